"""The papers' authors' sampling and crop rules, to the pixel and frame, for `protocol=` in `sampling.py`.

    ibm    IBM/action-recognition-pytorch (utils/video_dataset.py, utils/video_transforms.py, utils/utils.py)
           and IBM/sifar-pytorch (video_dataset.py, video_transforms.py, video_dataset_aug.py): the CNN
           study and SIFAR; both share these rules.
    sifa   FuchenUSTC/SIFA (dataset/video_dataset.py, train_val_3d.py, util/clip_transforms.py).
    ivvit  shuki0shimizu/IV-ViT (datasets/dataset.py, datasets/transform_factory.py), which samples through
           PyTorchVideo 0.1.5 (RandomClipSampler, UniformTemporalSubsample, ShortSideScale) and torchvision.

Their code resizes a frame, then crops whole pixels of the resized frame; here every crop is returned as
the source region that holds those pixels (`y0, x0, y1, x1`), which the pipeline resizes to the crop in
one step. Their random draws come from Python's, NumPy's or torch's global generators; here from the
`numpy.random.Generator` passed in, over the same choices. docs/pipelines.md tables every difference
from the `default` rules with an example.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

PROTOCOLS = ("default", "ibm", "sifa", "ivvit")
TRAIN_CROPS_OF = {                   # the training crops each authors' code has
    "ibm": ("tsn_multiscale", "scale_jitter"),            # its augmentor v1 and v2
    "sifa": ("random_resized_crop",),
    "ivvit": ("scale_jitter", "random_resized_crop"),     # videos, images
}
IVVIT_CLIP_SECONDS = 80 / 30         # IV-ViT's Kinetics clip (its UCF101 clip is 64 / 25 s)
SIFA_AREA = (0.2, 1.0)               # SIFA's RandomResizedCrop scale; IV-ViT keeps torchvision's (0.08, 1)


def check(protocol: str, sampling: str | None = None, train_crop: str | None = None,
          num_crops: int | None = None) -> None:
    """Refuse, in one line, what a protocol's code cannot do (None: not asked)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "ivvit" and sampling == "dense":
        raise ValueError("protocol 'ivvit' samples one way (T frames spread over an 80/30 s clip); "
                         "use sampling='uniform'")
    if train_crop is not None and protocol in TRAIN_CROPS_OF and train_crop not in TRAIN_CROPS_OF[protocol]:
        raise ValueError(f"protocol {protocol!r} has no train_crop {train_crop!r}; its code trains with "
                         f"{' or '.join(TRAIN_CROPS_OF[protocol])}")
    if protocol == "ivvit" and num_crops not in (None, 1):
        raise ValueError("protocol 'ivvit' tests one centre crop (the IV-ViT code has no multi-crop test); "
                         "use num_crops=1")


# ---------------------------------------------------------------- frames

def ibm_uniform(n: int, t: int, clip: int, num_clips: int, rng: np.random.Generator | None) -> np.ndarray:
    """VideoDataSet._sample_indices / _get_val_indices, uniform sampling, one frame per group."""
    if rng is not None:
        segment = n // t
        if segment >= 1:     # one offset, shared by every segment
            return np.arange(t) * segment + int(rng.integers(segment))
        return np.sort(rng.integers(0, n, t))          # fewer frames than segments: T draws with replacement
    if n > t:
        tick = n / t
        shift = clip - math.ceil(num_clips / 2) + 1    # their range(-K // 2 + 1, K // 2 + 1)
        if shift >= tick / 2:
            shift = tick / 2 - 1e-4
        elif shift < -tick / 2:
            shift = -tick / 2
        return np.array([int(tick / 2 + shift + tick * i) for i in range(t)])
    # N <= T: their code seeds NumPy's global generator with the clip number, then draws with replacement
    return np.sort(np.random.RandomState(clip).choice(n, t))


def ibm_dense(n: int, t: int, stride: int, clip: int, num_clips: int, rng: np.random.Generator | None) -> np.ndarray:
    """random_clip (training) and the fixed-offset dense test: starts spread over 0..N - stride*T, wrapping."""
    if rng is not None:
        highest = n - stride * t
        start = int(rng.integers(highest)) if highest > 0 else 0
    else:
        last_start = max(1, 1 + n - stride * t) - 1
        start = int(np.linspace(0, last_start, num=num_clips, dtype=int)[clip])   # one clip: frame 0
    return (start + stride * np.arange(t)) % n


