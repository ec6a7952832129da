"""Streams samples out of the shards on any fsspec storage (local disk, s3://, gs://).

The split's `index.parquet` says where every video's bytes are (shard, offset, size) and what they hold
(frames, fps, size), so a whole epoch is planned before a byte is read: which rows this rank reads, in
which order, and how many batches that makes. Reading then needs no tar parsing: consecutive rows of a
shard become one byte-range read (a whole shard, or the part of it this rank owns), fetched by a pool
of threads a few reads ahead and delivered in plan order, so the stream is deterministic for a seed
however the reads finish. DALI's own webdataset reader is not used because it cannot read s3://.

Two read modes (docs/pipelines.md, "Reading shards"):
  whole  `ShardReader(index)(rows)`: each row's whole member, checked against the index's sha256.
  GOPs   `ShardReader(index).read_gops((row, frames) ...)`: where the index holds the row's packet table
         (`gops.PacketTable`, written by the shard job or `python -m shards.upgrade`), only the GOPs that
         `frames` (every frame the row's views need) sit in, as a few byte ranges merged where closer than
         `gap`, each GOP checked against its crc32; a row without a table comes back whole, as above.

What the loader's stages call:
  fetch  `reader.read_gops(requests)` -> (row, MemberParts | bytes | SampleError), in request order;
         `len(parts.pieces)` ranges and `parts.nbytes` bytes were read for a row (bytes: `len(data)`).
  cut    per view: `parts.cut(view_frames)` -> (IVF bytes, positions); for whole bytes, as before,
         `gops.webm_packets(data)` and `gops.cut(packets, view_frames)` (None: feed the bytes uncut).
  mode   `gop_reads_win(index)`: the measured default (GOP reads on local disks, whole reads on object storage).
  note   `packet_table_note(index)`: None, or the one line to print once when the index lacks packet tables
         (shards written before them: they load whole and are parsed at load, as before).

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
import itertools
import posixpath
import tarfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipelines.gops import FOURCC, MemberParts, PacketTable, byte_ranges, corrupt_gops

INDEX_FILE = "index.parquet"
CLASSES_FILE = "classes.txt"
_COLUMNS = ("key", "label", "label_name", "shard", "offset", "size", "ext", "num_frames", "fps", "width", "height",
            "codec", "sha256")
PACKET_COLUMNS = ("frame_size", "frame_gap", "keyframes", "gop_crc32")   # docs/shard_format.md; may be absent
DEFAULT_GAP = 32 << 10      # GOP reads: ranges at most this far apart are read as one (docs/pipelines.md)
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
            present = pq.read_schema(f).names
            f.seek(0)
            table = pq.read_table(f, columns=list(_COLUMNS) + [c for c in PACKET_COLUMNS if c in present])
        if table.num_rows == 0:
            raise ValueError(f"{index} lists no samples; was every video of this split a failure? "
                             f"(see failures.parquet beside the split folders)")
        self.columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in _COLUMNS}
        self._check_shards(index)
        self.keys = self.columns["key"]
        self.packets = PacketColumns(table) if set(PACKET_COLUMNS) <= set(table.column_names) else None
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

    def packet_table(self, row: int) -> PacketTable | None:
        """The row's packet table; None for indexes or rows without one (shards written before it, not WebM)."""
        fourcc = FOURCC.get(self.columns["codec"][row])
        if self.packets is None or fourcc is None:
            return None
        return self.packets.table(row, fourcc, int(self.columns["width"][row]), int(self.columns["height"][row]))

    @property
    def without_packet_table(self) -> int:
        """VP8/VP9 videos whose rows hold no packet table: these load whole and are parsed at load."""
        webm = np.isin(self.columns["codec"], list(FOURCC))
        if self.packets is None:
            return int(webm.sum())
        return int((webm & ~self.packets.present).sum())


class PacketColumns:
    """The index's packet tables as flat numpy arrays, one per column: the values of all rows end to end and
    where each row's begin. 6 bytes per frame (uint32 size, uint16 gap) and 8 per GOP, and no Python object
    per row or frame (docs/shard_format.md gives the figure per 1000 videos)."""

    def __init__(self, table: pa.Table):
        self.values, self.bounds = {}, {}
        for name in PACKET_COLUMNS:
            column = table.column(name)
            column = column.cast(pa.large_list(column.type.value_type)).combine_chunks()
            self.bounds[name] = column.offsets.to_numpy()
            self.values[name] = column.values.to_numpy()
        first = PACKET_COLUMNS[0]
        self.present = table.column(first).is_valid().to_numpy(zero_copy_only=False) & (np.diff(self.bounds[first]) > 0)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.values.values(), *self.bounds.values(), self.present))

    def table(self, row: int, fourcc: bytes, width: int, height: int) -> PacketTable | None:
        if not self.present[row]:
            return None
        size, gap, keyframes, crc = (self.values[name][self.bounds[name][row]:self.bounds[name][row + 1]]
                                     for name in PACKET_COLUMNS)
        return PacketTable(np.cumsum(gap + size, dtype=np.int64) - size, size, keyframes, crc, fourcc, width, height)


