"""The batch stage: the plan's batches as the arrays DALI is fed, with stand-ins for failed views.

A view whose row could not be read is recorded in the shared `LoaderState` and replaced by a flagged
(`valid=False`) copy of the batch's last good view, or of the previous batch's last view; a batch with
neither comes out as zeros, all flagged.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipelines.fetch import Fetched
from pipelines.plan import EpochPlan, Views
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


def host_batches(plan: EpochPlan, fetched: Iterator[tuple[int, Fetched]], start_batch: int,
                 state: LoaderState) -> Iterator[HostBatch]:
    """The plan's batches `start_batch`.. with the fetched bytes; failed views recorded and stood in for."""
    held: dict[int, Fetched] = {}          # rows until their last view is batched
    final_row = int(plan.order[-1])        # padding repeats it: held to the end
    stand_in = None
    b = plan.config.batch_size
    for k in range(start_batch, plan.num_batches):
        views = plan.batch(k)
        encoded, frames, cuts, failed = [], [], [], []
        which = np.minimum(np.arange(k * b, (k + 1) * b), plan.num_views - 1) % plan.per_row   # of the row's views
        for row, view in zip(views.rows.tolist(), which.tolist()):
            while row not in held:
                got, one = next(fetched)
                held[got] = one
            one = held[row]
            if one.failure is not None:
                failed.append(one)
                encoded.append(None)
                frames.append(None)
                cuts.append(False)
            else:
                encoded.append(np.frombuffer(one.encoded[view], np.uint8))
                frames.append(one.frames[view])
                cuts.append(one.cut[view])
        done = plan.last_position(np.array(list(held))) < (k + 1) * b
        for row, gone in zip(list(held), done.tolist()):
            if gone and row != final_row:
                del held[row]
        batch = _repaired(views, encoded, frames, cuts, failed, stand_in, state)
        stand_in = batch.one(len(batch) - 1) if batch.encoded is not None else None
        yield batch


def _repaired(views: Views, encoded: list, frames: list, cuts: list, failed: list[Fetched],
              stand_in: HostBatch | None, state: LoaderState) -> HostBatch:
    """The batch with each failed view recorded and replaced by a flagged copy of the batch's last good
    view, or of the previous batch's last view; zeros (encoded None) where there is neither."""
    for one in failed:
        state.record(one.row, one.error)
    if not failed:
        return _batch(views, encoded, frames, cuts)
    ok = np.array([e is not None for e in encoded])
    if ok.any():
        source = np.where(ok, np.arange(len(views)), np.flatnonzero(ok)[-1])
        return _batch(views.take(source, views.valid & ok), [encoded[i] for i in source],
                      [frames[i] for i in source], [cuts[i] for i in source])
    n = len(views)
    if stand_in is not None:
        return _batch(stand_in.views.take(np.zeros(n, np.int64), np.zeros(n, bool)), [stand_in.encoded[0]] * n,
                      [None if stand_in.frames is None else stand_in.frames[0]] * n, [bool(stand_in.cut[0])] * n)
    return HostBatch(views.take(np.arange(n), np.zeros(n, bool)), None, None, np.zeros(n, bool))


def _batch(views: Views, encoded: list, frames: list, cuts: list) -> HostBatch:
    return HostBatch(views, tuple(encoded), None if frames[0] is None else np.array(frames, np.int32),
                     np.array(cuts, bool))
