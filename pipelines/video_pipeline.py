"""The DALI graph: encoded bytes in, normalised clips in the model's layout out; one definition, two devices.

device="gpu" decodes on NVDEC (`mixed` video decoder; nvJPEG for images) and runs every later operator on
the GPU; device="cpu" runs the same operators on the host (libavcodec decodes VP8/VP9/MJPEG there).

The host computes every random choice (frame indices, crop window, flip, and the recipe augmentations a
config enables) from the Parquet index before any byte is read and feeds them with the bytes (see
`sampling.py`, `augment.py`). The graph itself is deterministic,
which makes an epoch reproducible for a seed whatever the number of DALI threads or pipelines, and lets
the loader re-run any sample alone when a batch fails to decode.

Inputs, per sample (`fn.external_source`, fed by the loader with `feed`):
  encoded  uint8[bytes]   the video (or image) file as stored in the shard, or cut to GOPs (`gops.py`)
  frames   int32[T]       frame indices to decode (video only)
  roi      float32[4]     y0, x0, y1, x1 of the source region that becomes the crop
  mirror   int32          1 to flip horizontally
  and, for each augmentation the config enables, its per-clip parameters (`augment.feed_augment`)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline

from contract.inputs import IMAGENET_MEAN, IMAGENET_STD, LAYOUTS, super_grid
from pipelines.augment import Augment, ClipParams, augment_clip, feed_augment

_SEQUENCE_LAYOUT = {"BTCHW": "FCHW", "BCTHW": "CFHW", "super": "FCHW"}


@dataclass(frozen=True)
class PipelineConfig:
    """What fixes the graph's shape and operators; everything per sample comes through the inputs."""
    num_frames: int = 8
    crop_size: int = 224
    layout: str = "BTCHW"
    grid: str | None = None          # super layout only: "2x4", or None for the SIFAR rule
    media: str = "video"             # "video" or "image"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    augment: Augment = Augment()     # training augmentations beyond crop and flip (none by default)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.media not in ("video", "image"):
            raise ValueError(f"media must be 'video' or 'image', got {self.media!r}")
        if self.media == "image" and self.num_frames != 1:
            raise ValueError(f"image shards give one frame per sample; set num_frames=1 (got {self.num_frames})")
        super_grid(self.num_frames, self.grid)  # a grid too small for the clip fails here, not at the first batch


def output_shape(config: PipelineConfig, batch_size: int) -> tuple[int, ...]:
    """The shape of one batch the graph outputs."""
    t, size = config.num_frames, config.crop_size
    if config.layout == "super":
        rows, cols = super_grid(t, config.grid)
        return batch_size, 3, rows * size, cols * size
    return (batch_size, t, 3, size, size) if config.layout == "BTCHW" else (batch_size, 3, t, size, size)


def decode(encoded, frames, device: str, media: str):
    """Decoded frames, FHWC uint8 RGB: the chosen frames of a video, or an image as a one-frame clip."""
    if media == "image":
        if device == "gpu":
            # nvJPEG; hw_decoder_load splits JPEGs between the hardware decoder (A100/H100) and CUDA cores.
            image = fn.decoders.image(encoded, device="mixed", output_type=types.RGB, hw_decoder_load=0.65)
        else:
            image = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
        return fn.expand_dims(image, axes=[0], new_axis_names="F")
    if device == "gpu":
        # affine=False: several pipelines (one per NVDEC engine) and ranks share the host cores.
        return fn.decoders.video(encoded, frames=frames, device="mixed", affine=False)
    return fn.decoders.video(encoded, frames=frames, device="cpu")


def crop_resize(frames, roi, size: int):
    """The window of every frame resized to size x size: resize-then-crop in a single resample."""
    return fn.resize(frames, roi_start=roi[0:2], roi_end=roi[2:4], roi_relative=False, size=[size, size],
                     interp_type=types.INTERP_LINEAR, antialias=True)


def normalize(frames, mirror, mean, std, layout: str):
    """Flip, (x - mean) / std in float32 and the clip layout, in one fused operator."""
    return fn.crop_mirror_normalize(frames, mirror=mirror, dtype=types.FLOAT, output_layout=_SEQUENCE_LAYOUT[layout],
                                    mean=[255 * m for m in mean], std=[255 * s for s in std])


def tile(frames, num_frames: int, size: int, grid: str | None):
    """FCHW clip -> CHW super image: frame f at row f // cols, column f % cols; blank tiles are 0
    (zero of the normalised tensor), the rule of `models.layouts.to_super_image`. Starting from FCHW
    keeps whole image rows contiguous through the transpose (measured: cheaper than from FHWC)."""
    rows, cols = super_grid(num_frames, grid)
    frames = fn.pad(frames, axis_names="F", shape=[rows * cols], fill_value=0.0)
    frames = fn.reshape(frames, shape=[rows, cols, 3, size, size], layout="")
    frames = fn.transpose(frames, perm=[2, 0, 3, 1, 4])              # C, rows, H, cols, W
    return fn.reshape(frames, shape=[3, rows * size, cols * size], layout="CHW")


@pipeline_def(enable_conditionals=True)   # `if` on per-sample inputs: augmentations applied with a probability
def video_pipeline(config: PipelineConfig, device: str):
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1) if config.media == "video" else None
    roi = fn.external_source(name="roi", dtype=types.FLOAT, ndim=1)
    mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
    clip = decode(encoded, frames, device, config.media)
    clip = crop_resize(clip, roi, config.crop_size)
    if config.augment.enabled:
        clip = augment_clip(clip, config.augment)
    clip = normalize(clip, mirror, config.mean, config.std, config.layout)
    if config.layout == "super":
        clip = tile(clip, config.num_frames, config.crop_size, config.grid)
    return clip


def build(config: PipelineConfig, device: str, batch_size: int, num_threads: int, device_id: int = 0,
          seed: int = 0) -> Pipeline:
    """A built pipeline; device="gpu" needs a CUDA device, device="cpu" runs with device_id=None."""
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    # exec_dynamic: each run's outputs get their own buffers, so the loader hands them to torch without a copy.
    pipe = video_pipeline(config, device, batch_size=batch_size, num_threads=num_threads,
                          device_id=device_id if device == "gpu" else None, seed=seed, prefetch_queue_depth=1,
                          exec_dynamic=True)
    pipe.build()
    return pipe


def feed(pipe: Pipeline, config: PipelineConfig, encoded: list[np.ndarray], frames, roi, mirror,
         augment: list[ClipParams] | None = None) -> None:
    """Queue one batch of inputs for the next `pipe.run()`: `encoded` a list of byte arrays, the others
    one entry per sample (arrays with a row per sample, or lists); `augment` is needed when the config
    enables augmentations. Arrays go to DALI as one tensor each, not a tensor per sample."""
    pipe.feed_input("encoded", encoded)
    if config.media == "video":
        pipe.feed_input("frames", np.ascontiguousarray(frames, np.int32))
    pipe.feed_input("roi", np.ascontiguousarray(roi, np.float32))
    pipe.feed_input("mirror", np.ascontiguousarray(mirror, np.int32))
    if config.augment.enabled:
        if augment is None:
            raise ValueError("the graph applies augmentations: feed each sample's drawn ClipParams (augment=)")
        feed_augment(pipe, config.augment, augment)
