"""What each DALI video backend can decode, checked against the shard index when a loader is built.

Both backends fail only when the first batch runs: the CPU one with a message naming no codec, NVDEC on a
frame smaller than its minimum with an error that leaves the whole DALI pipeline unusable. The index
already holds every video's codec and size, so the loader refuses such shards up front, naming the fix.
"""
from __future__ import annotations

import numpy as np

CPU_CODECS = ("vp8", "vp9", "mjpeg")   # what DALI 2.4's CPU video decoder reads

# NVDEC's smallest frame (width, height) per codec, from NVIDIA's NVDEC programming guide (hardware
# capabilities); VP9's 128x128 is also what DALI 2.4 reported on an H200. Codecs not listed are not checked.
NVDEC_MIN_SIZE = {"h264": (48, 16), "hevc": (144, 144), "vp8": (48, 16), "vp9": (128, 128), "av1": (128, 128)}


def check_cpu_codecs(codecs: np.ndarray, where: str) -> None:
    unreadable = sorted(set(codecs.tolist()) - set(CPU_CODECS))
    if unreadable:
        raise ValueError(f"{where} holds {int(np.isin(codecs, unreadable).sum())} of {len(codecs)} videos in "
                         f"{', '.join(unreadable)}, which DALI's CPU decoder cannot read (it reads VP8, VP9 and "
                         f"MJPEG): reshard them with --codec vp9, or load them with device='gpu'")


def check_nvdec_sizes(codecs: np.ndarray, widths: np.ndarray, heights: np.ndarray, where: str) -> None:
    small = np.zeros(len(codecs), dtype=bool)
    for codec, (min_width, min_height) in NVDEC_MIN_SIZE.items():
        small |= (codecs == codec) & ((widths < min_width) | (heights < min_height))
    if small.any():
        first = int(np.flatnonzero(small)[0])
        codec = str(codecs[first])
        min_width, min_height = NVDEC_MIN_SIZE[codec]
        h264 = "" if codec == "h264" else ", or with --codec h264 (NVDEC reads it from 48x16)"
        raise ValueError(f"{where} holds {int(small.sum())} of {len(codecs)} videos smaller than NVDEC decodes "
                         f"(the first: {codec} at {widths[first]}x{heights[first]}, below {codec}'s "
                         f"{min_width}x{min_height}): reshard them with --short-side {max(min_width, min_height)} or "
                         f"more where the sources are that large (the shard job never upscales){h264}, or load them "
                         f"with device='cpu'")
