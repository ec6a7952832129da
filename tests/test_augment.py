"""The recipes' augmentations in the DALI graph on a real VP9 clip the test encodes: one draw per clip
reaches every frame (each frame of the clip equals that frame augmented alone with the same draw), the
operators are the PIL/torchvision ones of the authors' code, and the graph is a pure function of the fed
draws. On the CPU backend, and again on the GPU where one is visible (the `device` fixture)."""
from __future__ import annotations

import functools
import inspect
from pathlib import Path

import numpy as np
import pytest
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from pipelines.augment import RA_KINDS, SIFA_RAND_AUGMENT, Augment, ClipParams, rand_augment_level
from pipelines.config import OPTIONS
from pipelines.video_pipeline import PipelineConfig, build, feed
from shards.sample_dataset import encode_video, motion_clip
from train.config import load_config

REPO = Path(__file__).resolve().parents[1]
SIZE, FRAMES = 48, 4
RAW = {"mean": (0, 0, 0), "std": (1 / 255,) * 3}       # output = pixel values
SIFA_K400 = Augment.of((0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5)
SIFA_SSV2 = Augment.of(rand_augment=(2, 27))
ONE_OP = Augment.of(rand_augment=(1, 27))              # one level: each sample shows one op


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> bytes:
    """A moving textured object over a colour field, 6 frames, VP9 at 128x128, the smallest NVDEC decodes."""
    frames = motion_clip("rotating clockwise", np.random.default_rng(0), size=(128, 128), num_frames=6)
    return encode_video(tmp_path_factory.mktemp("augment") / "clip.webm", frames, 15, codec="vp9").read_bytes()


@functools.cache
def pipeline(augment: Augment, device: str):
    config = PipelineConfig(num_frames=FRAMES, crop_size=SIZE, augment=augment, **RAW)
    return config, build(config, device, batch_size=8, num_threads=1)


def run(video: bytes, augment: Augment, params: list[ClipParams], device: str, frames=None) -> np.ndarray:
    """Clips out of the graph as uint8 (B, T, H, W, 3): the left 48x48 square of the chosen frames."""
    config, pipe = pipeline(augment, device)
    frames = frames or [list(range(FRAMES))] * len(params)
    feed(pipe, config, [np.frombuffer(video, np.uint8)] * len(params), [np.array(f) for f in frames],
         [(0, 0, SIZE, SIZE)] * len(params), [False] * len(params), params)
    (out,) = pipe.run()
    return np.array(out.as_cpu().as_tensor()).transpose(0, 1, 3, 4, 2).round().astype(np.uint8)


def assert_one_draw_per_clip(video: bytes, augment: Augment, params: ClipParams, device: str) -> np.ndarray:
    """Each frame of the augmented clip equals that frame augmented alone (a clip of it repeated) with the
    same draw: one transform for all frames. Returns the augmented clip."""
    alone = [[f] * FRAMES for f in range(FRAMES)]
    out = run(video, augment, [params] * (1 + FRAMES), device, [list(range(FRAMES))] + alone)
    for f in range(FRAMES):
        np.testing.assert_array_equal(out[0, f], out[1 + f, 0])
    return out[0]


@pytest.fixture
def frames(video, device) -> np.ndarray:
    """The clip the augmentations see: the graph's output with none applied."""
    return run(video, SIFA_K400, [ClipParams()], device)[0]


def mean_abs(a, b) -> float:
    return float(np.abs(a.astype(np.int64) - b.astype(np.int64)).mean())


def test_color_jitter_applies_one_torchvision_jitter_to_every_frame(video, frames, device):
    params = ClipParams(color=(1.3, 0.75, 1.25, 0.07), color_order=(3, 0, 2, 1))
    out = assert_one_draw_per_clip(video, SIFA_K400, params, device)
    jitters = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for got, frame in zip(out, frames):
        want = Image.fromarray(frame)
        for k in params.color_order:         # torchvision's ColorJitter on PIL, in the drawn order
            want = jitters[k](want, params.color[k])
        assert mean_abs(got, np.asarray(want)) < 3      # PIL rounds H and S to 8 bits; the graph does not
    other = run(video, SIFA_K400, [ClipParams(color=(0.7, 1.3, 0.8, -0.05), color_order=(0, 1, 2, 3))], device)[0]
    assert mean_abs(other, out) > 10


def test_grayscale_gives_every_frame_pils_luma(video, frames, device):
    out = assert_one_draw_per_clip(video, SIFA_K400, ClipParams(grayscale=True), device)
    for got, frame in zip(out, frames):
        want = np.asarray(Image.fromarray(frame).convert("L"))
        assert np.abs(got.astype(int) - want[..., None]).max() <= 1


def test_gaussian_blur_blurs_every_frame_with_the_clips_sigma(video, frames, device):
    out = assert_one_draw_per_clip(video, SIFA_K400, ClipParams(blur_sigma=1.5), device)
    for got, frame in zip(out, frames):
        want = np.asarray(Image.fromarray(frame).filter(ImageFilter.GaussianBlur(radius=1.5)))
        assert np.abs(got.astype(int) - want)[6:-6, 6:-6].max() <= 3     # PIL approximates with box blurs
    sharper = run(video, SIFA_K400, [ClipParams(blur_sigma=0.5)], device)[0]
    assert mean_abs(sharper, frames) < mean_abs(out, frames)


def pil_op(name: str, v: float, frame: np.ndarray, centre) -> np.ndarray:
    """SIFA's clip RandAugment op on one frame, written from its definitions with PIL (v already signed);
    equalize is OpenCV's mapping, the graph's documented difference."""
    image, n = Image.fromarray(frame), frame.shape[0]
    affine = {"shear_x": (1, v, 0, 0, 1, 0), "shear_y": (1, 0, 0, v, 1, 0),
              "translate_x": (1, 0, v * n, 0, 1, 0), "translate_y": (1, 0, 0, 0, 1, v * n)}
    enhance = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
               "brightness": ImageEnhance.Brightness, "sharpness": ImageEnhance.Sharpness}
    if name in affine:
        return np.asarray(image.transform(image.size, Image.AFFINE, affine[name]))
    if name in enhance:
        return np.asarray(enhance[name](image).enhance(1 - v))
    if name == "solarize_add":
        return np.where(frame < 128, np.clip(frame + v, 0, 255), frame).astype(np.uint8)
    if name == "cutout":
        y0, x0 = (int(max(0, c - v * n / 2)) for c in centre)
        ImageDraw.Draw(image).rectangle((x0, y0, min(n, x0 + v * n), min(n, y0 + v * n)), (125, 123, 114))
        return np.asarray(image)
    if name == "equalize":
        return np.stack([opencv_equalize(frame[..., c]) for c in range(3)], axis=-1)
    return np.asarray({"auto_contrast": lambda: ImageOps.autocontrast(image), "invert": lambda: ImageOps.invert(image),
                       "rotate": lambda: image.rotate(v), "posterize": lambda: ImageOps.posterize(image, 4 - int(v)),
                       "solarize": lambda: ImageOps.solarize(image, 256 - v)}[name]())


