"""What a run tells people: progress lines, metrics.jsonl, TensorBoard events and a curves.png.

metrics.jsonl is the record (one JSON object per line: split, epoch, update, values) that the PNG and
any later analysis are drawn from; TensorBoard gets the same scalars for live viewing. Only rank 0 writes.
Every run or evaluation folder gets a README.md saying what each of its files is (`write_index`).
"""
from __future__ import annotations

import datetime
import json
import math
import sys
import time
from pathlib import Path


class Throughput:
    """Clips, seconds spent waiting for the loader, and wall seconds, over the current window."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.clips, self.wait, self.began = 0, 0.0, time.perf_counter()

    def add(self, clips: int, wait_s: float) -> None:
        self.clips += clips
        self.wait += wait_s

    def read(self) -> dict:
        elapsed = max(time.perf_counter() - self.began, 1e-9)
        return {"clips_per_s": self.clips / elapsed, "data_wait": self.wait / elapsed, "window_s": elapsed}


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def say(text: str, stream=None) -> None:
    """`text` as one line on stderr (or `stream`). Written to the stream rather than print()ed: Ray Train
    patches print() in its workers to send each line to its logger as well as to the stream (Ray wraps a
    worker's stdout and stderr), and every printed line then reached the driver twice."""
    stream = stream or sys.stderr
    stream.write(text + "\n")
    stream.flush()


class Progress:
    """A line every few updates: position, rate, data-wait share, loss, lr, the samples the loader could
    not read so far this epoch, and the time left (for `total_updates`, the run's real end)."""

    def __init__(self, total_updates: int, done: int = 0, stream=None, enabled: bool = True):
        self.total, self.stream, self.enabled = total_updates, stream, enabled
        self.start_done, self.began = done, time.perf_counter()

    def eta(self, done: int) -> float:
        rate = (done - self.start_done) / max(time.perf_counter() - self.began, 1e-9)
        return (self.total - done) / rate if rate > 0 else float("inf")

    def line(self, epoch: int, epochs: int, done: int, stats: dict) -> str:
        eta = self.eta(done)
        loss = "-" if stats["loss"] is None else f"{stats['loss']:.4f}"
        text = (f"epoch {epoch + 1}/{epochs} | update {done}/{self.total} | "
                f"{stats['clips_per_s']:.1f} clips/s | data wait {100 * stats['data_wait']:.0f}% | "
                f"loss {loss} | lr {stats['lr']:.2e} | failed {stats['failures']} | "
                f"ETA {_clock(eta) if eta < 1e9 else '?'}")
        if self.enabled:
            say(text, self.stream)
        return text


class MetricsLogger:
    def __init__(self, run_dir: str | Path | None, enabled: bool = True):
        self.enabled = enabled and run_dir is not None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._tb = None
        if self.enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    @property
    def path(self) -> Path | None:
        return self.run_dir / "metrics.jsonl" if self.run_dir else None

    def log(self, split: str, values: dict, *, epoch: int, update: int) -> None:
        if not self.enabled:
            return
        record = {"split": split, "epoch": epoch, "update": update, "time": time.time(), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(f"{split}/{key}", value, update)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """curves.png: training loss and learning rate per update, validation accuracy per epoch,
    throughput and the share of time spent waiting for data."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    (ax_loss, ax_lr), (ax_acc, ax_rate) = axes
    if train:
        ups = [r["update"] for r in train]
        ax_loss.plot(ups, [math.nan if r["loss"] is None else r["loss"] for r in train], label="train loss")
        ax_lr.plot(ups, [r["lr"] for r in train], color="tab:orange")
        ax_rate.plot(ups, [r["clips_per_s"] for r in train], label="clips/s")
        wait_ax = ax_rate.twinx()
        wait_ax.plot(ups, [100 * r["data_wait"] for r in train], color="tab:red", label="data wait %")
        wait_ax.set_ylabel("data wait (%)", color="tab:red")
        wait_ax.set_ylim(0, 100)
    if val:
        for key in sorted({k for r in val for k in r if k.endswith("top1")}):   # per dataset, EMA too
            points = [(r["epoch"] + 1, r[key]) for r in val if key in r]
            ax_acc.plot(*zip(*points), marker="o", label=f"val {key}")
        ax_acc.legend()
    ax_loss.set(title="training loss", xlabel="update")
    ax_lr.set(title="learning rate", xlabel="update")
    ax_acc.set(title="validation accuracy (%)", xlabel="epoch")
    ax_rate.set(title="throughput", xlabel="update", ylabel="clips/s")
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


# What a run folder (python -m train fit) or evaluation folder (python -m train eval) may hold, in the
# order README.md lists it. A name ending in "/" is a folder; "*" matches a dataset name or a time.
FILES = {
    "config.yaml": "the resolved config the run started with (every key; `--config` repeats the run)",
    "metrics.jsonl": "one JSON record per line: `train` every log_every updates (loss, lr, clips/s, data wait, "
                     "failures: samples the loader could not read so far this epoch), `failures` at each "
                     "epoch's end (count and every sample with its reason), `val` after validations",
    "tensorboard/": "the same scalars for TensorBoard (`tensorboard --logdir <this folder>`)",
    "checkpoints/": "checkpoints (epoch<E>-update<U>.pt and a `latest` pointer; `python -m train eval "
                    "--checkpoint <this folder>`)",
    "ray/": "Ray Train's storage for this run: <run>/checkpoint_<time>/state.pt",
    "curves.png": "training loss, learning rate, validation accuracy, throughput and data wait",
    "eval_report.md": "the evaluation: how many videos were evaluated and which are missing, accuracy per "
                      "frame order, per class",
    "eval_report.json": "the same evaluation as data",
    "scores.parquet": "per-video scores averaged over the views: dataset, order, key, label, scores "
                      "(one logit per class), for ensembles",
    "confusion-*.png": "the video-level confusion matrix of a dataset (frames in order)",
    "eval-*/": "evaluations of this run's checkpoints (`python -m train eval`), each with its README.md",
}
INDEX = "README.md"


def run_files(folder: str | Path) -> list[Path]:
    """The files (not folders) of FILES present in `folder`."""
    folder = Path(folder)
    return [path for pattern in FILES if not pattern.endswith("/") for path in sorted(folder.glob(pattern))]


def write_index(folder: str | Path) -> Path:
    """README.md in `folder`: each file of FILES it holds, and what it is."""
    folder = Path(folder)
    lines = [f"# {folder.name}", "", "| file | what it is |", "|---|---|"]
    for pattern, text in FILES.items():
        for path in sorted(folder.glob(pattern.rstrip("/"))):
            if path.is_dir() == pattern.endswith("/"):
                lines.append(f"| `{path.name}{'/' if path.is_dir() else ''}` | {text} |")
    path = folder / INDEX
    path.write_text("\n".join(lines) + "\n")
    return path
