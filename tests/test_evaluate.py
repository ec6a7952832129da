"""Evaluation protocols: accuracy, video-level averaging, exact counts across ranks, frame-order tests
and the spatial / temporal effects against TSN."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from train_support import SyntheticLoader

from train.evaluate import (ViewScores, accuracy, confusion, evaluate, evaluate_views, gather, predict,
                            report_markdown, spatiotemporal_effects, summarize, write_report)


class MotionProbe(nn.Module):
    """Reads the direction of the bright square from where it is in the last frame versus the first:
    right/left/down/up. Perfect on clips in order, fooled by reversed ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # (B, T, C, H, W)
        bright = (x[:, :, 0] > 1.0).float()
        ys, xs = torch.meshgrid(torch.arange(x.shape[-2]), torch.arange(x.shape[-1]), indexing="ij")
        mass = bright.sum((-2, -1)).clamp(min=1)
        cx, cy = (bright * xs).sum((-2, -1)) / mass, (bright * ys).sum((-2, -1)) / mass
        dx, dy = cx[:, -1] - cx[:, 0], cy[:, -1] - cy[:, 0]
        return torch.stack([dx, -dx, dy, -dy], dim=1)


class FrameAverage(MotionProbe):
    """TSN-like: whatever it computes, it computes from the average frame, so frame order cannot matter."""

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        return mean.flatten(1)[:, :4]


def loader(videos=10, clips=2, crops=3, rank=0, world_size=1, layout="BTCHW"):
    return SyntheticLoader(f"synthetic:{videos}", batch_size=4, num_frames=8, mode="eval", num_clips=clips,
                           num_crops=crops, layout=layout, rank=rank, world_size=world_size)


KW = dict(device="cpu", layout="BTCHW", num_frames=8)


def test_accuracy_is_top1_top5_and_the_mean_of_per_class_recalls():
    logits = np.array([[9, 1, 0, 0, 0, 0], [9, 1, 0, 0, 0, 0], [9, 1, 0, 0, 0, 0], [0, 9, 8, 7, 6, 5]], float)
    labels = np.array([0, 0, 1, 5])
    result = accuracy(logits, labels)
    assert result["top1"] == 50.0 and result["top5"] == 100.0 and result["count"] == 4
    assert result["mean_class"] == pytest.approx(100 * (1.0 + 0.0 + 0.0) / 3)   # class 0: 2/2, 1: 0/1, 5: 0/1


def test_video_scores_average_the_logits_of_all_its_views():
    scores = ViewScores(["a", "a", "a", "b"], np.array([0, 1, 2, 0]), np.zeros(4, int), np.array([1, 1, 1, 0]),
                        np.array([[3.0, 0], [0, 2], [0, 2], [1, 0]]))   # video a: one wrong view, two right
    summary = summarize(scores)
    assert summary["clip"]["top1"] == 75.0 and summary["clip"]["count"] == 4
    assert summary["video"]["top1"] == 100.0 and summary["video"]["count"] == 2
    assert summary["views_per_video"] == 2.0


def test_every_view_is_counted_once_however_the_videos_are_split_over_ranks():
    """10 videos x 6 views over 3 ranks: the ranks pad to equal batches; the gathered result is the
    single-rank one exactly, padding included or not."""
    model = MotionProbe()
    single = summarize(gather(predict(model, loader(), **KW)))
    parts = [predict(model, loader(rank=r, world_size=3), **KW) for r in range(3)]
    merged = summarize(ViewScores.concat(parts).unique())
    assert single == merged
    assert single["video"]["count"] == 10 and single["clip"]["count"] == 60 and single["video"]["top1"] == 100.0


def test_duplicates_a_sampler_pads_with_are_dropped_even_when_not_flagged():
    """DistributedSampler-style padding repeats real views as valid ones; their identity gives them away."""
    model = MotionProbe()
    views = predict(model, loader(videos=5, clips=1, crops=1), **KW)
    padded = ViewScores.concat([views, views.select([0, 1, 2])])
    assert summarize(padded.unique()) == summarize(views)
    assert summarize(padded)["clip"]["count"] == 8


def test_views_flagged_invalid_count_nowhere():
    batches = list(loader(videos=3, clips=1, crops=1))          # 3 videos in one batch of 4: one stand-in
    assert batches[0]["valid"].tolist() == [True, True, True, False]
    scores = predict(MotionProbe(), batches, **KW)
    assert len(scores.keys) == 3


def _gather_on_rank(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results[rank] = summarize(gather(predict(MotionProbe(), loader(rank=rank, world_size=world_size), **KW)))
    finally:
        dist.destroy_process_group()


def test_gathering_over_a_real_process_group_gives_the_single_process_result():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_gather_on_rank, args=(2, port, results), nprocs=2)
    single = summarize(gather(predict(MotionProbe(), loader(), **KW)))
    assert results[0] == results[1] == single


