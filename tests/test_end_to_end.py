"""The README's path on the CPU: the embedded dataset (the one `make demo` makes) -> the shard job ->
VideoLoader -> the sample recipes, unchanged -> the video-level evaluation report.

The classes differ only by motion, and come in pairs that are each other played backwards, so the
papers' findings must show up: a temporal model (TSM) is far above chance, a TSN that averages frames
is not, and reversing the frames turns the temporal model's answers into the paired class. SIFAR sees
the frames tiled into one image and must learn their order from the tile positions.
Thresholds below, for 8 classes (chance 12.5 %); measured on 2 CPU cores: TSM 95 % (reversed 2 %),
TSN 23 % (the same in any order), SIFAR 81 % (reversed 0 %; 92 % and 5 % with seed=1).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow     # three trainings of a minute or two each on 2 cores

REPO = Path(__file__).resolve().parent.parent
CHANCE = 1 / 8
TSM_MIN = 0.70            # far above chance
TSN_MAX_VS_TSM = 0.35     # TSN at least this far below TSM
REVERSAL_DROP = 0.40      # reversing the frames costs the temporal models at least this much
SIFAR_MIN = 0.60          # far above chance, though from scratch on 192 clips SIFAR learns slower than TSM


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from shards.sample_dataset import make_sample_dataset
    root = tmp_path_factory.mktemp("readme")
    make_sample_dataset(root / "sample")                # the defaults `make demo` uses, broken files included
    out = subprocess.run([sys.executable, "pipelines/shard_kinetics.py", "--annotations",
                          str(root / "sample" / "annotations"), "--videos", str(root / "sample" / "videos"),
                          "--output", str(root / "shards"), "--workers", "2", "--shard-size", "2MB"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return root / "shards"


def video_top1(shards: Path, tmp_path_factory, recipe: str) -> dict[str, float]:
    """Train `configs/<recipe>.yaml` as the README says; video top-1 per frame order."""
    from train import cli
    run = tmp_path_factory.mktemp(recipe)
    cli.main(["fit", "--config", str(REPO / "configs" / f"{recipe}.yaml"), f"data.train.shards={shards}",
              f"data.val.shards={shards}", "--run-dir", str(run)])
    report = json.loads((run / "eval_report.json").read_text())["results"]["main"]
    assert report["normal"]["video"]["count"] == 64      # every validation video, once
    return {order: r["video"]["top1"] / 100 for order, r in report.items()}


@pytest.fixture(scope="module")
def tsm(shards, tmp_path_factory):
    return video_top1(shards, tmp_path_factory, "sample_tsm")


@pytest.fixture(scope="module")
def tsn(shards, tmp_path_factory):
    return video_top1(shards, tmp_path_factory, "sample_tsn")


@pytest.fixture(scope="module")
def sifar(shards, tmp_path_factory):
    return video_top1(shards, tmp_path_factory, "sample_sifar")


def test_tsm_learns_the_motion_classes_far_above_chance(tsm):
    assert tsm["normal"] >= TSM_MIN, tsm


def test_tsn_without_temporal_modelling_does_clearly_worse_than_tsm(tsm, tsn):
    assert tsn["normal"] <= tsm["normal"] - TSN_MAX_VS_TSM, (tsn, tsm)


def test_reversing_the_frames_hurts_tsm_but_not_tsn(tsm, tsn):
    assert tsm["reversed"] <= tsm["normal"] - REVERSAL_DROP, tsm
    assert tsn["reversed"] == pytest.approx(tsn["normal"]), tsn       # averaging frames ignores their order


def test_sifar_learns_from_super_images_and_depends_on_frame_order(sifar):
    assert sifar["normal"] >= SIFAR_MIN, sifar
    assert sifar["reversed"] <= sifar["normal"] - REVERSAL_DROP, sifar
