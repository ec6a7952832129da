"""CPU per clip of the loader's host stages alone, with no decoder: what one training process can feed at
most, against the loader of an earlier commit in the same run.

    python -m benchmarks.host_ceiling                      # 48 clips of 300 frames made in /tmp/vidscale-bench300
    python -m benchmarks.host_ceiling --shards PATH        # a shard job's output root (split "train")

The host stages are everything before the DALI call: the epoch plan, reading the bytes, the sha256 check,
the GOP cut and the batch arrays (`VideoLoader.host_batches`). Each measurement runs in a fresh process
pinned to 1, 2 or all host cores (`os.sched_setaffinity`), which goes through the epoch once (page cache,
imports) and then times `--epochs` more: CPU time of the whole process (all its threads, and its reader
processes where there are any) per clip, clips per second, and bytes read from storage per clip.
Configurations are measured in turns, `--rounds` times, and the medians reported, so the load of other
users of a shared machine falls on all of them alike.

The baseline is the loader of commit `--baseline` (the one before the loader became plan + stages),
extracted with `git archive` and timed the same way through its `_host_batches`.

Read modes (READ_MODES, the loader options that select them): "whole" reads each video's whole tar member
and checks its sha256; "GOPs" reads only the GOPs the views need, from the packet table in the index, and
checks each GOP's crc32 (docs/pipelines.md, "Read modes"). The baseline reads whole members.

Writes docs/host_ceiling.md (or --doc), one section per machine kind.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "host_ceiling.md"
BASELINE = "eb3fe80"
WORKLOADS = {
    "TSN-8": {"sampling": "uniform", "num_frames": 8, "stride": 1, "layout": "super"},
    "dense 32x2": {"sampling": "dense", "num_frames": 32, "stride": 2, "layout": "BCTHW"},
}
TARGETS = {"TSN-8": 0.3, "dense 32x2": 0.5}      # CPU ms per clip, issue #14
READ_MODES = {"whole": {"gop_reads": False}, "GOPs": {"gop_reads": True}}
TITLE = ("# Host ceiling\n\nCPU per clip of VideoLoader's host stages (plan, fetch, verify, cut, batch arrays: "
         "everything before the DALI call) with no decoder, and the loader before it became plan + stages, in the "
         "same run. Written by `python -m benchmarks.host_ceiling`; see docs/pipelines.md, \"Host cost\".\n")


# ---------------------------------------------------------------- one measurement, in its own process

def child(spec: dict) -> dict:
    """Time the host stages as `spec` says; runs with the code under test first on sys.path."""
    cpus = sorted(os.sched_getaffinity(0))[:spec["cores"]]
    os.sched_setaffinity(0, cpus)
    from pipelines.loader import VideoLoader

    loader = VideoLoader(spec["shards"], spec["batch_size"], split="train", crop_size=224, short_side=(256, 320),
                         **spec["options"])
    read = {"bytes": 0}
    import pipelines.source as source

    if hasattr(source, "fetch_ranges"):       # every read of this commit's ShardReader, whole or GOPs
        fetch_ranges = source.fetch_ranges

        def counted(*args):
            got = fetch_ranges(*args)
            read["bytes"] += sum(len(data) for data in got if isinstance(data, bytes))
            return got
        source.fetch_ranges = counted
    else:                                     # the baseline's reads go through cat_file
        fs = loader.index.fs
        cat_file = fs.cat_file

        def counted(path, start=None, end=None, **kwargs):
            data = cat_file(path, start=start, end=end, **kwargs)
            read["bytes"] += len(data)
            return data
        fs.cat_file = counted                 # this process's reads; reader processes count their own

    def epoch(e: int) -> int:
        if hasattr(loader, "host_batches"):
            return sum(len(batch) for batch in loader.host_batches(e))
        return sum(len(batch) for batch in loader._host_batches(e, 0))     # the baseline commit's loader

    epoch(0)
    read["bytes"] = 0
    cpu, own, wall, clips = process_tree_cpu_seconds(), time.process_time(), time.perf_counter(), 0
    for e in range(1, spec["epochs"] + 1):
        clips += epoch(e)
    result = {"clips": clips, "cpu_s": process_tree_cpu_seconds() - cpu, "own_cpu_s": time.process_time() - own,
              "wall_s": time.perf_counter() - wall, "bytes": read["bytes"]}
    if hasattr(loader, "close"):
        loader.close()
    return result


class DaliSample:
    """DALI's parallel external_source callback: the view at position `idx_in_epoch` of the epoch's plan, read,
    checked and cut in one of DALI's worker processes by the loader's own stage functions. A pure function
    of (epoch, position), as DALI asks: each worker builds the epoch's plan itself."""

    def __init__(self, shards: str, options: dict, batch_size: int):
        self.shards, self.options, self.batch_size = shards, options, batch_size
        self.plans: dict = {}

    def __call__(self, info):
        from pipelines.fetch import prepared, read_whole
        from pipelines.plan import EpochPlan
        from pipelines.source import ShardIndex, ShardReader

        if not self.plans:
            self.index = ShardIndex(self.shards, "train")
            self.reader = ShardReader(self.index, readers=1)
            from pipelines.config import LoaderConfig
            self.config = LoaderConfig.of(self.batch_size, **self.options)
        if info.epoch_idx not in self.plans:
            self.plans = {info.epoch_idx: EpochPlan(self.index, self.config, info.epoch_idx)}
        plan = self.plans[info.epoch_idx]
        if info.idx_in_epoch >= plan.num_batches * self.batch_size:
            raise StopIteration
        views = plan.views_at(np.array([info.idx_in_epoch]))
        (one,) = prepared(self.reader([int(views.rows[0])]), iter([views.frames]), lambda: True, plan.media,
                          lambda row: read_whole(self.reader, row))
        return np.frombuffer(one.encoded[0], np.uint8), one.frames[0].astype(np.int32), views.roi[0]


