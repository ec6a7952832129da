"""`VideoLoader`: shards in, batches of torch tensors on the training device out, for any PyTorch loop.

    loader = VideoLoader("s3://bucket/k400-shards", split="train", batch_size=32, num_frames=8,
                         layout="super", device="gpu", rank=rank, world_size=world_size, seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:            # len(loader) batches, the same number on every rank
            loss = criterion(model(batch["video"]), batch["label"])

Three stages run concurrently, in threads (the heavy work releases the GIL: storage I/O, DALI):
  feeder   plans the epoch from the index, reads the bytes (`source.ShardReader`'s thread pool), shuffles,
           draws every view's frames, crop window, flip (`sampling`) and augmentations (`augment`), cuts
           each video down to the GOPs those frames need (`gops`), and groups views into batches;
  drivers  one per DALI pipeline: feed a batch, run it, hand the output to torch without a copy. Batch k
           goes to pipeline k % num_pipelines; on the GPU several pipelines keep several NVDEC engines
           busy (one decoder instance feeds one engine);
  caller   takes batches in order, so the stream does not depend on thread timing.

A sample that cannot be read or decoded is recorded in `loader.failures` with its reason and replaced by a
copy of a good sample of the same batch (zeros where none is good), flagged `valid=False`; more than
`max_failures` in one epoch (a count, or a fraction of the samples this rank reads) raise `LoaderError`.
DALI reports a decode error for the batch, not the sample, so a failed batch is run again one sample at a
time on a rebuilt pipeline to find the culprit. A GOP cut that the decoder rejects
while the whole video decodes is not the sample's fault: that sample is decoded whole, and the loader
stops cutting (`cut_gops` turns False, with a warning), so an optimisation never costs a sample.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import itertools
import math
import os
import queue
import threading
import warnings
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from contract.inputs import IMAGENET_MEAN, IMAGENET_STD
from pipelines import video_pipeline as vp
from pipelines.augment import Augment, ClipParams
from pipelines.gops import cut, webm_packets
from pipelines.protocols import check as check_protocol
from pipelines.sampling import (TSN_SCALES, eval_short_side, eval_views, eval_window, frame_indices,
                                random_in_evaluation, random_resized_crop_window, scale_jitter_window,
                                tsn_multiscale_window)
from pipelines.source import SampleError, ShardIndex, ShardReader, rank_part, shard_order, shuffled

TRAIN_CROPS = ("scale_jitter", "tsn_multiscale", "random_resized_crop")
CPU_CODECS = ("vp8", "vp9", "mjpeg")   # what DALI 2.4's CPU video decoder reads


class LoaderError(RuntimeError):
    """The epoch cannot go on: too many broken samples, or none usable where one is needed."""


@dataclasses.dataclass(frozen=True)
class View:
    """One sample as the pipeline sees it: whose bytes, which frames, which window, flipped or not, and
    the clip's draw of the recipe augmentations."""
    row: int                       # the video's position in the split index
    clip: int
    crop: int
    valid: bool                    # False for stand-ins (padding, replaced failures): count them nowhere
    data: bytes | SampleError
    frames: np.ndarray | None      # indices into `data` (which may be cut to GOPs); None for images
    roi: tuple[float, float, float, float]
    mirror: bool
    whole: tuple[bytes, np.ndarray] | None = None   # the uncut bytes and frames, when `data` is a GOP cut
    augment: ClipParams = ClipParams()              # none in evaluation

    @property
    def ok(self) -> bool:
        return not isinstance(self.data, SampleError)