def opencv_equalize(channel: np.ndarray) -> np.ndarray:
    """The histogram mapping DALI's `equalize` applies (OpenCV's), which is not PIL's (docs/pipelines.md)."""
    counts = np.bincount(channel.ravel(), minlength=256)
    cdf = counts.cumsum()
    lowest = cdf[counts > 0][0]
    if lowest == channel.size:
        return channel
    return np.round((cdf - lowest) * 255 / (channel.size - lowest)).astype(np.uint8)[channel]


# PIL's own formula where the graph rounds differently: enhance ops and auto_contrast by one level,
# sharpness on the 1-pixel border PIL leaves unfiltered.
CLOSE = {"auto_contrast": 1, "color": 2, "contrast": 1, "brightness": 1, "sharpness": 1}


@pytest.mark.parametrize("name", list(SIFA_RAND_AUGMENT))
def test_rand_augment_applies_sifas_op_alike_to_every_frame(video, frames, name, device):
    centre = (20.0, 30.0)
    kind, values = rand_augment_level(name, 27, True, centre, SIZE)
    assert RA_KINDS[kind] == SIFA_RAND_AUGMENT[name][2]
    out = assert_one_draw_per_clip(video, ONE_OP, ClipParams(ra_kinds=(kind,), ra_params=(values,)), device)
    top, negated = SIFA_RAND_AUGMENT[name][:2]
    v = -top * 27 / 30 if negated else top * 27 / 30          # the negated value, where the op negates
    for got, frame in zip(out, frames):
        want = pil_op(name, v, frame, centre)
        inner = (slice(1, -1),) * 2 if name == "sharpness" else (slice(None),) * 2
        assert np.abs(got.astype(int) - want)[inner].max() <= CLOSE.get(name, 0), name