def gop_reads_win(index: ShardIndex) -> bool:
    """Whether reading only the GOPs a view needs beats reading whole members, for this index: it must hold
    packet tables, and live on a local (or mounted) disk. Through s3fs each range is an HTTP request that
    costs about 5 ms of client CPU (measured on moto), against 1 to 4 ms per MB for a whole-member read of
    up to 16 MB, so on object storage the 8 ranges of a TSN-8 view cost far more than the bytes they save."""
    return index.packets is not None and isinstance(index.fs, LocalFileSystem)


def packet_table_note(index: ShardIndex) -> str | None:
    """The one line a loader prints when some videos of the index have no packet table (None when all do)."""
    missing = index.without_packet_table
    if not missing:
        return None
    return (f"{missing} of {len(index)} videos in {index.url} have no packet table in the index (shards written "
            f"before it), so they are read whole and parsed at load; `python -m shards.upgrade {index.root}` adds "
            "it without re-encoding (or reshard), and loading reads only the GOPs a view needs")


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

def fetch_ranges(fs, paths: list[str], starts: list[int], ends: list[int], retries: int,
                 backoff_s: float) -> list[bytes | Exception]:
    """The byte ranges, with the reader's policy for storage errors: a range that fails is retried `retries`
    times with doubling waits (object stores drop connections under load), except a permanent error (a
    missing file). Per range: its bytes, or the error that outlasted the retries."""
    out: list = [None] * len(paths)
    todo = list(range(len(paths)))
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        got = _cat_ranges(fs, [paths[i] for i in todo], [starts[i] for i in todo], [ends[i] for i in todo])
        for i, data in zip(todo, got):
            out[i] = data
        todo = [i for i in todo if isinstance(out[i], Exception) and not isinstance(out[i], _PERMANENT)]
        if not todo:
            break
    return out


def _cat_ranges(fs, paths: list[str], starts: list[int], ends: list[int]) -> list[bytes | Exception]:
    """`fs.cat_ranges` (s3fs sends the ranges concurrently), except on a local disk: there fsspec opens the
    file again for every range, which costs twice the CPU of reading a GOP, so each file is opened once."""
    if not isinstance(fs, LocalFileSystem):
        return fs.cat_ranges(paths, starts, ends, on_error="return")
    out: list = []
    for path, indices in itertools.groupby(range(len(paths)), key=paths.__getitem__):
        indices = list(indices)
        until = len(out) + len(indices)
        try:
            with fs.open(path, "rb") as f:
                for i in indices:
                    f.seek(starts[i])
                    out.append(f.read(ends[i] - starts[i]))
        except Exception as e:  # noqa: BLE001 - returned per range, like cat_ranges(on_error="return")
            out += [e] * (until - len(out))
    return out


@dataclass(frozen=True)
class _Read:
    path: str
    start: int
    end: int
    rows: tuple[int, ...]
    frames: tuple          # per row: the frames its views need (GOP reads), or None (whole reads)


