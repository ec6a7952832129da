"""Super images in torch: SIFAR tiles clips given as frame sequences, training untiles them for Mixup.

The grid rule itself is part of the input contract (`contract.inputs.super_grid`), which the pipelines
follow when they tile on device.
"""
from __future__ import annotations

import torch
from einops import rearrange

from contract.inputs import super_grid


def to_super_image(frames: torch.Tensor, grid: str | tuple[int, int] | None = None) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, C, rows*H, cols*W); frame f at row f // cols, column f % cols; blank tiles are 0."""
    b, t, c, h, w = frames.shape
    rows, cols = super_grid(t, grid)
    if rows * cols > t:
        frames = torch.cat([frames, frames.new_zeros(b, rows * cols - t, c, h, w)], dim=1)
    return rearrange(frames, "b (th tw) c h w -> b c (th h) (tw w)", th=rows, tw=cols)
