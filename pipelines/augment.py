"""The recipes' optional training augmentations: drawn per clip on the host, applied by DALI on the device.

Like frames, window and flip (`sampling.py`), every random choice is drawn on the host from the view's
seeded generator (`Augment.draw`) and fed to the graph with the bytes (`feed_augment`); the operators
(`augment_clip`) are then the same deterministic function of those inputs on the CPU and the GPU. RandAugment
too: the host picks each level's op and turns its magnitude into the op's parameters (an affine matrix, a
factor, a threshold), so DALI's own random generators are never used. One draw per clip, applied to every
frame alike, as the authors' clip transforms do. The graph holds only the augmentations a config enables.

What each one computes, and where it departs from the PIL/torchvision code of the recipes, is in
docs/pipelines.md ("Recipe augmentations").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import nvidia.dali.math as dmath
from nvidia.dali import fn, types
from nvidia.dali.auto_aug import augmentations as aa
from nvidia.dali.auto_aug.core import select

RA_MAX_MAGNITUDE = 30       # SIFA's scale: at magnitude m an op takes m / 30 of its range (timm's m9 is m27 here)
RA_PARAMS = 9               # floats per RandAugment level: the largest parameter is a 3x3 kernel


@dataclass(frozen=True)
class ClipParams:
    """One clip's draw: what the graph applies to every frame of it (nothing by default)."""
    color: tuple[float, float, float, float] | None = None   # brightness, contrast, saturation; hue (of the circle)
    color_order: tuple[int, ...] = (0, 1, 2, 3)              # the order the four apply in (indices into `color`)
    grayscale: bool = False
    blur_sigma: float | None = None                          # in pixels of the crop
    ra_kinds: tuple[int, ...] = ()                           # RandAugment, per level: an index into RA_KINDS
    ra_params: tuple[tuple[float, ...], ...] = ()            # per level: that kind's parameters (RA_PARAMS floats)


