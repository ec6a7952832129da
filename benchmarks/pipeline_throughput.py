"""Clips per second of VideoLoader against a PyAV + torch DataLoader baseline, in the same run.

    python -m benchmarks.pipeline_throughput                  # CPU: both on every host core
    python -m benchmarks.pipeline_throughput --device gpu     # ours on NVDEC + GPU; baseline still decodes on CPU
    python -m benchmarks.pipeline_throughput --shards PATH    # existing shard job output instead of the sample set

Two workloads, the common ones of the papers: TSN-8 (8 uniform segments, 224 crop out of a 256-320 jittered
short side, super-image layout) and dense 32x2 (32 frames at stride 2, 224, BCTHW). The baseline is what a
plain PyTorch project does: a map-style Dataset that reads the video's bytes from the shard, decodes the
sampled frames with PyAV (seeking to the keyframe before each one when that is shorter than decoding on),
crops, resizes, flips and normalises with torch, in a DataLoader with one worker per host core. It draws
its frames, windows and flips with the same `pipelines.sampling` functions, so both produce the same
tensors up to resampling filters. Without --shards the embedded motion dataset is generated at a realistic
size (320x256, 25 fps, 4 s) and sharded to VP9 by the real shard job (Ray on 127.0.0.1).

Writes docs/pipeline_throughput.md (or --doc) with the device named.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
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

from benchmarks.report import write_section
from contract.inputs import IMAGENET_MEAN, IMAGENET_STD
from models.layouts import to_super_image
from pipelines.loader import VideoLoader
from pipelines.sampling import frame_indices, scale_jitter_window

DOC = Path(__file__).resolve().parents[1] / "docs" / "pipeline_throughput.md"
WORKLOADS = {
    "TSN-8 (uniform, 224, super)": {"sampling": "uniform", "num_frames": 8, "stride": 1, "layout": "super"},
    "dense 32x2 (224, BCTHW)": {"sampling": "dense", "num_frames": 32, "stride": 2, "layout": "BCTHW"},
}
CROP, SHORT_SIDE = 224, (256, 320)
TITLE = ("# Pipeline throughput\n\nVideoLoader against a PyAV + torch DataLoader baseline producing the same tensors, "
         "measured in the same run. Each section is rewritten by a run on its device; see docs/pipelines.md.\n")


# ---------------------------------------------------------------- data

def sample_shards(folder: Path, videos_per_class: int) -> str:
    """The embedded dataset at 320x256 (short side 256), 25 fps, 4 s, sharded to VP9 by the shard job."""
    output = folder / "shards"
    if (output / "manifest.json").exists():
        return str(output)
    import ray

    from shards.job import JobConfig, run_job, transcode_options
    from shards.sample_dataset import make_sample_dataset

    print(f"making the sample dataset in {folder} ...", flush=True)
    source = make_sample_dataset(folder / "source", num_classes=8, train_per_class=videos_per_class,
                                 val_per_class=0, size=(320, 256), fps=25, seconds=4, broken=False, progress=True)
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="ERROR")
    try:
        run_job(JobConfig(annotations=source["annotations"], videos=source["videos"], output=str(output),
                          transcode=transcode_options(short_side=256, codec="vp9", gop=8), splits=("train",),
                          shard_size=64 << 20, workers=os.cpu_count() or 1))
    finally:
        ray.shutdown()
    return str(output)


# ---------------------------------------------------------------- the baseline

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


class PyAVClips(Dataset):
    """The baseline: one training clip per index row, exactly the choices VideoLoader makes, on the CPU."""

    def __init__(self, shards: str, sampling: str, num_frames: int, stride: int, layout: str, seed: int = 0):
        self.root = Path(shards)
        self.rows = pq.read_table(self.root / "train" / "index.parquet").to_pylist()
        self.sampling, self.num_frames, self.stride, self.layout, self.seed = sampling, num_frames, stride, layout, seed
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        with open(self.root / row["shard"], "rb") as f:
            f.seek(row["offset"])
            data = f.read(row["size"])
        rng = np.random.default_rng([self.seed, i])
        indices = frame_indices(self.sampling, row["num_frames"], self.num_frames, self.stride, rng=rng)
        y0, x0, y1, x1 = scale_jitter_window(row["height"], row["width"], CROP, SHORT_SIDE, rng)
        frames = torch.from_numpy(pyav_decode(data, indices, row["gop"]))
        region = frames[:, int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))].permute(0, 3, 1, 2).float()
        clip = F.interpolate(region, size=(CROP, CROP), mode="bilinear", antialias=True, align_corners=False)
        if rng.random() < 0.5:
            clip = clip.flip(-1)
        clip = (clip - self.mean) / self.std                                # T, C, H, W
        if self.layout == "super":
            return to_super_image(clip[None])[0], row["label"]
        return clip.transpose(0, 1).contiguous(), row["label"]


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


def process_tree_cpu_seconds() -> float:
    """CPU time of this process and its children (the DataLoader workers), all threads, from /proc."""
    me, ticks = os.getpid(), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(pid) == me or int(fields[1]) == me:
            ticks += int(fields[11]) + int(fields[12])          # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


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


def one_core(shards: str, workload: dict, batch_size: int, rounds: int) -> dict[str, float]:
    """CPU ms per clip with one core's worth of work each: VideoLoader with one single-threaded pipeline,
    and the baseline's Dataset + collate in this process. Measured in turns; the median is reported."""
    torch.set_num_threads(1)
    dataset = PyAVClips(shards, workload["sampling"], workload["num_frames"], workload["stride"], workload["layout"])
    loaders = {cut: VideoLoader(shards, split="train", batch_size=batch_size, crop_size=CROP, short_side=SHORT_SIDE,
                                num_pipelines=1, num_threads=1, readers=1, prefetch=1, cut_gops=cut, **workload)
               for cut in (True, False)}
    costs = {"ours": [], "whole": [], "baseline": []}
    for r in range(rounds):
        for cut, loader in loaders.items():
            loader.set_epoch(r)
            batches = iter(loader)
            next(batches)                                       # pipelines built, threads started
            start, clips = time.process_time(), 0
            for batch in batches:
                clips += len(batch["key"])
            costs["ours" if cut else "whole"].append(1000 * (time.process_time() - start) / clips)
        start = time.process_time()
        for i in range(4):
            torch.utils.data.default_collate([dataset[((r * 4 + i) * batch_size + j) % len(dataset)]
                                             for j in range(batch_size)])
        costs["baseline"].append(1000 * (time.process_time() - start) / (4 * batch_size))
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


