"""SIFAR: an image classifier reads a clip as one super image (Fan, Chen, Panda, ICLR 2022).

The frames of a clip are tiled row by row onto a grid (`models.layouts`, 8 frames -> 3x3) and the
result is classified like any image. Two classifiers carry the paper's results:

* Swin, with a larger window per stage so that windows straddle neighbouring frames, and a last stage
  whose window is its whole feature map: global self-attention over all frames, where it is cheapest
  (two blocks at 1/32 resolution). SIFAR-B-7 keeps Swin's 7x7 windows everywhere. Optionally one
  learnable embedding per tile ("which frame am I in"), which the paper uses on SSv2.
* ResNet, optionally followed by bottleneck blocks whose 3x3 is widened to 7, 11 or 21: at 1/32 of a
  672 px super image the map is 21x21, so a 21x21 kernel sees every frame.

Every model takes either a super image (B, C, rows*S, cols*S), as the data pipeline tiles it on device,
or frames (B, T, C, S, S), which it tiles itself; `model.super_grid` tells the loader the layout.
"""
from __future__ import annotations

import warnings

import timm
import torch
from einops import repeat
from timm.layers import trunc_normal_
from timm.models.resnet import Bottleneck
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from contract.inputs import super_grid
from models.layouts import to_super_image
from models.registry import register_model
from models.weights import adapt_swin, load_pretrained


class SuperImageInput:
    """The input contract shared by the SIFAR classifiers: frames or an already tiled super image."""

    num_frames: int
    frame_size: int
    super_grid: tuple[int, int]

    @property
    def super_image_size(self) -> tuple[int, int]:
        rows, cols = self.super_grid
        return rows * self.frame_size, cols * self.frame_size

    def super_image(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self.super_grid
        s, t = self.frame_size, self.num_frames
        if x.ndim == 5:
            if x.shape[1] != t or x.shape[-2:] != (s, s):
                raise ValueError(f"{type(self).__name__} expects frames (B, {t}, C, {s}, {s}), got {tuple(x.shape)}; "
                                 f"build the model with num_frames={x.shape[1]}, img_size={x.shape[-1]} to match")
            return to_super_image(x, self.super_grid)
        if x.ndim == 4 and x.shape[-2:] == self.super_image_size:
            return x
        raise ValueError(f"{type(self).__name__} expects a {rows}x{cols} super image (B, C, {rows * s}, {cols * s}) "
                         f"or frames (B, {t}, C, {s}, {s}), got {tuple(x.shape)}")


def sifar_windows(img_size: tuple[int, int], patch_size: int, window: int, num_stages: int,
                  global_last: bool) -> tuple[tuple[int, int], ...]:
    """One (h, w) window per Swin stage: `window` everywhere, the last stage's whole map if `global_last`."""
    h, w = img_size[0] // patch_size, img_size[1] // patch_size
    for _ in range(num_stages - 1):  # each patch merging halves the map, rounding up as timm pads
        h, w = (h + 1) // 2, (w + 1) // 2
    windows = [(window, window)] * num_stages
    if global_last:
        windows[-1] = (h, w)
    return tuple(windows)


class SwinSIFAR(SuperImageInput, SwinTransformer):
    """timm's Swin on a super image, with per-stage windows and an optional embedding per tile.

    timm already clamps a window that covers its whole map and drops the shift there, which is
    exactly SIFAR's global last stage; the state dict keeps timm's names, so image Swin checkpoints load.
    """

    def __init__(self, num_frames: int = 8, frame_size: int = 224, grid: str | tuple[int, int] | None = None,
                 window_size: int = 7, global_last: bool = True, frame_pos_embed: bool = False,
                 patch_size: int = 4, depths=(2, 2, 18, 2), embed_dim: int = 128, **swin_kwargs):
        self.num_frames, self.frame_size = num_frames, frame_size
        self.super_grid = super_grid(num_frames, grid)
        if frame_size % patch_size:
            raise ValueError(f"img_size {frame_size} is not a multiple of the patch size {patch_size}, so patches "
                             f"would straddle frames; use a frame size divisible by {patch_size}")
        img_size = self.super_image_size
        super().__init__(img_size=img_size, patch_size=patch_size, depths=depths, embed_dim=embed_dim,
                         window_size=sifar_windows(img_size, patch_size, window_size, len(depths), global_last),
                         **swin_kwargs)
        self._warn_padded_windows()
        self.tile_tokens = frame_size // patch_size
        self.frame_pos_embed = None
        if frame_pos_embed:
            self.frame_pos_embed = nn.Parameter(torch.zeros(self.super_grid[0] * self.super_grid[1], embed_dim))
            trunc_normal_(self.frame_pos_embed, std=0.02)

    @property
    def stage_windows(self) -> list[tuple[int, int]]:
        """The windows the blocks actually use, after timm's clamping."""
        return [tuple(stage.blocks[0].window_size) for stage in self.layers]

    def _warn_padded_windows(self) -> None:
        for i, stage in enumerate(self.layers):
            (h, w), (wh, ww) = stage.output_resolution, stage.blocks[0].window_size
            if h % wh or w % ww:
                warnings.warn(f"Swin stage {i + 1}: window {wh}x{ww} does not tile its {h}x{w} map (super image "
                              f"{self.super_image_size[0]}x{self.super_image_size[1]}), so it is zero-padded; the "
                              f"registered SIFAR configs tile exactly at the frames x img_size in their names",
                              stacklevel=2)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"frame_pos_embed"}

    def tile_embedding(self) -> torch.Tensor:
        """(rows*h, cols*w, C): the embedding of each tile spread over that tile's tokens."""
        rows, cols = self.super_grid
        return repeat(self.frame_pos_embed, "(th tw) c -> (th h) (tw w) c", th=rows, tw=cols,
                      h=self.tile_tokens, w=self.tile_tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self.super_image(x))  # (B, H, W, C)
        if self.frame_pos_embed is not None:
            x = x + self.tile_embedding()
        return self.norm(self.layers(x))


