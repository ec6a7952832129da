"""The loader's build-time codec checks, on the columns a shard index holds (codec, width, height)."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.codecs import check_nvdec_sizes


def test_vp9_below_nvdecs_128_pixels_is_refused_naming_the_short_side_to_reshard_with():
    codecs, widths, heights = np.array(["vp9", "vp9", "vp9"]), np.array([176, 160, 128]), np.array([128, 120, 96])
    with pytest.raises(ValueError, match=r"^k400 split 'train' holds 2 of 3 videos smaller than NVDEC decodes \(the "
                                         r"first: vp9 at 160x120, below vp9's 128x128\): reshard them with "
                                         r"--short-side 128 or more where the sources are that large \(the shard "
                                         r"job never upscales\), or with --codec h264 \(NVDEC reads it from 48x16\), "
                                         r"or load them with device='cpu'$"):
        check_nvdec_sizes(codecs, widths, heights, "k400 split 'train'")


def test_h264_decodes_on_nvdec_at_sizes_vp9_cannot():
    check_nvdec_sizes(np.array(["h264", "vp8"]), np.array([64, 64]), np.array([48, 48]), "small")


def test_hevc_needs_144_pixels_on_each_side():
    with pytest.raises(ValueError, match=r"hevc at 160x128, below hevc's 144x144\): reshard them with --short-side 144"):
        check_nvdec_sizes(np.array(["hevc"]), np.array([160]), np.array([128]), "hevc shards")