def baseline(shards: str, workload: dict, batch_size: int, device: str):
    workers = os.cpu_count() or 1
    dataset = PyAVClips(shards, workload["sampling"], workload["num_frames"], workload["stride"], workload["layout"])
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        worker_init_fn=_one_thread, persistent_workers=True, prefetch_factor=2,
                        pin_memory=device == "gpu")
    target = "cuda" if device == "gpu" else "cpu"

    def epoch(loader, e):
        return ((v.to(target, non_blocking=True), y) for v, y in loader)
    return endless(loader, epoch)


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


def section(a, rows: list[dict], every_core: list[str], one: list[str], swept: list[str], load: tuple) -> str:
    """This device's section of the doc, from what has been measured so far."""
    gpu = a.device == "gpu"
    sizes = sorted({(r["width"], r["height"]) for r in rows})
    size = f"{sizes[0][0]}x{sizes[0][1]}" + (f" .. {sizes[-1][0]}x{sizes[-1][1]}" if len(sizes) > 1 else "")
    lines = [
        f"## {'GPU' if gpu else 'CPU'} run: `python -m benchmarks.pipeline_throughput"
        + (" --device gpu" if gpu else "") + "`",
        "",
        "The loaders run in one process, in turns, on the same shards.",
        "",
        f"- device: {device_name(a.device)}",
        f"- data: {len(rows)} VP9 videos, {size}, {np.mean([r['num_frames'] for r in rows]):.0f} frames at "
        f"{rows[0]['fps']:g} fps, GOP {rows[0]['gop']} (the embedded motion dataset sharded by the shard job)",
        f"- training views: crop {CROP} from a short side jittered in {list(SHORT_SIDE)}, random flip, ImageNet "
        f"normalisation; batch {a.batch_size}",
        f"- VideoLoader: device={a.device}, DALI `fn.decoders.video` "
        f"({'mixed, NVDEC' if gpu else 'cpu, libavcodec'}), {a.num_pipelines or 'default'} pipelines; baseline: "
        f"PyAV decode (seeking to keyframes) + torch resize/crop/flip/normalise in a DataLoader with "
        f"{os.cpu_count()} workers",
        f"- load average (1 min) at the start and end: {load[0]:.1f}, {load[1]:.1f} on {os.cpu_count()} cores",
        "",
        "### Every host core",
        "",
        f"Median of {a.rounds} windows of {a.batches} batches per loader, taken in turns, each after {a.warmup} "
        "batches that drain what it prefetched while the others ran. CPU ms/clip is the CPU time of the whole "
        "process tree (all threads and the DataLoader's workers) per clip delivered. Other jobs share this "
        "machine, so clips/s depends on them.",
        "",
        "| workload | VideoLoader | PyAV + DataLoader | VideoLoader / PyAV |" + (" GPU during VideoLoader |" if gpu else ""),
        "|---|---|---|---|" + ("---|" if gpu else ""),
        *every_core,
        "",
    ]
    if one:
        lines += ["### One core each", "",
                  "CPU ms per clip with one core's worth of work: VideoLoader with one single-threaded pipeline, the "
                  "baseline's Dataset and collate in one process. This cost hardly depends on what else runs on the "
                  "machine; on a dedicated machine the all-core throughputs follow it. \"Whole videos to DALI\" is "
                  "VideoLoader with `cut_gops=False`: DALI then decodes every frame up to the last one a view needs "
                  "(it does not seek in in-memory videos; see pipelines/gops.py).", "",
                  "| workload | VideoLoader | VideoLoader, whole videos to DALI | PyAV + torch | PyAV / VideoLoader |",
                  "|---|---|---|---|---|", *one, ""]
    if swept:
        lines += ["### Pipelines", "",
                  f"VideoLoader alone on {next(iter(WORKLOADS))} by `num_pipelines` (median of {a.rounds} windows of "
                  f"{a.batches} batches): one DALI video decoder drives one NVDEC engine.", "",
                  "| pipelines | clips/s |" + (" GPU |" if gpu else ""), "|---|---|" + ("---|" if gpu else ""),
                  *swept, ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pipeline_throughput", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--shards", default=None, help="shard job output root (split 'train' is read)")
    p.add_argument("--data", default="/tmp/vidscale-bench", help="where the sample dataset and its shards go")
    p.add_argument("--videos-per-class", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=8,
                   help="batches dropped at the start of each window: more than either loader prefetches")
    p.add_argument("--batches", type=int, default=10, help="batches timed per window")
    p.add_argument("--rounds", type=int, default=5, help="alternating windows per loader (the median is reported)")
    p.add_argument("--num-pipelines", type=int, default=None, help="DALI pipelines (NVDEC engines used); default: VideoLoader's")
    p.add_argument("--sweep-pipelines", type=int, nargs="*", default=[], metavar="N",
                   help="also measure VideoLoader alone on TSN-8 with each of these numbers of pipelines")
    p.add_argument("--doc", default=str(DOC))
    a = p.parse_args(argv)
    shards = a.shards or sample_shards(Path(a.data), a.videos_per_class)
    rows = pq.read_table(Path(shards) / "train" / "index.parquet").to_pylist()
    load_before = os.getloadavg()[0]
    every_core, one, swept = [], [], []

    def write():   # after every row, so a run stopped by a time limit keeps what it measured
        block = section(a, rows, every_core, one, swept, (load_before, os.getloadavg()[0]))
        write_section(a.doc, TITLE, a.device, block)

    for name, workload in WORKLOADS.items():
        loaders = {"ours": ours(shards, workload, a.batch_size, a.device, a.num_pipelines),
                   "baseline": baseline(shards, workload, a.batch_size, a.device)}
        with monitoring(a.device) as monitor:
            got = compare(loaders, a.batch_size, a)
        for batches in loaders.values():
            batches.close()                                 # frees the pipelines, the workers and their memory
        cells = " | ".join(f"{rate:.1f} clips/s, {cpu:.0f} CPU ms/clip" for rate, cpu in got.values())
        gpu = f" {monitor.summary()} |" if monitor else ""
        every_core.append(f"| {name} | {cells} | {got['ours'][0] / got['baseline'][0]:.2f}x |{gpu}")
        print(every_core[-1], flush=True)
        write()
    if a.device == "cpu":
        for name, workload in WORKLOADS.items():
            cost = one_core(shards, workload, a.batch_size, a.rounds + 1)
            one.append(f"| {name} | {cost['ours']:.0f} ms | {cost['whole']:.0f} ms | {cost['baseline']:.0f} ms "
                       f"| {cost['baseline'] / cost['ours']:.2f}x |")
            print(one[-1], flush=True)
            write()
    for row in sweep(shards, next(iter(WORKLOADS.values())), a):
        swept.append(row)
        print(row, flush=True)
        write()
    print(f"wrote {a.doc}")


if __name__ == "__main__":
    main()
