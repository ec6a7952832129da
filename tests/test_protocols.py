"""The papers' authors' sampling and crop rules (`protocol=`), against cases worked out from their code by hand.

0-based frames. ibm: IBM/action-recognition-pytorch and IBM/sifar-pytorch; sifa: FuchenUSTC/SIFA; ivvit:
shuki0shimizu/IV-ViT through PyTorchVideo 0.1.5. Windows are (y0, x0, y1, x1) in source pixels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines import protocols
from pipelines.sampling import (eval_short_side, eval_views, eval_window, frame_indices, random_resized_crop_window,
                                scale_jitter_window, tsn_multiscale_window)
from train.config import datasets_of, load_config

REPO = Path(__file__).resolve().parents[1]


def rngs(n=300):
    return [np.random.default_rng(seed) for seed in range(n)]


def ibm(n, t, clip=0, clips=1, stride=1, sampling="uniform", rng=None):
    return frame_indices(sampling, n, t, stride, clip, clips, rng, protocol="ibm").tolist()


def sifa(n, t, clip=0, clips=1, stride=1, sampling="uniform", rng=None):
    return frame_indices(sampling, n, t, stride, clip, clips, rng, protocol="sifa").tolist()


def ivvit(n, t, fps, rng):
    return frame_indices("uniform", n, t, rng=rng, protocol="ivvit", fps=fps).tolist()


# ---------------------------------------------------------------- ibm frames

def test_ibm_test_clip_reads_int_of_half_a_tick_plus_whole_ticks():
    # tick = 300 / 8 = 37.5: int(18.75 + 37.5 i)
    assert ibm(300, 8) == [18, 56, 93, 131, 168, 206, 243, 281]


def test_ibm_test_clips_shift_the_segment_centre_by_whole_frames():
    # 3 clips: shifts -1, 0, +1 (c - ceil(3 / 2) + 1)
    assert ibm(300, 8, clip=0, clips=3) == [17, 55, 92, 130, 167, 205, 242, 280]
    assert ibm(300, 8, clip=2, clips=3) == [19, 57, 94, 132, 169, 207, 244, 282]
    # 2 clips: shifts 0 and +1, so the first clip is the single-clip centre
    assert ibm(300, 8, clip=0, clips=2) == ibm(300, 8)
    assert ibm(300, 8, clip=1, clips=2) == [19, 57, 94, 132, 169, 207, 244, 282]


def test_ibm_test_clip_shifts_are_clamped_to_the_segment():
    # N=20, T=8: tick 2.5; 10 clips shift -4..+5, clamped to [-1.25, 1.25 - 1e-4]
    assert ibm(20, 8, clip=0, clips=10) == [0, 2, 5, 7, 10, 12, 15, 17]      # int(2.5 i)
    assert ibm(20, 8, clip=9, clips=10) == [2, 4, 7, 9, 12, 14, 17, 19]      # int(2.4999 + 2.5 i)


def test_ibm_dense_test_clips_start_on_an_integer_linspace_and_one_clip_starts_at_frame_0():
    starts = [ibm(300, 8, clip=c, clips=10, stride=8, sampling="dense")[0] for c in range(10)]
    assert starts == [0, 26, 52, 78, 104, 131, 157, 183, 209, 236]
    assert ibm(300, 8, stride=8, sampling="dense") == [0, 8, 16, 24, 32, 40, 48, 56]


def test_ibm_dense_clip_longer_than_the_video_starts_at_0_and_wraps_in_training_and_test():
    assert ibm(40, 8, stride=8, sampling="dense") == [0, 8, 16, 24, 32, 0, 8, 16]
    for rng in rngs(20):
        assert ibm(40, 8, stride=8, sampling="dense", rng=rng) == [0, 8, 16, 24, 32, 0, 8, 16]


def test_ibm_test_clip_of_a_video_no_longer_than_the_clip_is_their_draw_seeded_with_the_clip_number():
    # their code: np.random.seed(c); sorted(np.random.choice(N, T)) (values taken from running it)
    assert ibm(5, 8) == [0, 1, 2, 3, 3, 3, 3, 4]
    assert ibm(5, 8) == ibm(5, 8)                          # fixed seeds: the same every time
    assert ibm(8, 8, clip=1, clips=2) != ibm(8, 8, clip=0, clips=2)   # N == T takes this branch too


def test_ibm_training_draws_one_offset_shared_by_all_segments_of_n_div_t_frames():
    offsets = set()
    for rng in rngs():
        frames = np.array(ibm(300, 8, rng=rng))
        shared = frames - 37 * np.arange(8)                # segments of 300 // 8 = 37 frames
        assert len(set(shared.tolist())) == 1
        offsets.add(int(shared[0]))
    assert offsets == set(range(37))                       # every offset 0..36 reachable, frames 296..299 never


def test_ibm_training_on_a_video_shorter_than_the_clip_draws_frames_with_replacement_sorted():
    draws = set()
    for rng in rngs():
        frames = ibm(5, 8, rng=rng)
        assert frames == sorted(frames) and 0 <= frames[0] and frames[-1] <= 4
        draws.add(tuple(frames))
    assert len(draws) > 50


def test_ibm_dense_training_starts_anywhere_before_n_minus_stride_times_t():
    starts = {ibm(100, 8, stride=8, sampling="dense", rng=rng)[0] for rng in rngs(2000)}
    assert starts == set(range(36))                        # randint(0, 100 - 64): 0..35


# ---------------------------------------------------------------- sifa frames

def test_sifa_test_clip_starts_each_segment_at_clip_over_k_of_its_room():
    # 8 segments of 300 // 8 = 37 frames, one frame each (room 36): int(36 c / K) + 37 i
    assert sifa(300, 8) == [0, 37, 74, 111, 148, 185, 222, 259]
    assert sifa(300, 8, clip=10, clips=20) == [18, 55, 92, 129, 166, 203, 240, 277]


def test_sifa_dense_test_clips_are_runs_starting_at_clip_over_k_of_the_room():
    # their 1x16x1 K400 setting: one run of 16 consecutive frames, 20 clips, room 300 - 16 = 284
    assert sifa(300, 16, clip=0, clips=20, sampling="dense") == list(range(16))
    assert sifa(300, 16, clip=19, clips=20, sampling="dense") == list(range(269, 285))   # int(284 * 19 / 20)
    # stride 2: a run spans 32 frames, room 68: starts 0, int(68 / 3), int(136 / 3)
    starts = [sifa(100, 16, clip=c, clips=3, stride=2, sampling="dense")[0] for c in range(3)]
    assert starts == [0, 22, 45]


def test_sifa_segments_shorter_than_a_run_overlap_in_steps_of_the_float_room():
    # N=5, T=8: (5 - 1) / 8 = 0.5 per segment: int(0.5 i), and training has no room to draw in
    assert sifa(5, 8) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(sifa(5, 8, rng=rng) == [0, 0, 1, 1, 2, 2, 3, 3] for rng in rngs(20))


def test_sifa_training_draws_an_offset_per_segment():
    firsts, independent = set(), False
    for rng in rngs():
        frames = np.array(sifa(300, 8, rng=rng))
        shifts = frames - 37 * np.arange(8)
        assert shifts.min() >= 0 and shifts.max() <= 36    # randint(0, 36) inside each segment
        independent |= len(set(shifts.tolist())) > 1
        firsts.add(int(frames[0]))
    assert independent and firsts == set(range(37))


def test_sifa_dense_training_run_starts_anywhere_it_fits():
    starts = set()
    for rng in rngs(2000):
        frames = sifa(100, 16, stride=2, sampling="dense", rng=rng)
        assert np.all(np.diff(frames) == 2)
        starts.add(frames[0])
    assert starts == set(range(69))                        # randint(0, 100 - 32), inclusive


def test_sifa_run_longer_than_the_video_starts_at_0_and_wraps():
    # their code stops on such a video (NotImplementedError); we wrap like default
    assert sifa(10, 8, stride=2, sampling="dense") == [0, 2, 4, 6, 8, 0, 2, 4]


# ---------------------------------------------------------------- ivvit frames

def test_ivvit_picks_t_frames_of_an_80_frame_clip_at_30_fps():
    # int(linspace(0, 79, 16)) = int(79 i / 15); the clip starts at ceil(30 s), s uniform in [0, 10 - 8/3]
    pattern = [0, 5, 10, 15, 21, 26, 31, 36, 42, 47, 52, 57, 63, 68, 73, 79]
    firsts = set()
    for rng in rngs():
        frames = ivvit(300, 16, 30.0, rng)
        assert [f - frames[0] for f in frames] == pattern
        firsts.add(frames[0])
    assert min(firsts) >= 1 and max(firsts) <= 220 and len(firsts) > 150


def test_ivvit_clip_holds_66_or_67_frames_at_25_fps():
    # 80/30 s at 25 fps is 66.7 frames: int(linspace(0, 66, 8)) or int(linspace(0, 65, 8))
    patterns = set()
    for rng in rngs():
        frames = ivvit(250, 8, 25.0, rng)
        patterns.add(tuple(f - frames[0] for f in frames))
    assert patterns == {(0, 9, 18, 28, 37, 47, 56, 66), (0, 9, 18, 27, 37, 46, 55, 65)}


def test_ivvit_video_shorter_than_the_clip_is_read_whole():
    # 40 frames at 30 fps (1.3 s): all of them, int(linspace(0, 39, 8))
    assert {tuple(ivvit(40, 8, 30.0, rng)) for rng in rngs(20)} == {(0, 5, 11, 16, 22, 27, 33, 39)}


def test_ivvit_video_exactly_one_clip_long_starts_after_frame_0():
    # PyTorchVideo subtracts the float clip length from the exact duration 8/3 s: a sliver of room, so the
    # clip starts just after 0 and holds frames 1..79: 1 + int(linspace(0, 78, 8))
    assert {tuple(ivvit(80, 8, 30.0, rng)) for rng in rngs(20)} == {(1, 12, 23, 34, 45, 56, 67, 79)}


def test_ivvit_needs_an_rng_and_the_fps_and_has_no_dense_sampling():
    with pytest.raises(ValueError, match="rng"):
        frame_indices("uniform", 300, 8, protocol="ivvit", fps=30.0)
    with pytest.raises(ValueError, match="fps"):
        frame_indices("uniform", 300, 8, rng=np.random.default_rng(0), protocol="ivvit", fps=0.0)
    with pytest.raises(ValueError, match="sampling='uniform'"):
        frame_indices("dense", 300, 8, 2, rng=np.random.default_rng(0), protocol="ivvit", fps=30.0)


# ---------------------------------------------------------------- test-time crops (a 340x256 video)

def test_ibm_three_crops_without_scale_up_are_first_last_centre_in_steps_of_a_quarter_of_the_slack():
    # short side 224: resized to 297x224 (int(224 * 340 / 256)); x step (297 - 224) // 4 = 18: x = 0, 72, 36
    sx, sy = 340 / 297, 256 / 224
    want = [(0, x * sx, 224 * sy, (x + 224) * sx) for x in (0, 72, 36)]
    got = [eval_window(256, 340, 224, 224, k, 3, protocol="ibm") for k in range(3)]
    assert got == [pytest.approx(w) for w in want]
    assert got[1][3] < 340                                  # the last crop stops short of the right edge


def test_ibm_three_crops_with_scale_up_sit_at_the_middle_of_the_short_side():
    # short side int(224 / 0.875 + 0.5) = 256: no resize; steps (340 - 224) // 4 = 29 and (256 - 224) // 4 = 8
    got = [eval_window(256, 340, 224, 256, k, 3, protocol="ibm") for k in range(3)]
    assert got == [(16, 0, 240, 224), (16, 116, 240, 340), (16, 58, 240, 282)]
    portrait = [eval_window(340, 256, 224, 256, k, 3, protocol="ibm") for k in range(3)]
    assert portrait == [(0, 16, 224, 240), (116, 16, 340, 240), (58, 16, 282, 240)]   # top, bottom, centre


def test_ibm_centre_crop_rounds_half_pixels_to_even():
    # 297x224: (297 - 224) / 2 = 36.5 rounds to 36 (torchvision's CenterCrop uses Python's round)
    y0, x0, y1, x1 = eval_window(256, 340, 224, 224, protocol="ibm")
    assert (y0, x0) == pytest.approx((0, 36 * 340 / 297))


def test_sifa_three_crops_are_top_left_centre_bottom_right_of_the_resized_frame():
    sx, sy = 340 / 297, 256 / 224
    got = [eval_window(256, 340, 224, 224, k, 3, protocol="sifa") for k in range(3)]
    assert got == [pytest.approx((0, x * sx, 224 * sy, (x + 224) * sx)) for x in (0, 36, 73)]


def test_ivvit_centre_crop_after_short_side_256():
    assert eval_window(256, 340, 224, 256, protocol="ivvit") == (16, 58, 240, 282)
    with pytest.raises(ValueError, match="num_crops=1"):
        eval_views(1, 3, protocol="ivvit")


def test_each_protocol_resizes_to_its_own_test_short_side():
    assert [eval_short_side(224, 1, p) for p in protocols.PROTOCOLS] == [256, 224, 224, 256]
    assert [eval_short_side(224, 3, p) for p in ("default", "ibm", "sifa")] == [224, 224, 224]


# ---------------------------------------------------------------- training crops

def test_ibm_multiscale_crop_has_whole_pixel_sides_snapped_to_the_crop_and_quarter_steps():
    # 300x300 frame, crop 224: int(300 * (1, .875, .75, .66)) = 300, 262, 225, 198; 225 is within 3 px: 224
    sizes = set()
    for rng in rngs():
        y0, x0, y1, x1 = tsn_multiscale_window(300, 300, rng, protocol="ibm", crop_size=224)
        h, w = y1 - y0, x1 - x0
        sizes |= {h, w}
        assert y0 in {q * ((300 - h) // 4) for q in range(5)} and x0 in {q * ((300 - w) // 4) for q in range(5)}
    assert sizes == {300, 262, 224, 198}


def test_whole_pixel_scale_jitter_crops_whole_pixels_of_the_resized_frame():
    for protocol in ("ibm", "ivvit"):
        shorts = set()
        for rng in rngs():
            y0, x0, y1, x1 = scale_jitter_window(256, 340, 224, (256, 320), rng, protocol)
            short = round(224 * 256 / (y1 - y0))           # the short side this crop was cut at
            long_side = int(short * 340 / 256)
            assert 256 <= short <= 320 and (y0 * short / 256) == pytest.approx(round(y0 * short / 256))
            assert x0 * long_side / 340 == pytest.approx(round(x0 * long_side / 340))
            shorts.add(short)
        assert len(shorts) > 40


def test_random_resized_crop_area_is_sifas_20_to_100_percent_and_ivvits_8_to_100():
    def areas(protocol):
        out = []
        for rng in rngs(500):
            y0, x0, y1, x1 = random_resized_crop_window(256, 340, rng, protocol=protocol)
            assert all(float(v).is_integer() for v in (y0, x0, y1, x1))
            out.append((y1 - y0) * (x1 - x0) / (256 * 340))
        return min(out)
    assert 0.19 < areas("sifa") and areas("ivvit") < 0.15


def test_a_protocol_refuses_a_training_crop_its_code_does_not_have():
    with pytest.raises(ValueError, match="random_resized_crop"):
        scale_jitter_window(256, 340, 224, (256, 320), np.random.default_rng(0), protocol="sifa")
    with pytest.raises(ValueError, match="tsn_multiscale or scale_jitter"):
        random_resized_crop_window(256, 340, np.random.default_rng(0), protocol="ibm")
    with pytest.raises(ValueError, match="protocol must be one of"):
        frame_indices("uniform", 300, 8, protocol="tsm")


# ---------------------------------------------------------------- recipes

RECIPE_PROTOCOL = {"sifar_": "ibm", "cnn_study_": "ibm", "sifa_": "sifa", "ivvit_": "ivvit", "sample_": "default"}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_each_recipe_names_its_papers_protocol_and_the_protocol_takes_its_views(path):
    cfg = load_config(path)
    want = next(protocol for prefix, protocol in RECIPE_PROTOCOL.items() if path.stem.startswith(prefix))
    assert cfg["data"]["options"].get("protocol", "default") == want
    eval_views(cfg["eval"]["clips"], cfg["eval"]["crops"], want)
    for spec in datasets_of(cfg).values():
        options = {**cfg["data"]["options"], **((spec.get("train") or {}).get("options") or {})}
        protocols.check(want, cfg["data"]["sampling"], options.get("train_crop", "scale_jitter"))
