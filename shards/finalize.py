"""Builds the job's global outputs from the per-shard commit markers, after checking nothing was lost.

Everything here is derived from what is committed on storage, never from the driver's memory of the
run, so the outputs always agree with the shards on disk and a resumed job produces the same files as
an uninterrupted one. `manifest.json` is written last: its presence means the output is complete.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import io
import platform
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .plan import Plan, ShardSpec

# A WebM member's packet table (null for other members): per frame its packet's size and the container bytes
# before it, the frames that start a GOP, and per GOP a crc32 of its bytes (docs/shard_format.md).
PACKET_COLUMNS = ("frame_size", "frame_gap", "keyframes", "gop_crc32")
INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("label", pa.int32()), ("label_name", pa.string()),
    ("shard", pa.string()), ("offset", pa.int64()), ("size", pa.int64()), ("ext", pa.string()),
    ("num_frames", pa.int32()), ("fps", pa.float64()), ("width", pa.int32()), ("height", pa.int32()),
    ("duration", pa.float64()), ("codec", pa.string()), ("gop", pa.int32()), ("source", pa.string()),
    ("time_start", pa.float64()), ("time_end", pa.float64()), ("sha256", pa.string()),
    ("notes", pa.list_(pa.string())),
    ("frame_size", pa.list_(pa.uint32())), ("frame_gap", pa.list_(pa.uint16())), ("keyframes", pa.list_(pa.uint32())),
    ("gop_crc32", pa.list_(pa.uint32())),
])
FAILURE_SCHEMA = pa.schema([("source", pa.string()), ("split", pa.string()), ("stage", pa.string()),
                            ("reason", pa.string()), ("key", pa.string())])
_VERSIONED = ("vidscale", "ray", "av", "pyarrow", "fsspec", "s3fs", "numpy", "webdataset")


class IncompleteOutput(RuntimeError):
    """Some planned video is neither indexed nor recorded as a failure (or is both): a bug, never ignored."""


def check_shard(spec: ShardSpec, marker: dict | None) -> None:
    """Every planned record of the shard must be in exactly one place: the shard's rows or its failures."""
    if marker is None or marker["fingerprint"] != spec.fingerprint():
        raise IncompleteOutput(f"shard {spec.name} has no commit marker for the planned contents")
    planned = [r.key for r in spec.records]
    seen = Counter([row["key"] for row in marker["rows"]] + [f["key"] for f in marker["failures"]])
    missing = [k for k in planned if k not in seen]
    doubled = [k for k, n in seen.items() if n > 1]
    stray = sorted(set(seen) - set(planned))
    if missing or doubled or stray:
        raise IncompleteOutput(f"shard {spec.name}: videos missing {missing[:5]}, in two places {doubled[:5]}, "
                               f"never planned {stray[:5]}")


def tar_mismatch(spec: ShardSpec, marker: dict, listed: dict[str, int], root: str) -> str | None:
    """Why the shard on storage is not the one its marker committed (None when it is), from one listing.

    The marker holds the tar's size and sha256 as streamed, and rows cut from that same stream; a tar of
    the committed size whose rows all lie inside it is that stream's tar unless someone rewrote it with
    exactly as many bytes, which the lease keeps other jobs from doing. Rehashing instead would read
    every byte of the dataset again.
    """
    if not marker["rows"]:
        return None
    if marker["tar"] != spec.name + ".tar":
        return f"its marker names {marker['tar']}"
    size = listed.get(storage.join(root, marker["tar"]))
    if size is None:
        return "its tar is missing"
    if size != marker["size"]:
        return f"its tar has {size} bytes on storage but {marker['size']} were committed"
    if storage.join(root, marker["idx"]) not in listed:
        return "its DALI index is missing"
    outside = [r["key"] for r in marker["rows"]
               if r["shard"] != marker["tar"] or r["offset"] < 0 or r["offset"] + r["size"] > size]
    return f"index rows {outside[:3]} point outside its tar" if outside else None


