"""The fetch stage: the bytes of the rows an epoch reads, checked, and cut to the GOPs their views need.

Reading goes through `source.ShardReader`: consecutive rows of a shard become one byte-range read, a
pool of `readers` threads reads a few ahead, retries what storage drops, and checks each video's size and
sha256, naming what is wrong in a failure. Each row is then cut, view by view, to the GOPs its frames sit
in (`gops.py`; the row's WebM parsed once). Rows are handed on in the order their views come out, so the
stream does not depend on which read finishes first.

Where the cut runs: with reader threads (the default below 8 cores) in the thread that consumes the stream,
since the WebM parse and the cut hold the interpreter lock while reading and checksums release it; with
reader processes (the default from 8 cores, `processes_win`) in `readers` worker processes, which take
chunks of consecutive rows of a shard, read, check and cut them, and hand the cut bytes over in shared
memory (`_shipped`: one file in /dev/shm per chunk, mapped here and unlinked at once, so it lives as long as
the arrays viewing it). Through the pool's pipe instead, receiving the bytes cost this process about 0.35 ms
per TSN-8 clip, more than the rest of its host work (docs/pipelines.md, "Host cost"). This module imports
neither DALI nor torch: a worker process starts with numpy, fsspec and pyarrow only.

With `gop_reads`, a row is read as the GOPs its views' frames sit in (`ShardReader.read_gops`: a few byte
ranges, each GOP checked against its crc32) and cut from those ranges without a WebM parse; a row whose
index has no packet table comes back whole and is cut as above.
"""
from __future__ import annotations

import dataclasses
import glob
import itertools
import mmap
import multiprocessing
import os
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipelines.gops import MemberParts, cut, webm_packets
from pipelines.source import SampleError, ShardIndex, ShardReader

CHUNK_ROWS = 32    # rows per reader-process task, consecutive in one shard (one read): each task costs this
                   # process about 1 ms to hand out and take back, so 8 rows made 0.13 ms per clip of it
SHARED = "/dev/shm"   # where reader processes leave a chunk's bytes for the loader (Linux's shared memory)


@dataclass(frozen=True)
class Fetched:
    """One row, ready for batching: per view of it, the bytes to decode and its frames as indices into them."""
    row: int
    encoded: tuple[bytes | np.ndarray, ...] = ()  # per view (uint8 arrays from reader processes); empty if failed
    frames: tuple[np.ndarray | None, ...] = ()    # per view; None for images
    cut: tuple[bool, ...] = ()                    # per view: `encoded` is a GOP cut
    failure: tuple[str, str] | None = None        # (stage, reason) of the SampleError (which does not pickle)

    @property
    def error(self) -> SampleError | None:
        return None if self.failure is None else SampleError(*self.failure)


def prepared(fetched: Iterator[tuple[int, MemberParts | bytes | SampleError]], frames: Iterator[np.ndarray | None],
             cut_gops, media: str, whole: Callable[[int], bytes | SampleError]) -> Iterator[Fetched]:
    """Each fetched row with its views cut: `frames` gives, row by row, the frames of every view of it
    (views, T), or None for images; `cut_gops()` says whether to cut; `whole(row)` reads a row's member
    again when it came as GOP ranges but cuts have stopped (a decoder rejected one mid-epoch)."""
    for (row, data), views in zip(fetched, frames):
        if isinstance(data, MemberParts) and not cut_gops():
            data = whole(row)
        if isinstance(data, SampleError):
            yield Fetched(row, failure=(data.stage, data.reason))
            continue
        if views is None:
            yield Fetched(row, (data,), (None,), (False,))
            continue
        if isinstance(data, MemberParts):      # read for these views: every one of them can be cut
            pieces = [data.cut(wanted) for wanted in views]
            yield Fetched(row, tuple(one for one, _ in pieces), tuple(at for _, at in pieces), (True,) * len(views))
            continue
        packets = webm_packets(data) if cut_gops() and media == "video" else None
        encoded, local, was_cut = [], [], []
        for wanted in views:
            cuttable = packets is not None and wanted.max() < len(packets.spans)
            one, at = cut(packets, wanted) if cuttable else (data, wanted)   # only the GOPs these frames sit in
            encoded.append(one)
            local.append(at)
            was_cut.append(cuttable)
        yield Fetched(row, tuple(encoded), tuple(local), tuple(was_cut))