@dataclass(frozen=True)
class Augment:
    """Which augmentations a training graph applies, named as timm names them where timm has them.

    color_jitter: strengths (brightness, contrast, saturation, hue) as torchvision's ColorJitter reads them:
    factors drawn from [1 - s, 1 + s], a hue shift from [-h, h] of the colour circle. rand_augment: (n, m),
    n ops per clip at magnitude m of 0..30, from SIFA's clip RandAugment suite (`SIFA_RAND_AUGMENT`).
    """
    color_jitter: tuple[float, float, float, float] | None = None
    color_jitter_prob: float = 1.0
    grayscale_prob: float = 0.0
    gaussian_blur_prob: float = 0.0
    gaussian_blur_sigma: tuple[float, float] = (0.1, 2.0)
    rand_augment: tuple[int, int] | None = None

    @classmethod
    def of(cls, color_jitter=None, color_jitter_prob: float = 1.0, grayscale_prob: float = 0.0,
           gaussian_blur_prob: float = 0.0, gaussian_blur_sigma=(0.1, 2.0), rand_augment=None) -> Augment:
        """From VideoLoader's keywords as a recipe gives them (timm's forms: `color_jitter` a float for
        (x, x, x) without hue, or 3 or 4 strengths; YAML lists for tuples); refuses what cannot work."""
        if isinstance(color_jitter, (int, float)):
            color_jitter = (color_jitter,) * 3
        if color_jitter is not None:
            if len(color_jitter) not in (3, 4) or min(color_jitter) < 0:
                raise ValueError(f"color_jitter is a strength >= 0 or 3 or 4 of them (brightness, contrast, "
                                 f"saturation[, hue]), got {color_jitter!r}")
            color_jitter = tuple(float(s) for s in color_jitter) + (0.0,) * (4 - len(color_jitter))
            if color_jitter[3] > 0.5:
                raise ValueError(f"the hue strength of color_jitter is a fraction of the colour circle, at most 0.5, "
                                 f"got {color_jitter[3]}")
        for name, p in [("color_jitter_prob", color_jitter_prob), ("grayscale_prob", grayscale_prob),
                        ("gaussian_blur_prob", gaussian_blur_prob)]:
            if not 0 <= p <= 1:
                raise ValueError(f"{name} is a probability in [0, 1], got {p!r}")
        low, high = gaussian_blur_sigma
        if not 0 < low <= high:
            raise ValueError(f"gaussian_blur_sigma is a range [low, high] with 0 < low <= high, "
                             f"got {gaussian_blur_sigma!r}")
        if rand_augment is not None:
            n, m = rand_augment
            if not (isinstance(n, int) and isinstance(m, int) and n >= 1 and 0 <= m <= RA_MAX_MAGNITUDE):
                raise ValueError(f"rand_augment is [n, m]: n >= 1 ops per clip at magnitude m in 0..30 (SIFA's scale; "
                                 f"timm's m9 is m=27 here), got {rand_augment!r}")
            rand_augment = (n, m)
        return cls(color_jitter, float(color_jitter_prob), float(grayscale_prob), float(gaussian_blur_prob),
                   (float(low), float(high)), rand_augment)

    @property
    def enabled(self) -> bool:
        return (self.color_jitter is not None or self.grayscale_prob > 0 or self.gaussian_blur_prob > 0
                or self.rand_augment is not None)

    def draw(self, rng: np.random.Generator, size: int) -> ClipParams:
        """One clip's parameters for `size` x `size` frames. Drawn in a fixed order (RandAugment, colour jitter,
        grayscale, blur), each only when enabled, so a config that enables none draws nothing."""
        kinds, params = (), ()
        if self.rand_augment is not None:
            n, m = self.rand_augment
            levels = []
            for _ in range(n):     # SIFA's 16 ops with replacement; three draws whatever the op
                name = list(SIFA_RAND_AUGMENT)[int(rng.integers(len(SIFA_RAND_AUGMENT)))]
                negate = bool(rng.random() < 0.5)
                levels.append(rand_augment_level(name, m, negate, rng.uniform(0, size, 2), size))
            kinds, params = tuple(kind for kind, _ in levels), tuple(p for _, p in levels)
        color, order = None, (0, 1, 2, 3)
        if self.color_jitter is not None:    # torchvision's ColorJitter: a random order, then the four values
            applied = rng.random() < self.color_jitter_prob
            permutation = tuple(int(k) for k in rng.permutation(4))
            b, c, s, h = self.color_jitter
            factors = rng.uniform([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h], [1 + b, 1 + c, 1 + s, h])
            if applied:
                color, order = tuple(float(f) for f in factors), permutation
        grayscale = self.grayscale_prob > 0 and bool(rng.random() < self.grayscale_prob)
        sigma = None
        if self.gaussian_blur_prob > 0:
            applied = rng.random() < self.gaussian_blur_prob
            value = float(rng.uniform(*self.gaussian_blur_sigma))
            sigma = value if applied else None
        return ClipParams(color, order, grayscale, sigma, kinds, params)


# ---------------------------------------------------------------- RandAugment: SIFA's ops, host side

SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13    # PIL's SMOOTH filter
IDENTITY = np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], np.float32)


def _rotation(degrees: float, size: int) -> list[float]:
    """PIL's `rotate(degrees)` (counter-clockwise about the centre) as its output-to-input affine map."""
    t = math.radians(degrees)
    c, s, centre = math.cos(t), math.sin(t), size / 2
    return [c, -s, centre - c * centre + s * centre, s, c, centre - s * centre - c * centre]


def _cutout(centre: np.ndarray, v: float, size: int) -> list[float]:
    """SIFA's Cutout: PIL's rectangle from the corner (the centre minus half the side v * size, not below 0)
    to the corner plus the side, both ends included, cut at the frame's edge; as (y, x, height, width)."""
    side = v * size
    y0, x0 = (math.floor(max(0.0, c - side / 2)) for c in centre)
    return [y0, x0, min(size, math.floor(y0 + side) + 1) - y0, min(size, math.floor(x0 + side) + 1) - x0]