def dali_child(spec: dict) -> dict:
    """The host stages run by DALI's parallel external_source in `cores` worker processes, no decoder."""
    cpus = sorted(os.sched_getaffinity(0))[:spec["cores"]]
    os.sched_setaffinity(0, cpus)
    from nvidia.dali import fn, pipeline_def, types

    options = {**spec["options"], "crop_size": 224, "short_side": (256, 320)}
    source = DaliSample(spec["shards"], options, spec["batch_size"])

    @pipeline_def(batch_size=spec["batch_size"], num_threads=1, device_id=None, py_num_workers=spec["cores"],
                  py_start_method="spawn", prefetch_queue_depth=2 * spec["cores"])
    def host_only():
        return tuple(fn.external_source(source=source, num_outputs=3, parallel=True, batch=False,
                                        dtype=[types.UINT8, types.INT32, types.FLOAT]))

    pipe = host_only()
    pipe.build()

    def epoch() -> int:
        clips = 0
        try:
            while True:
                clips += len(pipe.run()[0])
        except StopIteration:
            pipe.reset()
        return clips

    epoch()
    cpu, own, wall, clips = process_tree_cpu_seconds(), time.process_time(), time.perf_counter(), 0
    for _ in range(spec["epochs"]):
        clips += epoch()
    return {"clips": clips, "cpu_s": process_tree_cpu_seconds() - cpu, "own_cpu_s": time.process_time() - own,
            "wall_s": time.perf_counter() - wall, "bytes": 0}


def process_tree_cpu_seconds() -> float:
    """CPU seconds of this process and its children (reader, DALI or DataLoader worker processes), every
    thread, from /proc. Standard library only: it runs in the baseline's child, which has no benchmarks/."""
    me, ticks = os.getpid(), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(pid) == me or int(fields[1]) == me:
            ticks += int(fields[11]) + int(fields[12])          # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


def run(code: Path, spec: dict) -> dict:
    """`child(spec)` in a fresh interpreter that imports the loader from `code`."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, cwd=tempfile.gettempdir(),
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"measuring {spec} with the code in {code} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def baseline_code(commit: str, into: Path) -> Path:
    """The packages the loader of `commit` needs, extracted from git."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "pipelines", "contract"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


# ---------------------------------------------------------------- the tables

def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return f"{model}, {os.cpu_count()} cores"


def core_counts() -> list[int]:
    every = len(os.sched_getaffinity(0))
    return sorted({1, min(2, every), every})