class VideoLoader:
    """Batches of `{"video", "label", "key", "video_index", "clip", "crop", "valid"}` from a shard split.

    mode="train": one view per video, random frames (`sampling`), random crop (`train_crop`), random flip,
    and the recipe augmentations asked for (`augment.Augment`, timm's names): `color_jitter` (a strength
    or (brightness, contrast, saturation[, hue])) applied with `color_jitter_prob`, `grayscale_prob`,
    `gaussian_blur_prob` with sigma drawn from `gaussian_blur_sigma`, `rand_augment=(n, m)` (m in 0..30).
    Every clip gets one draw of each, applied alike to all its frames; evaluation applies none.
    mode="eval": `num_clips` x `num_crops` views per video (`clip`, `crop` say which); every video once.
    `video` is (B, T, C, H, W), (B, C, T, H, W) or (B, C, rows*H, cols*W) for layout "BTCHW", "BCTHW",
    "super". Keep `flip=False` for direction-sensitive classes (SSv2, and our sample dataset's left/right).
    `failures` lists the videos of the current epoch it could not deliver; `short_videos` counts the videos
    of the split shorter than one clip. `protocol` picks whose sampling and crop rules: "default" (ours),
    or the papers' authors' code, "ibm", "sifa" or "ivvit" (`pipelines/protocols.py`, docs/pipelines.md).
    """

    def __init__(self, shards: str, batch_size: int, num_frames: int = 8, sampling: str = "uniform",
                 mode: str = "train", *, split: str | None = None, stride: int = 2, num_clips: int = 1,
                 num_crops: int = 1, crop_size: int = 224, train_crop: str = "scale_jitter",
                 short_side: tuple[int, int] = (256, 320), test_short_side: int | None = None,
                 tsn_scales: tuple[float, ...] = TSN_SCALES, flip: bool = True,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 layout: str = "BTCHW", grid: str | None = None, device: str = "cpu", device_id: int = 0,
                 rank: int = 0, world_size: int = 1, seed: int = 0, storage_options: dict | None = None,
                 readers: int = 8, shuffle_buffer: int = 64, num_threads: int | None = None,
                 num_pipelines: int | None = None, prefetch: int = 2, max_failures: int | float = 100,
                 verify: bool = True, cut_gops: bool = True, protocol: str = "default",
                 color_jitter: float | tuple | None = None, color_jitter_prob: float = 1.0,
                 grayscale_prob: float = 0.0, gaussian_blur_prob: float = 0.0,
                 gaussian_blur_sigma: tuple[float, float] = (0.1, 2.0), rand_augment: tuple[int, int] | None = None):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be at least 1, got {batch_size} and {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is not a rank of world_size={world_size}: ranks count from 0 to "
                             f"{world_size - 1}")
        _check_max_failures(max_failures)
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if train_crop not in TRAIN_CROPS:
            raise ValueError(f"train_crop must be one of {TRAIN_CROPS}, got {train_crop!r}")
        if device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("device='gpu' needs a CUDA GPU visible to torch; use device='cpu' on this machine")
        self.index = ShardIndex(shards, split, storage_options)
        where = shards if split is None else f"{shards} split {split!r}"
        if device == "cpu" and self.index.media == "video":
            _check_cpu_codecs(self.index, where)
        augment = Augment.of(color_jitter, color_jitter_prob, grayscale_prob, gaussian_blur_prob,
                             gaussian_blur_sigma, rand_augment)
        self.config = vp.PipelineConfig(num_frames=num_frames, crop_size=crop_size, layout=layout, grid=grid,
                                        media=self.index.media, mean=tuple(mean), std=tuple(std),
                                        augment=augment if mode == "train" else Augment())
        frame_indices(sampling, 1, 1, stride)  # a wrong sampling name or stride fails here
        check_protocol(protocol, sampling, train_crop if mode == "train" else None)   # eval_views checks the crops
        self.protocol = protocol
        self.short_videos = _count_short_videos(self.index, sampling, num_frames, stride, where)
        self.batch_size, self.num_frames, self.sampling, self.mode = batch_size, num_frames, sampling, mode
        self.stride, self.train_crop, self.short_side, self.tsn_scales = stride, train_crop, short_side, tsn_scales
        self.crop_size, self.flip = crop_size, flip
        self.views = [(0, 0)] if mode == "train" else eval_views(num_clips, num_crops, protocol)
        self.num_clips, self.num_crops = (1, 1) if mode == "train" else (num_clips, num_crops)
        self.test_short_side = test_short_side or eval_short_side(crop_size, self.num_crops, protocol)
        self.device, self.device_id = device, device_id
        self.rank, self.world_size, self.seed, self.epoch, self.start_batch = rank, world_size, seed, 0, 0
        self.reader = ShardReader(self.index, readers=readers, verify=verify)
        self.shuffle_buffer, self.prefetch, self.max_failures = shuffle_buffer, prefetch, max_failures
        self.cut_gops = cut_gops
        # GPU: a pipeline's decoder feeds one NVDEC engine and an H100 has 7, so run several. CPU: a pipeline
        # per core up to 4, the cores shared out as DALI threads (on 2 cores, 1 x 2, 2 x 1 and 4 x 1 deliver
        # within 5 % of each other: docs/pipeline_throughput.md).
        cores = os.cpu_count() or 1
        self.num_pipelines = num_pipelines or (4 if device == "gpu" else min(4, cores))
        self.num_threads = num_threads or (4 if device == "gpu" else max(1, cores // self.num_pipelines))
        self.failures: list[dict] = []
        self._failed_keys: set[str] = set()
        self._lock = threading.Lock()
        self._pipes: list = []
        if mode == "eval" and len(self.index) < world_size:
            raise ValueError(f"{len(self.index)} videos cannot be spread over {world_size} ranks; evaluate on fewer ranks")
        if len(self) == 0:
            raise ValueError(f"{len(self.index)} samples split over {world_size} ranks make no full batch of "
                             f"{batch_size}; lower batch_size or world_size")

    # ------------------------------------------------------------ epoch plan

    def __len__(self) -> int:
        """Batches per epoch, the same on every rank."""
        n, w, b = len(self.index), self.world_size, self.batch_size
        if self.mode == "train":
            return n // w // b
        return math.ceil(math.ceil(n / w) * len(self.views) / b)

    @property
    def samples_per_epoch(self) -> int:
        """Videos this rank reads in an epoch: what a fractional `max_failures` is a fraction of."""
        if self.mode == "train":
            return len(self) * self.batch_size
        part = rank_part(len(self.index), self.rank, self.world_size, equal=False)
        return part.stop - part.start

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch whose shard order, shuffle and augmentation the next iteration draws, and
        the batch it starts at (exact resume: earlier batches are neither read nor decoded)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def rows(self, epoch: int) -> np.ndarray:
        """Index rows this rank reads in `epoch`, in read order."""
        n = len(self.index)
        if self.mode == "train":
            order = shard_order(self.index, self.seed, epoch)[rank_part(n, self.rank, self.world_size, equal=True)]
            return order[: len(self) * self.batch_size]
        return np.arange(n)[rank_part(n, self.rank, self.world_size, equal=False)]

    # ------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict]:
        if not self._pipes:
            self._pipes = [self._build() for _ in range(self.num_pipelines)]
        stop = threading.Event()
        inboxes = [queue.Queue(self.prefetch) for _ in self._pipes]
        outboxes = [queue.Queue(self.prefetch) for _ in self._pipes]
        self.failures, self._failed_keys = [], set()
        epoch, start_batch = self.epoch, self.start_batch
        self.start_batch = 0                   # a resume point applies to one iteration
        threads = [threading.Thread(target=self._feed, args=(epoch, start_batch, inboxes, stop), daemon=True)]
        threads += [threading.Thread(target=self._drive, args=(p, inboxes[p], outboxes[p], stop), daemon=True)
                    for p in range(len(self._pipes))]
        for thread in threads:
            thread.start()
        running = (stop, tuple(threads))
        _RUNNING.add(running)
        try:
            for k in range(len(self) - start_batch):
                item = _get(outboxes[k % len(outboxes)], stop)
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    raise LoaderError(f"the stream ended after {start_batch + k} of {len(self)} batches")
                if self.device == "gpu":
                    _wait_on_current_stream(item)
                yield item
        finally:
            _stop(*running)
            _RUNNING.discard(running)

    def _feed(self, epoch: int, start_batch: int, inboxes: list[queue.Queue], stop: threading.Event) -> None:
        """Feeder thread: host-side batches of views, round-robin over the pipelines' inboxes."""
        try:
            for k, batch in enumerate(self._host_batches(epoch, start_batch)):
                if not _put(inboxes[k % len(inboxes)], batch, stop):
                    return
            for inbox in inboxes:
                _put(inbox, None, stop)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, which raises it
            for inbox in inboxes:
                _put(inbox, e, stop)

    def order(self, epoch: int) -> np.ndarray:
        """Index rows in the order their views come out: the read order through the shuffle buffer (train).

        The buffer is run on row numbers, not bytes, so the order is known up front: a resumed epoch
        skips rows without reading them, while reads still go shard by shard.
        """
        rows = self.rows(epoch)
        if self.mode == "eval":
            return rows
        return np.fromiter(shuffled(rows, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, self.rank])),
                           np.int64, len(rows))

    def _host_batches(self, epoch: int, start_batch: int) -> Iterator[list[View]]:
        skip_rows, skip_views = divmod(start_batch * self.batch_size, len(self.views))
        order = self.order(epoch)[skip_rows:]
        wanted = set(order.tolist())
        stream = _in_order(self.reader(r for r in self.rows(epoch) if r in wanted), order)
        views = itertools.islice((view for row, data in stream for view in self._views(row, data, epoch)), skip_views, None)
        views = _padded(views, (len(self) - start_batch) * self.batch_size)
        stand_in = None
        while batch := list(itertools.islice(views, self.batch_size)):
            batch = self._repair(batch, stand_in)
            stand_in = batch[-1]
            yield batch

    def _views(self, row: int, data: bytes | SampleError, epoch: int) -> Iterator[View]:
        h, w = int(self.index["height"][row]), int(self.index["width"][row])
        cuttable = self.cut_gops and self.config.media == "video" and isinstance(data, bytes)
        packets = webm_packets(data) if cuttable else None
        if self.mode == "train":
            rng = np.random.default_rng([self.seed, epoch, row])
            frames = self._frames(row, 0, rng)   # drawn first, then the window, the flip, the augmentations
            yield self._view(row, 0, 0, data, packets, frames, self._train_window(h, w, rng),
                             self.flip and rng.random() < 0.5, self.config.augment.draw(rng, self.crop_size))
            return
        for clip, crop in self.views:
            rng = np.random.default_rng([self.seed, row, clip]) if random_in_evaluation(self.protocol) else None
            yield self._view(row, clip, crop, data, packets, self._frames(row, clip, rng),
                             eval_window(h, w, self.crop_size, self.test_short_side, crop, self.num_crops,
                                         self.protocol, self.config.media), False)

    def _frames(self, row: int, clip: int, rng: np.random.Generator | None) -> np.ndarray | None:
        if self.config.media == "image":
            return None
        return frame_indices(self.sampling, int(self.index["num_frames"][row]), self.num_frames, self.stride, clip,
                             self.num_clips, rng, self.protocol, float(self.index["fps"][row]))

    @staticmethod
    def _view(row, clip, crop, data, packets, frames, roi, mirror, augment=ClipParams()) -> View:
        if packets is not None and frames.max() < len(packets.spans):
            # decode only the GOPs these frames sit in (see gops.py)
            return View(row, clip, crop, True, *cut(packets, frames), roi, mirror, whole=(data, frames),
                        augment=augment)
        return View(row, clip, crop, True, data, frames, roi, mirror, augment=augment)

    def _train_window(self, h: int, w: int, rng: np.random.Generator):
        if self.train_crop == "scale_jitter":
            return scale_jitter_window(h, w, self.crop_size, self.short_side, rng, self.protocol)
        if self.train_crop == "tsn_multiscale":
            return tsn_multiscale_window(h, w, rng, self.tsn_scales, protocol=self.protocol, crop_size=self.crop_size)
        return random_resized_crop_window(h, w, rng, protocol=self.protocol)

    def _repair(self, batch: list[View], stand_in: View | None) -> list[View]:
        """Replace views whose bytes could not be read by flagged copies of a good one."""
        for view in batch:
            if not view.ok:
                self._record(view.row, view.data)
        good = [v for v in batch if v.ok] or ([stand_in] if stand_in is not None and stand_in.ok else [])
        if not good:   # nothing to copy: the driver sends zeros
            return [dataclasses.replace(v, valid=False) for v in batch]
        return [v if v.ok else dataclasses.replace(good[-1], valid=False) for v in batch]

    def _record(self, row: int, error: SampleError) -> None:
        key = str(self.index.keys[row])
        with self._lock:
            if key in self._failed_keys:
                return
            self._failed_keys.add(key)
            self.failures.append({"key": key, "video_index": row, "shard": str(self.index["shard"][row]),
                                  "stage": error.stage, "reason": error.reason})
            if len(self.failures) > self._allowed_failures():
                raise LoaderError(self._too_many_failures())

    def _allowed_failures(self) -> float:
        if isinstance(self.max_failures, float):
            return self.max_failures * self.samples_per_epoch
        return self.max_failures

    def _too_many_failures(self) -> str:
        limit = f"max_failures={self.max_failures}"
        if isinstance(self.max_failures, float):
            limit += f", a fraction: {self._allowed_failures():g} of them"
        shards = len({f["shard"] for f in self.failures})
        first = self.failures[0]
        return (f"{len(self.failures)} of the {self.samples_per_epoch} samples this rank reads failed this epoch, "
                f"more than {limit}; they sit in {shards} shard(s), the first: {first['key']} in {first['shard']}, "
                f"{first['stage']}: {first['reason']}")

    # ------------------------------------------------------------ DALI

    def _build(self):
        return vp.build(self.config, self.device, self.batch_size, self.num_threads, self.device_id, self.seed)

    def _drive(self, p: int, inbox: queue.Queue, outbox: queue.Queue, stop: threading.Event) -> None:
        """Driver thread of pipeline `p`: host batches in, torch batches out, errors passed on.

        On the GPU all its work is queued on a stream of its own; each batch carries an event that the
        caller's stream waits for.
        """
        stream = torch.cuda.Stream(self.device_id) if self.device == "gpu" else None
        while (batch := _get(inbox, stop)) is not None and not isinstance(batch, BaseException):
            try:
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    result = self._run(p, batch, stream)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, which raises it
                result = e
            if not _put(outbox, result, stop) or isinstance(result, BaseException):
                return
        _put(outbox, batch, stop)

    def _run(self, p: int, batch: list[View], stream) -> dict:
        if not any(v.ok for v in batch):
            video = self._blank(len(batch))
        else:
            try:
                video = self._decode(self._pipes[p], batch, stream)
            except RuntimeError:
                self._pipes[p] = self._build()    # a failed run can leave the pipeline unusable
                batch, video = self._decode_alone(p, batch, stream)
        rows = np.array([v.row for v in batch])
        host = {"label": torch.from_numpy(self.index["label"][rows].astype(np.int64)),
                "video_index": torch.from_numpy(rows.astype(np.int64)),
                "clip": torch.tensor([v.clip for v in batch]), "crop": torch.tensor([v.crop for v in batch]),
                "valid": torch.tensor([v.valid for v in batch])}
        out = {"video": video, "key": [str(self.index.keys[r]) for r in rows]}
        out |= {name: t.to(video.device, non_blocking=True) for name, t in host.items()}
        if stream is not None:
            out["_ready"] = stream.record_event()
        return out

    def _decode(self, pipe, views: list[View], stream) -> torch.Tensor:
        vp.feed(pipe, self.config, [np.frombuffer(v.data, np.uint8) for v in views],
                [v.frames for v in views], [v.roi for v in views], [v.mirror for v in views],
                [v.augment for v in views])
        (out,) = pipe.run(stream)
        # No copy: DALI's dynamic executor gives every run fresh buffers, alive while referenced; on the
        # GPU, DLPack makes the current (driver's) stream wait for DALI's work.
        return torch.from_dlpack(out.as_tensor())

    def _blank(self, n: int) -> torch.Tensor:
        """Zeros in the batch's shape: what stands in for a batch without one usable view (all flagged)."""
        device = f"cuda:{self.device_id}" if self.device == "gpu" else "cpu"
        return torch.zeros(vp.output_shape(self.config, n), device=device)

    def _decode_alone(self, p: int, batch: list[View], stream):
        """Run each view alone to find the ones DALI cannot decode; replace them with flagged copies."""
        outputs = []
        for view in batch:
            try:
                outputs.append(self._decode_view(p, view, stream))
            except RuntimeError as e:
                self._pipes[p] = self._build()
                self._record(view.row, SampleError("decode", _dali_reason(e)))
                outputs.append(None)
        good = [i for i, out in enumerate(outputs) if out is not None]
        if not good:
            return [dataclasses.replace(view, valid=False) for view in batch], self._blank(len(batch))
        fixed = [view if out is not None else dataclasses.replace(batch[good[-1]], valid=False)
                 for view, out in zip(batch, outputs)]
        return fixed, torch.cat([out if out is not None else outputs[good[-1]] for out in outputs])

    def _decode_view(self, p: int, view: View, stream) -> torch.Tensor:
        """One view; if its GOP cut is rejected, the whole video, and no more cuts if that decodes."""
        try:
            return self._decode(self._pipes[p], [view], stream)
        except RuntimeError as e:
            if view.whole is None:
                raise
            self._pipes[p] = self._build()
            data, frames = view.whole
            out = self._decode(self._pipes[p], [dataclasses.replace(view, data=data, frames=frames)], stream)
            if self.cut_gops:
                self.cut_gops = False
                warnings.warn(f"the {self.device} video decoder rejected a GOP-cut stream that it decodes whole "
                              f"({_dali_reason(e)}); decoding whole videos from now on (cut_gops=False)")
            return out