# name: (range, negated at random, graph kind, parameters from the signed value v and the drawn centre)
SIFA_RAND_AUGMENT = {
    "auto_contrast": (0, False, "auto_contrast", lambda v, size, centre: []),
    "equalize": (0, False, "equalize", lambda v, size, centre: []),
    "invert": (0, False, "invert", lambda v, size, centre: []),
    "rotate": (30, True, "warp", lambda v, size, centre: _rotation(v, size)),
    "posterize": (4, False, "posterize", lambda v, size, centre: [256 - 2 ** (4 + int(v))]),   # keeps 4 - int(v) bits
    "solarize": (256, False, "solarize", lambda v, size, centre: [256 - v]),                     # the threshold
    "solarize_add": (110, False, "solarize_add", lambda v, size, centre: [int(v)]),
    "color": (0.9, True, "color", lambda v, size, centre: [1 - v]),
    "contrast": (0.9, True, "contrast", lambda v, size, centre: [1 - v]),
    "brightness": (0.9, True, "brightness", lambda v, size, centre: [1 - v]),
    "sharpness": (0.9, True, "sharpness", lambda v, size, centre: list((v * SMOOTH + (1 - v) * IDENTITY).flat)),
    "shear_x": (0.3, True, "warp", lambda v, size, centre: [1, v, 0, 0, 1, 0]),
    "shear_y": (0.3, True, "warp", lambda v, size, centre: [1, 0, 0, v, 1, 0]),
    "cutout": (0.3571, False, "cutout", lambda v, size, centre: _cutout(centre, v, size)),
    "translate_x": (0.4464, True, "warp", lambda v, size, centre: [1, 0, v * size, 0, 1, 0]),
    "translate_y": (0.4464, True, "warp", lambda v, size, centre: [1, 0, 0, 0, 1, v * size]),
}


def rand_augment_level(name: str, m: int, negate: bool, centre, size: int) -> tuple[int, tuple[float, ...]]:
    """SIFA's op `name` at magnitude m as the graph applies it: its kind (index into RA_KINDS) and parameters.
    `negate` negates the value of the ops SIFA negates at random; `centre` (y, x) places a Cutout."""
    top, signed, kind, params = SIFA_RAND_AUGMENT[name]
    v = top * m / RA_MAX_MAGNITUDE
    values = [float(p) for p in params(-v if signed and negate else v, size, centre)]
    return RA_KINDS.index(kind), tuple(values + [0.0] * (RA_PARAMS - len(values)))


# ---------------------------------------------------------------- the graph

def _warp(data, p):       # PIL's affine transform: output-to-input map, nearest pixel, black outside
    return fn.warp_affine(data, matrix=fn.reshape(p[0:6], shape=[2, 3]), inverse_map=True, fill_value=0,
                          interp_type=types.INTERP_NN)


def _sharpen(data, p):    # PIL's Sharpness: a 3x3 kernel, an input on the clip's device
    kernel = fn.reshape(p, shape=[3, 3])
    return fn.filter(data, kernel.gpu() if data.device == "gpu" else kernel)


RA_OPS = {   # kind: the op on a uint8 FHWC clip `data` with its parameters `p` (float32[RA_PARAMS])
    "warp": _warp,
    "auto_contrast": lambda data, p: aa.auto_contrast.op(data, None),
    "equalize": lambda data, p: fn.equalize(data),
    "invert": lambda data, p: aa.invert.op(data, None),
    "posterize": lambda data, p: data & fn.cast(p[0], dtype=types.UINT8),
    "solarize": lambda data, p: aa.solarize.op(data, p[0]),
    "solarize_add": lambda data, p: aa.solarize_add.op(data, fn.cast(p[0], dtype=types.UINT8)),
    "color": lambda data, p: fn.saturation(data, saturation=p[0]),
    "contrast": lambda data, p: aa.contrast.op(data, p[0]),
    "brightness": lambda data, p: fn.brightness(data, brightness=p[0]),
    "sharpness": _sharpen,
    "cutout": lambda data, p: fn.erase(data, anchor=p[0:2], shape=p[2:4], axis_names="HW", fill_value=[125, 123, 114]),
}
RA_KINDS = tuple(RA_OPS)