def fetched(reader: ShardReader, reads: np.ndarray, frames: Iterator[np.ndarray | None], gop_reads: bool):
    """`prepared`'s input: (row, what was read) for `reads`, and each row's views' frames, in read order."""
    if not gop_reads:
        return reader(reads), frames
    frames, wanted = itertools.tee(frames)
    return reader.read_gops(zip(reads.tolist(), (None if f is None else f.ravel() for f in wanted))), frames


def read_whole(reader: ShardReader, row: int) -> bytes | SampleError:
    ((_, data),) = reader([row])
    return data


class Fetcher:
    """The fetch stage of a loader: `prepared` over an epoch's reads, in this process or in reader processes."""

    def __init__(self, reader: ShardReader, storage: tuple, readers: int, processes: bool, gop_reads: bool):
        """`storage` is (url, split, storage options): how a worker process opens the index; `gop_reads`:
        read the GOPs the views need while cuts are made, else whole members."""
        self.reader, self.storage, self.readers, self.processes = reader, storage, readers, processes
        self.gop_reads = gop_reads
        self._pool: ProcessPoolExecutor | None = None
        self._prefix = f"vidscale-{os.getpid()}-{id(self):x}-"    # this fetcher's chunks in SHARED

    def __call__(self, plan, start_batch: int, cut_gops) -> Iterator[tuple[int, Fetched]]:
        """(row, Fetched) of every row of batches `start_batch`.., in the order their views come out;
        `cut_gops()` says whether to cut (asked per row, or per chunk in processes)."""
        reads = plan.reads_from(start_batch)
        if self.processes:
            rows = self._in_processes(plan, reads, cut_gops)
        else:
            gop_reads = self.gop_reads and cut_gops()
            rows = prepared(*fetched(self.reader, reads, plan.row_frames(reads), gop_reads), cut_gops, plan.media,
                            lambda row: read_whole(self.reader, row))
        return _in_order(((one.row, one) for one in rows), plan.rows_from(start_batch))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        _remove_chunks(self._prefix)

    def _in_processes(self, plan, reads: np.ndarray, cut_gops) -> Iterator[Fetched]:
        if self._pool is None:   # spawn: the loader's process runs DALI and CUDA threads, which fork does not copy
            self._pool = ProcessPoolExecutor(self.readers, multiprocessing.get_context("spawn"),
                                             initializer=_start_worker, initargs=(*self.storage, self.reader.verify))
            weakref.finalize(self, _remove_chunks, self._prefix)     # where close() is never called
        ahead: deque = deque()
        frames = plan.row_frames(reads)
        try:
            for rows in _shard_runs(reads, plan.index["shard"]):
                chunk = [next(frames) for _ in rows]
                cutting = cut_gops()
                ahead.append(self._pool.submit(_in_worker, rows, chunk, cutting, self.gop_reads and cutting,
                                               plan.media, self._prefix))
                if len(ahead) >= 2 * self.readers:
                    yield from _received(ahead.popleft().result())
            while ahead:
                yield from _received(ahead.popleft().result())
        finally:
            for future in ahead:
                future.cancel()


def _remove_chunks(prefix: str) -> None:
    """Unlink the shared files of chunks read ahead and never taken."""
    for left in glob.glob(os.path.join(SHARED, glob.escape(prefix) + "*")):
        os.unlink(left)


def processes_win() -> bool:
    """Reader processes cost a process start and more CPU per clip in all, but keep the training process's
    share at about 0.2 ms per clip instead of 1.2 (docs/host_ceiling.md): worth it where cores are many,
    as beside a GPU, not on a laptop or a 2-core CI machine."""
    return len(os.sched_getaffinity(0)) >= 8