def section(a, load: tuple, shards_info: str, lines: list[str], stages: list[str]) -> str:
    out = [
        "## CPU run: `python -m benchmarks.host_ceiling`",
        "",
        f"- machine: {machine()}; load average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end "
        "(the machine is shared: clips/s moves with other users' load, CPU ms per clip much less)",
        f"- data: {shards_info}",
        f"- batches of {a.batch_size}, training views (crop 224 from a short side jittered in [256, 320], flips), "
        f"{a.epochs} epochs timed per measurement after one untimed, median of {a.rounds} rounds taken in turns",
        f"- baseline: the loader of commit {a.baseline} (before plan + stages), its `_host_batches`, from `git archive`",
        f"- ours: this commit's `VideoLoader.host_batches`; readers are threads unless the row says processes",
        "",
        "CPU ms/clip counts every process (the loader's and its reader or DALI worker processes); \"of which in "
        "the loader's process\" is what stays in the training process, where the interpreter lock serialises it.",
        "",
        "| workload | read mode | loader | readers | cores | CPU ms/clip | of which in the loader's process | clips/s "
        "| MB read/clip | target, in the loader's process |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *lines,
        "",
    ]
    if stages:
        out += ["### Per stage, one core", "",
                "CPU ms per clip with one stage turned off at a time (`verify=False`, `cut_gops=False`), one core, "
                "whole reads, the same for both loaders: what is left with both off is reading the bytes, the plan "
                "and the batches.", "",
                "| workload | loader | all stages | verify | GOP cut | rest (read, plan, batches) |",
                "|---|---|---|---|---|---|", *stages, ""]
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_ceiling", description=__doc__.splitlines()[0])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shards", default=None, help="a shard job's output root (split 'train'); default: made here")
    p.add_argument("--data", default="/tmp/vidscale-bench300", help="where the 300-frame shards are made")
    p.add_argument("--videos", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline", default=BASELINE, help="commit whose loader is the baseline")
    p.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    p.add_argument("--cores", type=int, nargs="*", default=None, help="core counts (default: 1, 2 and all)")
    p.add_argument("--loaders", nargs="*", default=["baseline", "threads", "processes", "dali"],
                   choices=["baseline", "threads", "processes", "dali"])
    p.add_argument("--no-stages", action="store_true", help="skip the per-stage table")
    p.add_argument("--doc", default=str(DOC))
    a = p.parse_args(argv)
    if a.child is not None:
        spec = json.loads(a.child)
        print(json.dumps(dali_child(spec) if spec.get("dali") else child(spec)))
        return
    from benchmarks.clip_shards import clip_shards
    from benchmarks.report import write_section

    shards = a.shards or clip_shards(a.data, a.videos)
    import pyarrow.parquet as pq
    index = pq.read_table(Path(shards) / "train" / "index.parquet").to_pandas()
    sizes = sorted({f"{w}x{h}" for w, h in zip(index["width"], index["height"])})
    shards_info = (f"{len(index)} VP9 clips, {', '.join(sizes)}, {index['num_frames'].mean():.0f} frames at "
                   f"{index['fps'].iloc[0]:g} fps, GOP {index['gop'].iloc[0]}, {index['size'].mean() / 1e6:.2f} MB each "
                   f"(benchmarks/clip_shards.py: the sample dataset's motion clips, sharded by the shard job)")
    load_before = os.getloadavg()[0]
    lines, stages = [], []
    base = dict(shards=shards, batch_size=a.batch_size, epochs=a.epochs)

    def write():
        write_section(a.doc, TITLE, "cpu", section(a, (load_before, os.getloadavg()[0]), shards_info, lines, stages))

    with tempfile.TemporaryDirectory() as tmp:
        old = baseline_code(a.baseline, Path(tmp)) if "baseline" in a.loaders else None
        for name in a.workloads:
            workload = WORKLOADS[name]
            for mode, mode_options in READ_MODES.items():
                configs = []       # (loader, code, readers, cores, options, in DALI's workers)
                for cores in a.cores or core_counts():
                    if "baseline" in a.loaders and mode == "whole":
                        configs.append(("baseline", old, "8 threads", cores, {}, False))
                    if "threads" in a.loaders:
                        configs.append(("ours", REPO, "8 threads", cores, {**mode_options, "reader_processes": False},
                                        False))
                    if "processes" in a.loaders:
                        configs.append(("ours", REPO, f"{cores} processes", cores,
                                        {**mode_options, "readers": cores, "reader_processes": True}, False))
                    if "dali" in a.loaders and mode == "whole":   # DALI's worker processes run our stages per sample
                        configs.append(("ours in DALI's parallel external_source", REPO, f"{cores} processes", cores,
                                        mode_options, True))
                got = {i: [] for i in range(len(configs))}
                for _ in range(a.rounds):
                    for i, (_, code, _, cores, options, dali) in enumerate(configs):
                        got[i].append(run(code, {**base, "cores": cores, "dali": dali,
                                                 "options": {**workload, **options}}))
                for i, (who, _, readers, cores, _, _) in enumerate(configs):
                    ms = np.median([1000 * r["cpu_s"] / r["clips"] for r in got[i]])
                    own = np.median([1000 * r["own_cpu_s"] / r["clips"] for r in got[i]])
                    rate = np.median([r["clips"] / r["wall_s"] for r in got[i]])
                    mb = np.median([r["bytes"] / r["clips"] / 1e6 for r in got[i]])
                    mb_text = f"{mb:.2f}" if mb else "- (read in the processes)"
                    lines.append(f"| {name} | {mode} | {who} | {readers} | {cores} | {ms:.2f} | {own:.2f} | {rate:.0f} "
                                 f"| {mb_text} | {TARGETS[name]} |")
                    print(lines[-1], flush=True)
                write()
            if a.no_stages:
                continue
            for who, code in (("baseline", old), ("ours", REPO)) if "baseline" in a.loaders else (("ours", REPO),):
                costs = {}
                for label, options in (("all", {}), ("no verify", {"verify": False}), ("no cut", {"cut_gops": False}),
                                       ("neither", {"verify": False, "cut_gops": False})):
                    whole = READ_MODES["whole"] if who == "ours" else {}    # the baseline reads whole members only
                    costs[label] = np.median([1000 * r["cpu_s"] / r["clips"] for r in
                                              (run(code, {**base, "cores": 1,
                                                          "options": {**workload, **whole, **options}})
                                               for _ in range(a.rounds))])
                stages.append(f"| {name} | {who} | {costs['all']:.2f} | {costs['all'] - costs['no verify']:.2f} | "
                              f"{costs['all'] - costs['no cut']:.2f} | {costs['neither']:.2f} |")
                print(stages[-1], flush=True)
                write()
    print(f"wrote {a.doc}")


if __name__ == "__main__":
    main()
