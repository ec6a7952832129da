"""Which frames and pixels a view reads, against cases computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.sampling import (TSN_SCALES, dense_indices, eval_views, eval_window, frame_indices,
                                random_resized_crop_window, scale_jitter_window, tsn_multiscale_window,
                                uniform_indices)


def rngs(n=200):
    return [np.random.default_rng(seed) for seed in range(n)]


# ---------------------------------------------------------------- uniform (TSN segments)

def test_uniform_eval_reads_the_centre_of_each_segment():
    assert uniform_indices(300, 8).tolist() == [18, 56, 93, 131, 168, 206, 243, 281]


def test_uniform_eval_clips_shift_the_positions_evenly_inside_segments():
    # clip k of 2 sits at (k + 0.5) / 2 of each 37.5-frame segment: 37.5 * (i + 0.25) and 37.5 * (i + 0.75)
    assert uniform_indices(300, 8, clip=0, num_clips=2).tolist() == [9, 46, 84, 121, 159, 196, 234, 271]
    assert uniform_indices(300, 8, clip=1, num_clips=2).tolist() == [28, 65, 103, 140, 178, 215, 253, 290]


def test_uniform_train_takes_one_frame_inside_each_segment():
    seen = set()
    for rng in rngs():
        idx = uniform_indices(300, 8, rng=rng)
        for i, f in enumerate(idx):
            assert math.floor(37.5 * i) <= f < 37.5 * (i + 1)
        seen.add(int(idx[0]))
    assert len(seen) > 25                      # the first segment's 38 frames are all reachable


def test_uniform_repeats_frames_of_a_video_shorter_than_the_clip():
    # 5 frames, 8 segments of 0.625 frames: floor(0.625 * (i + 0.5))
    assert uniform_indices(5, 8).tolist() == [0, 0, 1, 2, 2, 3, 4, 4]
    for rng in rngs(20):
        idx = uniform_indices(5, 8, rng=rng)
        assert idx.min() >= 0 and idx.max() <= 4 and np.all(np.diff(idx) >= 0)


# ---------------------------------------------------------------- dense (stride)

def test_dense_eval_single_clip_sits_in_the_middle():
    # 8 frames x stride 2 span 16 of 100 frames: starts 0..84, the middle one is 42
    assert dense_indices(100, 8, 2).tolist() == [42, 44, 46, 48, 50, 52, 54, 56]


def test_dense_eval_clips_spread_from_the_first_to_the_last_start():
    starts = [dense_indices(100, 8, 2, clip=k, num_clips=3)[0] for k in range(3)]
    assert starts == [0, 42, 84]


def test_dense_train_start_is_random_and_the_clip_fits():
    starts = set()
    for rng in rngs():
        idx = dense_indices(100, 32, 2, rng=rng)
        assert np.all(np.diff(idx) == 2) and idx[-1] <= 99
        starts.add(int(idx[0]))
    assert min(starts) >= 0 and max(starts) <= 36 and len(starts) > 20


def test_dense_wraps_around_a_video_shorter_than_the_clip():
    assert dense_indices(10, 8, 2).tolist() == [0, 2, 4, 6, 8, 0, 2, 4]


def test_frame_indices_names_the_methods():
    assert frame_indices("uniform", 300, 8).tolist() == uniform_indices(300, 8).tolist()
    assert frame_indices("dense", 100, 8, 2).tolist() == dense_indices(100, 8, 2).tolist()
    with pytest.raises(ValueError, match="uniform"):
        frame_indices("random", 100, 8)


# ---------------------------------------------------------------- evaluation views and crops

def test_eval_views_tag_every_clip_and_crop():
    assert eval_views(2, 3) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    with pytest.raises(ValueError, match="num_crops"):
        eval_views(1, 5)


def test_three_crops_run_along_the_long_side():
    # 320x240 landscape, short side resized to the crop: 240-pixel squares at x = 0, 40, 80
    crops = [eval_window(240, 320, 224, 224, crop=k, num_crops=3) for k in range(3)]
    assert crops == [(0, 0, 240, 240), (0, 40, 240, 280), (0, 80, 240, 320)]
    portrait = [eval_window(320, 240, 224, 224, crop=k, num_crops=3) for k in range(3)]
    assert portrait == [(0, 0, 240, 240), (40, 0, 280, 240), (80, 0, 320, 240)]


def test_centre_crop_after_resizing_the_short_side():
    # short side 240 -> 256: a 224 crop covers 224 * 240 / 256 = 210 source pixels, centred
    assert eval_window(240, 320, 224, 256) == pytest.approx((15, 55, 225, 265))


# ---------------------------------------------------------------- training crops

def inside(window, h, w):
    y0, x0, y1, x1 = window
    return 0 <= y0 < y1 <= h + 1e-9 and 0 <= x0 < x1 <= w + 1e-9


def test_scale_jitter_crop_matches_a_random_short_side_in_range():
    sides = set()
    for rng in rngs():
        y0, x0, y1, x1 = win = scale_jitter_window(240, 320, 224, (256, 320), rng)
        assert inside(win, 240, 320) and y1 - y0 == pytest.approx(x1 - x0)
        short = 224 * 240 / (y1 - y0)          # the short side this crop corresponds to
        assert 256 - 1e-6 <= short <= 320 + 1e-6
        sides.add(round(short))
    assert len(sides) > 30


def test_tsn_multiscale_crop_uses_the_scale_set_and_fixed_positions():
    sides = [240 * s for s in TSN_SCALES]      # scales of the short side, largest first

    def step(offset, room):                    # position in quarters of the free room
        return round(offset / (room / 4), 6) if room > 1e-9 else 0

    for rng in rngs():
        y0, x0, y1, x1 = win = tsn_multiscale_window(240, 320, rng)
        assert inside(win, 240, 320)
        i, j = (int(np.argmin([abs(side - s) for s in sides])) for side in (y1 - y0, x1 - x0))
        assert (sides[i], sides[j]) == pytest.approx((y1 - y0, x1 - x0)) and abs(i - j) <= 1
        assert step(y0, 240 - (y1 - y0)) in {0, 1, 2, 3, 4} and step(x0, 320 - (x1 - x0)) in {0, 1, 2, 3, 4}


def test_random_resized_crop_keeps_area_and_aspect_in_range():
    for rng in rngs():
        y0, x0, y1, x1 = win = random_resized_crop_window(240, 320, rng)
        assert inside(win, 240, 320)
        h, w = y1 - y0, x1 - x0
        if (h, w) != (240, 320):               # not the fallback
            assert 0.08 - 1e-9 <= h * w / (240 * 320) <= 1 + 1e-9 and 3 / 4 - 1e-9 <= w / h <= 4 / 3 + 1e-9
