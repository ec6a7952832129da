"""Something-Something V2: labels.json ({template: id}), train/validation/test JSON lists, videos <id>.webm.

Class indices are the official ids from labels.json (what published numbers use), not a re-sort.
An entry's class is its "template" with the [brackets] removed; the free-text "label" (with the
objects filled in) would give thousands of classes.
"""
from __future__ import annotations

import json

from shards.adapters.common import AdapterResult, Collector, index_tree, open_url, read_text, to_url
from shards.records import VideoRecord

SPLIT_FILES = {"train": "train.json", "val": "validation.json", "test": "test.json"}


def load(annotations: str, videos: str, splits=None) -> AdapterResult:
    out = Collector()
    fs, root = open_url(annotations, "annotations", must_be_dir=True)
    files = sorted(fs.find(root))
    labels_file = next((p for p in files if p.endswith("labels.json")), None)
    if labels_file is None:
        raise FileNotFoundError(f"no labels.json under {annotations!r}; pass the SSv2 annotation folder")
    ids = {name: int(i) for name, i in json.loads(read_text(fs, labels_file)).items()}
    classes = [name for name, _ in sorted(ids.items(), key=lambda kv: kv[1])]
    if sorted(ids.values()) != list(range(len(ids))):
        raise ValueError(f"{to_url(fs, labels_file)}: class ids must be 0..{len(ids) - 1} without gaps")
    vfs, vroot = open_url(videos, "videos", must_be_dir=True)
    found = index_tree(vfs, vroot)
    for split, suffix in SPLIT_FILES.items():
        path = next((p for p in files if p.endswith(suffix) and not p.endswith("labels.json")), None)
        if path is None or (splits is not None and split not in splits):
            continue
        url = to_url(fs, path)
        for n, entry in enumerate(json.loads(read_text(fs, path))):
            where = f"{url}:#{n}"
            vid = str(entry.get("id", "")).strip() if isinstance(entry, dict) else ""
            if not vid:
                out.fail(where, split, "annotations", f"entry without an id: {entry!r}; fix or delete it")
                continue
            template = entry.get("template")
            name = template.replace("[", "").replace("]", "") if template else ""
            if split != "test" and name not in ids:
                out.fail(where, split, "annotations", f"template {template!r} is not in labels.json; fix the entry "
                                                      f"or use the labels.json of the same release", vid)
                continue
            if not out.claim(where, split, vid):
                continue
            if vid not in found:
                out.fail(where, split, "fetch", f"no video {vid}.webm under {videos}; download it or delete the entry", vid)
                continue
            out.add(VideoRecord(vid, split, ids.get(name, -1), name, to_url(vfs, found[vid][0])))
    return out.finish(classes)
