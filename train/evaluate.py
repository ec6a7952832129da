"""Evaluation with the papers' protocols: clip-level and video-level accuracy, temporal-order tests,
and the spatial / temporal effects of a model family measured against TSN.

Exact across ranks: every rank keeps one score row per view (video key, clip, crop); the rows are
gathered and de-duplicated by that identity before anything is averaged, so the padding a distributed
loader adds to even out ranks never counts a view (or a video) twice. Video-level scores are the mean
of a video's view logits (clips x crops), as in TSN/TSM/SIFAR testing.

Nothing is dropped without a word: a video the loader could not read (or decode, in any of its views)
is left out whole and listed with its reason, and the report says "N of M videos evaluated". Beside the
report, the per-video scores go to a Parquet file (for ensembles) and each dataset's confusion matrix to
a PNG.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from train.clips import autocast, input_memory_format, reorder
from train.metrics import say

ORDERS = ("normal", "reversed", "shuffled")
NAMED_TICKS = 40       # a confusion matrix with more classes than this is drawn without class names
SHOWN_MISSING = 5      # missing videos named in the one-line summary (the report lists them all)
NOT_DELIVERED = {"stage": "delivery", "reason": "the loader delivered none of its views and reported no failure"}


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


def per_class(logits: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Top-1 (%) and the number of samples of every class of the model; top1 None where a class has none."""
    num_classes = logits.shape[1] if logits.ndim == 2 else 0
    hits = np.argmax(logits, axis=1) == labels if len(labels) else np.zeros(0, bool)
    out = []
    for c in range(num_classes):
        mine = labels == c
        out.append({"count": int(mine.sum()), "top1": 100 * float(hits[mine].mean()) if mine.any() else None})
    return out


