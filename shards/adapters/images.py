"""An ImageFolder tree `<split>/<class>/<image>` as image records, for joint image + video training.

Image files anywhere else in the tree are reported rather than dropped, since a misplaced folder
usually means a whole class is missing from a split.
"""
from __future__ import annotations

from shards.adapters.common import IMAGE_EXTS, AdapterResult, Collector, open_url, safe_key, split_name, to_url
from shards.records import VideoRecord


def load(annotations: str | None = None, videos: str | None = None) -> AdapterResult:
    out = Collector()
    fs, root = open_url(videos or annotations, "image folder", must_be_dir=True)
    placed = []
    for path in sorted(fs.find(root)):
        parts = path[len(root):].strip("/").split("/")
        if split_name(path)[2] not in IMAGE_EXTS:
            continue
        if len(parts) != 3:
            out.fail(to_url(fs, path), parts[0] if len(parts) > 1 else "", "annotations",
                     f"not at <split>/<class>/<image> under {videos or annotations}; move it or delete it")
            continue
        placed.append((parts[0], parts[1], path))
    classes = sorted({c for _, c, _ in placed})
    for split, name, path in placed:
        key, where = safe_key(f"{name}_{split_name(path)[1]}"), to_url(fs, path)
        if out.claim(where, split, key):
            out.add(VideoRecord(key, split, classes.index(name), name, where, media="image"))
    return out.finish(classes)
