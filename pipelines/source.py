"""Streams samples out of the shards on any fsspec storage (local disk, s3://, gs://).

The split's `index.parquet` says where every video's bytes are (shard, offset, size) and what they hold
(frames, fps, size), so a whole epoch is planned before a byte is read: which rows this rank reads, in
which order, and how many batches that makes. Reading then needs no tar parsing: consecutive rows of a
shard become one byte-range read (a whole shard, or the part of it this rank owns), fetched by a pool
of threads a few reads ahead and delivered in plan order, so the stream is deterministic for a seed
however the reads finish. DALI's own webdataset reader is not used because it cannot read s3://.

Epoch policy (every rank gets the same number of batches; see docs/pipelines.md):
  train: shards in a seeded per-epoch order, rows in shard order, cut into `world_size` contiguous equal
         parts; the few rows past an equal split and past the last full batch are left out of this epoch
         (different ones each epoch, since the shard order changes).
  eval:  rows in index order cut into contiguous parts of sizes differing by at most one; the loader
         pads the last batches with duplicates flagged `valid=False`, so each video counts once.
"""
from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow.parquet as pq

INDEX_FILE = "index.parquet"
CLASSES_FILE = "classes.txt"
_COLUMNS = ("key", "label", "label_name", "shard", "offset", "size", "ext", "num_frames", "fps", "width", "height",
            "codec", "sha256")
_PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class SampleError(Exception):
    """One sample cannot be used; `stage` says where it failed ("fetch", "verify", "decode")."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason = stage, reason


class ShardIndex:
    """The split's Parquet index as numpy columns, plus the filesystem its shards live on.

    `url` is a split folder (`<output>/train`, holding index.parquet) or the shard job's output root
    with `split` naming the folder. Shard paths in the index are relative to the output root, and an
    index naming a shard outside it is refused: a crafted index must not make the loader read any file.
    """

    def __init__(self, url: str, split: str | None = None, storage_options: dict | None = None):
        self.fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        path = path.rstrip("/")
        if split is not None:
            path = posixpath.join(path, split)
        index = posixpath.join(path, INDEX_FILE)
        if not self.fs.exists(index):
            raise FileNotFoundError(_no_index(self.fs, url, path, split))
        self.url, self.root = url, posixpath.dirname(path)
        with self.fs.open(index, "rb") as f:
            table = pq.read_table(f, columns=list(_COLUMNS))
        if table.num_rows == 0:
            raise ValueError(f"{index} lists no samples; was every video of this split a failure? "
                             f"(see failures.parquet beside the split folders)")
        self.columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in _COLUMNS}
        self._check_shards(index)
        self.keys = self.columns["key"]
        self.class_names = self._read_classes()

    def _check_shards(self, index: str) -> None:
        shards, first = np.unique(self.columns["shard"], return_index=True)
        for shard, row in zip(shards, first):
            if not posixpath.normpath(posixpath.join(self.root, shard)).startswith(self.root.rstrip("/") + "/"):
                raise ValueError(f"{index} row {row} names shard {shard!r}, outside the shard root {self.root}; the "
                                 f"index is damaged or was not written by the shard job: write the shards again")

    def _read_classes(self) -> tuple[str, ...] | None:
        """The shard job's classes.txt beside the split folders (line i names label i); None without one."""
        path = posixpath.join(self.root, CLASSES_FILE)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            return tuple(line.strip() for line in f.read().decode("utf-8").splitlines() if line.strip())

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    @property
    def media(self) -> str:
        """"image" when the split holds images (jpg members), else "video"."""
        return "image" if str(self.columns["ext"][0]).lower() in ("jpg", "jpeg", "png") else "video"

    def shard_path(self, row: int) -> str:
        return posixpath.join(self.root, self.columns["shard"][row])


def _no_index(fs, url: str, path: str, split: str | None) -> str:
    """The one-line error for a folder without an index: name the splits found where they were looked for."""
    root = posixpath.dirname(path) if split is not None else path
    splits = sorted(posixpath.basename(posixpath.dirname(p)) for p in fs.glob(posixpath.join(root, "*", INDEX_FILE)))
    where = f"{url!r} has no split {split!r}" if split is not None else f"no {INDEX_FILE} in {url!r}"
    if splits:
        return (f"{where}: it is a shard job's output with the splits {', '.join(splits)}; "
                f"pass split={splits[0]!r} (or the split folder {url.rstrip('/')}/{splits[0]})")
    return f"{where}: give a split folder written by pipelines/shard_kinetics.py, or its output root with split="