def sifa(n: int, segments: int, length: int, step: int, clip: int, num_clips: int,
         rng: np.random.Generator | None) -> np.ndarray:
    """VideoTrainDataset / VideoTestDataset._parse_sample_str: `segments` equal parts, a run of `length`
    frames `step` apart in each, at a random offset of its own (training) or at clip / K of the room left."""
    span = length * step
    segment = n // segments
    if segment >= span:
        room = segment - span
        offsets = [_sifa_offset(room, clip, num_clips, rng) + i * segment for i in range(segments)]
    elif n >= span:      # segments shorter than a run: runs start in (N - span) / segments steps and overlap
        part = (n - span) / segments
        offsets = [_sifa_offset(part, clip, num_clips, rng) + int(i * part) for i in range(segments)]
    else:    # their code stops here (NotImplementedError); we start at 0 and wrap, like `default`
        offsets = [0] * segments
    return (np.array(offsets)[:, None] + step * np.arange(length)).reshape(-1) % n


def _sifa_offset(room: float, clip: int, num_clips: int, rng: np.random.Generator | None) -> int:
    """Where a run starts in its segment: random.randint(0, int(room)) or int(room * clip / K)."""
    return int(rng.integers(int(room) + 1)) if rng is not None else int(room * clip / num_clips)


def ivvit(n: int, t: int, fps: float, rng: np.random.Generator | None) -> np.ndarray:
    """RandomClipSampler (training and test alike) then UniformTemporalSubsample.

    The clip starts at a uniform time in [0, duration - 80/30 s] (0 for shorter videos) and holds the
    frames whose time i / fps falls in [start, start + 80/30 s); T of them are picked at
    torch.linspace(0, count - 1, T), truncated.
    """
    if rng is None:
        raise ValueError("protocol 'ivvit' draws its clip at random in evaluation too; pass an rng")
    if not fps > 0:
        raise ValueError(f"protocol 'ivvit' places its clip in seconds and needs the video's fps, got {fps!r}")
    # PyTorchVideo subtracts the clip length (a float) from the exact duration (a Fraction): a video exactly
    # one clip long keeps a sliver of room, and its clip then starts just after frame 0
    room = max(Fraction(n) / Fraction(fps) - Fraction(IVVIT_CLIP_SECONDS), 0)
    start = rng.uniform(0, float(room))
    first = math.ceil(start * fps)
    end = min(math.ceil((start + IVVIT_CLIP_SECONDS) * fps), n)
    count = end - first
    # torch's float32 linspace, as theirs: truncation then lands on the same frames where the exact value is whole
    return first + torch.linspace(0, count - 1, t).clamp(0, count - 1).long().numpy()


# ---------------------------------------------------------------- test-time crops

def eval_crop(protocol: str, height: int, width: int, crop_size: int, short_side: int, crop: int,
              num_crops: int, media: str = "video") -> tuple[float, float, float, float]:
    """Crop `crop` of `num_crops` after resizing the short side to `short_side`, in source pixels.

    ibm  GroupScale, then GroupCenterCrop or GroupOverSample's three crops in its order: first, last,
         centre, stepped by (resized - crop) // 4 along the long side at the middle of the short one.
    sifa ClipResize, then ClipFirstCrop (top-left), ClipCenterCrop, ClipThirdCrop (bottom-right).
    ivvit ShortSideScale (images: Resize), then CenterCrop.
    """
    if protocol == "ivvit" and media == "video":
        rh, rw = pytorchvideo_resized(height, width, short_side)
    else:
        rh, rw = torchvision_resized(height, width, short_side)
    c = crop_size
    centre = (_centre(rh, c), _centre(rw, c))
    if num_crops == 1:
        y0, x0 = centre
    elif protocol == "ibm":
        hs, ws = (rh - c) // 4, (rw - c) // 4
        if rw < rh:
            y0, x0 = [(0, 2 * ws), (4 * hs, 2 * ws), (2 * hs, 2 * ws)][crop]    # top, bottom, centre
        else:
            y0, x0 = [(2 * hs, 0), (2 * hs, 4 * ws), (2 * hs, 2 * ws)][crop]    # left, right, centre
    else:
        y0, x0 = [(0, 0), centre, (rh - c, rw - c)][crop]
    return _in_source(height, width, rh, rw, y0, x0, c, c)