def _check_max_failures(max_failures) -> None:
    count = isinstance(max_failures, int) and not isinstance(max_failures, bool) and max_failures >= 0
    fraction = isinstance(max_failures, float) and 0 <= max_failures <= 1
    if not (count or fraction):
        raise ValueError(f"max_failures must be a count (an int >= 0) or a fraction of the samples a rank reads per "
                         f"epoch (a float in [0, 1], e.g. 0.01), got {max_failures!r}")


def _check_cpu_codecs(index: ShardIndex, where: str) -> None:
    """DALI's CPU decoder fails on other codecs only when the first batch runs, with a message naming none."""
    codecs = index["codec"]
    unreadable = sorted(set(codecs.tolist()) - set(CPU_CODECS))
    if unreadable:
        raise ValueError(f"{where} holds {int(np.isin(codecs, unreadable).sum())} of {len(codecs)} videos in "
                         f"{', '.join(unreadable)}, which DALI's CPU decoder cannot read (it reads VP8, VP9 and "
                         f"MJPEG): reshard them with --codec vp9, or load them with device='gpu'")


def _count_short_videos(index: ShardIndex, sampling: str, num_frames: int, stride: int, where: str) -> int:
    """Videos too short for one clip (sampling then repeats or wraps frames, as documented), with one warning."""
    if index.media == "image":
        return 0
    needed = num_frames if sampling == "uniform" else (num_frames - 1) * stride + 1
    short = int((index["num_frames"] < needed).sum())
    if short:
        warnings.warn(f"{short} of {len(index)} videos in {where} have fewer than the {needed} frames a {sampling} "
                      f"clip of {num_frames} spans, so their clips repeat or wrap frames (loader.short_videos)",
                      stacklevel=3)
    return short


