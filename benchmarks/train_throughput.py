"""Training-step throughput with the real loader against the compute ceiling, measured in one run.

    python -m benchmarks.train_throughput --config configs/sample_tsm.yaml --config configs/sample_sifar.yaml \
        data.train.shards=data/shards data.val.shards=data/shards
    python -m benchmarks.train_throughput --device cuda \
        --config "configs/cnn_study_k400_f8.yaml model.name=tsm_r50" --config configs/sifar_b14_k400.yaml \
        data.train.shards=/data/k400-shards data.val.shards=/data/k400-shards data.batch_size=32

A --config may carry its own overrides after the path; the trailing key=value ones apply to every recipe.

For each recipe the same model and the same `Trainer.update` (augmentation, autocast, backward,
optimizer) run twice: fed by the configured loader (`VideoLoader` streaming the shards), and fed batches
made beforehand and kept on the device, which is the most the step can do (the ceiling), in alternating
windows whose medians are reported. Reported:
clips/s of both, their ratio, and the share of wall time the step spent waiting for the loader.
The table goes to docs/train_throughput.md.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.report import write_section
from train.checkpoint import unwrap
from train.config import load_config
from train.data import Source, build_loader
from train.loop import Trainer, setup

OUT = Path(__file__).resolve().parent.parent / "docs" / "train_throughput.md"


class Premade:
    """Batches taken from the real loader once and replayed from device memory: no decoding, no waiting."""

    def __init__(self, loader, count: int, device):
        self.batches = []
        loader.set_epoch(0)
        for i, batch in enumerate(loader):
            if i == count:
                break
            self.batches.append({k: v.to(device).clone() if isinstance(v, torch.Tensor) and k != "valid" else v
                                 for k, v in batch.items()})   # `valid` stays on the host, as the loader gives it

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return iter(self.batches)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(trainer: Trainer, updates: int, warmup: int) -> dict:
    for _ in range(warmup):
        trainer.update(trainer.accum)
    _sync(trainer.device)
    trainer.throughput.reset()
    began = time.perf_counter()
    for _ in range(updates):
        trainer.update(trainer.accum)
    _sync(trainer.device)
    stats = trainer.throughput.read()
    stats["seconds"] = time.perf_counter() - began
    return stats


def bench(cfg: dict, updates: int, warmup: int, repeats: int) -> dict:
    """Alternate loader and ceiling windows `repeats` times and keep the medians, so that a load change
    on a shared machine hits both sides alike."""
    model, device = setup(cfg)
    module = unwrap(model)
    kw = dict(contract=module.contract, device=device)
    loader = build_loader(cfg, cfg["data"]["name"], "train", **kw)
    streamed = Trainer(cfg, model, [Source(cfg["data"]["name"], loader, cycle=True)], device=device)
    own = build_loader(cfg, cfg["data"]["name"], "train", **kw)   # not shared
    premade = Premade(own, count=min(8, len(own)), device=device)
    replayed = Trainer(cfg, model, [Source(cfg["data"]["name"], premade, cycle=True)], device=device)
    real, ceiling = [], []
    for i in range(repeats):
        real.append(measure(streamed, updates, warmup if i == 0 else 0))
        ceiling.append(measure(replayed, updates, warmup if i == 0 else 0))
    for trainer in (streamed, replayed):   # end the loader's threads before the next recipe is measured
        trainer.sources[0].close()
    med = lambda runs, key: statistics.median(r[key] for r in runs)   # noqa: E731
    m = cfg["model"]
    options = ", ".join(f"{k}={v}" for k, v in m["options"].items())
    return {"recipe": cfg["name"], "model": m["name"] + (f" ({options})" if options else ""),
            "input": f"{m['num_frames']}x{m['img_size']}",
            "layout": module.layout, "batch": cfg["data"]["batch_size"] * cfg["optim"]["accum_steps"],
            "amp": str(streamed.amp).replace("torch.", "") if streamed.amp else "fp32",
            "loader_clips_s": med(real, "clips_per_s"), "data_wait": med(real, "data_wait"),
            "ceiling_clips_s": med(ceiling, "clips_per_s"), "ceiling_data_wait": med(ceiling, "data_wait"),
            "ratio": med(real, "clips_per_s") / med(ceiling, "clips_per_s"), "updates": updates * repeats}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


TITLE = """# Training throughput: real loader vs. the compute ceiling

Measured by `benchmarks/train_throughput.py` in one run: the same model and training step
(augmentation, autocast, backward, optimizer update) fed by `VideoLoader` streaming the shards,
then fed batches made beforehand and held on the device (the ceiling), in alternating windows
(medians reported). *data wait* is the share of wall time the step spent waiting in `next(batch)`.
A loader that keeps up but shares the machine with the step (CPU decoding threads taking cores, its
Python threads taking the GIL) shows little data wait and a loader / ceiling ratio below 1; a loader
that cannot keep up shows the wait itself. Each recipe runs in a fresh process. Each device has its
own section, rewritten by a run there.
"""


def section(rows: list[dict], device: str, command: str, load: tuple[float, float]) -> str:
    lines = [f"## {'GPU' if device.startswith('cuda') else 'CPU'} run", "",
             f"Device: {device_name(device)}; {time.strftime('%Y-%m-%d')}; 1-minute load average "
             f"{load[0]:.1f} at the start, {load[1]:.1f} at the end (other work on a shared machine makes CPU "
             "figures noisy; the alternating windows spread that noise over both columns).", "",
             f"Command: `{command}`", "",
             "| recipe | model | frames x size | layout | clips/update | precision | loader clips/s | data wait "
             "| ceiling clips/s | loader / ceiling |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['model']} | {r['input']} | {r['layout']} | {r['batch']} | {r['amp']} | "
                     f"{r['loader_clips_s']:.1f} | {100 * r['data_wait']:.0f} % | {r['ceiling_clips_s']:.1f} | "
                     f"{r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action="append", required=True,
                   help="recipe to measure, optionally followed by its own overrides (quoted); repeatable")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every recipe")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--updates", type=int, default=10, help="measured updates per window")
    p.add_argument("--warmup", type=int, default=3, help="updates before measuring (allocator, cudnn, loader fill)")
    p.add_argument("--repeats", type=int, default=3, help="alternating loader/ceiling windows; medians reported")
    p.add_argument("--out", default=str(OUT), help="markdown doc whose section for this device is rewritten")
    args = p.parse_args(argv)
    rows, load_before = [], os.getloadavg()[0]
    command = "python -m benchmarks.train_throughput " + " ".join(sys.argv[1:] if argv is None else argv)
    section_name = "gpu" if args.device.startswith("cuda") else "cpu"
    for spec in args.config:
        recipe, *own = shlex.split(spec)
        cfg = load_config(recipe, [*args.overrides, *own, f"train.device={args.device}"])
        # A fresh process per recipe: one recipe's loaders (DALI pipelines, threads) never slow the next.
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            row = pool.apply(bench, (cfg, args.updates, args.warmup, args.repeats))
        print(f"{row['recipe']}: loader {row['loader_clips_s']:.1f} clips/s (data wait {100 * row['data_wait']:.0f} %),"
              f" ceiling {row['ceiling_clips_s']:.1f} clips/s, ratio {row['ratio']:.2f}", flush=True)
        rows.append(row)
        # after every recipe, so a run stopped by a time limit keeps what it measured
        write_section(args.out, TITLE, section_name, section(rows, args.device, command,
                                                             (load_before, os.getloadavg()[0])))
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
