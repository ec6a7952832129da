"""The input contract between a model and its loader: layout, frames, super-image grid, crop size, mean, std.

A model is trained on tensors of one shape and one normalisation; evaluating or fine-tuning it on any
other is a silent wrong number. So the model states its contract (`model.contract`, set by
`models.build`), the loader is built from it, and a checkpoint stores it beside the weights.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# How a batch of clips is laid out:
#   "BTCHW"  frames as a sequence (2D CNNs with temporal modules, ViTs),
#   "BCTHW"  channels-first clips (3D CNNs),
#   "super"  one super image per clip, (B, C, rows*H, cols*W) (SIFAR).
LAYOUTS = ("BTCHW", "BCTHW", "super")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)   # IBM's Inception nets (action-recognition-pytorch) scale to [-1, 1]
INCEPTION_STD = (0.5, 0.5, 0.5)
KINETICS_MEAN = (0.45, 0.45, 0.45)   # PyTorchVideo's defaults, which the IV-ViT code normalises with
KINETICS_STD = (0.225, 0.225, 0.225)


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


@dataclass(frozen=True)
class InputContract:
    """What one model reads. `grid` is set for super-image models only (resolved, never the rule)."""
    layout: str = "BTCHW"
    num_frames: int = 8
    crop_size: int = 224
    grid: tuple[int, int] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.num_frames < 1 or self.crop_size < 1:
            raise ValueError(f"num_frames and crop_size must be positive, got {self.num_frames} and {self.crop_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std positive; got {self.mean} and {self.std}")
        if (self.grid is not None) != (self.layout == "super"):
            raise ValueError(f"a grid goes with the super layout only (layout {self.layout!r}, grid {self.grid})")
        if self.grid is not None:
            object.__setattr__(self, "grid", super_grid(self.num_frames, tuple(self.grid)))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def grid_text(self) -> str | None:
        """The grid as the loader's option spells it ("3x3"), None outside the super layout."""
        return None if self.grid is None else f"{self.grid[0]}x{self.grid[1]}"

    def to_dict(self) -> dict:
        """Plain lists and numbers: what a checkpoint stores (loadable with torch.load(weights_only=True))."""
        out = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict) -> "InputContract":
        known = {k: data[k] for k in ("layout", "num_frames", "crop_size", "grid", "mean", "std") if k in data}
        for key in ("grid", "mean", "std"):
            if known.get(key) is not None:
                known[key] = tuple(known[key])
        return cls(**known)
