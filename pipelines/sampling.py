"""Which frames and which pixels each view of a video reads: pure functions of the index metadata.

Everything here runs on the host before a byte of video is fetched (the Parquet index gives the frame
count and size), so the same numbers drive the CPU and the GPU pipeline and a fixed seed fixes an epoch.
Randomness comes from a `numpy.random.Generator` passed in; `rng=None` means evaluation: no randomness.

Spatial windows are `(y0, x0, y1, x1)` in source pixels: the pipeline resizes that region of every frame
of a clip to the output size in one step, so "resize the short side, then crop" costs one resample.

`protocol=` picks whose rules: "default" (ours, below) or the papers' authors' code, "ibm", "sifa" or
"ivvit" (`protocols.py`). `default` keeps its own rules because they treat every clip, crop and video
length alike (centred, evenly spread, no fixed seeds); the others exist to reproduce published numbers.
"""
from __future__ import annotations

import math

import numpy as np

from pipelines import protocols

Window = tuple[float, float, float, float]  # y0, x0, y1, x1 in source pixels

TSN_SCALES = (1.0, 0.875, 0.75, 0.66)


# ---------------------------------------------------------------- frames

def uniform_indices(num_video_frames: int, num_frames: int, clip: int = 0, num_clips: int = 1,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """TSN segment sampling: `num_frames` equal segments, one frame from each.

    Training (rng given) takes a random frame inside each segment. Evaluation takes the same offset
    inside every segment: clip k of K at (k + 0.5) / K of the segment, so one clip reads the centres,
    floor(N / T * (i + 0.5)), and further clips shift those positions evenly. Short videos repeat frames.
    """
    n, t = _check_counts(num_video_frames, num_frames)
    offsets = rng.random(t) if rng is not None else np.full(t, (clip + 0.5) / num_clips)
    return uniform_frames(n, t, offsets)


def uniform_frames(n, t: int, offsets) -> np.ndarray:
    """Frame `floor(n / t * (i + offset_i))` of each segment i, broadcast over videos: `n` (V, 1) frame
    counts and `offsets` (V, t) in [0, 1) give (V, t) frames; plain numbers give one clip."""
    return np.minimum(np.floor(n / t * (np.arange(t) + offsets)).astype(np.int64), n - 1)


def dense_indices(num_video_frames: int, num_frames: int, stride: int, clip: int = 0, num_clips: int = 1,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """I3D/SlowFast dense sampling: `num_frames` frames `stride` apart from one start.

    Training starts anywhere the clip fits; evaluation spreads `num_clips` starts evenly from the first
    to the last possible start (one clip sits in the middle). A video shorter than the clip wraps around.
    """
    n, t = _check_counts(num_video_frames, num_frames)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    slack = max(n - t * stride, 0)  # possible starts are 0..slack
    if rng is not None:
        start = int(rng.integers(0, slack + 1))
    else:
        start = dense_eval_start(slack, clip, num_clips)
    return dense_frames(n, t, stride, start)


def dense_eval_start(slack, clip: int, num_clips: int):
    """Where evaluation clip `clip` of `num_clips` starts, for starts 0..slack (arrays broadcast)."""
    if num_clips == 1:
        return slack // 2
    return np.floor(slack * clip / (num_clips - 1)).astype(np.int64)


def dense_frames(n, t: int, stride: int, start) -> np.ndarray:
    """`t` frames `stride` apart from `start`, wrapping at `n`; `n` and `start` (V, 1) give (V, t)."""
    return (start + stride * np.arange(t)) % n


def frame_indices(sampling: str, num_video_frames: int, num_frames: int, stride: int = 1, clip: int = 0,
                  num_clips: int = 1, rng: np.random.Generator | None = None, protocol: str = "default",
                  fps: float | None = None) -> np.ndarray:
    """Frames of one view by sampling name (the loader's `sampling=`) under `protocol`.

    default: `uniform_indices` or `dense_indices`. ibm: its uniform or dense rule. sifa: "uniform" is its
    T segments of one frame, "dense" its one segment of T frames `stride` apart. ivvit: its one rule (a
    random 80/30 s clip, also in evaluation, so `rng` is required; it needs `fps`).
    """
    if sampling not in ("uniform", "dense"):
        raise ValueError(f"sampling must be 'uniform' (TSN segments) or 'dense' (stride), got {sampling!r}")
    protocols.check(protocol, sampling)
    n, t = _check_counts(num_video_frames, num_frames)
    if sampling == "dense" and stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if protocol == "ibm":
        return (protocols.ibm_uniform(n, t, clip, num_clips, rng) if sampling == "uniform"
                else protocols.ibm_dense(n, t, stride, clip, num_clips, rng))
    if protocol == "sifa":
        return (protocols.sifa(n, t, 1, 1, clip, num_clips, rng) if sampling == "uniform"
                else protocols.sifa(n, 1, t, stride, clip, num_clips, rng))
    if protocol == "ivvit":
        return protocols.ivvit(n, t, fps, rng)
    if sampling == "uniform":
        return uniform_indices(n, t, clip, num_clips, rng)
    return dense_indices(n, t, stride, clip, num_clips, rng)


def random_in_evaluation(protocol: str) -> bool:
    """Whether evaluation frames are drawn at random (IV-ViT's test clip is): the loader then passes a
    generator seeded by (seed, video, clip), so a seed fixes them."""
    return protocol == "ivvit"


def _check_counts(num_video_frames: int, num_frames: int) -> tuple[int, int]:
    if num_video_frames < 1:
        raise ValueError(f"a video must have at least one frame, got {num_video_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return int(num_video_frames), int(num_frames)


# ---------------------------------------------------------------- views

def eval_views(num_clips: int, num_crops: int, protocol: str = "default") -> list[tuple[int, int]]:
    """(clip, crop) of every evaluation view of one video, clip-major."""
    if num_crops not in (1, 3):
        raise ValueError(f"num_crops must be 1 (centre) or 3 (along the long side), got {num_crops}")
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    protocols.check(protocol, num_crops=num_crops)
    return [(clip, crop) for clip in range(num_clips) for crop in range(num_crops)]


def eval_short_side(crop_size: int, num_crops: int, protocol: str = "default") -> int:
    """The short side evaluation resizes to when none is given: 256 for a 224 centre crop (default, and
    ivvit's ShortSideScale(256)), the crop size for three crops; the crop size for ibm (its
    disable_scaleup, as the papers ran) and sifa (its ClipResize to the crop)."""
    protocols.check(protocol)
    if protocol in ("ibm", "sifa"):
        return crop_size
    return round(crop_size * 256 / 224) if num_crops == 1 else crop_size


def eval_window(height: int, width: int, crop_size: int, short_side: int, crop: int = 0,
                num_crops: int = 1, protocol: str = "default", media: str = "video") -> Window:
    """Evaluation crop: short side resized to `short_side`, then a `crop_size` square.

    default: one crop is the centre; three crops (SIFAR, SlowFast) are the top-left, centre and
    bottom-right squares, which cover the long side when `short_side == crop_size`. The protocols crop
    whole pixels of the resized frame in their own places and order (`protocols.eval_crop`).
    """
    if short_side < crop_size:
        raise ValueError(f"the test short side ({short_side}) must be at least the crop size ({crop_size})")
    protocols.check(protocol, num_crops=num_crops)
    if protocol != "default":
        return protocols.eval_crop(protocol, height, width, crop_size, short_side, crop, num_crops, media)
    scale = short_side / np.minimum(height, width)
    anchor = crop_anchor(crop, num_crops)
    return square_at(height, width, crop_size / scale, anchor, anchor)


def crop_anchor(crop, num_crops: int):
    """Where evaluation crop `crop` sits along both sides: the centre, or the first, middle and last square."""
    return 0.5 if num_crops == 1 else np.array([0.0, 0.5, 1.0])[crop]


def scale_jitter_window(height: int, width: int, crop_size: int, short_side: tuple[int, int],
                        rng: np.random.Generator, protocol: str = "default") -> Window:
    """Multi-scale jitter: short side resized to a random size in `short_side` (inclusive), then a random
    square (ibm, ivvit: at a whole pixel of the resized frame)."""
    lo, hi = short_side
    if lo < crop_size:
        raise ValueError(f"the smallest jitter short side ({lo}) must be at least the crop size ({crop_size})")
    protocols.check(protocol, train_crop="scale_jitter")
    if protocol != "default":
        return protocols.scale_jitter(protocol, height, width, crop_size, short_side, rng)
    return scale_jitter_at(height, width, crop_size, int(rng.integers(lo, hi + 1)), rng.random(), rng.random())


def scale_jitter_at(height, width, crop_size: int, short, fy, fx) -> Window:
    """The `crop_size` square of the frame resized to short side `short`, its room split fy : 1 - fy and
    fx : 1 - fx (numbers, or arrays of one value per view)."""
    scale = short / np.minimum(height, width)
    return square_at(height, width, crop_size / scale, fy, fx)


def tsn_multiscale_window(height: int, width: int, rng: np.random.Generator, scales=TSN_SCALES,
                          max_distort: int = 1, protocol: str = "default", crop_size: int | None = None) -> Window:
    """TSN's multi-scale corner crop: sides from `scales` x short side (aspect distorted by at most
    `max_distort` scale steps), placed at one of 13 fixed positions (corners, centre, edge centres, quarters).
    ibm: whole-pixel sides and steps, sides near `crop_size` snapped to it (`protocols.ibm_multiscale`).
    """
    protocols.check(protocol, train_crop="tsn_multiscale")
    if protocol != "default":
        if crop_size is None:
            raise ValueError(f"protocol {protocol!r} snaps crop sides to the crop size; pass crop_size")
        return protocols.ibm_multiscale(height, width, crop_size, rng, scales, max_distort)
    pair = int(rng.integers(len(tsn_pairs(scales, max_distort))))
    return tsn_multiscale_at(height, width, pair, int(rng.integers(len(TSN_QUARTERS))), scales, max_distort)


TSN_QUARTERS = np.array([(0, 0), (0, 4), (4, 0), (4, 4), (2, 2),    # corners and centre
                         (2, 0), (2, 4), (4, 2), (0, 2),            # edge centres
                         (1, 1), (1, 3), (3, 1), (3, 3)])           # quarter points


def tsn_pairs(scales, max_distort: int) -> np.ndarray:
    """(height, width) scale pairs of TSN's crops: aspect distorted by at most `max_distort` steps."""
    return np.array([(a, b) for i, a in enumerate(scales) for j, b in enumerate(scales) if abs(i - j) <= max_distort])


def tsn_multiscale_at(height, width, pair, quarter, scales=TSN_SCALES, max_distort: int = 1) -> Window:
    """TSN crop number `pair` of `tsn_pairs` at position number `quarter` of TSN_QUARTERS (numbers, or
    arrays of one value per view)."""
    base = np.minimum(height, width)
    pairs = tsn_pairs(scales, max_distort)
    crop_h, crop_w = base * pairs[pair, 0], base * pairs[pair, 1]
    qy, qx = TSN_QUARTERS[quarter, 0], TSN_QUARTERS[quarter, 1]
    y0, x0 = (height - crop_h) * qy / 4, (width - crop_w) * qx / 4
    return y0, x0, y0 + crop_h, x0 + crop_w


def random_resized_crop_window(height: int, width: int, rng: np.random.Generator, scale=(0.08, 1.0),
                               ratio=(3 / 4, 4 / 3), attempts: int = 10, protocol: str = "default") -> Window:
    """Inception-style crop for images: random area fraction and aspect ratio, centre crop as fallback.
    sifa, ivvit: torchvision's whole-pixel version, with their area range (`protocols.random_resized_crop`)."""
    protocols.check(protocol, train_crop="random_resized_crop")
    if protocol != "default":
        return protocols.random_resized_crop(protocol, height, width, rng, ratio, attempts)
    return tuple(float(v) for v in random_resized_crop_at(height, width, rng.random((attempts, 4)), scale, ratio))


def random_resized_crop_at(height, width, draws: np.ndarray, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Window:
    """The Inception crop from uniform draws (..., attempts, 4): per attempt an area fraction, a log aspect
    ratio and the position; the first attempt that fits wins, else the centre crop clamped to `ratio`.
    `height` and `width` are numbers, or arrays of one value per view (draws then (views, attempts, 4))."""
    height, width = np.asarray(height, np.float64)[..., None], np.asarray(width, np.float64)[..., None]
    target = height * width * (scale[0] + draws[..., 0] * (scale[1] - scale[0]))
    aspect = np.exp(math.log(ratio[0]) + draws[..., 1] * (math.log(ratio[1]) - math.log(ratio[0])))
    w, h = np.sqrt(target * aspect), np.sqrt(target / aspect)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = np.argmax(fits, axis=-1)[..., None]
    w, h = np.take_along_axis(w, first, -1)[..., 0], np.take_along_axis(h, first, -1)[..., 0]
    fy, fx = (np.take_along_axis(draws[..., k], first, -1)[..., 0] for k in (2, 3))
    height, width = height[..., 0], width[..., 0]
    fallback_w = np.where(width / height > ratio[1], height * ratio[1], width)
    fallback_h = np.where(width / height < ratio[0], width / ratio[0], height)
    found = fits.any(axis=-1)
    h, w = np.where(found, h, fallback_h), np.where(found, w, fallback_w)
    y0 = np.where(found, fy * (height - h), (height - h) / 2)
    x0 = np.where(found, fx * (width - w), (width - w) / 2)
    return y0, x0, y0 + h, x0 + w


def square_at(height, width, side, fy, fx) -> Window:
    """A `side` square whose free room is split fy : 1 - fy vertically and fx : 1 - fx horizontally
    (numbers, or arrays of one value per view)."""
    side = np.minimum(np.minimum(side, height), width)
    y0, x0 = (height - side) * fy, (width - side) * fx
    return y0, x0, y0 + side, x0 + side
