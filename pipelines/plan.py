"""The epoch plan: which views a rank delivers, in which order and batches, each with its frames, crop
window, flip and augmentation draw. A pure function of the index's metadata, the config and the epoch:
no byte of video is read, so a plan is known before the epoch starts and checked on an index alone.

    plan = EpochPlan(index, config, epoch)
    plan.batch(k)               # Views: the views of batch k, as arrays
    plan.reads_from(k)          # the rows to read for batches k.. (read order: shard by shard)
    plan.rows_from(k)           # the same rows in the order their views come out
    plan.row_frames(rows)       # per row, the frames of its views: known before a byte is read

Order (docs/pipelines.md, "Epoch policy"):
  train  shards shuffled by (seed, epoch), rows in shard order, `world_size` contiguous equal parts, cut to
         whole batches; then a shuffle buffer over row numbers, seeded by (seed, epoch, rank). One view per row.
  eval   rows in index order in contiguous parts of sizes within one; every (clip, crop) view of a row in
         turn; the last batch padded with copies of the last view, flagged invalid.

Draws. A view's random choices depend on (seed, epoch, row) only, never on the rank or the batch, so a
resumed epoch redraws exactly what it skipped and adding ranks moves no crop. Under the default protocol
they are computed for a batch at once from uniform numbers: row r's are row r % 256 of a table drawn per
block of 256 rows from `default_rng([seed, epoch, r // 256])`, mapped to frames, window and flip by the
array forms of `sampling.py`'s rules. The authors' protocols draw from their own code's generators, so
each of their views (and each clip's augmentation) is drawn from `default_rng([seed, epoch, row])` by
the scalar rules, as their code does it, one row at a time.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipelines.augment import ClipParams
from pipelines.config import LoaderConfig
from pipelines.sampling import (dense_eval_start, dense_frames, eval_short_side, eval_window, frame_indices,
                                random_in_evaluation, random_resized_crop_at, random_resized_crop_window,
                                scale_jitter_at, scale_jitter_window, tsn_multiscale_at, tsn_multiscale_window,
                                tsn_pairs, uniform_frames, TSN_QUARTERS)
from pipelines.source import rank_part, shard_order

DRAW_BLOCK = 256           # rows per table of uniform draws (default protocol, training)
RRC_ATTEMPTS = 10          # tries of the Inception crop before its centre fallback


@dataclass(frozen=True)
class Views:
    """Views as arrays, one entry per view."""
    rows: np.ndarray               # int64: the video's row in the split index
    clip: np.ndarray               # int64: which evaluation clip (0 in training)
    crop: np.ndarray               # int64: which evaluation crop
    valid: np.ndarray              # bool: False for stand-ins (padding, replaced failures): count them nowhere
    frames: np.ndarray | None      # int64 (views, num_frames): frames of the video to decode; None for images
    roi: np.ndarray                # float32 (views, 4): y0, x0, y1, x1 of the source region that becomes the crop
    mirror: np.ndarray             # bool: flip horizontally
    augment: tuple[ClipParams, ...] | None   # one draw per view where the config augments, else None

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, at, valid: np.ndarray | None = None) -> Views:
        """The views at positions `at` (repeats allowed), with `valid` if given."""
        at = np.asarray(at, np.int64)
        return Views(self.rows[at], self.clip[at], self.crop[at], self.valid[at] if valid is None else valid,
                     None if self.frames is None else self.frames[at], self.roi[at], self.mirror[at],
                     None if self.augment is None else tuple(self.augment[i] for i in at.tolist()))

    @staticmethod
    def concat(first: Views, second: Views) -> Views:
        def both(a, b):
            if a is None:
                return None
            return a + b if isinstance(a, tuple) else np.concatenate([a, b])
        return Views(*(both(getattr(first, f.name), getattr(second, f.name)) for f in dataclasses.fields(Views)))


def num_batches(num_rows: int, config: LoaderConfig) -> int:
    """Batches per epoch, the same on every rank."""
    b, w = config.batch_size, config.world_size
    if config.mode == "train":
        return num_rows // w // b
    return math.ceil(math.ceil(num_rows / w) * len(config.views) / b)


class EpochPlan:
    """One rank's epoch. `index` is anything with the split index's columns by name (`num_frames`, `fps`,
    `height`, `width`, `shard`, `offset`), a length and `media` ("video" or "image"): a `source.ShardIndex`."""

    def __init__(self, index, config: LoaderConfig, epoch: int):
        self.index, self.config, self.epoch = index, config, epoch
        self.media = index.media
        c, n = config, len(index)
        self.per_row = len(c.views)
        self.num_batches = num_batches(n, c)
        if c.mode == "train":
            reads = shard_order(index, c.seed, epoch)[rank_part(n, c.rank, c.world_size, equal=True)]
            self.reads = reads[: self.num_batches * c.batch_size]
            self.order = buffer_order(self.reads, c.shuffle_buffer, np.random.default_rng([c.seed, epoch, c.rank]))
        else:
            self.reads = self.order = np.arange(n)[rank_part(n, c.rank, c.world_size, equal=False)]
        self.num_views = len(self.order) * self.per_row            # padding excluded
        self._position = np.full(n, -1)                             # each row's place in `order` (-1: not read)
        self._position[self.order] = np.arange(len(self.order))
        self._clips = np.array([clip for clip, _ in c.views])
        self._crops = np.array([crop for _, crop in c.views])
        self._short_side = c.test_short_side or eval_short_side(c.contract.crop_size, c.num_crops, c.protocol)
        self._table = functools.lru_cache(maxsize=64)(self._draw_table)
        self._vectorised = c.protocol == "default"

    def __len__(self) -> int:
        return self.num_batches

    # ------------------------------------------------------------ which views, where

    def batch(self, k: int) -> Views:
        """The views of batch `k`; past the last view (evaluation), copies of it flagged invalid."""
        if not 0 <= k < self.num_batches:
            raise IndexError(f"batch {k} of an epoch of {self.num_batches}")
        b = self.config.batch_size
        return self.views_at(np.arange(k * b, (k + 1) * b))

    def views_at(self, positions: np.ndarray) -> Views:
        """The views at positions of the epoch's stream of views (padding past `num_views`)."""
        real = positions < self.num_views
        at = np.minimum(positions, self.num_views - 1)
        rows, view = self.order[at // self.per_row], at % self.per_row
        return self._draw(rows, self._clips[view], self._crops[view], real)

    def views_of(self, rows: np.ndarray) -> Views:
        """Every view of each of `rows` (rows of this rank's epoch), a row's views together."""
        first = self._position[np.asarray(rows)]
        if (first < 0).any():
            raise ValueError(f"row {int(np.asarray(rows)[first < 0][0])} is not read by rank {self.config.rank} "
                             f"in epoch {self.epoch}")
        return self.views_at((first[:, None] * self.per_row + np.arange(self.per_row)).reshape(-1))

    def row_frames(self, rows: np.ndarray) -> Iterator[np.ndarray | None]:
        """Row by row, the frames of every view of it, (views, T), or None for images: what a reader needs to
        know of a row before it reads (a reader of GOP ranges reads their union). Drawn 256 rows at a time."""
        for start in range(0, len(rows), 256):
            chunk = rows[start:start + 256]
            frames = self.views_of(chunk).frames
            if frames is None:
                yield from [None] * len(chunk)
            else:
                yield from frames.reshape(len(chunk), self.per_row, -1)

    def rows_from(self, start_batch: int) -> np.ndarray:
        """Rows whose views batches `start_batch`.. hold, in the order they come out (a row's views all
        follow their first; padding repeats the last row)."""
        first = min(start_batch * self.config.batch_size, self.num_views - 1) // self.per_row
        return self.order[first:]

    def reads_from(self, start_batch: int) -> np.ndarray:
        """The same rows in read order: shard by shard, byte after byte."""
        return self.reads[np.isin(self.reads, self.rows_from(start_batch))]

    def last_position(self, rows: np.ndarray) -> np.ndarray:
        """The position of each row's last view in the epoch's stream (after it, its bytes can go)."""
        return self._position[rows] * self.per_row + self.per_row - 1

    # ------------------------------------------------------------ draws

    def _draw(self, rows: np.ndarray, clips: np.ndarray, crops: np.ndarray, valid: np.ndarray) -> Views:
        c = self.config
        if c.mode == "train" and self._vectorised:
            frames, roi, mirror = self._train_arrays(rows)
            augment = None
            if c.augment.enabled:
                augment = tuple(c.augment.draw(self._row_rng(r), c.contract.crop_size) for r in rows.tolist())
            return Views(rows, clips, crops, valid, frames, roi, mirror, augment)
        if c.mode == "eval" and self._vectorised and not random_in_evaluation(c.protocol):
            return Views(rows, clips, crops, valid, *self._eval_arrays(rows, clips, crops), None)
        return self._draw_one_by_one(rows, clips, crops, valid)

    def _train_arrays(self, rows: np.ndarray):
        """Frames, windows and flips of training views under the default protocol, from uniform draws."""
        c, t = self.config, self.config.contract.num_frames
        u = self._uniforms(rows)
        h, w = self._column("height", rows), self._column("width", rows)
        frames, used = None, 0
        if self.media == "video":
            n = self._column("num_frames", rows)[:, None].astype(np.int64)
            if c.sampling == "uniform":
                frames, used = uniform_frames(n, t, u[:, :t]), t
            else:
                slack = np.maximum(n - t * c.stride, 0)
                frames, used = dense_frames(n, t, c.stride, np.floor(u[:, :1] * (slack + 1)).astype(np.int64)), 1
        window = u[:, used:]
        if c.train_crop == "scale_jitter":
            lo, hi = c.short_side
            short = lo + np.floor(window[:, 0] * (hi - lo + 1))
            roi = scale_jitter_at(h, w, c.contract.crop_size, short, window[:, 1], window[:, 2])
        elif c.train_crop == "tsn_multiscale":
            pairs = len(tsn_pairs(c.tsn_scales, 1))
            roi = tsn_multiscale_at(h, w, (window[:, 0] * pairs).astype(np.int64),
                                    (window[:, 1] * len(TSN_QUARTERS)).astype(np.int64), c.tsn_scales)
        else:
            roi = random_resized_crop_at(h, w, window[:, :4 * RRC_ATTEMPTS].reshape(-1, RRC_ATTEMPTS, 4))
        mirror = (window[:, -1] < 0.5) & c.flip
        return frames, np.stack(roi, axis=1).astype(np.float32), mirror

    def _eval_arrays(self, rows: np.ndarray, clips: np.ndarray, crops: np.ndarray):
        """Frames and windows of evaluation views under the default protocol (nothing random)."""
        c, t, k = self.config, self.config.contract.num_frames, self.config.num_clips
        frames = None
        if self.media == "video":
            n = self._column("num_frames", rows)[:, None].astype(np.int64)
            if c.sampling == "uniform":
                frames = uniform_frames(n, t, ((clips + 0.5) / k)[:, None])
            else:
                slack = np.maximum(n - t * c.stride, 0)
                frames = dense_frames(n, t, c.stride, dense_eval_start(slack, clips[:, None], k))
        h, w = self._column("height", rows), self._column("width", rows)
        roi = eval_window(h, w, c.contract.crop_size, self._short_side, crops, c.num_crops)
        return frames, np.stack(np.broadcast_arrays(*roi), axis=1).astype(np.float32), np.zeros(len(rows), bool)

    def _draw_one_by_one(self, rows, clips, crops, valid) -> Views:
        """The authors' protocols: each view drawn by the scalar rules, as their code draws it."""
        c, train = self.config, self.config.mode == "train"
        num_clips = 1 if train else c.num_clips
        frames, roi, mirror, augment = [], [], [], []
        for row, clip, crop in zip(rows.tolist(), clips.tolist(), crops.tolist()):
            h, w = int(self.index["height"][row]), int(self.index["width"][row])
            if train:
                rng = self._row_rng(row)   # drawn in this order: frames, window, flip, augmentations
            else:
                rng = np.random.default_rng([c.seed, row, clip]) if random_in_evaluation(c.protocol) else None
            if self.media == "video":
                frames.append(frame_indices(c.sampling, int(self.index["num_frames"][row]), c.contract.num_frames,
                                            c.stride, clip, num_clips, rng, c.protocol,
                                            float(self.index["fps"][row])))
            if train:
                roi.append(self._train_window(h, w, rng))
                mirror.append(c.flip and rng.random() < 0.5)
                augment.append(c.augment.draw(rng, c.contract.crop_size))
            else:
                roi.append(eval_window(h, w, c.contract.crop_size, self._short_side, crop, c.num_crops, c.protocol,
                                       self.media))
                mirror.append(False)
        return Views(rows, clips, crops, valid, np.array(frames) if frames else None,
                     np.array(roi, np.float32).reshape(-1, 4), np.array(mirror, bool),
                     tuple(augment) if train and c.augment.enabled else None)

    def _train_window(self, h: int, w: int, rng: np.random.Generator):
        c = self.config
        if c.train_crop == "scale_jitter":
            return scale_jitter_window(h, w, c.contract.crop_size, c.short_side, rng, c.protocol)
        if c.train_crop == "tsn_multiscale":
            return tsn_multiscale_window(h, w, rng, c.tsn_scales, protocol=c.protocol, crop_size=c.contract.crop_size)
        return random_resized_crop_window(h, w, rng, protocol=c.protocol)

    def _row_rng(self, row: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, self.epoch, row])

    def _uniforms(self, rows: np.ndarray) -> np.ndarray:
        """Row r's uniform draws: row r % DRAW_BLOCK of its block's table."""
        blocks, at = np.divmod(rows, DRAW_BLOCK)
        out = np.empty((len(rows), self._draws_per_view()))
        for block in np.unique(blocks).tolist():
            mine = blocks == block
            out[mine] = self._table(block)[at[mine]]
        return out

    def _draw_table(self, block: int) -> np.ndarray:
        rng = np.random.default_rng([self.config.seed, self.epoch, block])
        return rng.random((DRAW_BLOCK, self._draws_per_view()))

    def _draws_per_view(self) -> int:
        """Frames (one per segment, or a start), window, flip."""
        c = self.config
        frames = 0 if self.media == "image" else (c.contract.num_frames if c.sampling == "uniform" else 1)
        window = {"scale_jitter": 3, "tsn_multiscale": 2, "random_resized_crop": 4 * RRC_ATTEMPTS}[c.train_crop]
        return frames + window + 1

    def _column(self, name: str, rows: np.ndarray) -> np.ndarray:
        return self.index[name][rows].astype(np.float64)


def buffer_order(rows: np.ndarray, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """`rows` through a WebDataset-style shuffle buffer: each row leaves at a random moment among the next
    `buffer_size` (the draws `source.shuffled` makes, taken at once)."""
    rows = rows.tolist()
    buffer, out = rows[:buffer_size], []
    for row, slot in zip(rows[buffer_size:], rng.integers(buffer_size, size=max(len(rows) - buffer_size, 0)).tolist()):
        out.append(buffer[slot])
        buffer[slot] = row
    rng.shuffle(buffer)
    return np.array(out + buffer, np.int64)
