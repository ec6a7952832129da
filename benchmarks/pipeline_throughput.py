"""Clips per second and CPU per clip of VideoLoader against PyAV, torchcodec and decord, in the same run.

    python -m benchmarks.pipeline_throughput                  # CPU: every loader on every host core
    python -m benchmarks.pipeline_throughput --device gpu     # ours on NVDEC + GPU; the others still decode on CPU
    python -m benchmarks.pipeline_throughput --shards PATH    # existing shard job output instead of the 300-frame clips

Two workloads, the common ones of the papers: TSN-8 (8 uniform segments, 224 crop out of a 256-320 jittered
short side, super-image layout) and dense 32x2 (32 frames at stride 2, 224, BCTHW). The contenders are
what a plain PyTorch project does: a map-style Dataset that reads the video's bytes from the shard, decodes
the frames with PyAV (seeking to the keyframe before each one when that is shorter than decoding on),
torchcodec (`VideoDecoder.get_frames_at`) or decord (`VideoReader.get_batch`), crops, resizes, flips and
normalises with torch, in a DataLoader with one worker per host core. Each takes its views (frames, window,
flip) from VideoLoader's own epoch plan, so all of them produce the same tensors up to resampling filters
(checked at the start: the PSNR of each contender's first batch against VideoLoader's). Without --shards,
300-frame clips (10 s at 30 fps, 340x256 and 456x256, VP9, GOP 8) are made by benchmarks/clip_shards.py.

Writes docs/pipeline_throughput.md (or --doc) with the device named.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import math
import os
import platform
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from benchmarks.clip_shards import clip_shards, repeated
from benchmarks.host_ceiling import process_tree_cpu_seconds
from benchmarks.report import write_section
from contract.inputs import IMAGENET_MEAN, IMAGENET_STD
from models.layouts import to_super_image
from pipelines.loader import VideoLoader

DOC = Path(__file__).resolve().parents[1] / "docs" / "pipeline_throughput.md"
WORKLOADS = {
    "TSN-8 (uniform, 224, super)": {"sampling": "uniform", "num_frames": 8, "stride": 1, "layout": "super"},
    "dense 32x2 (224, BCTHW)": {"sampling": "dense", "num_frames": 32, "stride": 2, "layout": "BCTHW"},
}
CROP, SHORT_SIDE = 224, (256, 320)
TITLE = ("# Pipeline throughput\n\nVideoLoader against PyAV, torchcodec and decord in a torch DataLoader, each producing "
         "the same tensors from the same views, measured in the same run. Each section is rewritten by a run on its "
         "device; see docs/pipelines.md.\n")


# ---------------------------------------------------------------- the contenders

def pyav_decode(data: bytes, indices: np.ndarray, gop: int) -> np.ndarray:
    """Frames at `indices` (T, H, W, 3) uint8: decode forward, seeking when the next frame is a GOP or more ahead."""
    wanted = sorted(set(indices.tolist()))
    got: dict[int, np.ndarray] = {}
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "NONE"
        rate, base = float(stream.average_rate), float(stream.time_base)
        position = -1
        frames = None
        for target in wanted:
            if frames is None or target - position > gop:
                container.seek(int(round(target / rate / base)), stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
            for frame in frames:
                position = int(round(frame.pts * base * rate))
                if position == target:
                    got[target] = frame.to_ndarray(format="rgb24")
                    break
    return np.stack([got[i] for i in indices.tolist()])


def torchcodec_decode(data: bytes, indices: np.ndarray, gop: int) -> np.ndarray:
    """torchcodec's own frame access (it seeks to the keyframe before a frame it has to jump to), one thread."""
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(data, seek_mode="approximate", num_ffmpeg_threads=1, dimension_order="NHWC")
    return decoder.get_frames_at(indices.tolist()).data.numpy()


def decord_decode(data: bytes, indices: np.ndarray, gop: int) -> np.ndarray:
    """decord's batch access (it seeks by its keyframe index), one thread."""
    import decord

    return decord.VideoReader(io.BytesIO(data), num_threads=1).get_batch(indices.tolist()).asnumpy()


DECODERS = {"PyAV": pyav_decode, "torchcodec": torchcodec_decode, "decord": decord_decode}


def unavailable(name: str, data: bytes) -> str | None:
    """None if the contender decodes `data` here, else why not (the table says so)."""
    try:
        DECODERS[name](data, np.array([0, 3]), 8)
    except Exception as e:  # noqa: BLE001 - an import or a missing FFmpeg library
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return None


