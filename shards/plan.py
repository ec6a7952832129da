"""Turns the adapter's records into a fixed list of shards: which video goes into which shard.

The plan must come out identical every time the job runs with the same arguments on the same inputs,
because resuming means "skip the shards already committed": records are sorted by key, shuffled with
the seed (so every shard mixes classes instead of holding one class), then cut into shards greedily by
the size of their *source* files. Source sizes are known before any work and do not change between
runs; transcoded sizes are neither. Downscaling usually shrinks videos, so shards come out smaller than
`shard_size` (see docs/shard_format.md). Sizes cost one listing of the videos folder, not a request per
video.

Records whose keys would break the tar layout, or repeat within a split, are turned into
annotation-stage failures here, so the writer never meets them. So are records whose split is not a
plain folder name: a split becomes a folder of the output, and `../x` would write outside it. This is
the one place every adapter's records pass, so no adapter needs its own check.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

from . import storage
from .records import Failure, VideoRecord


@dataclass(frozen=True)
class ShardSpec:
    split: str
    index: int
    records: tuple[VideoRecord, ...]

    @property
    def name(self) -> str:
        """Path of the tar relative to the output root, without extension."""
        return f"{self.split}/shard-{self.index:06d}"

    @property
    def marker(self) -> str:
        """The commit marker's path relative to the output root; its existence is the shard's commit."""
        return f"_job/done/{self.name}.json"

    def fingerprint(self) -> str:
        """Identifies the shard's exact contents; a commit marker only counts if this matches."""
        blob = json.dumps([r.to_dict() for r in self.records], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class Plan:
    shards: tuple[ShardSpec, ...]
    failures: tuple[Failure, ...]     # annotation-stage failures (adapter's and ours)
    classes: tuple[str, ...]          # line i of classes.txt is the name of label i (the adapter's order)
    splits: tuple[str, ...]

    def fingerprint(self) -> str:
        blob = json.dumps({"shards": [[s.name, s.fingerprint()] for s in self.shards],
                           "failures": [f.to_dict() for f in self.failures],
                           "classes": list(self.classes)}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    @property
    def num_records(self) -> int:
        return sum(len(s.records) for s in self.shards)


def split_problem(split: str) -> str | None:
    """Why `split` cannot name a folder of the output (one path segment, not `.` or `..`), or None."""
    if split in ("", ".", "..") or any(c in split for c in "/\\\0"):
        return (f"split {split!r} is not a folder name (one path segment, no '/', '\\' or '..'); fix the split "
                f"of its annotation row, e.g. train or val")
    return None


def _key_problem(key: str, seen: set[str]) -> str | None:
    if not key:
        return "the sample key is empty"
    if "." in key or "/" in key:
        return f"sample key {key!r} contains '.' or '/', which would break WebDataset's grouping by key"
    if key in seen:
        return f"duplicate sample key {key!r} in this split; only the first occurrence is sharded"
    return None


def validate_keys(records: list[VideoRecord]) -> tuple[list[VideoRecord], list[Failure]]:
    """Split records into shardable ones and annotation-stage failures (bad or repeated keys)."""
    keep, failures, seen = [], [], {}
    for record in records:
        split_seen = seen.setdefault(record.split, set())
        problem = _key_problem(record.key, split_seen)
        if problem:
            failures.append(Failure(record.source, record.split, "annotations", problem, record.key))
        else:
            split_seen.add(record.key)
            keep.append(record)
    return keep, failures


def source_sizes(records: list[VideoRecord], videos: str) -> dict[str, int]:
    """Bytes per source URL: one recursive listing of `videos`, a stat only for sources outside it.

    A missing source counts as 0 bytes; the transcoder reports it as a fetch failure later.
    """
    fs, root = storage.resolve(videos)
    listed = fs.find(root, detail=True) if fs.isdir(root) else {}
    sizes = {}
    for record in records:
        path = fs._strip_protocol(storage.absolute_url(record.source))
        if path in listed:
            sizes[record.source] = int(listed[path].get("size") or 0)
            continue
        try:
            source_fs, source_path = storage.resolve(record.source)
            sizes[record.source] = int(source_fs.size(source_path) or 0)
        except (OSError, ValueError):
            sizes[record.source] = 0
    return sizes


def pack(records: list[VideoRecord], sizes: dict[str, int], shard_size: int, seed: int) -> list[ShardSpec]:
    """Shuffle each split with `seed`, then start a new shard whenever the next video would pass `shard_size`."""
    shards = []
    for split in sorted({r.split for r in records}):
        members = sorted((r for r in records if r.split == split), key=lambda r: r.key)
        random.Random(f"{seed}:{split}").shuffle(members)
        groups, total = [[]], 0
        for record in members:
            size = sizes.get(record.source, 0)
            if groups[-1] and total + size > shard_size:
                groups.append([])
                total = 0
            groups[-1].append(record)
            total += size
        shards += [ShardSpec(split, i, tuple(g)) for i, g in enumerate(groups) if g]
    return shards


def make_plan(records: list[VideoRecord], failures: list[Failure], classes: list[str], videos: str,
              shard_size: int, seed: int, splits: tuple[str, ...] | None = None) -> Plan:
    """The whole plan from an adapter's output; `splits` keeps only those splits (None: all)."""
    bad = [r for r in records if split_problem(r.split)]
    records = [r for r in records if not split_problem(r.split)]
    failures = failures + [Failure(r.source, r.split, "annotations", f"{r.source}: {split_problem(r.split)}", r.key)
                           for r in bad]
    available = sorted({r.split for r in records} | {f.split for f in failures if not split_problem(f.split)})
    if splits:
        missing = [s for s in splits if s not in available]
        if missing:
            raise ValueError(f"{missing} not in the annotations, which hold splits {available}; pick from those")
        records = [r for r in records if r.split in splits]
        failures = [f for f in failures if f.split in splits]
    records, key_failures = validate_keys(records)
    shards = pack(records, source_sizes(records, videos), shard_size, seed)
    chosen = tuple(splits) if splits else tuple(available)
    return Plan(tuple(shards), tuple(failures) + tuple(key_failures), tuple(classes), chosen)
