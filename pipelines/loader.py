"""`VideoLoader`: shards in, batches of torch tensors on the training device out, for any PyTorch loop.

    loader = VideoLoader("s3://bucket/k400-shards", 32, split="train", num_frames=8, layout="super",
                         device="gpu", rank=rank, world_size=world_size, seed=0)
    loader = VideoLoader("s3://bucket/k400-shards", config=LoaderConfig.of(32, contract=model.contract, ...))
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:            # len(loader) batches, the same number on every rank
            loss = criterion(model(batch["video"]), batch["label"])

An epoch is a plan, then stages:
  plan     `plan.EpochPlan`: the rows, order, views, frames, windows, flips and augmentation draws of this
           rank's epoch, from the index and the seed alone;
  host     `fetch.Fetcher`: read the bytes (`source.ShardReader`: the GOPs the views need where the index
           holds packet tables on a local disk, else whole members), cut each view to its GOPs (`gops`);
           `batches`: group views into batches with stand-ins for failures; one feeder thread;
  decode   `decode.Decoder`, one per DALI pipeline, each in a driver thread: feed, run, hand to torch without
           a copy. Batch k goes to pipeline k % num_pipelines; on the GPU several pipelines keep several
           NVDEC engines busy (one decoder instance feeds one engine);
  caller   takes batches in order, so the stream does not depend on thread timing; on the GPU its stream
           waits for the driver's.
What the stages change while running (failures, whether cuts are fed) is in one `state.LoaderState`.

A sample that cannot be read or decoded is recorded in `loader.failures` with its reason and replaced by a
copy of a good sample of the same batch (zeros where none is good), flagged `valid=False`; more than
`max_failures` in one epoch (a count, or a fraction of the samples this rank reads) raise `LoaderError`.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import queue
import threading
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from pipelines import video_pipeline as vp
from pipelines.codecs import CPU_CODECS, check_cpu_codecs, check_nvdec_sizes
from pipelines.config import LoaderConfig
from pipelines.decode import Decoder
from pipelines.batches import HostBatch, host_batches
from pipelines.fetch import Fetcher, processes_win, read_whole
from pipelines.plan import EpochPlan, Views, num_batches
from pipelines.source import SampleError, ShardIndex, ShardReader, gop_reads_win, packet_table_note, rank_part
from pipelines.state import LoaderError, LoaderState

__all__ = ["CPU_CODECS", "LoaderConfig", "LoaderError", "VideoLoader"]


class VideoLoader:
    """Batches of `{"video", "label", "key", "video_index", "clip", "crop", "valid"}` from a shard split.

    Settings are a `LoaderConfig`, given whole (`config=`) or as keywords (its fields' names, and the
    names of the fields of its `contract` and `augment`); `contract=` passes a model's input contract whole.
    mode="train": one view per video, random frames, crop, flip and the recipe augmentations asked for.
    mode="eval": `num_clips` x `num_crops` views per video (`clip`, `crop` say which); every video once.
    `video` is (B, T, C, H, W), (B, C, T, H, W) or (B, C, rows*H, cols*W) for layout "BTCHW", "BCTHW",
    "super". `failures` lists the videos of the current epoch it could not deliver; `short_videos` counts
    the videos of the split shorter than one clip.
    """

    def __init__(self, shards: str, batch_size: int | None = None, *, config: LoaderConfig | None = None,
                 **options):
        if config is None:
            if batch_size is None:
                raise ValueError("give the batch size (VideoLoader(shards, batch_size, ...)) or a LoaderConfig (config=)")
            config = LoaderConfig.of(batch_size, **options)
        elif batch_size is not None or options:
            raise ValueError("give a LoaderConfig (config=) or keywords, not both")
        if config.device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("device='gpu' needs a CUDA GPU visible to torch; use device='cpu' on this machine")
        self.config = c = config
        self.index = ShardIndex(shards, c.split, c.storage_options)
        where = shards if c.split is None else f"{shards} split {c.split!r}"
        if self.index.media == "video" and c.device == "cpu":
            check_cpu_codecs(self.index["codec"], where)
        if self.index.media == "video" and c.device == "gpu":
            check_nvdec_sizes(self.index["codec"], self.index["width"], self.index["height"], where)
        self.pipeline_config = vp.PipelineConfig(
            num_frames=c.contract.num_frames, crop_size=c.contract.crop_size, layout=c.contract.layout,
            grid=c.contract.grid, media=self.index.media, mean=c.contract.mean, std=c.contract.std,
            augment=c.train_augment)
        self.short_videos = _count_short_videos(self.index, c, where)
        if c.mode == "eval" and len(self.index) < c.world_size:
            raise ValueError(f"{len(self.index)} videos cannot be spread over {c.world_size} ranks; evaluate on fewer ranks")
        if len(self) == 0:
            raise ValueError(f"{len(self.index)} samples split over {c.world_size} ranks make no full batch of "
                             f"{c.batch_size}; lower batch_size or world_size")
        self.reader = ShardReader(self.index, readers=c.readers, verify=c.verify)
        cutting = c.cut_gops and self.index.media == "video"
        self.gop_reads = cutting and (gop_reads_win(self.index) if c.gop_reads is None else c.gop_reads)
        if cutting and (note := packet_table_note(self.index)):
            warnings.warn(note)
        self.reader_processes = processes_win() if c.reader_processes is None else c.reader_processes
        self.fetcher = Fetcher(self.reader, (shards, c.split, c.storage_options), c.readers, self.reader_processes,
                               self.gop_reads)
        # GPU: a pipeline's decoder feeds one NVDEC engine and an H100 has 7, so run several. CPU: a pipeline
        # per core up to 4, the cores shared out as DALI threads (on 2 cores, 1 x 2, 2 x 1 and 4 x 1 deliver
        # within 5 % of each other: docs/pipeline_throughput.md).
        cores = os.cpu_count() or 1
        self.num_pipelines = c.num_pipelines or (4 if c.device == "gpu" else min(4, cores))
        self.num_threads = c.num_threads or (4 if c.device == "gpu" else max(1, cores // self.num_pipelines))
        self.state = LoaderState(self.index, c.cut_gops, c.max_failures, self.samples_per_epoch, c.device)
        self.epoch, self.start_batch = 0, 0
        self._decoders: list[Decoder] = []

    # ------------------------------------------------------------ the epoch

    def __len__(self) -> int:
        """Batches per epoch, the same on every rank."""
        return num_batches(len(self.index), self.config)

    @property
    def samples_per_epoch(self) -> int:
        """Videos this rank reads in an epoch: what a fractional `max_failures` is a fraction of."""
        c = self.config
        if c.mode == "train":
            return len(self) * c.batch_size
        part = rank_part(len(self.index), c.rank, c.world_size, equal=False)
        return part.stop - part.start

    @property
    def failures(self) -> list[dict]:
        """The videos of the current epoch that could not be delivered (key, video_index, shard, stage, reason)."""
        return self.state.failures

    @property
    def cut_gops(self) -> bool:
        """Whether views are still cut to their GOPs (False for good once a decoder rejected a cut)."""
        return self.state.cut_gops

    def plan(self, epoch: int) -> EpochPlan:
        """This rank's plan of `epoch`: what it delivers, computed from the index alone."""
        return EpochPlan(self.index, self.config, epoch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch whose shard order, shuffle and augmentation the next iteration draws, and
        the batch it starts at (exact resume: earlier batches are neither read nor decoded)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def host_batches(self, epoch: int, start_batch: int = 0) -> Iterator[HostBatch]:
        """The host stages alone (plan, fetch, verify, cut, batches): what DALI is fed, batch by batch."""
        plan = self.plan(epoch)
        fetched = self.fetcher(plan, start_batch, lambda: self.state.cut_gops)
        return host_batches(plan, fetched, start_batch, self.state)

    def close(self) -> None:
        """Stop the reader processes, if any (threads need nothing)."""
        self.fetcher.close()

    # ------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict]:
        c = self.config
        if not self._decoders:
            self._decoders = [Decoder(self.pipeline_config, c.device, c.batch_size, self.num_threads, c.device_id,
                                      c.seed, self.state, self._read_again) for _ in range(self.num_pipelines)]
        stop = threading.Event()
        inboxes = [queue.Queue(c.prefetch) for _ in self._decoders]
        outboxes = [queue.Queue(c.prefetch) for _ in self._decoders]
        self.state.new_epoch()
        epoch, start_batch = self.epoch, self.start_batch
        self.start_batch = 0                   # a resume point applies to one iteration
        threads = [threading.Thread(target=self._feed, args=(epoch, start_batch, inboxes, stop), daemon=True)]
        threads += [threading.Thread(target=self._drive, args=(p, inboxes[p], outboxes[p], stop), daemon=True)
                    for p in range(len(self._decoders))]
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
                if c.device == "gpu":
                    _wait_on_current_stream(item)
                yield item
        finally:
            _stop(*running)
            _RUNNING.discard(running)

    def _feed(self, epoch: int, start_batch: int, inboxes: list[queue.Queue], stop: threading.Event) -> None:
        """Feeder thread: host batches, round-robin over the pipelines' inboxes."""
        try:
            for k, batch in enumerate(self.host_batches(epoch, start_batch)):
                if not _put(inboxes[k % len(inboxes)], batch, stop):
                    return
            for inbox in inboxes:
                _put(inbox, None, stop)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, which raises it
            for inbox in inboxes:
                _put(inbox, e, stop)

    def _drive(self, p: int, inbox: queue.Queue, outbox: queue.Queue, stop: threading.Event) -> None:
        """Driver thread of pipeline `p`: host batches in, torch batches out, errors passed on.

        On the GPU all its work is queued on a stream of its own; each batch carries an event that the
        caller's stream waits for.
        """
        stream = torch.cuda.Stream(self.config.device_id) if self.config.device == "gpu" else None
        while (batch := _get(inbox, stop)) is not None and not isinstance(batch, BaseException):
            try:
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    result = self._to_torch(*self._decoders[p](batch, stream), stream)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread, which raises it
                result = e
            if not _put(outbox, result, stop) or isinstance(result, BaseException):
                return
        _put(outbox, batch, stop)

    def _to_torch(self, views: Views, video: torch.Tensor, stream) -> dict:
        """The hand-off: the batch dict on the clips' device, with an event to wait on for the GPU."""
        rows = views.rows
        host = {"label": torch.from_numpy(self.index["label"][rows].astype(np.int64)),
                "video_index": torch.from_numpy(rows.astype(np.int64)), "clip": torch.from_numpy(views.clip),
                "crop": torch.from_numpy(views.crop), "valid": torch.from_numpy(views.valid)}
        out = {"video": video, "key": self.index.keys[rows].tolist()}
        out |= {name: t.to(video.device, non_blocking=True) for name, t in host.items()}
        if stream is not None:
            out["_ready"] = stream.record_event()
        return out

    def _read_again(self, row: int) -> bytes:
        """A video's whole bytes, read again (a GOP cut the decoder rejected is decoded whole)."""
        data = read_whole(self.reader, row)
        if isinstance(data, SampleError):
            raise data
        return data


def _count_short_videos(index: ShardIndex, config: LoaderConfig, where: str) -> int:
    """Videos too short for one clip (sampling then repeats or wraps frames, as documented), with one warning."""
    if index.media == "image":
        return 0
    t, sampling = config.contract.num_frames, config.sampling
    needed = t if sampling == "uniform" else (t - 1) * config.stride + 1
    short = int((index["num_frames"] < needed).sum())
    if short:
        warnings.warn(f"{short} of {len(index)} videos in {where} have fewer than the {needed} frames a {sampling} "
                      f"clip of {t} spans, so their clips repeat or wrap frames (loader.short_videos)",
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


def _wait_on_current_stream(batch: dict) -> None:
    """Make the caller's CUDA stream wait for the driver's copy, and keep the memory alive on it."""
    current = torch.cuda.current_stream()
    current.wait_event(batch.pop("_ready"))
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            value.record_stream(current)


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