class ResNetSIFAR(SuperImageInput, nn.Module):
    """A timm CNN on a super image, with optional large-kernel bottleneck blocks after its last stage."""

    def __init__(self, arch: str = "resnet50", num_classes: int = 400, num_frames: int = 8, frame_size: int = 224,
                 grid: str | tuple[int, int] | None = None, extra_kernels: tuple[int, ...] = (), **timm_kwargs):
        super().__init__()
        self.num_frames, self.frame_size = num_frames, frame_size
        self.super_grid = super_grid(num_frames, grid)
        self.net = timm.create_model(arch, pretrained=False, num_classes=num_classes, **timm_kwargs)
        self.extra = nn.Sequential(*(large_kernel_bottleneck(self.net.num_features, k) for k in extra_kernels))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.extra(self.net.forward_features(self.super_image(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.forward_features(x))


def large_kernel_bottleneck(channels: int, kernel_size: int) -> Bottleneck:
    """ResNet's own bottleneck (channels -> channels/4 -> channels) with its 3x3 widened to k x k.

    The last BatchNorm starts at zero, so the new block is the identity until it learns something
    and a pretrained backbone's features reach the head unchanged.
    """
    block = Bottleneck(channels, channels // 4)
    width = block.conv2.in_channels
    block.conv2 = nn.Conv2d(width, width, kernel_size, padding=kernel_size // 2, bias=False)
    block.zero_init_last()
    return block


# --- registered configs ------------------------------------------------------------------------------

SWIN_ARCHS = {
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}


def _build_swin(num_classes, num_frames, img_size, pretrained, *, arch, window_size, global_last, **options):
    model = SwinSIFAR(num_frames=num_frames, frame_size=img_size, window_size=window_size,
                      global_last=global_last, num_classes=num_classes, **{**SWIN_ARCHS[arch], **options})
    if pretrained:
        load_pretrained(model, pretrained, adapt=adapt_swin)
    return model


def _build_cnn(num_classes, num_frames, img_size, pretrained, *, arch, extra_kernels=(), **options):
    model = ResNetSIFAR(arch, num_classes=num_classes, num_frames=num_frames, frame_size=img_size,
                        extra_kernels=tuple(extra_kernels), **options)
    if pretrained:
        load_pretrained(model, pretrained, adapt=_image_weights_into_backbone)
    return model


def _image_weights_into_backbone(state_dict, model):
    """An image checkpoint fills the backbone (`net.`); a SIFAR one, with its extra blocks, the whole model."""
    if any(key.startswith(("net.", "extra.")) for key in state_dict):
        return state_dict
    return {f"net.{key}": value for key, value in state_dict.items()}


_SOURCE = "SIFAR, ICLR 2022: GFLOPs Table 1, params Tables 3-4, top-1 Tables 2-4 and 7"
# name: (arch, window, global last stage, frames, frame size, paper figures)
_SWIN_CONFIGS = {
    "sifar_base_7_8x224": ("base", 7, False, 8, 224, dict(gflops=138, params_m=87, k400_top1=79.6, ssv2_top1=59.0)),
    "sifar_base_12_8x192": ("base", 12, True, 8, 192, dict(gflops=106, params_m=87, k400_top1=80.0, ssv2_top1=60.1)),
    "sifar_base_14_8x224": ("base", 14, True, 8, 224, dict(gflops=147, params_m=87, k400_top1=80.4, ssv2_top1=60.6)),
    "sifar_base_12_16x192": ("base", 12, True, 16, 192, dict(gflops=189, params_m=87, k400_top1=80.4, ssv2_top1=61.9)),
    "sifar_base_14_16x224": ("base", 14, True, 16, 224, dict(gflops=263, params_m=87, k400_top1=81.1, ssv2_top1=62.6)),
    "sifar_base_12_8x384": ("base", 12, True, 8, 384, dict(gflops=423, params_m=87, k400_top1=81.6)),
    "sifar_large_7_8x224": ("large", 7, False, 8, 224, {}),
    "sifar_large_12_8x192": ("large", 12, True, 8, 192, {}),
    "sifar_large_14_8x224": ("large", 14, True, 8, 224, {}),
    "sifar_large_14_16x224": ("large", 14, True, 16, 224,
                              dict(gflops=576, params_m=196, k400_top1=82.2, ssv2_top1=64.2)),
    "sifar_large_12_8x384": ("large", 12, True, 8, 384, dict(gflops=944, params_m=196, k400_top1=84.2)),
}
# name: (timm backbone, kernels of the appended blocks, paper top-1 on SSv2 / Kinetics400 with 8 frames)
_CNN_CONFIGS = {
    "sifar_resnet50": ("resnet50", (), 50.8, 73.2),
    "sifar_resnet50_c7": ("resnet50", (7,), 54.4, 74.4),
    "sifar_resnet50_c11": ("resnet50", (11,), 55.2, 74.5),
    "sifar_resnet50_c21": ("resnet50", (21,), 55.8, 74.8),
    "sifar_resnet50_c21_11": ("resnet50", (21, 11), 57.6, 75.1),
    "sifar_resnet101": ("resnet101", (), 56.3, 76.6),
    "sifar_resnet101_c21": ("resnet101", (21,), 58.3, 77.1),
    "sifar_resnet101_c21_11": ("resnet101", (21, 11), 59.0, 77.5),
    "sifar_resnet152x2": ("resnetv2_152x2_bit", (), 58.2, 79.0),
}

for _name, (_arch, _window, _global, _frames, _size, _figures) in _SWIN_CONFIGS.items():
    register_model(_name, family="sifar", layout="super", arch=_arch, window_size=_window, global_last=_global,
                   paper=dict(frames=_frames, img_size=_size, **_figures, source=_SOURCE))(_build_swin)
for _name, (_arch, _kernels, _ssv2, _k400) in _CNN_CONFIGS.items():
    register_model(_name, family="sifar", layout="super", arch=_arch, extra_kernels=_kernels,
                   paper=dict(frames=8, img_size=224, ssv2_top1=_ssv2, k400_top1=_k400, source=_SOURCE))(_build_cnn)
