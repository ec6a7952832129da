"""HMDB51: <class>_test_split<N>.txt files tagging each video 1 (train), 2 (test) or 0 (not in split N).

Tag-0 videos belong to the other splits by the benchmark's definition, so they are neither records
nor failures. Classes are the sorted class names (the usual 0-50 order). Videos: <class>/<name>.avi.
"""
from __future__ import annotations

import re

from shards.adapters.common import AdapterResult, Collector, index_tree, open_url, pick, read_text, safe_key, to_url
from shards.records import VideoRecord

TAGS = {"1": "train", "2": "test"}


def load(annotations: str, videos: str, split: int = 1) -> AdapterResult:
    out = Collector()
    fs, root = open_url(annotations, "annotations", must_be_dir=True)
    pattern = re.compile(rf"(.+)_test_split{split}\.txt$")
    lists = {m.group(1): p for p in sorted(fs.find(root)) if (m := pattern.match(p.rsplit("/", 1)[-1]))}
    if not lists:
        raise FileNotFoundError(f"no <class>_test_split{split}.txt under {annotations!r}; pass the HMDB51 split folder")
    classes = sorted(lists)
    vfs, vroot = open_url(videos, "videos", must_be_dir=True)
    found = index_tree(vfs, vroot)
    for label, name in enumerate(classes):
        url = to_url(fs, lists[name])
        for n, line in enumerate(read_text(fs, lists[name]).splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            where = f"{url}:{n}"
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                out.fail(where, "train", "annotations", f"{line.strip()!r} is not '<video> <0|1|2>'; fix the line")
                continue
            if parts[1] == "0":
                continue
            stem, split_name = parts[0].rsplit(".", 1)[0], TAGS[parts[1]]
            key = safe_key(stem)
            if not out.claim(where, split_name, key):
                continue
            if stem not in found:
                out.fail(where, split_name, "fetch", f"no video {parts[0]} under {videos}; download HMDB51 again", key)
                continue
            out.add(VideoRecord(key, split_name, label, name, to_url(vfs, pick(found[stem], name))))
    return out.finish(classes)