@pytest.mark.parametrize("layout", ["BTCHW", "BCTHW", "super"])
def test_reversed_frames_fool_a_model_that_uses_order_but_not_one_that_averages_frames(layout):
    class InLayout(nn.Module):       # the probes read (B, T, C, H, W); feed them whatever layout is tested
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if layout == "BCTHW":
                x = x.transpose(1, 2)
            elif layout == "super":
                from train.clips import untile
                x = untile(x, 8)[:, :8]
            return self.inner(x)

    kw = {**KW, "layout": layout}
    orders = ("normal", "reversed", "shuffled")
    order_aware = evaluate(InLayout(MotionProbe()), loader(videos=8, clips=1, crops=1, layout=layout), orders=orders, **kw)
    averaging = evaluate(InLayout(FrameAverage()), loader(videos=8, clips=1, crops=1, layout=layout), orders=orders, **kw)
    assert order_aware["normal"]["video"]["top1"] == 100.0 and order_aware["reversed"]["video"]["top1"] == 0.0
    assert order_aware["shuffled"]["video"]["top1"] < 100.0
    assert averaging["normal"] == averaging["reversed"] == averaging["shuffled"]


def test_shuffled_order_is_the_same_permutation_on_every_run():
    first = evaluate(MotionProbe(), loader(videos=8), orders=("shuffled",), seed=5, **KW)
    again = evaluate(MotionProbe(), loader(videos=8), orders=("shuffled",), seed=5, **KW)
    assert first == again


def _report(top1_normal, top1_shuffled=None):
    entry = lambda v: {"clip": {"top1": v}, "video": {"top1": v}}   # noqa: E731
    out = {"normal": entry(top1_normal)}
    if top1_shuffled is not None:
        out["shuffled"] = entry(top1_shuffled)
    return out


def test_phi_and_psi_split_the_gain_over_tsn_into_order_dependent_and_order_free_parts():
    effects = spatiotemporal_effects(_report(60.0, 45.0), _report(40.0))
    assert effects["phi"] == pytest.approx((60 - 45) / 40)       # needs frames in order
    assert effects["psi"] == pytest.approx((45 - 40) / 40)       # survives shuffling
    assert effects["phi"] + effects["psi"] == pytest.approx(effects["gain"])
    with pytest.raises(ValueError, match="shuffled"):
        spatiotemporal_effects(_report(60.0), _report(40.0))


def test_the_markdown_report_has_a_row_per_frame_order_and_the_effects_table():
    summary = summarize(predict(MotionProbe(), loader(videos=4, clips=1, crops=1), **KW))
    report = {"model": "probe", "dataset": "main", "checkpoint": None, "views": 1,
              "results": {"main": {"normal": summary, "shuffled": summary}},
              "effects": {"main": spatiotemporal_effects(_report(60.0, 45.0), _report(40.0))}}
    text = report_markdown(report)
    assert "| normal | 100.00 |" in text and "| shuffled |" in text and "| main | +0.375 | +0.125 |" in text


class HorizontalOnly(MotionProbe):
    """Tells right from left, but has no opinion on up and down: those videos all go to class 0."""

    def forward(self, x):
        scores = super().forward(x)
        return torch.cat([scores[:, :2], torch.zeros_like(scores[:, 2:])], dim=1)


def test_the_report_adds_per_class_accuracy_a_confusion_matrix_and_per_video_scores(tmp_path):
    import pyarrow.parquet as pq
    from train.metrics import write_index

    views = evaluate_views(HorizontalOnly(), loader(videos=8, clips=2, crops=1), **KW)
    scores, coverage = views["normal"]
    names = ["right", "left", "down", "up"]
    report = {"model": "probe", "dataset": "main", "checkpoint": None, "views": 2, "classes": {"main": names},
              "coverage": {"main": coverage}, "results": {"main": {"normal": summarize(scores)}}}
    write_report(report, tmp_path, {"main": {"normal": scores}})

    per_class = report["results"]["main"]["normal"]["video"]["per_class"]
    assert [(c["count"], c["top1"]) for c in per_class] == [(2, 100.0), (2, 100.0), (2, 0.0), (2, 0.0)]
    _, labels, video_logits = scores.per_video()
    assert confusion(video_logits, labels).tolist() == [[2, 0, 0, 0], [0, 2, 0, 0], [2, 0, 0, 0], [2, 0, 0, 0]]
    assert (tmp_path / "confusion-main.png").read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "eval_report.md").read_text()
    assert "**8 of 8 videos evaluated.**" in text and "| 2 | down | 2 | 0.00 |" in text

    rows = pq.read_table(tmp_path / "scores.parquet").to_pylist()      # one row per video: its views averaged
    assert len(rows) == 8 and {r["order"] for r in rows} == {"normal"}
    for row in rows:
        mine = [i for i, key in enumerate(scores.keys) if key == row["key"]]
        assert len(mine) == 2 and row["label"] == scores.labels[mine[0]]
        np.testing.assert_allclose(row["scores"], scores.logits[mine].mean(0), rtol=1e-6)
    index = write_index(tmp_path).read_text()
    assert "`scores.parquet`" in index and "`confusion-main.png`" in index and "`eval_report.md`" in index
