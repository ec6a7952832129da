"""The fetch stage: the bytes of the rows an epoch reads, checked, and cut to the GOPs their views need.

The rows go out in chunks (consecutive rows of one shard, in read order) to `readers` worker threads, or
worker processes (`reader_processes=True`). A worker reads its chunk with one byte-range read
(`source.ShardReader`: retries, size and sha256 checks, failures named), and cuts every view of each row
to the GOPs its frames sit in (`gops.py`), parsing the row's WebM once. The chunks come back in read
order and the rows are handed on in the order their views come out, so the stream does not depend on
which worker finishes first.

Threads share one interpreter lock: reading and sha256 release it, the WebM parse and the cut do not, so
with threads the parse runs on one core at a time. Processes run it on every core, and return the cut
bytes through a pipe (docs/pipelines.md, "Host cost", measures both). This module imports neither DALI nor
torch: a worker process starts with numpy, fsspec and pyarrow only.

Reading only the GOPs a view needs changes `fetch_rows` alone: it gets each row's views' frames already.
"""
from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipelines.gops import cut, webm_packets
from pipelines.source import SampleError, ShardIndex, ShardReader

CHUNK_ROWS = 8     # rows per task: one read of up to 8 consecutive videos of a shard


@dataclass(frozen=True)
class Fetched:
    """One row, ready for batching: per view of it, the bytes to decode and its frames as indices into them."""
    row: int
    encoded: tuple[bytes, ...] = ()               # per view; empty when the row failed
    frames: tuple[np.ndarray | None, ...] = ()    # per view; None for images
    cut: tuple[bool, ...] = ()                    # per view: `encoded` is a GOP cut
    failure: tuple[str, str] | None = None        # (stage, reason) of the SampleError (which does not pickle)

    @property
    def error(self) -> SampleError | None:
        return None if self.failure is None else SampleError(*self.failure)


def fetch_rows(reader: ShardReader, rows: list[int], frames: list[np.ndarray | None], cut_gops: bool,
               media: str) -> list[Fetched]:
    """Read `rows` (consecutive rows of one shard), check them, and cut each row's views: `frames[i]` holds
    the frames of every view of row i, (views, T), or None for images."""
    out = []
    for (row, data), views in zip(reader(rows), frames):
        if isinstance(data, SampleError):
            out.append(Fetched(row, failure=(data.stage, data.reason)))
            continue
        if views is None:
            out.append(Fetched(row, (data,), (None,), (False,)))
            continue
        packets = webm_packets(data) if cut_gops and media == "video" else None
        encoded, local, was_cut = [], [], []
        for wanted in views:
            cuttable = packets is not None and wanted.max() < len(packets.spans)
            one, at = cut(packets, wanted) if cuttable else (data, wanted)   # only the GOPs these frames sit in
            encoded.append(one)
            local.append(at)
            was_cut.append(cuttable)
        out.append(Fetched(row, tuple(encoded), tuple(local), tuple(was_cut)))
    return out


class Fetcher:
    """Runs `fetch_rows` over an epoch's reads in `readers` threads or processes."""

    def __init__(self, reader: ShardReader, storage: tuple, readers: int, processes: bool):
        """`storage` is (url, split, storage options): how a worker process opens the index."""
        self.reader, self.storage, self.readers, self.processes = reader, storage, readers, processes
        self._pool: Executor | None = None

    def __call__(self, plan, start_batch: int, cut_gops) -> Iterator[tuple[int, Fetched]]:
        """(row, Fetched) of every row of batches `start_batch`.., in the order their views come out;
        `cut_gops()` says, chunk by chunk, whether to cut."""
        return _in_order(self._chunks(plan, start_batch, cut_gops), plan.rows_from(start_batch))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _chunks(self, plan, start_batch: int, cut_gops) -> Iterator[tuple[int, Fetched]]:
        pool, ahead = self._executor(), deque()
        single = ShardReader(self.reader.index, readers=1, read_bytes=self.reader.read_bytes, retries=self.reader.retries,
                             backoff_s=self.reader.backoff_s, verify=self.reader.verify)
        try:
            for rows in _shard_runs(plan.reads_from(start_batch), plan.index["shard"]):
                views = plan.views_of(rows)
                frames = [None] * len(rows) if views.frames is None else list(
                    views.frames.reshape(len(rows), plan.per_row, -1))
                args = (rows.tolist(), frames, cut_gops(), plan.media)
                ahead.append(pool.submit(_in_worker, *args) if self.processes else pool.submit(fetch_rows, single, *args))
                if len(ahead) >= 2 * self.readers:
                    yield from ((f.row, f) for f in ahead.popleft().result())
            while ahead:
                yield from ((f.row, f) for f in ahead.popleft().result())
        finally:
            for future in ahead:
                future.cancel()

    def _executor(self) -> Executor:
        if self._pool is None:
            if self.processes:   # spawn: the loader's process runs DALI and CUDA threads, which fork does not copy
                self._pool = ProcessPoolExecutor(self.readers, multiprocessing.get_context("spawn"),
                                                 initializer=_start_worker,
                                                 initargs=(*self.storage, self.reader.verify))
            else:
                self._pool = ThreadPoolExecutor(self.readers, thread_name_prefix="fetch")
        return self._pool


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


def _in_worker(rows, frames, cut_gops, media) -> list[Fetched]:
    return fetch_rows(_WORKER_READER, rows, frames, cut_gops, media)
