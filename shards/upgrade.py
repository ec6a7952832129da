"""`python -m shards.upgrade OUTPUT [--split S]`: add the packet table to the index of shards written before
it, without re-encoding.

With each WebM member's packet table in the index (docs/shard_format.md) a loader reads just the GOPs a
view needs and parses nothing; an older output loads whole, parsed at load. This reads each member once
(whole shards, front to back, `workers` shards at a time), checks it against the index's sha256, computes
its table as the shard job does (`writer.packet_columns`), and rewrites atomically each shard's commit
marker (a resumed shard job rebuilds the index from those, so it keeps the columns) and then each split's
index.parquet. Tars are not touched. It holds the output's lease, so it never runs beside a shard job, and
rerunning it is safe: rows that have a table are not read again.
"""
from __future__ import annotations

import argparse
import hashlib
import posixpath
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .execute import Progress
from .finalize import INDEX_SCHEMA, PACKET_COLUMNS
from .lease import Lease, LeaseHeld
from .writer import packet_columns


class UpgradeError(ValueError):
    """The output cannot be upgraded as given (one line, naming the fix)."""


def upgrade(output: str, splits: list[str] | None = None, workers: int = 8, log: Callable[[str], None] = print,
            interval: float = 5.0) -> dict:
    """Upgrade the splits (all by default); returns {"upgraded", "had", "failed"} video counts.

    A video that cannot be upgraded (its bytes fail their sha256, its shard is missing) is logged in one
    line and keeps no table: it loads whole, as before, and the loader reports it if it is damaged.
    """
    fs, root = storage.resolve(output)
    if not fs.exists(storage.join(root, "manifest.json")):
        raise UpgradeError(f"{output} has no manifest.json, so it is not a finished shard job output: finish it by "
                           "rerunning the shard job with its arguments (it writes the packet table itself)")
    available = list(storage.read_json(fs, storage.join(root, "manifest.json"))["splits"])
    unknown = sorted(set(splits or ()) - set(available))
    if unknown:
        raise UpgradeError(f"--split {unknown[0]}: {output} has the splits {', '.join(available)}")
    with Lease(output, log=log):
        indexes = {split: _read_index(fs, storage.join(root, split, "index.parquet")) for split in splits or available}
        todo = {split: _needs_table(index) for split, index in indexes.items()}
        progress = Progress(total=sum(int(need.sum()) for need in todo.values()))
        log(f"upgrade: {progress.total} videos without a packet table in {', '.join(indexes)}")
        counts = {"upgraded": 0, "had": 0, "failed": 0}
        for split, index in indexes.items():
            shards = _upgrade_split(fs, root, index, todo[split], workers, progress, log, interval)
            counts["failed"] += sum(len(errors) for _, _, errors in shards)
            counts["upgraded"] += int(todo[split].sum()) - sum(len(errors) for _, _, errors in shards)
            counts["had"] += int((index.column("ext").to_numpy(zero_copy_only=False) == "webm").sum()
                                 - todo[split].sum())
            _write_index(fs, storage.join(root, split, "index.parquet"), index, shards)
        log(progress.line())
    return counts


def _read_index(fs, path: str) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f, use_threads=False)


def _needs_table(index: pa.Table) -> np.ndarray:
    """WebM rows without a packet table."""
    webm = index.column("ext").to_numpy(zero_copy_only=False) == "webm"
    if PACKET_COLUMNS[0] not in index.column_names:
        return webm
    return webm & index.column(PACKET_COLUMNS[0]).is_null().to_numpy(zero_copy_only=False)