def _hue_shift(data, shift):
    """torchvision's adjust_hue (PIL's HSV): each pixel's hue turned by `shift` of the circle, its value
    (max) and chroma (max - min) kept; computed in float, where PIL rounds H and S to 8 bits."""
    x = fn.cast(data, dtype=types.FLOAT)
    r, g, b = x[:, :, :, 0], x[:, :, :, 1], x[:, :, :, 2]
    value = dmath.max(dmath.max(r, g), b)
    chroma = value - dmath.min(dmath.min(r, g), b)
    divisor = chroma + (chroma == 0)
    red_max = r == value
    green_max = (g == value) & (red_max == 0)
    blue_max = (red_max == 0) & (green_max == 0)
    hue = (red_max * ((g - b) / divisor) + green_max * ((b - r) / divisor + 2) + blue_max * ((r - g) / divisor + 4)
           + 6 * shift)                                       # in sixths of the circle
    channels = []
    for n in (5, 3, 1):                                       # R, G, B from the hexagon
        k = n + hue
        k = k - 6 * dmath.floor(k / 6)
        channels.append(value - chroma * dmath.clamp(dmath.min(k, 4 - k), 0, 1))
    return fn.cast(fn.stack(*channels, axis=3, axis_name="C"), dtype=types.UINT8)


JITTER_OPS = [   # ColorJitter's four, in `color` order, each clipping to 8 bits as PIL does
    lambda data, color: fn.brightness(data, brightness=color[0]),
    lambda data, color: aa.contrast.op(data, color[1]),        # about each frame's mean luma, as PIL's Contrast
    lambda data, color: fn.saturation(data, saturation=color[2]),
    lambda data, color: _hue_shift(data, color[3]),
]


def augment_clip(clip, augment: Augment):
    """The enabled augmentations on a uint8 FHWC clip, each reading its fed per-clip inputs."""
    if augment.rand_augment is not None:
        kinds = fn.external_source(name="ra_kinds", dtype=types.INT32, ndim=1)
        params = fn.external_source(name="ra_params", dtype=types.FLOAT, ndim=2)
        ops = list(RA_OPS.values())
        for level in range(augment.rand_augment[0]):
            clip = select(ops, kinds[level], clip, params[level])
    if augment.color_jitter is not None:
        color_on = fn.external_source(name="color_on", dtype=types.BOOL, ndim=0)
        color = fn.external_source(name="color", dtype=types.FLOAT, ndim=1)
        order = fn.external_source(name="color_order", dtype=types.INT32, ndim=1)
        if color_on:
            for step in range(4):
                clip = select(JITTER_OPS, order[step], clip, color)
    if augment.grayscale_prob > 0:
        grayscale = fn.external_source(name="grayscale", dtype=types.BOOL, ndim=0)
        if grayscale:
            luma = fn.color_space_conversion(clip, image_type=types.RGB, output_type=types.GRAY)   # PIL's "L"
            clip = fn.cat(luma, luma, luma, axis_name="C")
    if augment.gaussian_blur_prob > 0:
        blur_on = fn.external_source(name="blur_on", dtype=types.BOOL, ndim=0)
        sigma = fn.external_source(name="blur_sigma", dtype=types.FLOAT, ndim=0)
        if blur_on:
            clip = fn.gaussian_blur(clip, sigma=sigma)
    return clip


def feed_augment(pipe, augment: Augment, params: list[ClipParams]) -> None:
    """Queue the augmentation inputs of one batch (one ClipParams per sample) for the next `pipe.run()`."""
    if augment.rand_augment is not None:
        n = augment.rand_augment[0]
        if any(len(p.ra_kinds) != n for p in params):
            raise ValueError(f"the graph applies rand_augment with n={n}: every sample needs {n} drawn levels")
        pipe.feed_input("ra_kinds", [np.array(p.ra_kinds, np.int32) for p in params])
        pipe.feed_input("ra_params", [np.array(p.ra_params, np.float32) for p in params])
    if augment.color_jitter is not None:
        pipe.feed_input("color_on", [np.array(p.color is not None) for p in params])
        pipe.feed_input("color", [np.array(p.color or (1, 1, 1, 0), np.float32) for p in params])
        pipe.feed_input("color_order", [np.array(p.color_order, np.int32) for p in params])
    if augment.grayscale_prob > 0:
        pipe.feed_input("grayscale", [np.array(p.grayscale) for p in params])
    if augment.gaussian_blur_prob > 0:
        pipe.feed_input("blur_on", [np.array(p.blur_sigma is not None) for p in params])
        pipe.feed_input("blur_sigma", [np.array(p.blur_sigma or 0, np.float32) for p in params])
