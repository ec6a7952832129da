"""Evaluation with the papers' protocols: clip-level and video-level accuracy, temporal-order tests,
and the spatial / temporal effects of a model family measured against TSN.

Exact across ranks: every rank keeps one score row per view (video key, clip, crop); the rows are
gathered and de-duplicated by that identity before anything is averaged, so the padding a distributed
loader adds to even out ranks never counts a view (or a video) twice. Video-level scores are the mean
of a video's view logits (clips x crops), as in TSN/TSM/SIFAR testing.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from train.clips import autocast, input_memory_format, reorder

ORDERS = ("normal", "reversed", "shuffled")


@dataclass
class ViewScores:
    """One row per evaluated view."""
    keys: list[str]
    clips: np.ndarray
    crops: np.ndarray
    labels: np.ndarray
    logits: np.ndarray   # (views, classes) float32

    @classmethod
    def concat(cls, parts: list["ViewScores"]) -> "ViewScores":
        parts = [p for p in parts if len(p.keys)]
        if not parts:
            return cls([], np.zeros(0, int), np.zeros(0, int), np.zeros(0, int), np.zeros((0, 0), np.float32))
        return cls(sum((p.keys for p in parts), []), np.concatenate([p.clips for p in parts]),
                   np.concatenate([p.crops for p in parts]), np.concatenate([p.labels for p in parts]),
                   np.concatenate([p.logits for p in parts]))

    def select(self, rows) -> "ViewScores":
        rows = np.asarray(rows, dtype=np.int64)
        return ViewScores([self.keys[i] for i in rows], self.clips[rows], self.crops[rows],
                          self.labels[rows], self.logits[rows])

    def unique(self) -> "ViewScores":
        """Each (key, clip, crop) once: drops the duplicates of distributed padding."""
        seen, keep = set(), []
        for i, ident in enumerate(zip(self.keys, self.clips.tolist(), self.crops.tolist())):
            if ident not in seen:
                seen.add(ident)
                keep.append(i)
        return self.select(keep)

    def per_video(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(keys, labels, mean logits over each video's views), videos in first-seen order."""
        index: dict[str, int] = {}
        for key in self.keys:
            index.setdefault(key, len(index))
        rows = np.array([index[k] for k in self.keys], dtype=np.int64)
        sums = np.zeros((len(index), self.logits.shape[1]), np.float64)
        np.add.at(sums, rows, self.logits)
        counts = np.bincount(rows, minlength=len(index))[:, None]
        labels = np.zeros(len(index), np.int64)
        labels[rows] = self.labels
        return list(index), labels, (sums / counts).astype(np.float32)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1, top-5 and mean class accuracy (the mean of per-class recalls over classes present), in %."""
    if len(labels) == 0:
        return {"top1": float("nan"), "top5": float("nan"), "mean_class": float("nan"), "count": 0}
    k = min(5, logits.shape[1])
    ranked = np.argsort(-logits, axis=1, kind="stable")
    top1 = ranked[:, 0] == labels
    top5 = (ranked[:, :k] == labels[:, None]).any(axis=1)
    per_class = [top1[labels == c].mean() for c in np.unique(labels)]
    return {"top1": 100 * float(top1.mean()), "top5": 100 * float(top5.mean()),
            "mean_class": 100 * float(np.mean(per_class)), "count": int(len(labels))}


def _numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.cpu().numpy()
    return np.asarray(values).reshape(-1).astype(np.int64)


def _view_ids(batch: dict, n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    keys = [str(k) for k in batch["key"]]
    clips = _numpy(batch["clip"]) if "clip" in batch else np.zeros(n, np.int64)
    crops = _numpy(batch["crop"]) if "crop" in batch else np.zeros(n, np.int64)
    return keys, clips, crops


def permutations(order: str, batch: int, num_frames: int, generator: torch.Generator) -> torch.Tensor | None:
    if order == "normal":
        return None
    if order == "reversed":
        return torch.arange(num_frames - 1, -1, -1).expand(batch, -1)
    if order == "shuffled":
        return torch.argsort(torch.rand(batch, num_frames, generator=generator), dim=1)
    raise ValueError(f"frame order {order!r} is not one of {ORDERS}")


@torch.no_grad()
def predict(model, loader, *, device, layout: str, num_frames: int, grid: tuple[int, int] | None = None,
            amp_dtype=None, dataset: str | None = None,
            order: str = "normal", seed: int = 0, channels_last: bool = False, progress: bool = False) -> ViewScores:
    """Logits of every view this rank's loader yields, frames optionally reversed or shuffled."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    parts = []
    lead = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    total, began = len(loader), time.perf_counter()
    every = max(10, total // 10)
    for done, batch in enumerate(loader, 1):
        x = batch["video"].to(device, non_blocking=True)
        perms = permutations(order, len(x), num_frames, generator)
        if perms is not None:
            x = reorder(x, layout, num_frames, perms, grid)
        if channels_last and (fmt := input_memory_format(x, layout)) is not None:
            x = x.contiguous(memory_format=fmt)
        with autocast(device, amp_dtype):
            logits = model(x, dataset=dataset) if dataset is not None else model(x)
        keys, clips, crops = _view_ids(batch, len(x))
        scores = ViewScores(keys, clips, crops, _numpy(batch["label"]), logits.float().cpu().numpy())
        if "valid" in batch:   # padding and stand-ins for broken samples count nowhere
            scores = scores.select(np.flatnonzero(_numpy(batch["valid"]).astype(bool)))
        parts.append(scores)
        if lead and progress and (done % every == 0 or done == total):
            rate = done / (time.perf_counter() - began)
            print(f"eval ({order}): batch {done}/{total} | {rate:.1f} batches/s | ETA {(total - done) / rate:.0f}s",
                  file=sys.stderr, flush=True)
    return ViewScores.concat(parts)


def gather(scores: ViewScores) -> ViewScores:
    """All ranks' views on every rank, each view once."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, scores)
        scores = ViewScores.concat(parts)
    return scores.unique()


def summarize(scores: ViewScores) -> dict:
    """Clip-level (every view on its own) and video-level (views averaged) accuracy."""
    _, labels, video_logits = scores.per_video()
    return {"clip": accuracy(scores.logits, scores.labels), "video": accuracy(video_logits, labels),
            "views_per_video": len(scores.keys) / max(len(labels), 1)}


def evaluate(model, loader, *, orders=("normal",), **kwargs) -> dict:
    """{order: {"clip": {...}, "video": {...}}} over the whole (distributed) split."""
    return {order: summarize(gather(predict(model, loader, order=order, **kwargs))) for order in orders}


def spatiotemporal_effects(model_report: dict, tsn_report: dict, level: str = "video") -> dict:
    """Spatial and temporal effects of a model family, measured against TSN at equal backbone, frames and data.

    TSN averages per-frame predictions, so it sees appearance only and no frame order: it is the
    spatial reference. With A_m, A_m^shuf the model's top-1 on normal and shuffled frames and A_TSN
    TSN's top-1, the model's relative gain over TSN splits into
      Phi = (A_m - A_m^shuf) / A_TSN   the temporal effect: gain that needs frames in order;
      Psi = (A_m^shuf - A_TSN) / A_TSN  the spatial effect: gain that survives shuffling
    (Phi + Psi = (A_m - A_TSN) / A_TSN). Both reports must hold the "normal" and "shuffled" orders.
    """
    for name, report in (("model", model_report), ("TSN", tsn_report)):
        if "normal" not in report:
            raise ValueError(f"the {name} report has no 'normal' order; evaluate with eval.orders=[normal,shuffled]")
    if "shuffled" not in model_report:
        raise ValueError("the model report has no 'shuffled' order; evaluate with eval.orders=[normal,shuffled]")
    a_m = model_report["normal"][level]["top1"]
    a_shuf = model_report["shuffled"][level]["top1"]
    a_tsn = tsn_report["normal"][level]["top1"]
    if not a_tsn > 0:
        raise ValueError(f"TSN top-1 is {a_tsn}; the effects are relative to it and need it above 0")
    return {"phi": (a_m - a_shuf) / a_tsn, "psi": (a_shuf - a_tsn) / a_tsn, "gain": (a_m - a_tsn) / a_tsn,
            "top1": a_m, "top1_shuffled": a_shuf, "tsn_top1": a_tsn, "level": level}


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def report_markdown(report: dict) -> str:
    lines = [f"# Evaluation: {report.get('model', '?')} on {report.get('dataset', '?')}", "",
             f"checkpoint: `{report.get('checkpoint')}`; views per video: {report.get('views', '?')}", ""]
    for name, results in report["results"].items():
        lines += [f"## {name}", "", "| frame order | clip top-1 | clip top-5 | video top-1 | video top-5 | "
                  "video mean class | videos |", "|---|---|---|---|---|---|---|"]
        for order, r in results.items():
            c, v = r["clip"], r["video"]
            lines.append(f"| {order} | {_fmt(c['top1'])} | {_fmt(c['top5'])} | {_fmt(v['top1'])} | "
                         f"{_fmt(v['top5'])} | {_fmt(v['mean_class'])} | {v['count']} |")
        lines.append("")
    if report.get("effects"):
        lines += ["## Spatial and temporal effects against TSN", "",
                  "| dataset | Phi (temporal) | Psi (spatial) | gain over TSN | top-1 | shuffled | TSN top-1 |",
                  "|---|---|---|---|---|---|---|"]
        for name, e in report["effects"].items():
            lines.append(f"| {name} | {e['phi']:+.3f} | {e['psi']:+.3f} | {e['gain']:+.3f} | {_fmt(e['top1'])} "
                         f"| {_fmt(e['top1_shuffled'])} | {_fmt(e['tsn_top1'])} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, run_dir: str | Path) -> tuple[Path, Path]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = run_dir / "eval_report.json", run_dir / "eval_report.md"
    json_path.write_text(json.dumps(report, indent=2, default=float))
    md_path.write_text(report_markdown(report))
    return json_path, md_path