def _upgrade_split(fs, root: str, index: pa.Table, needs: np.ndarray, workers: int, progress: Progress,
                   log: Callable[[str], None], interval: float) -> list[tuple[slice, dict, list[str]]]:
    """Per shard, in index order: its rows, their packet columns (Arrow arrays) and its errors."""
    shard = index.column("shard").to_numpy(zero_copy_only=False)
    bounds = np.flatnonzero(np.append(True, shard[1:] != shard[:-1])).tolist() + [len(shard)]
    lock = threading.Lock()

    def one(rows: slice) -> tuple[slice, dict, list[str]]:
        part = index.slice(rows.start, rows.stop - rows.start)
        columns, errors = _upgrade_shard(fs, root, part, needs[rows], progress, lock)
        for error in errors:
            log(f"upgrade: {error}")
        return rows, _packet_arrays(part, columns), errors

    with ThreadPoolExecutor(workers, thread_name_prefix="upgrade") as pool:
        futures = [pool.submit(one, slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
        while wait(futures, timeout=interval).not_done:
            with lock:
                log(progress.line())
        return [future.result() for future in futures]


def _upgrade_shard(fs, root: str, rows: pa.Table, needs: np.ndarray, progress: Progress,
                   lock: threading.Lock) -> tuple[dict[int, dict], list[str]]:
    """Read the shard's members that need a table, front to back, and update its commit marker; returns the
    new packet columns by row, and the errors."""
    shard = rows.column("shard")[0].as_py()
    keys = rows.column("key").to_pylist()
    todo = np.flatnonzero(needs).tolist()
    if not todo:
        return {}, []
    columns, errors = {}, []
    try:
        with fs.open(storage.join(root, shard), "rb") as tar:
            for i in todo:
                row = {name: rows.column(name)[i].as_py() for name in ("key", "offset", "size", "ext", "sha256")}
                tar.seek(row["offset"])
                found = _columns(tar.read(row["size"]), row)
                if isinstance(found, str):
                    errors.append(f"{shard} {row['key']}.{row['ext']}: {found}; it keeps no packet table and loads whole")
                else:
                    columns[i] = found
                with lock:
                    progress.done += 1
                    progress.failed += isinstance(found, str)
    except FileNotFoundError:
        with lock:
            progress.done += len(todo)
            progress.failed += len(todo)
        return {}, [f"{shard} is missing: restore it, or reshard it; its {len(todo)} videos keep no packet table"]
    if columns:
        _update_marker(fs, root, shard, keys, {keys[i]: c for i, c in columns.items()})
    return columns, errors


def _columns(data: bytes, row: dict) -> dict | str:
    """The member's packet columns, or why its bytes cannot give them."""
    if len(data) != row["size"]:
        return f"the tar ends {len(data)} bytes into it, where the index says {row['size']}: it is truncated"
    if hashlib.sha256(data).hexdigest() != row["sha256"]:
        return "its bytes fail the index's sha256 (a damaged tar, or a tar of another run)"
    columns = packet_columns(row["ext"], data)
    return columns if columns[PACKET_COLUMNS[0]] is not None else "it is not laid out as the WebM the shard job writes"


def _update_marker(fs, root: str, shard: str, keys: list[str], columns: dict[str, dict]) -> None:
    """Give the shard's commit marker the same columns, so a resumed shard job rebuilds the same index."""
    name = posixpath.splitext(shard)[0]
    path = storage.join(root, "_job", "done", name + ".json")
    if not fs.exists(path):       # a copy of the splits without the job's folder: the index is all there is
        return
    marker = storage.read_json(fs, path)
    if sorted(row["key"] for row in marker["rows"]) != sorted(keys):
        raise UpgradeError(f"the commit marker {path} and the index disagree on the videos of {shard}: rerun the shard "
                           "job on this output with its arguments first (it rebuilds the index from the markers)")
    for row in marker["rows"]:
        row.update(columns.get(row["key"], {}))
    storage.write_json(fs, path, marker)


def _packet_arrays(rows: pa.Table, columns: dict[int, dict]) -> dict[str, pa.Array]:
    """A shard's packet columns: the new tables where computed, what the index held elsewhere (Arrow arrays,
    not Python lists, so a split of 240k videos stays a few hundred MB until its index is written)."""
    arrays = {}
    for name in PACKET_COLUMNS:
        old = rows.column(name).to_pylist() if name in rows.column_names else [None] * len(rows)
        arrays[name] = pa.array([columns[i][name] if i in columns else value for i, value in enumerate(old)],
                                INDEX_SCHEMA.field(name).type)
    return arrays


def _write_index(fs, path: str, index: pa.Table, shards: list[tuple[slice, dict, list[str]]]) -> None:
    """The index with the packet columns, one row group per shard as the shard job writes it."""
    with storage.atomic_write(fs, path) as f, pq.ParquetWriter(f, INDEX_SCHEMA) as writer:
        for rows, arrays, _ in shards:
            part = index.slice(rows.start, rows.stop - rows.start)
            writer.write_table(pa.Table.from_arrays(
                [arrays[field.name] if field.name in arrays else part.column(field.name).cast(field.type)
                 for field in INDEX_SCHEMA], schema=INDEX_SCHEMA))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shards.upgrade",
                                     description="Add the packet table to the index of shards written before it, "
                                                 "without re-encoding (docs/shard_format.md).")
    parser.add_argument("output", help="a shard job's output (a local folder, s3://... or gs://...)")
    parser.add_argument("--split", action="append", help="upgrade only this split (repeatable); default: all")
    parser.add_argument("--workers", type=int, default=8, help="shards read at once (default 8)")
    args = parser.parse_args(argv)
    try:
        counts = upgrade(args.output, args.split, args.workers, log=lambda line: print(line, flush=True))
    except (UpgradeError, LeaseHeld) as e:
        print(f"upgrade: error: {e}", file=sys.stderr)
        return 2
    print(f"upgrade: {counts['upgraded']} videos now have a packet table ({counts['had']} had one); "
          + (f"{counts['failed']} could not be upgraded (above) and load whole" if counts["failed"] else "none failed"))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