# ---------------------------------------------------------------- training crops

def ibm_multiscale(height: int, width: int, crop_size: int, rng: np.random.Generator, scales,
                   max_distort: int = 1) -> tuple[float, float, float, float]:
    """GroupMultiScaleCrop: sides int(short side * scale), those within 3 px of the crop size snapped to
    it, aspect changed by at most `max_distort` steps, at 13 fixed offsets stepped by (side - crop) // 4."""
    base = min(height, width)
    sizes = [int(base * s) for s in scales]
    sizes = [crop_size if abs(size - crop_size) < 3 else size for size in sizes]
    pairs = [(h, w) for i, h in enumerate(sizes) for j, w in enumerate(sizes) if abs(i - j) <= max_distort]
    crop_h, crop_w = pairs[int(rng.integers(len(pairs)))]
    hs, ws = (height - crop_h) // 4, (width - crop_w) // 4
    quarters = [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2), (2, 0), (2, 4), (4, 2), (0, 2),
                (1, 1), (1, 3), (3, 1), (3, 3)]          # (y, x) quarters in their order
    qy, qx = quarters[int(rng.integers(len(quarters)))]
    y0, x0 = qy * hs, qx * ws
    return y0, x0, y0 + crop_h, x0 + crop_w


def scale_jitter(protocol: str, height: int, width: int, crop_size: int, short_side: tuple[int, int],
                 rng: np.random.Generator) -> tuple[float, float, float, float]:
    """ibm GroupRandomScale + GroupRandomCrop, ivvit RandomShortSideScale + RandomCrop: a short side drawn
    from `short_side` (inclusive), then a crop at a whole-pixel offset of the resized frame."""
    size = int(rng.integers(short_side[0], short_side[1] + 1))
    resized = pytorchvideo_resized if protocol == "ivvit" else torchvision_resized
    rh, rw = resized(height, width, size)
    y0, x0 = int(rng.integers(rh - crop_size + 1)), int(rng.integers(rw - crop_size + 1))
    return _in_source(height, width, rh, rw, y0, x0, crop_size, crop_size)


def random_resized_crop(protocol: str, height: int, width: int, rng: np.random.Generator,
                        ratio=(3 / 4, 4 / 3), attempts: int = 10) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop.get_params: whole-pixel sides (rounded) and offsets; area from
    SIFA_AREA for sifa and torchvision's (0.08, 1) for ivvit; centre crop clamped to `ratio` as fallback."""
    scale = SIFA_AREA if protocol == "sifa" else (0.08, 1.0)
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0, x0 = int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1))
            return y0, x0, y0 + h, x0 + w
    h, w = height, width
    if width / height < min(ratio):
        h = int(round(width / min(ratio)))
    elif width / height > max(ratio):
        w = int(round(height * max(ratio)))
    y0, x0 = (height - h) // 2, (width - w) // 2
    return y0, x0, y0 + h, x0 + w


# ---------------------------------------------------------------- resizing as their libraries do it

def torchvision_resized(height: int, width: int, short_side: int) -> tuple[int, int]:
    """torchvision Resize(int) (and IBM's GroupScale): the short side to `short_side`, the long one
    int(short_side * long / short)."""
    if width <= height:
        return int(short_side * height / width), short_side
    return short_side, int(short_side * width / height)


def pytorchvideo_resized(height: int, width: int, short_side: int) -> tuple[int, int]:
    """PyTorchVideo's short_side_scale: the long side floor(long / short * short_side), in that order."""
    if width < height:
        return int(math.floor(float(height) / width * short_side)), short_side
    return short_side, int(math.floor(float(width) / height * short_side))


def _centre(size: int, crop: int) -> int:
    """torchvision CenterCrop's offset: Python's round, so halves go to the even pixel."""
    return int(round((size - crop) / 2.0))


def _in_source(height: int, width: int, rh: int, rw: int, y0: float, x0: float, ch: int, cw: int):
    """The source region of a crop taken from the frame resized to (rh, rw)."""
    sy, sx = height / rh, width / rw
    return y0 * sy, x0 * sx, (y0 + ch) * sy, (x0 + cw) * sx
