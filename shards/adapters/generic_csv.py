"""Any dataset as a CSV of `path,label[,split]`: the way in for data that has no adapter of its own.

Paths are URLs or paths relative to `videos`; image files become image records, so one list can mix
images and videos. An empty label means unlabelled (-1). Keys are the path (relative to `videos`, or the
URL without its protocol) minus the extension, with every other character than [A-Za-z0-9_-] made '_'.

A URL row must be in the scheme of `videos` (s3:// rows with an s3:// videos root); local paths (absolute
or file://) are always taken. A row in another scheme (https://, a second store) is refused unless
`other_schemes=True`: an annotation file must not make the job request any URL the cluster can reach.
"""
from __future__ import annotations

import csv
import io

from fsspec.core import url_to_fs

from shards.adapters.common import (IMAGE_EXTS, VIDEO_EXTS, AdapterResult, Collector, index_tree, open_url,
                                    read_classes, read_text, safe_key, split_name, to_url)
from shards.records import VideoRecord


def load(annotations: str, videos: str | None = None, split: str = "train", classes=None,
         other_schemes: bool = False) -> AdapterResult:
    out = Collector()
    fs, path = open_url(annotations, "annotations", must_be_dir=False)
    url = to_url(fs, path)
    rows = list(csv.reader(io.StringIO(read_text(fs, path))))
    has_header = bool(rows) and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]
    start = 2 if has_header else 1
    vfs, vroot = open_url(videos, "videos", must_be_dir=True) if videos else (None, None)
    found = {p for paths in index_tree(vfs, vroot, VIDEO_EXTS + IMAGE_EXTS).values() for p in paths} if vfs else set()
    entries = []
    for n, row in enumerate(rows[start - 1:], start):
        where = f"{url}:{n}"
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2 or not row[0].strip():
            out.fail(where, split, "annotations", f"row {row} is not 'path,label[,split]'; fix the row")
            continue
        entries.append((where, row[0].strip(), row[1].strip(), (row[2].strip() if len(row) > 2 else "") or split))
    names = read_classes(classes) or sorted({label for *_, label, _ in entries if label})
    index_of = {name: i for i, name in enumerate(names)}
    protocol = vfs.protocol if vfs else "file"
    schemes = {"file", *((protocol,) if isinstance(protocol, str) else protocol)}   # local paths are always fine
    for where, rel, label, row_split in entries:
        scheme = rel.split("://", 1)[0].lower() if "://" in rel else "file"
        if scheme not in schemes and not other_schemes:
            out.fail(where, row_split, "annotations", f"{rel} is a {scheme}:// URL but the videos are not; give "
                                                      f"--adapter-option other_schemes=true to fetch it")
            continue
        remote = "://" in rel or rel.startswith("/") or vroot is None
        efs, epath = url_to_fs(rel) if remote else (vfs, f"{vroot}/{rel.removeprefix('./')}")
        key = safe_key(rel.split("://")[-1].rsplit(".", 1)[0].removeprefix("./").lstrip("/"))
        if label and label not in index_of:
            out.fail(where, row_split, "annotations", f"label {label!r} is not in the given classes; fix it or add it", key)
            continue
        if not out.claim(where, row_split, key):
            continue
        if not (epath in found if not remote else efs.exists(epath)):
            out.fail(where, row_split, "fetch", f"no file {rel} (looked at {to_url(efs, epath)}); fix the path", key)
            continue
        media = "image" if split_name(epath)[2] in IMAGE_EXTS else "video"
        out.add(VideoRecord(key, row_split, index_of.get(label, -1), label, to_url(efs, epath), media=media))
    return out.finish(names)