def _shard_runs(rows: np.ndarray, shards: np.ndarray) -> Iterator[np.ndarray]:
    """`rows` cut into runs of at most CHUNK_ROWS consecutive rows of one shard."""
    run: list[int] = []
    for row in rows.tolist():
        if run and (len(run) == CHUNK_ROWS or shards[row] != shards[run[0]]):
            yield np.array(run)
            run = []
        run.append(row)
    if run:
        yield np.array(run)


def _in_order(fetched: Iterator[tuple[int, Fetched]], order: np.ndarray) -> Iterator[tuple[int, Fetched]]:
    """(row, fetched) in `order`; holds rows read early until their turn (about a shuffle buffer's worth)."""
    pending = {}
    for row in order.tolist():
        while row not in pending:
            got, data = next(fetched)
            pending[got] = data
        yield row, pending.pop(row)


_WORKER_READER: ShardReader | None = None    # a worker process's own reader


def _start_worker(url: str, split: str | None, storage_options: dict | None, verify: bool) -> None:
    global _WORKER_READER
    _WORKER_READER = ShardReader(ShardIndex(url, split, storage_options), readers=1, verify=verify)


@dataclass(frozen=True)
class Shipped:
    """A worker's chunk: its rows without their bytes, and where each view's bytes sit in the shared file
    `name` (None: the bytes travel in `rows`, where shared memory was short)."""
    rows: list[Fetched]
    name: str | None = None
    size: int = 0
    spans: tuple[tuple[tuple[int, int], ...], ...] = ()   # per row, per view: (offset, length)


_CHUNKS = itertools.count()    # a worker process's chunks, for their files' names


def _in_worker(rows: np.ndarray, frames: list, cut_gops: bool, gop_reads: bool, media: str, prefix: str) -> Shipped:
    done = list(prepared(*fetched(_WORKER_READER, rows, iter(frames), gop_reads), lambda: cut_gops, media,
                         lambda row: read_whole(_WORKER_READER, row)))
    return _shipped(done, f"{prefix}{os.getpid()}-{next(_CHUNKS)}")


def _shipped(rows: list[Fetched], name: str) -> Shipped:
    """`rows` with their bytes copied into a new file of SHARED; sent whole where it has no room for them."""
    spans, offset = [], 0
    for row in rows:
        where = []
        for one in row.encoded:
            where.append((offset, len(one)))
            offset += len(one)
        spans.append(tuple(where))
    if offset == 0:
        return Shipped(rows)
    path = os.path.join(SHARED, name)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError:                            # no shared memory here
        return Shipped(rows)
    try:
        os.posix_fallocate(fd, 0, offset)      # a full tmpfs says so here, not with a SIGBUS on the first write
        with mmap.mmap(fd, offset) as shared:
            for row, where in zip(rows, spans):
                for one, (start, length) in zip(row.encoded, where):
                    shared[start:start + length] = one
    except OSError:
        os.unlink(path)
        return Shipped(rows)
    finally:
        os.close(fd)
    return Shipped([dataclasses.replace(row, encoded=()) for row in rows], name, offset, tuple(spans))


def _received(chunk: Shipped) -> list[Fetched]:
    """The worker's rows with their bytes as views of its shared file, which is unlinked here: the mapping,
    and the memory, live as long as the arrays viewing it."""
    if chunk.name is None:
        return chunk.rows
    path = os.path.join(SHARED, chunk.name)
    fd = os.open(path, os.O_RDONLY)
    try:
        shared = np.frombuffer(mmap.mmap(fd, chunk.size, prot=mmap.PROT_READ), np.uint8)
    finally:
        os.close(fd)
        os.unlink(path)
    return [dataclasses.replace(row, encoded=tuple(shared[start:start + length] for start, length in where))
            for row, where in zip(chunk.rows, chunk.spans)]