class Clips(Dataset):
    """A contender: view i of VideoLoader's epoch plan (its frames, window and flip) decoded by `decoder`
    and resized, flipped and normalised with torch, as a plain PyTorch project would."""

    def __init__(self, shards: str, loader: VideoLoader, epoch: int, decoder: str):
        self.root, self.decoder = Path(shards), decoder
        plan = loader.plan(epoch)
        views = [plan.batch(k) for k in range(len(plan))]
        self.rows = np.concatenate([v.rows for v in views])
        self.frames = np.concatenate([v.frames for v in views])
        self.roi = np.concatenate([v.roi for v in views])
        self.mirror = np.concatenate([v.mirror for v in views])
        index = loader.index
        self.where = [(index["shard"][r], int(index["offset"][r]), int(index["size"][r])) for r in range(len(index))]
        self.labels = index["label"]
        self.gop = pq.read_table(self.root / "train" / "index.parquet", columns=["gop"]).column("gop").to_pylist()
        self.layout, self.num_frames = loader.config.contract.layout, loader.config.contract.num_frames
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        shard, offset, size = self.where[row]
        with open(self.root / shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        frames = torch.from_numpy(DECODERS[self.decoder](data, self.frames[i], self.gop[row]))
        y0, x0, y1, x1 = self.roi[i].tolist()
        region = frames[:, int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))].permute(0, 3, 1, 2).float()
        clip = F.interpolate(region, size=(CROP, CROP), mode="bilinear", antialias=True, align_corners=False)
        if self.mirror[i]:
            clip = clip.flip(-1)
        clip = (clip - self.mean) / self.std                                # T, C, H, W
        if self.layout == "super":
            return to_super_image(clip[None])[0], int(self.labels[row])
        return clip.transpose(0, 1).contiguous(), int(self.labels[row])


def _one_thread(_):
    torch.set_num_threads(1)


# ---------------------------------------------------------------- measuring