# ---------------------------------------------------------------- planning

def shard_order(index: ShardIndex, seed: int | None, epoch: int) -> np.ndarray:
    """All rows, shard by shard in byte order; the shards shuffled by (seed, epoch) unless seed is None."""
    shards, first = np.unique(index["shard"], return_inverse=True)
    rank_of_shard = np.arange(len(shards))
    if seed is not None:
        rank_of_shard = np.random.default_rng([seed, epoch]).permutation(len(shards))
    return np.lexsort((index["offset"], rank_of_shard[first]))


def rank_part(num_rows: int, rank: int, world_size: int, equal: bool) -> slice:
    """Contiguous part of `num_rows` for `rank`: equal sizes (dropping the rest) or sizes within one of each other."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if equal:
        size = num_rows // world_size
        return slice(rank * size, (rank + 1) * size)
    return slice(rank * num_rows // world_size, (rank + 1) * num_rows // world_size)


def shuffled(items: Iterable, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """WebDataset-style shuffle buffer: each item leaves at a random moment among the next `buffer_size`."""
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = int(rng.integers(buffer_size))
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


# ---------------------------------------------------------------- reading

@dataclass(frozen=True)
class _Read:
    path: str
    start: int
    end: int
    rows: tuple[int, ...]


class ShardReader:
    """Fetches the bytes of index rows with `readers` threads; yields (row, bytes or SampleError) in order.

    A storage error is retried `retries` times with doubling waits (object stores drop connections
    under load); one that outlasts them, or a missing shard, fails the rows of that read only. Bytes are
    checked against the index's size and sha256, so a damaged shard shows up as a named failure.
    """

    def __init__(self, index: ShardIndex, readers: int = 8, read_bytes: int = 16 << 20, retries: int = 4,
                 backoff_s: float = 0.2, verify: bool = True):
        self.index, self.readers, self.read_bytes = index, readers, read_bytes
        self.retries, self.backoff_s, self.verify = retries, backoff_s, verify

    def __call__(self, rows: Iterable[int]) -> Iterator[tuple[int, bytes | SampleError]]:
        reads = self._plan_reads(rows)
        with ThreadPoolExecutor(self.readers, thread_name_prefix="shard-reader") as pool:
            ahead: deque = deque()
            for read in reads:
                ahead.append(pool.submit(self._fetch, read))
                if len(ahead) >= 2 * self.readers:
                    yield from ahead.popleft().result()
            while ahead:
                yield from ahead.popleft().result()

    def _plan_reads(self, rows: Iterable[int]) -> Iterator[_Read]:
        """Group consecutive rows of one shard into reads of at most `read_bytes` (one row may exceed it)."""
        offset, size = self.index["offset"], self.index["size"]
        group: list[int] = []
        for row in rows:
            row = int(row)
            if group and (self.index["shard"][row] != self.index["shard"][group[0]]
                          or offset[row] < offset[group[-1]]
                          or offset[row] + size[row] - offset[group[0]] > self.read_bytes):
                yield self._read(group)
                group = []
            group.append(row)
        if group:
            yield self._read(group)

    def _read(self, group: list[int]) -> _Read:
        offset, size = self.index["offset"], self.index["size"]
        return _Read(self.index.shard_path(group[0]), int(offset[group[0]]),
                     int(offset[group[-1]] + size[group[-1]]), tuple(group))

    def _fetch(self, read: _Read) -> list[tuple[int, bytes | SampleError]]:
        try:
            blob = self._cat(read)
        except FileNotFoundError:
            error = SampleError("fetch", f"{read.path} is missing; restore it, or {self._reshard(read.rows[0])}")
            return [(row, error) for row in read.rows]
        except Exception as e:  # noqa: BLE001 - any storage failure fails these rows, not the epoch
            error = SampleError("fetch", f"{read.path} bytes {read.start}-{read.end}: {type(e).__name__}: {e} "
                                         f"(still failing after {self.retries} retries)")
            return [(row, error) for row in read.rows]
        return [(row, self._check(row, blob, read.start)) for row in read.rows]

    def _cat(self, read: _Read) -> bytes:
        for attempt in range(self.retries + 1):
            try:
                return self.index.fs.cat_file(read.path, start=read.start, end=read.end)
            except _PERMANENT:
                raise
            except Exception:
                if attempt == self.retries:
                    raise
                time.sleep(self.backoff_s * 2 ** attempt)

    def _check(self, row: int, blob: bytes, start: int) -> bytes | SampleError:
        begin = int(self.index["offset"][row]) - start
        data = blob[begin:begin + int(self.index["size"][row])]
        if len(data) != self.index["size"][row]:
            return SampleError("fetch", self._short(row, len(data)))
        if self.verify and hashlib.sha256(data).hexdigest() != self.index["sha256"][row]:
            return SampleError("verify", self._mismatch(row, data))
        return data

    # A failure's reason names the tar and the fix. These tell a tar of another run (another member where the
    # index points, or the same clip in other bytes) from a damaged or truncated one; they run on failures only.

    def _short(self, row: int, got: int) -> str:
        path = self.index.shard_path(row)
        same_shard = np.flatnonzero(self.index["shard"] == self.index["shard"][row])
        misplaced = self._misplaced(int(same_shard[np.argmin(self.index["offset"][same_shard])]))
        if misplaced:
            return f"{path} {misplaced}: {self._other_run(row)}"
        return (f"{path} ends {got} bytes into {self._member(row)}, which the index says has "
                f"{self.index['size'][row]}: the tar is truncated (an interrupted copy or upload?); copy it again, or {self._reshard(row)}")

    def _mismatch(self, row: int, data: bytes) -> str:
        path, member = self.index.shard_path(row), self._member(row)
        misplaced = self._misplaced(row)
        if misplaced:
            return f"{path} {misplaced}: {self._other_run(row)}"
        if _packets(data) != int(self.index["num_frames"][row]):
            return (f"{member} in {path} fails its sha256 and no longer parses as the indexed video: the tar is "
                    f"damaged; restore it from a good copy, or {self._reshard(row)}")
        return f"{path} holds a complete {member} with other bytes than the index's: {self._other_run(row)}"

    def _misplaced(self, row: int) -> str | None:
        """What the tar holds where the index puts `row`'s member, unless it is that member (by its header)."""
        path, member, size = self.index.shard_path(row), self._member(row), int(self.index["size"][row])
        found = _tar_member_before(self.index.fs, path, int(self.index["offset"][row]))
        if found is None:
            return f"has no tar member where the index puts {member}"
        if member.startswith(found[0]) and found[1] == size:   # startswith: GNU tar cuts names at 100 characters
            return None
        return f"holds {found[0]} ({found[1]} bytes) where the index expects {member} ({size} bytes)"

    def _member(self, row: int) -> str:
        return f"{self.index.keys[row]}.{self.index['ext'][row]}"

    def _other_run(self, row: int) -> str:
        return (f"the tar and the index come from different runs; rerun the shard job on this output with its "
                f"arguments (it rebuilds the index from the committed shards), and if this stays, {self._reshard(row)}")

    def _reshard(self, row: int) -> str:
        """How to rewrite one shard: the job redoes every shard without a commit marker."""
        shard = posixpath.splitext(self.index["shard"][row])[0]
        marker = posixpath.join(self.index.root, "_job", "done", shard + ".json")
        return f"reshard it: delete {marker} and rerun the shard job on this output with its arguments"


def _tar_member_before(fs, path: str, offset: int) -> tuple[str, int] | None:
    """(name, size) of the tar header whose data starts at `offset`; None where there is no valid header."""
    if offset < tarfile.BLOCKSIZE:
        return None
    try:
        header = tarfile.TarInfo.frombuf(fs.cat_file(path, start=offset - tarfile.BLOCKSIZE, end=offset),
                                         "utf-8", "surrogateescape")
    except (tarfile.HeaderError, OSError):
        return None
    return header.name, header.size


def _packets(data: bytes) -> int:
    """Video packets of a complete file (one per frame in what the shard job writes); -1 if it does not parse."""
    import av   # only on this diagnostic path

    try:
        with av.open(io.BytesIO(data)) as container:
            return sum(1 for packet in container.demux(video=0) if packet.size)
    except Exception:  # noqa: BLE001 - whatever fails to parse is not a complete video
        return -1