class ShardReader:
    """Fetches the bytes of index rows with `readers` threads; yields (row, bytes or SampleError) in order.

    A storage error is retried `retries` times with doubling waits (object stores drop connections
    under load); one that outlasts them, or a missing shard, fails the rows of that read only. Bytes are
    checked against the index's size and sha256 (whole members) or each GOP's crc32 (`read_gops`), so a
    damaged shard shows up as a named failure.
    """

    def __init__(self, index: ShardIndex, readers: int = 8, read_bytes: int = 16 << 20, retries: int = 4,
                 backoff_s: float = 0.2, verify: bool = True, gap: int = DEFAULT_GAP):
        self.index, self.readers, self.read_bytes = index, readers, read_bytes
        self.retries, self.backoff_s, self.verify, self.gap = retries, backoff_s, verify, gap

    def __call__(self, rows: Iterable[int]) -> Iterator[tuple[int, bytes | SampleError]]:
        return self._pipelined(self._plan_reads((row, None) for row in rows), self._fetch)

    def read_gops(self, requests: Iterable[tuple[int, np.ndarray]]) -> Iterator[tuple[int, MemberParts | bytes | SampleError]]:
        """(row, what was read), in the order of `requests` = (row, every frame its views need): the GOPs those
        frames sit in (`MemberParts`, cut per view with `.cut(frames)`), or the whole member where the row
        has no packet table. A GOP that fails its crc32 fails the row ("verify"), so it is never decoded."""
        return self._pipelined(self._plan_reads(requests), self._fetch_gops)

    def _pipelined(self, reads: Iterator[_Read], fetch) -> Iterator[tuple[int, object]]:
        with ThreadPoolExecutor(self.readers, thread_name_prefix="shard-reader") as pool:
            ahead: deque = deque()
            for read in reads:
                ahead.append(pool.submit(fetch, read))
                if len(ahead) >= 2 * self.readers:
                    yield from ahead.popleft().result()
            while ahead:
                yield from ahead.popleft().result()

    def _plan_reads(self, requests: Iterable[tuple[int, np.ndarray | None]]) -> Iterator[_Read]:
        """Group consecutive rows of one shard into reads spanning at most `read_bytes` (one row may exceed it)."""
        offset, size = self.index["offset"], self.index["size"]
        group: list[tuple[int, np.ndarray | None]] = []
        for row, frames in requests:
            row = int(row)
            if group and (self.index["shard"][row] != self.index["shard"][group[0][0]]
                          or offset[row] < offset[group[-1][0]]
                          or offset[row] + size[row] - offset[group[0][0]] > self.read_bytes):
                yield self._read(group)
                group = []
            group.append((row, frames))
        if group:
            yield self._read(group)

    def _read(self, group: list[tuple[int, np.ndarray | None]]) -> _Read:
        offset, size = self.index["offset"], self.index["size"]
        first, last = group[0][0], group[-1][0]
        return _Read(self.index.shard_path(first), int(offset[first]), int(offset[last] + size[last]),
                     tuple(row for row, _ in group), tuple(frames for _, frames in group))

    def _fetch(self, read: _Read) -> list[tuple[int, bytes | SampleError]]:
        (blob,) = fetch_ranges(self.index.fs, [read.path], [read.start], [read.end], self.retries, self.backoff_s)
        if isinstance(blob, Exception):
            error = self._fetch_error(read.path, read.rows[0], blob, read.start, read.end)
            return [(row, error) for row in read.rows]
        return [(row, self._check(row, blob, read.start)) for row in read.rows]

    def _fetch_gops(self, read: _Read) -> list[tuple[int, MemberParts | bytes | SampleError]]:
        """One `cat_ranges` for the read's rows: their GOP ranges, or whole members where a row has no table."""
        tables = [self._table(row, frames) for row, frames in zip(read.rows, read.frames)]
        ranges = [byte_ranges(table, frames, self.gap) if table is not None else ([0], [int(self.index["size"][row])])
                  for row, frames, table in zip(read.rows, read.frames, tables)]
        bases = [int(self.index["offset"][row]) for row in read.rows]
        starts = [base + s for base, (row_starts, _) in zip(bases, ranges) for s in row_starts]
        ends = [base + e for base, (_, row_ends) in zip(bases, ranges) for e in row_ends]
        got = iter(fetch_ranges(self.index.fs, [read.path] * len(starts), starts, ends, self.retries, self.backoff_s))
        out = []
        for row, frames, table, base, (row_starts, row_ends) in zip(read.rows, read.frames, tables, bases, ranges):
            pieces = [next(got) for _ in row_starts]
            out.append((row, self._check_gops(row, frames, table, base, row_starts, row_ends, pieces)))
        return out

    def _table(self, row: int, frames: np.ndarray | None) -> PacketTable | None:
        """The row's packet table, unless it cannot serve `frames` (then the row is read whole, cut as before)."""
        table = self.index.packet_table(row)
        if table is None or frames is None or np.max(frames) >= table.num_frames:
            return None
        return table

    def _check_gops(self, row: int, frames, table: PacketTable | None, base: int, starts: list[int],
                    ends: list[int], pieces: list) -> MemberParts | bytes | SampleError:
        for start, end, piece in zip(starts, ends, pieces):
            if isinstance(piece, Exception):
                return self._fetch_error(self.index.shard_path(row), row, piece, base + start, base + end)
            if len(piece) != end - start:
                return SampleError("fetch", self._short(row, start + len(piece)))
        if table is None:
            return self._check(row, pieces[0], base)
        bad = corrupt_gops(table, starts, pieces, frames) if self.verify else []
        if bad:
            return SampleError("verify", self._gop_mismatch(row, table, bad))
        return MemberParts(table, starts, pieces)

    def _fetch_error(self, path: str, row: int, error: Exception, start: int, end: int) -> SampleError:
        if isinstance(error, FileNotFoundError):
            return SampleError("fetch", f"{path} is missing; restore it, or {self._reshard(row)}")
        return SampleError("fetch", f"{path} bytes {start}-{end}: {type(error).__name__}: {error} "
                                    f"(still failing after {self.retries} retries)")

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

    def _gop_mismatch(self, row: int, table: PacketTable, bad: list[int]) -> str:
        path, member = self.index.shard_path(row), self._member(row)
        misplaced = self._misplaced(row)
        if misplaced:
            return f"{path} {misplaced}: {self._other_run(row)}"
        starts, ends = table.gop_spans
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        return (f"{member} in {path} fails the crc32 of GOP {bad[0]} (its bytes {starts[bad[0]]}-{ends[bad[0]]}){more}: "
                f"the tar is damaged; restore it from a good copy, or {self._reshard(row)}")

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