_RUNNING: set = set()   # (stop event, threads) of epochs being iterated


def _stop(stop: threading.Event, threads) -> None:
    stop.set()
    for thread in threads:
        thread.join()


@atexit.register
def _stop_all() -> None:
    """An epoch left half-read at exit: stop its threads before DALI's own exit hook tears pipelines down."""
    for running in list(_RUNNING):
        _stop(*running)


def _in_order(fetched: Iterator[tuple[int, bytes | SampleError]], order: np.ndarray) -> Iterator:
    """(row, data) in `order`; holds rows read early until their turn (about a shuffle buffer's worth)."""
    pending = {}
    for row in order.tolist():
        while row not in pending:
            got, data = next(fetched)
            pending[got] = data
        yield row, pending.pop(row)


def _padded(views: Iterable[View], total: int) -> Iterator[View]:
    """The views, then flagged copies of the last one up to `total` (eval: equal batches on every rank)."""
    last = None
    for last in views:
        yield last
        total -= 1
    for _ in range(total):
        yield dataclasses.replace(last, valid=False)


def _wait_on_current_stream(batch: dict) -> None:
    """Make the caller's CUDA stream wait for the driver's copy, and keep the memory alive on it."""
    current = torch.cuda.current_stream()
    current.wait_event(batch.pop("_ready"))
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            value.record_stream(current)


def _dali_reason(error: BaseException) -> str:
    """The line of a DALI error that says what went wrong (it follows "encountered:")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1:]
    return (lines[0] if lines else type(error).__name__)[:300]


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event):
    while not stop.is_set():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue
    return None
