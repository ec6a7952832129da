"""The loader's host stages: everything between the epoch plan and the DALI call.

  fetch    the bytes of every row the plan reads (`source.ShardReader`: byte-range reads shard by shard,
           size and sha256 checked, in `readers` threads), handed on in the order the views need them;
  cut      each view's bytes cut down to the GOPs its frames sit in (`gops.py`), its frames renumbered;
  batches  the plan's batches as arrays (`HostBatch`), a view whose bytes failed replaced by a flagged copy
           of a good one and recorded in the shared `LoaderState`.

Reading only the GOPs a view needs changes two places: `fetch` passes the reader `plan.frames_needed(rows)`
(each row with the frames all its views decode) instead of the rows, and `Cutter` cuts from the ranges the
reader returns instead of the whole file.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipelines.gops import cut, webm_packets
from pipelines.plan import EpochPlan, Views
from pipelines.source import SampleError, ShardReader
from pipelines.state import LoaderState


@dataclass(frozen=True)
class HostBatch:
    """One batch as DALI is fed it: the plan's views (stand-ins flagged) and, per view, the bytes to decode."""
    views: Views
    encoded: tuple[np.ndarray, ...] | None   # uint8 per view; None when no view of the batch could be read
    frames: np.ndarray | None                # int32 (views, T): indices into `encoded`; None for images
    cut: np.ndarray                          # bool per view: `encoded` is a GOP cut of the video

    def __len__(self) -> int:
        return len(self.views)

    def one(self, i: int) -> HostBatch:
        """View `i` alone."""
        return HostBatch(self.views.take([i]), None if self.encoded is None else (self.encoded[i],),
                         None if self.frames is None else self.frames[i:i + 1], self.cut[i:i + 1])


# ---------------------------------------------------------------- fetch

def fetch(reader: ShardReader, plan: EpochPlan, start_batch: int) -> Iterator[tuple[int, bytes | SampleError]]:
    """(row, bytes or the reason it has none) for every row of batches `start_batch`.., read shard by
    shard and handed on in the order its views come out."""
    return in_order(reader(plan.reads_from(start_batch)), plan.rows_from(start_batch))


def in_order(fetched: Iterator[tuple[int, bytes | SampleError]], order: np.ndarray) -> Iterator:
    """(row, data) in `order`; holds rows read early until their turn (about a shuffle buffer's worth)."""
    pending = {}
    for row in order.tolist():
        while row not in pending:
            got, data = next(fetched)
            pending[got] = data
        yield row, pending.pop(row)


# ---------------------------------------------------------------- cut

class Cutter:
    """Per row, its packet table (parsed once, whatever its number of views); per view, the GOP cut."""

    def __init__(self, state: LoaderState, media: str):
        self.state, self.media = state, media

    def packets(self, data: bytes):
        """What a cut needs of the row; None where the row is fed whole."""
        return webm_packets(data) if self.state.cut_gops and self.media == "video" else None

    @staticmethod
    def view(data: bytes, packets, frames: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, bool]:
        """(bytes to decode, the frames as indices into them, cut or not)."""
        if packets is not None and frames.max() < len(packets.spans):
            encoded, local = cut(packets, frames)
            return np.frombuffer(encoded, np.uint8), local, True
        return np.frombuffer(data, np.uint8), frames, False


# ---------------------------------------------------------------- batches

def host_batches(plan: EpochPlan, fetched: Iterator[tuple[int, bytes | SampleError]], start_batch: int,
                 state: LoaderState, cutter: Cutter) -> Iterator[HostBatch]:
    """The plan's batches `start_batch`.. with their bytes; failed views recorded and stood in for."""
    held: dict[int, tuple] = {}            # row -> (data, packets) until its last view is batched
    final_row = int(plan.order[-1])        # padding repeats it: held to the end
    stand_in = None
    b = plan.config.batch_size
    for k in range(start_batch, plan.num_batches):
        views = plan.batch(k)
        encoded, frames, cuts, failed = [], [], [], []
        for i, row in enumerate(views.rows.tolist()):
            while row not in held:
                got, data = next(fetched)
                held[got] = (data, None if isinstance(data, SampleError) else cutter.packets(data))
            data, packets = held[row]
            if isinstance(data, SampleError):
                failed.append((row, data))
                one, local, was_cut = None, None, False
            else:
                one, local, was_cut = cutter.view(data, packets, None if views.frames is None else views.frames[i])
            encoded.append(one)
            frames.append(local)
            cuts.append(was_cut)
        done = plan.last_position(np.array(list(held))) < (k + 1) * b
        for row, gone in zip(list(held), done.tolist()):
            if gone and row != final_row:
                del held[row]
        batch = _repaired(views, encoded, frames, cuts, failed, stand_in, state)
        stand_in = batch.one(len(batch) - 1) if batch.encoded is not None else None
        yield batch


def _repaired(views: Views, encoded: list, frames: list, cuts: list, failed: list, stand_in: HostBatch | None,
              state: LoaderState) -> HostBatch:
    """The batch with each failed view recorded and replaced by a flagged copy of the batch's last good
    view, or of the previous batch's last view; zeros (encoded None) where there is neither."""
    for row, error in failed:
        state.record(row, error)
    ok = np.array([e is not None for e in encoded])
    if not failed:
        return _batch(views, encoded, frames, cuts)
    if ok.any():
        good = int(np.flatnonzero(ok)[-1])
        source = np.where(ok, np.arange(len(views)), good)
        return _batch(views.take(source, views.valid & ok), [encoded[i] for i in source],
                      [frames[i] for i in source], [cuts[i] for i in source])
    if stand_in is not None:
        n = len(views)
        return _batch(stand_in.views.take(np.zeros(n, np.int64), np.zeros(n, bool)), [stand_in.encoded[0]] * n,
                      [None if stand_in.frames is None else stand_in.frames[0]] * n, [bool(stand_in.cut[0])] * n)
    return HostBatch(views.take(np.arange(len(views)), np.zeros(len(views), bool)), None, None,
                     np.zeros(len(views), bool))


def _batch(views: Views, encoded: list, frames: list, cuts: list) -> HostBatch:
    return HostBatch(views, tuple(encoded), None if frames[0] is None else np.array(frames, np.int32),
                     np.array(cuts, bool))