class GpuMonitor:
    """Samples NVDEC utilisation and used memory (pynvml if installed, else nvidia-smi) while a run lasts."""

    def __init__(self, device_id: int):
        self.device_id, self.samples, self._stop = device_id, [], threading.Event()

    def _sample(self):
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.device_id)
            return float(pynvml.nvmlDeviceGetDecoderUtilization(handle)[0]), pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30
        except ImportError:
            out = subprocess.run(["nvidia-smi", "-i", str(self.device_id), "--query-gpu=utilization.decoder,memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True).stdout
            dec, mem = (float(v) for v in out.strip().split(","))
            return dec, mem / 1024

    def _run(self):
        while not self._stop.wait(0.5):
            self.samples.append(self._sample())

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        if not self.samples:
            return "-"
        dec, mem = zip(*self.samples)
        return f"NVDEC {np.mean(dec):.0f} % (max {max(dec):.0f} %), {max(mem):.1f} GiB used"


def monitoring(device: str):
    """NVDEC and memory samples while a GPU run lasts; nothing to sample on the CPU."""
    return GpuMonitor(torch.cuda.current_device()) if device == "gpu" else contextlib.nullcontext()


def endless(loader, make_epoch):
    for epoch in itertools.count():
        yield from make_epoch(loader, epoch)


def window(batches, batch_size: int, warmup: int, measure: int, device: str) -> tuple[float, float]:
    """(clips/s, CPU ms per clip) over `measure` batches, after `warmup` batches that drain what was
    prefetched while the other loader was timed."""
    for _ in range(warmup):
        next(batches)
    cpu, start = process_tree_cpu_seconds(), time.perf_counter()
    for _ in range(measure):
        video = next(batches)[0]
        if device == "gpu":
            torch.cuda.synchronize()
        assert video.shape[0] == batch_size
    clips = measure * batch_size
    return clips / (time.perf_counter() - start), 1000 * (process_tree_cpu_seconds() - cpu) / clips


def compare(loaders: dict, batch_size: int, args) -> dict[str, tuple[float, float]]:
    """Median (clips/s, CPU ms/clip) of each loader over windows taken in turn, so load from other
    processes on a shared machine hits all of them alike."""
    results = {name: [] for name in loaders}
    for _ in range(args.rounds):
        for name, batches in loaders.items():
            results[name].append(window(batches, batch_size, args.warmup, args.batches, args.device))
    return {name: tuple(np.median(r, axis=0)) for name, r in results.items()}


def one_core(shards: str, workload: dict, batch_size: int, rounds: int, contenders: list[str]) -> dict[str, float]:
    """CPU ms per clip with one core's worth of work each: VideoLoader with one single-threaded pipeline
    (with and without the GOP cut), each contender's Dataset + collate in this process, on the same views.
    Measured in turns; the median is reported."""
    torch.set_num_threads(1)
    loaders = {cut: VideoLoader(shards, split="train", batch_size=batch_size, crop_size=CROP, short_side=SHORT_SIDE,
                                num_pipelines=1, num_threads=1, readers=1, prefetch=1, cut_gops=cut, **workload)
               for cut in (True, False)}
    datasets = {name: Clips(shards, loaders[True], 0, name) for name in contenders}
    costs = {"ours": [], "whole": [], **{name: [] for name in contenders}}
    for r in range(rounds):
        for cut, loader in loaders.items():
            loader.set_epoch(r)
            batches = iter(loader)
            next(batches)                                       # pipelines built, threads started
            start, clips = time.process_time(), 0
            for batch in batches:
                clips += len(batch["key"])
            costs["ours" if cut else "whole"].append(1000 * (time.process_time() - start) / clips)
        for name, dataset in datasets.items():
            start = time.process_time()
            for i in range(2):
                torch.utils.data.default_collate([dataset[((r * 2 + i) * batch_size + j) % len(dataset)]
                                                 for j in range(batch_size)])
            costs[name].append(1000 * (time.process_time() - start) / (2 * batch_size))
    torch.set_num_threads(os.cpu_count() or 1)
    return {name: float(np.median(c)) for name, c in costs.items()}


def ours(shards: str, workload: dict, batch_size: int, device: str, num_pipelines: int | None, cut_gops: bool = True):
    loader = VideoLoader(shards, split="train", batch_size=batch_size, crop_size=CROP, short_side=SHORT_SIDE,
                         train_crop="scale_jitter", device=device, num_pipelines=num_pipelines, cut_gops=cut_gops,
                         **workload)

    def epoch(loader, e):
        loader.set_epoch(e)
        return ((b["video"], b["label"]) for b in loader)
    return endless(loader, epoch)


def contender(shards: str, workload: dict, batch_size: int, device: str, decoder: str):
    """A DataLoader over the contender's Dataset, one worker per host core, VideoLoader's epoch-0 views."""
    workers = os.cpu_count() or 1
    plan_of = VideoLoader(shards, split="train", batch_size=batch_size, crop_size=CROP, short_side=SHORT_SIDE,
                          **workload)
    loader = DataLoader(Clips(shards, plan_of, 0, decoder), batch_size=batch_size, shuffle=False,
                        num_workers=workers, drop_last=True, worker_init_fn=_one_thread, persistent_workers=True,
                        prefetch_factor=2, pin_memory=device == "gpu")
    target = "cuda" if device == "gpu" else "cpu"

    def epoch(loader, e):
        return ((v.to(target, non_blocking=True), y) for v, y in loader)
    return endless(loader, epoch)


def same_tensors(shards: str, workload: dict, batch_size: int, contenders: list[str]) -> dict[str, float]:
    """PSNR (dB, over the normalised range) of each contender's first batch against VideoLoader's."""
    loader = VideoLoader(shards, split="train", batch_size=batch_size, crop_size=CROP, short_side=SHORT_SIDE,
                         num_pipelines=1, **workload)
    loader.set_epoch(0)
    ours_video = next(iter(loader))["video"].float().cpu()
    out = {}
    for name in contenders:
        theirs = torch.utils.data.default_collate([Clips(shards, loader, 0, name)[j] for j in range(batch_size)])[0]
        peak = float(ours_video.max() - ours_video.min())
        out[name] = float(10 * np.log10(peak ** 2 / F.mse_loss(theirs, ours_video).item()))
    return out


def device_name(device: str) -> str:
    if device == "gpu":
        return f"{torch.cuda.get_device_name()} + {os.cpu_count()} host cores"
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return f"CPU only: {model}, {os.cpu_count()} cores"


def sweep(shards: str, workload: dict, args) -> Iterator[str]:
    """Table rows of VideoLoader clips/s for each number of DALI pipelines in --sweep-pipelines: each
    pipeline's decoder drives one NVDEC engine, so this shows how many it takes to fill them (7 on an H100/H200)."""
    for count in args.sweep_pipelines:
        if args.device == "gpu":
            torch.cuda.empty_cache()                        # what is used during the window is this loader's
        batches = ours(shards, workload, args.batch_size, args.device, count)
        with monitoring(args.device) as monitor:
            rate = np.median([window(batches, args.batch_size, args.warmup, args.batches, args.device)[0]
                              for _ in range(args.rounds)])
        batches.close()                                     # ends the loader's threads before the next count
        yield f"| {count} | {rate:.1f} |" + (f" {monitor.summary()} |" if monitor else "")


def section(a, rows: list[dict], every_core: list[str], one: list[str], swept: list[str], load: tuple,
            missing: dict[str, str], psnr: list[str]) -> str:
    """This device's section of the doc, from what has been measured so far."""
    gpu = a.device == "gpu"
    sizes = sorted({(r["width"], r["height"]) for r in rows})
    size = ", ".join(f"{w}x{h}" for w, h in sizes)
    names = list(DECODERS)
    lines = [
        f"## {'GPU' if gpu else 'CPU'} run: `python -m benchmarks.pipeline_throughput"
        + (" --device gpu" if gpu else "") + "`",
        "",
        "The loaders run in one process, in turns, on the same shards and the same views.",
        "",
        f"- device: {device_name(a.device)}",
        f"- data: {len(rows)} VP9 videos, {size}, {np.mean([r['num_frames'] for r in rows]):.0f} frames at "
        f"{rows[0]['fps']:g} fps, GOP {rows[0]['gop']}, {np.mean([r['size'] for r in rows]) / 1e6:.2f} MB each "
        f"(benchmarks/clip_shards.py, sharded by the shard job), the index listing each {a.copies} times so that "
        f"an epoch holds {a.copies * len(rows) // a.batch_size} batches",
        f"- training views: crop {CROP} from a short side jittered in {list(SHORT_SIDE)}, random flip, ImageNet "
        f"normalisation; batch {a.batch_size}; every contender decodes VideoLoader's own views",
        f"- VideoLoader: device={a.device}, DALI `fn.decoders.video` "
        f"({'mixed, NVDEC' if gpu else 'cpu, libavcodec'}), {a.num_pipelines or 'default'} pipelines; contenders: "
        f"PyAV {av.__version__}, {_version('torchcodec')}, {_version('decord')}, each with torch resize/crop/flip/"
        f"normalise in a DataLoader with {os.cpu_count()} workers",
        f"- load average (1 min) at the start and end: {load[0]:.1f}, {load[1]:.1f} on {os.cpu_count()} cores",
        *[f"- {name}: not available here ({why})" for name, why in missing.items()],
        *([f"- same tensors: PSNR of each contender's first batch against VideoLoader's: {'; '.join(psnr)} "
           f"(the resampling filters differ)"] if psnr else []),
        "",
        "### Every host core",
        "",
        f"Median of {a.rounds} windows of {a.batches} batches per loader, taken in turns, each after {a.warmup} "
        "batches that drain what it prefetched while the others ran. CPU ms/clip is the CPU time of the whole "
        "process tree (all threads and the DataLoader's workers) per clip delivered. Other jobs share this "
        "machine, so clips/s depends on them.",
        "",
        "| workload | VideoLoader | " + " | ".join(names) + " |" + (" GPU during VideoLoader |" if gpu else ""),
        "|---|---|" + "---|" * len(names) + ("---|" if gpu else ""),
        *every_core,
        "",
    ]
    if one:
        lines += ["### One core each", "",
                  "CPU ms per clip with one core's worth of work: VideoLoader with one single-threaded pipeline, each "
                  "contender's Dataset and collate in one process, on the same views. This cost hardly depends on what "
                  "else runs on the machine; on a dedicated machine the all-core throughputs follow it. \"Whole "
                  "videos\" is VideoLoader with `cut_gops=False`: DALI then decodes every frame up to the last one a "
                  "view needs (it does not seek in in-memory videos; see pipelines/gops.py). The last column is the "
                  "best contender's cost over ours.", "",
                  "| workload | VideoLoader | VideoLoader, whole videos | " + " | ".join(names) + " | best / ours |",
                  "|---|---|---|" + "---|" * len(names) + "---|", *one, ""]
    if swept:
        lines += ["### Pipelines", "",
                  f"VideoLoader alone on {next(iter(WORKLOADS))} by `num_pipelines` (median of {a.rounds} windows of "
                  f"{a.batches} batches): one DALI video decoder drives one NVDEC engine.", "",
                  "| pipelines | clips/s |" + (" GPU |" if gpu else ""), "|---|---|" + ("---|" if gpu else ""),
                  *swept, ""]
    return "\n".join(lines)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"{package} {version(package)}"
    except PackageNotFoundError:
        return f"{package} (not installed)"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_throughput", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--shards", default=None, help="shard job output root (split 'train' is read)")
    p.add_argument("--data", default="/tmp/vidscale-bench300", help="where the 300-frame clips and their shards go")
    p.add_argument("--videos", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=4,
                   help="batches dropped at the start of each window: more than any loader prefetches")
    p.add_argument("--batches", type=int, default=6, help="batches timed per window")
    p.add_argument("--rounds", type=int, default=3, help="alternating windows per loader (the median is reported)")
    p.add_argument("--num-pipelines", type=int, default=None, help="DALI pipelines (NVDEC engines used); default: VideoLoader's")
    p.add_argument("--sweep-pipelines", type=int, nargs="*", default=[], metavar="N",
                   help="also measure VideoLoader alone on TSN-8 with each of these numbers of pipelines")
    p.add_argument("--copies", type=int, default=None,
                   help="times the index lists each clip; default: enough for epochs of 4 windows, since a window over "
                        "an epoch boundary times the loaders' epoch start, not their rate")
    p.add_argument("--doc", default=str(DOC))
    a = p.parse_args(argv)
    source = a.shards or clip_shards(a.data, a.videos)
    rows = pq.read_table(Path(source) / "train" / "index.parquet").to_pylist()
    a.copies = a.copies or math.ceil(4 * (a.warmup + a.batches) * a.batch_size / len(rows))
    shards = repeated(source, a.copies)
    first = rows[0]
    with open(Path(shards) / first["shard"], "rb") as f:
        f.seek(first["offset"])
        sample = f.read(first["size"])
    missing = {name: why for name in DECODERS if (why := unavailable(name, sample)) is not None}
    contenders = [name for name in DECODERS if name not in missing]
    load_before = os.getloadavg()[0]
    every_core, one, swept, psnr = [], [], [], []

    def write():   # after every row, so a run stopped by a time limit keeps what it measured
        block = section(a, rows, every_core, one, swept, (load_before, os.getloadavg()[0]), missing, psnr)
        write_section(a.doc, TITLE, a.device, block)

    for name, workload in WORKLOADS.items():
        got = same_tensors(shards, workload, a.batch_size, contenders)
        psnr.append(f"{name.split(' (')[0]}: " + ", ".join(f"{c} {db:.0f} dB" for c, db in got.items()))
    for name, workload in WORKLOADS.items():
        loaders = {"ours": ours(shards, workload, a.batch_size, a.device, a.num_pipelines),
                   **{c: contender(shards, workload, a.batch_size, a.device, c) for c in contenders}}
        with monitoring(a.device) as monitor:
            got = compare(loaders, a.batch_size, a)
        for batches in loaders.values():
            batches.close()                                 # frees the pipelines, the workers and their memory
        cells = [f"{got[c][0]:.1f} clips/s, {got[c][1]:.0f} CPU ms/clip" if c in got else "not available"
                 for c in ["ours", *DECODERS]]
        gpu = f" {monitor.summary()} |" if monitor else ""
        every_core.append(f"| {name} | {' | '.join(cells)} |{gpu}")
        print(every_core[-1], flush=True)
        write()
    if a.device == "cpu":
        for name, workload in WORKLOADS.items():
            cost = one_core(shards, workload, a.batch_size, a.rounds + 1, contenders)
            cells = [f"{cost[c]:.0f} ms" if c in cost else "not available" for c in DECODERS]
            best = min(cost[c] for c in contenders) if contenders else float("nan")
            one.append(f"| {name} | {cost['ours']:.0f} ms | {cost['whole']:.0f} ms | {' | '.join(cells)} "
                       f"| {best / cost['ours']:.2f}x |")
            print(one[-1], flush=True)
            write()
    for row in sweep(shards, next(iter(WORKLOADS.values())), a):
        swept.append(row)
        print(row, flush=True)
        write()
    print(f"wrote {a.doc}")


if __name__ == "__main__":
    main()
