"""The embedded sample dataset: Kinetics layout, real encoded clips, classes that only motion separates."""
import csv
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from shards.sample_dataset import CLASSES, encode_video, make_sample_dataset, motion_clip, youtube_id

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    return root, make_sample_dataset(root, num_classes=4, train_per_class=2, val_per_class=1, seed=3)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _motion_energy(frames):
    """Per step: (centroid x, centroid y, changed pixels) of the difference between consecutive frames."""
    diff = np.abs(np.diff(frames.astype(np.int16), axis=0)).sum(-1) > 30
    ys, xs = np.mgrid[: frames.shape[1], : frames.shape[2]]
    out = []
    for d in diff:
        n = d.sum()
        out.append((xs[d].mean() if n else np.nan, ys[d].mean() if n else np.nan, n))
    return np.array(out)


def test_writes_kinetics_csvs_and_clip_names(small):
    root, summary = small
    train = _rows(root / "annotations" / "train.csv")
    assert list(train[0]) == ["label", "youtube_id", "time_start", "time_end", "split"]
    assert len(train) == 4 * 2 + len(summary["expected_failures"])
    assert len(_rows(root / "annotations" / "val.csv")) == 4
    for row in _rows(root / "annotations" / "val.csv"):
        name = f"{row['youtube_id']}_{int(row['time_start']):06d}_{int(row['time_end']):06d}.mp4"
        assert (root / "videos" / "val" / name).stat().st_size > 1000
    assert summary["classes"] == CLASSES[:4]


def test_clips_decode_to_the_requested_frames_size_and_rate(small):
    root, summary = small
    clip = sorted((root / "videos" / "val").glob("*.mp4"))[0]
    with av.open(str(clip)) as c:
        stream = c.streams.video[0]
        frames = list(c.decode(stream))
        assert stream.codec_context.name == "h264" and stream.average_rate == 15
    assert len(frames) == summary["frames_per_clip"] == 30
    assert (frames[0].width, frames[0].height) == (128, 96)


def test_broken_entries_are_listed_with_their_stage_and_can_be_left_out(small, tmp_path):
    root, summary = small
    cases = {v["case"]: v["stage"] for v in summary["expected_failures"].values()}
    assert cases == {"zero bytes": "fetch", "truncated": "probe", "not a video": "probe", "missing": "fetch"}
    keys = {r["youtube_id"] for r in _rows(root / "annotations" / "train.csv")}
    assert {k[:11] for k in summary["expected_failures"]} <= keys
    clean = make_sample_dataset(tmp_path, num_classes=2, train_per_class=1, val_per_class=0, broken=False)
    assert clean["expected_failures"] == {} and clean["counts"] == {"train": 2, "val": 0}


@pytest.mark.parametrize("forward", CLASSES[0:10:2])
def test_second_class_of_each_pair_is_the_first_played_backwards(forward):
    backward = CLASSES[CLASSES.index(forward) + 1]
    a = motion_clip(forward, np.random.default_rng(5), num_frames=20)
    b = motion_clip(backward, np.random.default_rng(5), num_frames=20)
    np.testing.assert_array_equal(a[::-1], b)
    assert not np.array_equal(a, b)  # so only frame order tells them apart


@pytest.mark.parametrize("name, axis, sign", [("moving left", 0, -1), ("moving right", 0, 1),
                                              ("moving up", 1, -1), ("moving down", 1, 1)])
def test_linear_classes_move_in_the_direction_they_name(name, axis, sign):
    for seed in range(3):
        track = _motion_energy(motion_clip(name, np.random.default_rng(seed), num_frames=30))
        assert sign * (np.nanmean(track[-5:, axis]) - np.nanmean(track[:5, axis])) > 10


def test_approaching_grows_and_receding_shrinks():
    for seed in range(3):
        grow = _motion_energy(motion_clip("approaching", np.random.default_rng(seed), num_frames=30))[:, 2]
        shrink = _motion_energy(motion_clip("receding", np.random.default_rng(seed), num_frames=30))[:, 2]
        assert grow[-5:].mean() > 2 * grow[:5].mean() and shrink[:5].mean() > 2 * shrink[-5:].mean()


def test_flashing_left_then_right_shows_left_first():
    frames = motion_clip("flashing left then right", np.random.default_rng(0), num_frames=30).astype(int)
    changed = np.abs(frames - frames[0]).sum(-1) > 30  # frame 0 is background only
    left, right = changed[:, :, :64].sum((1, 2)), changed[:, :, 64:].sum((1, 2))
    assert np.argmax(left > 50) < np.argmax(right > 50)


def test_quick_moves_farther_than_slow():
    def travel(name, seed):
        track = _motion_energy(motion_clip(name, np.random.default_rng(seed), num_frames=30))
        return np.hypot(*(np.nanmean(track[-5:, :2], 0) - np.nanmean(track[:5, :2], 0)))
    assert min(travel("moving quickly", s) for s in range(3)) > max(travel("moving slowly", s) for s in range(3))


def test_appearance_comes_from_the_seed_not_the_class():
    same = [motion_clip("moving left", np.random.default_rng(1)) for _ in range(2)]
    np.testing.assert_array_equal(*same)
    colours = [motion_clip("moving left", np.random.default_rng(s)).mean((0, 1, 2)) for s in range(2)]
    assert np.abs(colours[0] - colours[1]).max() > 3


def test_youtube_ids_have_eleven_url_safe_characters_and_some_start_with_a_dash():
    rng = np.random.default_rng(1)
    ids = [youtube_id(rng) for _ in range(200)]
    assert all(len(i) == 11 and set(i) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
               for i in ids)
    assert 5 < sum(i.startswith("-") for i in ids) < 60


def test_encode_video_forces_a_keyframe_every_gop_frames_in_vp9(tmp_path):
    frames = motion_clip("moving up", np.random.default_rng(0), num_frames=20)
    path = encode_video(tmp_path / "a.webm", frames, fps=10, codec="vp9", gop=4)
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.name == "vp9"
        decoded = list(c.decode(video=0))
    assert [i for i, f in enumerate(decoded) if f.key_frame] == [0, 4, 8, 12, 16]


def test_full_layout_keeps_whole_videos_longer_than_the_annotated_range(tmp_path):
    summary = make_sample_dataset(tmp_path, num_classes=1, train_per_class=1, val_per_class=0, broken=False,
                                  layout="full")
    row = _rows(tmp_path / "annotations" / "train.csv")[0]
    with av.open(str(tmp_path / "videos" / "train" / f"{row['youtube_id']}.mp4")) as c:
        seconds = c.duration / av.time_base
    assert seconds >= float(row["time_end"]) and summary["layout"] == "full"


def test_cli_writes_the_dataset_and_a_contact_sheet(tmp_path):
    out = subprocess.run([sys.executable, "-m", "shards.sample_dataset", str(tmp_path), "--classes", "2",
                          "--train-per-class", "1", "--val-per-class", "1", "--size", "64x48", "--no-broken",
                          "--sheet", str(tmp_path / "sheet.png")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "videos").rglob("*.mp4"))) == 4 and "2/4 clips" in out.stderr
    assert Image.open(tmp_path / "sheet.png").size == (6 * 68, 2 * 52)  # 6 frames per class, 2 px borders