def test_a_clip_not_drawn_for_an_augmentation_passes_through_untouched(video, frames, device):
    np.testing.assert_array_equal(frames, run(video, Augment(), [ClipParams()], device)[0])     # the default graph


@pytest.mark.parametrize("augment", [SIFA_K400, SIFA_SSV2], ids=["sifa_k400", "sifa_ssv2"])
def test_a_batch_equals_its_samples_run_alone_so_the_graph_draws_nothing(video, augment, device):
    params = [augment.draw(np.random.default_rng([7, 0, row]), SIZE) for row in range(3)]
    batch = run(video, augment, params, device)
    for k, p in enumerate(params):
        np.testing.assert_array_equal(batch[k], run(video, augment, [p], device)[0])
    assert mean_abs(batch[0], batch[1]) > 0 and mean_abs(batch[1], batch[2]) > 0


def test_the_draw_is_fixed_by_the_seed_differs_between_clips_and_is_empty_when_disabled():
    draws = [SIFA_K400.draw(np.random.default_rng([0, 0, row]), SIZE) for row in range(20)]
    assert draws[3] == SIFA_K400.draw(np.random.default_rng([0, 0, 3]), SIZE)
    assert len({d.color for d in draws}) > 10 and 0 < sum(d.grayscale for d in draws) < 20
    assert {d.blur_sigma is None for d in draws} == {True, False}
    assert all(0.1 <= d.blur_sigma <= 2 for d in draws if d.blur_sigma is not None)
    rng = np.random.default_rng(0)
    assert Augment().draw(rng, SIZE) == ClipParams() and rng.random() == np.random.default_rng(0).random()


@pytest.mark.parametrize("options, message", [
    ({"color_jitter": (0.4, 0.4)}, "color_jitter is a strength >= 0 or 3 or 4"),
    ({"color_jitter": (0.4, 0.4, 0.4, 0.7)}, "hue strength of color_jitter .* at most 0.5"),
    ({"grayscale_prob": 1.2}, r"grayscale_prob is a probability in \[0, 1\]"),
    ({"gaussian_blur_sigma": (2.0, 0.1)}, "gaussian_blur_sigma is a range"),
    ({"rand_augment": (2, 31)}, r"rand_augment is \[n, m\]: .* m in 0..30"),
])
def test_augmentation_options_that_cannot_work_are_refused_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        Augment.of(**options)


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (REPO / "configs").glob("*.yaml")))
def test_every_recipe_asks_for_augmentations_the_loader_knows(recipe):
    options = load_config(REPO / "configs" / f"{recipe}.yaml")["data"]["options"]
    assert set(options) <= set(OPTIONS)
    asked = Augment.of(**{k: v for k, v in options.items() if k in inspect.signature(Augment.of).parameters})
    if recipe == "sifa_r50_k400":      # train_val_3d.py's Kinetics transform
        assert asked == Augment((0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5, (0.1, 2.0))
    elif recipe == "sifa_r50_ssv2":    # base_config/ssv1_base.yml
        assert asked == Augment(rand_augment=(2, 27))
    else:                              # SIFAR, the CNN study and IV-ViT use none of them
        assert asked == Augment()
