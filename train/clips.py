"""Batch helpers shared by training and evaluation: per-frame views of a batch in any of the models'
layouts (BTCHW, BCTHW, super images), and mixed-precision context.

Mixup/CutMix and the temporal-order test both need "the frames of each clip", whatever layout the
loader produced for the model. Super images arrive tiled, (B, C, rows*H, cols*W); they are untiled
with the model's grid (SIFAR's rule of contract.inputs.super_grid unless the model names one), blank tiles included.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from contract.inputs import super_grid
from models.layouts import to_super_image


def untile(x: torch.Tensor, num_frames: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, C, rows*H, cols*W) -> (B, rows*cols, C, H, W): every tile, blanks at the end."""
    b, c, height, width = x.shape
    rows, cols = super_grid(num_frames, grid)
    if height % rows or width % cols:
        raise ValueError(f"super image {height}x{width} does not split into the {rows}x{cols} grid of "
                         f"{num_frames} frames; check model.num_frames against the loader's frames")
    h, w = height // rows, width // cols
    return x.view(b, c, rows, h, cols, w).permute(0, 2, 4, 1, 3, 5).reshape(b, rows * cols, c, h, w)


def time_first(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A (B, T, C, H, W) view of a 5-D clip batch (BCTHW is permuted, not copied)."""
    return x.transpose(1, 2) if layout == "BCTHW" else x


def map_frames(x: torch.Tensor, layout: str, num_frames: int, fn: Callable[[torch.Tensor], torch.Tensor],
               grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Apply `fn` to the (B, T, C, H, W) frames of `x` and return the result in `x`'s layout.

    For a super image `fn` sees every tile, blank ones too (they are blanked again afterwards);
    for 5-D layouts it sees a view.
    """
    if x.dim() == 4:
        if layout != "super":
            raise ValueError(f"a 4-D batch {tuple(x.shape)} is only valid for super-image models, "
                             f"this model's layout is {layout}")
        tiles = fn(untile(x, num_frames, grid))
        return to_super_image(tiles[:, :num_frames], super_grid(num_frames, grid))   # blanks re-zeroed
    if x.dim() != 5:
        raise ValueError(f"expected a clip batch with 4 (super image) or 5 dims, got {tuple(x.shape)}")
    out = fn(time_first(x, layout))
    return out.transpose(1, 2) if layout == "BCTHW" else out


def reorder(x: torch.Tensor, layout: str, num_frames: int, perms: torch.Tensor,
            grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Frames of clip i in the order perms[i] (a (B, T) index tensor)."""
    def take(frames: torch.Tensor) -> torch.Tensor:
        index = perms.to(frames.device)
        if frames.shape[1] > num_frames:      # super-image tiles: keep blanks where they are
            blanks = torch.arange(num_frames, frames.shape[1], device=frames.device).expand(len(frames), -1)
            index = torch.cat([index, blanks], dim=1)
        return frames[torch.arange(len(frames), device=frames.device)[:, None], index]
    return map_frames(x, layout, num_frames, take, grid)


def autocast(device, dtype: torch.dtype | None):
    """Mixed precision in `dtype` on `device`'s type, or nothing when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def input_memory_format(x: torch.Tensor, layout: str) -> torch.memory_format | None:
    """Channels-last for tensors a convolution reads as they are: super images (4-D) and BCTHW clips.
    BTCHW clips are reshaped to frames inside the model, which keeps the weights' format anyway."""
    if x.dim() == 4:
        return torch.channels_last
    return torch.channels_last_3d if layout == "BCTHW" else None
