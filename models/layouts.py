"""Tensor layouts shared by the data pipelines and the models: the SIFAR super-image grid rule.

It lives here, at the end of the data flow, so the pipelines (which tile on device) and SIFAR
(which tiles clips given as frame sequences) follow one rule.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange


def super_grid(num_frames: int, grid: str | tuple[int, int] | None = None) -> tuple[int, int]:
    """(rows, cols) of the super image for `num_frames` frames.

    SIFAR's rule: m = ceil(sqrt(T)); (m-1) x m when T <= (m-1)m, else m x m, so 8 -> 3x3,
    12 -> 3x4, 14 and 16 -> 4x4. An explicit grid ("2x4" or (2, 4)) overrides it.
    """
    if grid is not None:
        rows, cols = (int(v) for v in grid.lower().split("x")) if isinstance(grid, str) else grid
        if rows * cols < num_frames:
            raise ValueError(f"grid {rows}x{cols} holds {rows * cols} tiles, fewer than the {num_frames} frames; "
                             f"use at least {num_frames} tiles or leave the grid to the SIFAR rule")
        return rows, cols
    m = math.ceil(math.sqrt(num_frames))
    return (m - 1, m) if num_frames <= (m - 1) * m else (m, m)


def to_super_image(frames: torch.Tensor, grid: str | tuple[int, int] | None = None) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, C, rows*H, cols*W); frame f at row f // cols, column f % cols; blank tiles are 0."""
    b, t, c, h, w = frames.shape
    rows, cols = super_grid(t, grid)
    if rows * cols > t:
        frames = torch.cat([frames, frames.new_zeros(b, rows * cols - t, c, h, w)], dim=1)
    return rearrange(frames, "b (th tw) c h w -> b c (th h) (tw w)", th=rows, tw=cols)