def verify_shards(fs, root: str, plan: Plan) -> None:
    """Before any global file is written: every planned video is accounted for and every tar matches its marker.

    A shard that does not match loses its marker, so rerunning the same command rewrites exactly those.
    """
    listed: dict[str, int] = {}
    for split in plan.splits:   # one listing per split folder, however many shards
        folder = storage.join(root, split)
        if fs.isdir(folder):
            listed.update({entry["name"]: int(entry.get("size") or 0) for entry in fs.ls(folder, detail=True)})

    def mismatch(spec: ShardSpec) -> tuple[ShardSpec, str] | None:
        marker = read_marker(fs, root, spec)
        check_shard(spec, marker)
        why = tar_mismatch(spec, marker, listed, root)
        return (spec, why) if why else None
    with ThreadPoolExecutor(16) as pool:
        bad = [m for m in pool.map(mismatch, plan.shards) if m is not None]
    if bad:
        for path in [storage.join(root, spec.marker) for spec, _ in bad] + [storage.join(root, "manifest.json")]:
            if fs.exists(path):
                fs.rm_file(path)
        raise IncompleteOutput(f"{len(bad)} shards do not match their commit markers, so no manifest was written "
                               f"({'; '.join(f'{spec.name}: {why}' for spec, why in bad[:3])}): something else "
                               "wrote to the output. Their markers are removed: rerun the same command to rewrite them")


def read_marker(fs, root: str, spec: ShardSpec) -> dict | None:
    path = storage.join(root, spec.marker)
    return storage.read_json(fs, path) if fs.exists(path) else None


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    import av
    versions["ffmpeg"] = ".".join(map(str, av.library_versions.get("libavcodec", ())))
    return versions


def _write_split(fs, root: str, split: str, specs: list[ShardSpec], failures: list[dict], shards: list[dict]) -> dict:
    """Stream one split's rows marker by marker into its index: memory holds one shard's rows at a time.

    Appends the split's shard failures to `failures` and its tars to `shards`.
    """
    indexed, size = 0, 0
    with storage.atomic_write(fs, storage.join(root, split, "index.parquet")) as f, \
            pq.ParquetWriter(f, INDEX_SCHEMA) as index:
        for spec in specs:
            marker = read_marker(fs, root, spec)
            if marker["rows"]:
                index.write_table(pa.Table.from_pylist(marker["rows"], schema=INDEX_SCHEMA))
                shards.append({"split": split, "path": marker["tar"], "index": marker["idx"],
                               "samples": len(marker["rows"]), "size": marker["size"], "sha256": marker["sha256"]})
            failures += marker["failures"]
            indexed, size = indexed + len(marker["rows"]), size + marker["size"]
    return {"indexed": indexed, "bytes": size}


def write_outputs(plan: Plan, output: str, dataset: str, options: dict) -> dict:
    """Write indexes, failures, classes and (last) the manifest from the committed markers; returns the manifest.

    Raises `IncompleteOutput` (and writes nothing) if any planned video is unaccounted for or any tar does
    not match its marker.
    """
    fs, root = storage.resolve(output)
    fs.invalidate_cache()   # markers were written by other processes
    finals = [f"{split}/index.parquet" for split in plan.splits] + ["failures.parquet", "classes.txt", "manifest.json"]
    for name in finals:     # what a driver killed while finishing may have left
        storage.remove_stale_temporaries(fs, storage.join(root, name))
    verify_shards(fs, root, plan)
    failures = [f.to_dict() for f in plan.failures]
    shards: list[dict] = []
    splits = {split: _write_split(fs, root, split, [s for s in plan.shards if s.split == split], failures, shards)
              for split in plan.splits}
    for split, counts in splits.items():
        counts["failed"] = sum(f["split"] == split for f in failures)
        counts["videos"] = counts["indexed"] + counts["failed"]
        counts["shards"] = sum(s["split"] == split for s in shards)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(failures, schema=FAILURE_SCHEMA), buffer)
    with storage.atomic_write(fs, storage.join(root, "failures.parquet")) as f:
        f.write(buffer.getvalue())
    with storage.atomic_write(fs, storage.join(root, "classes.txt")) as f:
        f.write("".join(f"{c}\n" for c in plan.classes).encode())
    manifest = {
        "format": "vidscale-shards/1", "dataset": dataset, "options": options, "splits": splits,
        "classes": len(plan.classes), "shards": shards,
        "failures": {"total": len(failures), "by_stage": dict(Counter(f["stage"] for f in failures))},
        "versions": library_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    storage.write_json(fs, storage.join(root, "manifest.json"), manifest)
    return manifest