def confusion(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(classes, classes) counts: row = true label, column = top-1 prediction."""
    num_classes = logits.shape[1]
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels, np.argmax(logits, axis=1)), 1)
    return matrix


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
            say(f"eval ({order}): batch {done}/{total} | {rate:.1f} batches/s | ETA {(total - done) / rate:.0f}s")
    return ViewScores.concat(parts)


def gather(scores: ViewScores) -> ViewScores:
    """All ranks' views on every rank, each view once."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, scores)
        scores = ViewScores.concat(parts)
    return scores.unique()


def gather_list(items: list) -> list:
    """Every rank's `items`, concatenated, on every rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, items)
        return [item for part in parts for item in part]
    return list(items)


def summarize(scores: ViewScores) -> dict:
    """Clip-level (every view on its own) and video-level (views averaged) accuracy, and the video-level
    accuracy of every class."""
    _, labels, video_logits = scores.per_video()
    video = {**accuracy(video_logits, labels), "per_class": per_class(video_logits, labels)}
    return {"clip": accuracy(scores.logits, scores.labels), "video": video,
            "views_per_video": len(scores.keys) / max(len(labels), 1)}


def split_keys(loader) -> list[str] | None:
    """Every video of the loader's split (its index), or None for a loader without an index."""
    index = getattr(loader, "index", None)
    return None if index is None else [str(k) for k in index.keys]


def coverage(expected: list[str] | None, scores: ViewScores, failures: list[dict]) -> dict:
    """How many of the split's videos were evaluated, and for each missing one why.

    `expected` is every video of the split; without it (a loader with no index), the videos are those
    evaluated plus those the loader reported as failed.
    """
    reasons: dict[str, dict] = {}
    for failure in failures:
        reasons.setdefault(str(failure["key"]), failure)
    evaluated = set(scores.keys)
    videos = set(expected) if expected is not None else evaluated | set(reasons)
    missing = []
    for key in sorted(videos - evaluated):
        why = reasons.get(key, NOT_DELIVERED)
        missing.append({"key": key, "shard": why.get("shard"), "stage": why["stage"], "reason": why["reason"]})
    return {"videos": len(videos), "evaluated": len(evaluated & videos), "missing": missing}


def combined(coverages: list[dict]) -> dict:
    """One coverage for several passes over a split (frame orders): a video missing from any is missing."""
    missing: dict[str, dict] = {}
    for cover in coverages:
        for entry in cover["missing"]:
            missing.setdefault(entry["key"], entry)
    videos = coverages[0]["videos"]
    return {"videos": videos, "evaluated": videos - len(missing), "missing": [missing[k] for k in sorted(missing)]}


def evaluate_views(model, loader, *, orders=("normal",), **kwargs) -> dict[str, tuple[ViewScores, dict]]:
    """Per frame order: the views of every rank, each once, and the split's coverage.

    A video the loader failed on in this pass is left out whole, even if some of its views decoded: its
    score would otherwise be an average over fewer views than the protocol says.
    """
    out = {}
    for order in orders:
        scores = predict(model, loader, order=order, **kwargs)
        failures = gather_list(list(loader.failures))
        scores = gather(scores)
        failed = {str(f["key"]) for f in failures}
        scores = scores.select([i for i, key in enumerate(scores.keys) if key not in failed])
        out[order] = (scores, coverage(split_keys(loader), scores, failures))
    return out


def evaluate(model, loader, *, orders=("normal",), **kwargs) -> dict:
    """{order: {"clip": {...}, "video": {...}, "coverage": {...}}} over the whole (distributed) split."""
    return {order: {**summarize(scores), "coverage": cover}
            for order, (scores, cover) in evaluate_views(model, loader, orders=orders, **kwargs).items()}


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


def missing_count(report: dict) -> int:
    return sum(len(c["missing"]) for c in report.get("coverage", {}).values())


def coverage_line(report: dict) -> str:
    """One line per report: "N of M videos evaluated" per dataset, and the first missing ones."""
    parts = []
    for name, c in report.get("coverage", {}).items():
        text = f"{c['evaluated']} of {c['videos']} videos evaluated"
        if c["missing"]:
            shown = ", ".join(f"{m['key']} ({m['stage']}: {m['reason']})" for m in c["missing"][:SHOWN_MISSING])
            more = f", ... ({len(c['missing'])} missing in all)" if len(c["missing"]) > SHOWN_MISSING else ""
            text += f"; missing: {shown}{more}"
        parts.append(f"{name}: {text}" if len(report["coverage"]) > 1 else text)
    return "evaluation: " + "; ".join(parts)


def _coverage_markdown(c: dict) -> list[str]:
    lines = [f"**{c['evaluated']} of {c['videos']} videos evaluated.**", ""]
    if c["missing"]:
        lines += ["Missing (left out of every number above):", "", "| video | shard | stage | reason |",
                  "|---|---|---|---|"]
        lines += [f"| {m['key']} | {m['shard'] or '-'} | {m['stage']} | {m['reason']} |" for m in c["missing"]]
        lines.append("")
    return lines


def _per_class_markdown(result: dict, names: list[str] | None) -> list[str]:
    rows = result["video"].get("per_class", [])
    lines = ["Per class (video level, frames in order):", "", "| label | class | videos | top-1 |", "|---|---|---|---|"]
    for label, row in enumerate(rows):
        name = names[label] if names and label < len(names) else "-"
        lines.append(f"| {label} | {name} | {row['count']} | {_fmt(row['top1'])} |")
    return lines + [""]


def report_markdown(report: dict) -> str:
    lines = [f"# Evaluation: {report.get('model', '?')} on {report.get('dataset', '?')}", "",
             f"checkpoint: `{report.get('checkpoint')}`; views per video: {report.get('views', '?')}", ""]
    for name, results in report["results"].items():
        lines += [f"## {name}", ""]
        if name in report.get("coverage", {}):
            lines += _coverage_markdown(report["coverage"][name])
        lines += ["| frame order | clip top-1 | clip top-5 | video top-1 | video top-5 | "
                  "video mean class | videos |", "|---|---|---|---|---|---|---|"]
        for order, r in results.items():
            c, v = r["clip"], r["video"]
            lines.append(f"| {order} | {_fmt(c['top1'])} | {_fmt(c['top5'])} | {_fmt(v['top1'])} | "
                         f"{_fmt(v['top5'])} | {_fmt(v['mean_class'])} | {v['count']} |")
        lines.append("")
        if "normal" in results:
            lines += _per_class_markdown(results["normal"], report.get("classes", {}).get(name))
    if report.get("effects"):
        lines += ["## Spatial and temporal effects against TSN", "",
                  "| dataset | Phi (temporal) | Psi (spatial) | gain over TSN | top-1 | shuffled | TSN top-1 |",
                  "|---|---|---|---|---|---|---|"]
        for name, e in report["effects"].items():
            lines.append(f"| {name} | {e['phi']:+.3f} | {e['psi']:+.3f} | {e['gain']:+.3f} | {_fmt(e['top1'])} "
                         f"| {_fmt(e['top1_shuffled'])} | {_fmt(e['tsn_top1'])} |")
    return "\n".join(lines) + "\n"


def write_scores(scores: dict, path: Path) -> Path:
    """Per-video scores, averaged over each video's views: one row per (dataset, frame order, video) with
    its key, label and the model's scores (logits, one per class), for ensembling runs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for dataset, orders in scores.items():
        for order, views in orders.items():
            keys, labels, logits = views.per_video()
            num_classes = logits.shape[1] if logits.ndim == 2 else 0
            offsets = pa.array(np.arange(len(keys) + 1, dtype=np.int32) * num_classes)
            tables.append(pa.table({"dataset": [dataset] * len(keys), "order": [order] * len(keys),
                                    "key": pa.array(keys, pa.string()), "label": pa.array(labels, pa.int64()),
                                    "scores": pa.ListArray.from_arrays(offsets, pa.array(logits.reshape(-1),
                                                                                         pa.float32()))}))
    pq.write_table(pa.concat_tables(tables), path)
    return path


def plot_confusion(views: ViewScores, names: list[str] | None, title: str, path: Path) -> Path:
    """The video-level confusion matrix as a PNG: rows true classes, columns predictions, shaded by the
    share of the row (so rare classes show as clearly as common ones), counts written in small matrices."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, labels, logits = views.per_video()
    matrix = confusion(logits, labels) if len(labels) else np.zeros((len(names or []),) * 2, np.int64)
    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    size = min(4 + 0.35 * len(matrix), 24)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if len(matrix) <= NAMED_TICKS:
        ticks = names if names and len(names) == len(matrix) else [str(c) for c in range(len(matrix))]
        ax.set_xticks(range(len(matrix)), ticks, rotation=90)
        ax.set_yticks(range(len(matrix)), ticks)
        for (row, col), count in np.ndenumerate(matrix):
            if count:
                ax.text(col, row, str(count), ha="center", va="center", fontsize=8,
                        color="white" if share[row, col] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(report: dict, run_dir: str | Path, scores: dict | None = None) -> list[Path]:
    """eval_report.json and .md; with the scores behind them ({dataset: {order: ViewScores}}) also
    scores.parquet and confusion-<dataset>.png (frames in order). Returns the paths written."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = run_dir / "eval_report.json", run_dir / "eval_report.md"
    json_path.write_text(json.dumps(report, indent=2, default=float))
    md_path.write_text(report_markdown(report))
    paths = [json_path, md_path]
    if scores:
        paths.append(write_scores(scores, run_dir / "scores.parquet"))
        for name, orders in scores.items():
            order = "normal" if "normal" in orders else next(iter(orders))
            frames = "frames in order" if order == "normal" else f"frames {order}"
            title = f"{report.get('model', '')} on {name} (video level, {frames})"
            paths.append(plot_confusion(orders[order], report.get("classes", {}).get(name), title,
                                        run_dir / f"confusion-{name}.png"))
    return paths
