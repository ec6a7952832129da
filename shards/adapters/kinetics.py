"""Kinetics-400/600/700: the official CSVs plus a video tree of trimmed clips or whole YouTube videos.

People hold Kinetics in two ways: clips already cut to the 10 s window and named
`<youtube_id>_<start:06d>_<end:06d>.<ext>` (flat, or under <split>/ or <label>/ folders), or the full
downloads `<youtube_id>.<ext>` that still need trimming. Both are found from one listing; a clip wins
over a full video when both exist because it needs no seek.
"""
from __future__ import annotations

import csv
import io
import math

from shards.adapters.common import Collector, AdapterResult, index_tree, open_url, pick, read_classes, read_text, to_url
from shards.records import VideoRecord

REQUIRED = ("youtube_id", "time_start", "time_end")


def clip_name(youtube_id: str, start: int, end: int) -> str:
    """The name every Kinetics download tool gives a trimmed clip, and our sample key."""
    return f"{youtube_id}_{start:06d}_{end:06d}"


SPLIT_ALIASES = {"validate": "val", "validation": "val", "valid": "val", "training": "train", "testing": "test"}


def _split_of(value: str, file_name: str) -> str:
    """The row's split column, else the file's name (train.csv, validate.csv, test.csv)."""
    split = (value or "").strip().lower() or file_name.rsplit("/", 1)[-1].rsplit(".", 1)[0].lower()
    return SPLIT_ALIASES.get(split, split)


def _parse_rows(fs, path: str, url: str, out: Collector) -> list[tuple]:
    """(where, split, label or None, youtube_id, start, end) for each well-formed row; failures for the rest."""
    reader = csv.DictReader(io.StringIO(read_text(fs, path)))
    header = [h.strip() for h in reader.fieldnames or []]
    if not set(REQUIRED) <= set(header):
        raise ValueError(f"{url} is not a Kinetics annotation CSV: its header is {header}, expected "
                         f"label,youtube_id,time_start,time_end,split")
    reader.fieldnames = header
    rows = []
    for row in reader:
        where = f"{url}:{reader.line_num}"
        split = _split_of(row.get("split") or "", path)
        yid = (row.get("youtube_id") or "").strip()
        label = (row.get("label") or "").strip() or None
        try:
            start, end = float(row["time_start"]), float(row["time_end"])
            valid = math.isfinite(start) and math.isfinite(end) and 0 <= start < end
        except (TypeError, ValueError):
            valid = None
        if not yid or valid is None:
            missing = "youtube_id" if not yid else "a number in time_start/time_end"
            out.fail(where, split, "annotations", f"malformed row (needs {missing}): {dict(row)}; fix or delete the row")
        elif not valid:
            out.fail(where, split, "annotations", f"time_end {end:g} must be after time_start {start:g} (both >= 0); "
                                                  f"fix the times", clip_name(yid, int(max(start, 0)), int(max(end, 0))))
        elif label is None and split != "test" and "label" in header:
            out.fail(where, split, "annotations", f"row has no label but split {split!r} needs one; add the label",
                     clip_name(yid, int(start), int(end)))
        else:
            rows.append((where, split, label, yid, start, end))
    return rows


def load(annotations: str, videos: str, classes=None, splits=None) -> AdapterResult:
    """`classes`: a list or a file of names (default: the sorted labels of the train split, else of all rows);
    `splits`: keep only these splits."""
    out = Collector()
    fs, path = open_url(annotations, "annotations")
    files = sorted(p for p in fs.find(path) if p.lower().endswith(".csv")) if fs.isdir(path) else [path]
    if not files:
        raise FileNotFoundError(f"no .csv files under annotations {annotations!r}; pass the Kinetics CSV folder")
    rows = [r for f in files for r in _parse_rows(fs, f, to_url(fs, f), out)]
    names = read_classes(classes)
    if names is None:  # from all rows, before any split filter, so indices never depend on the filter
        labelled = [r[2] for r in rows if r[2] is not None and r[1] == "train"] or [r[2] for r in rows if r[2] is not None]
        names = sorted(set(labelled))
    if splits is not None:
        rows = [r for r in rows if r[1] in set(splits)]
        out.result.failures = [f for f in out.result.failures if f.split in set(splits)]
    index_of = {name: i for i, name in enumerate(names)}
    origin = "the classes file" if isinstance(classes, str) else "classes=" if classes else "the train split"

    vfs, vroot = open_url(videos, "videos", must_be_dir=True)
    found = index_tree(vfs, vroot)
    for where, split, label, yid, start, end in rows:
        key = clip_name(yid, int(start), int(end))
        if label is not None and label not in index_of:
            out.fail(where, split, "annotations", f"label {label!r} is not one of the {len(names)} classes of {origin}; "
                                                  f"fix the label or pass classes= with it", key)
            continue
        if not out.claim(where, split, key):
            continue
        if key in found:
            source, times = pick(found[key], split, label or ""), (None, None)
        elif yid in found:
            source, times = pick(found[yid], split, label or ""), (start, end)
        else:
            out.fail(where, split, "fetch", f"no video {key}.<ext> (trimmed clip) or {yid}.<ext> (full video) under "
                                            f"{videos}; download it or delete the row", key)
            continue
        out.add(VideoRecord(key, split, index_of[label] if label else -1, label or "", to_url(vfs, source), *times))
    return out.finish(names)
