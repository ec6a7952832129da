"""SIFA-Transformer: timm's Swin Transformer with SIFA after the window attention of its regular-window blocks.

Frames are flattened into the batch, so Swin's windows stay spatial; SIFA (models.sifa) is the only exchange
between frames. A tubelet embedding that strides `temporal_stride` frames (4, as in the authors' code: 16 frames
-> 4 token maps) keeps the cost of a 16-frame clip at four images. Parameter names are timm's, so a local
timm Swin checkpoint loads with only the patch embedding inflated in time.

In a regular-window block (one whose windows are not shifted): X = X + WindowAttention(LN(X)); X = X + A(X);
X = X + MLP(LN(X)), where A is the inter-frame term of SIFA (Y = Q + A on the residual stream). Shifted-window
blocks are timm's. As in the authors' code, a stage whose map is no larger than its window shifts nothing, so
every block there is a regular-window block and runs SIFA (the last stage of a 224-pixel model: both blocks);
and the tubelet embedding is a bare 3D conv, without the LayerNorm of Swin's image patch embedding
(`patch_norm=True` puts it back: see `SIFASwinTransformer`).
"""
from __future__ import annotations

import torch
from einops import rearrange
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from timm.models.swin_transformer import checkpoint_filter_fn as swin_checkpoint_filter
from torch import nn

from models.registry import register_model
from models.sifa import SIFA, inflate_centre
from models.temporal import check_clip
from models.weights import load_pretrained


class FrameMixingSwinBlock(SwinTransformerBlock):
    """timm's Swin block with a temporal term added between the window attention and the MLP."""

    temporal: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x + self.temporal(x)
        x = x.reshape(b, -1, c)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(b, h, w, c)


class SIFATerm(nn.Module):
    """SIFA's inter-frame term A on channels-last (B*T, H, W, C) tokens.

    `out_norm=True` passes A through a LayerNorm whose scale and shift start at zero (authors' code), so a
    pretrained Swin starts unchanged; the paper adds A as it is.
    """

    def __init__(self, dim: int, num_frames: int, out_norm: bool = False, **sifa_options):
        super().__init__()
        self.sifa = SIFA(dim, num_frames, **sifa_options)
        self.norm = nn.LayerNorm(dim) if out_norm else nn.Identity()
        if out_norm:
            nn.init.zeros_(self.norm.weight)
            nn.init.zeros_(self.norm.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.sifa.inter_frame(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class TemporalConvTerm(nn.Module):
    """The authors' code adds, in shifted-window blocks, a dense 3-tap conv over time per token (zero-initialised)."""

    def __init__(self, dim: int, num_frames: int):
        super().__init__()
        self.num_frames = num_frames
        self.conv = nn.Conv2d(dim, dim, (1, 3), padding=(0, 1), bias=False)
        nn.init.zeros_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        seq = rearrange(x, "(n t) h w c -> n c (h w) t", t=self.num_frames)
        return rearrange(self.conv(seq), "n c (h w) t -> (n t) h w c", h=h, w=w)


class SIFASwinTransformer(SwinTransformer):
    """Swin on (B, T, 3, H, W) clips: space-time patch embedding, SIFA in regular-window blocks, clip logits.

    `sifa` holds the block options of models.sifa.SIFA plus `out_norm`; `shifted_temporal_conv=True` adds the
    authors' temporal conv to the shifted-window blocks. `patch_norm=True` keeps the LayerNorm that Swin's image
    patch embedding has and the authors' tubelet embedding drops: with it, an image Swin checkpoint loads whole
    and a fresh model reproduces the image Swin on a static clip, at the price of no longer being the
    authors' network.
    """

    def __init__(self, num_frames: int, temporal_stride: int = 4, sifa: dict | None = None,
                 shifted_temporal_conv: bool = False, patch_norm: bool = False, **swin_kwargs):
        super().__init__(**swin_kwargs)
        if num_frames % temporal_stride:
            raise ValueError(f"SIFA-Transformer: num_frames={num_frames} is not a multiple of temporal_stride="
                             f"{temporal_stride}; sample a multiple of {temporal_stride} frames or change the stride")
        self.num_frames = num_frames
        self.temporal_stride = temporal_stride
        self.feature_frames = num_frames // temporal_stride
        proj = self.patch_embed.proj
        self.patch_embed.proj = nn.Conv3d(proj.in_channels, proj.out_channels, (temporal_stride, *proj.kernel_size),
                                          stride=(temporal_stride, *proj.stride))
        if not patch_norm:
            self.patch_embed.norm = nn.Identity()
        sifa = dict(sifa or {})
        for stage in self.layers:
            for block in stage.blocks:
                # timm alternates regular and shifted windows and, like the authors' code, drops the shift where
                # the map fits in one window: SIFA goes wherever the windows end up unshifted.
                if not any(block.shift_size):
                    _add_temporal_term(block, SIFATerm(block.dim, self.feature_frames, **sifa))
                elif shifted_temporal_conv:
                    _add_temporal_term(block, TemporalConvTerm(block.dim, self.feature_frames))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_clip(x, "BTCHW", "SIFA-Transformer")
        if x.shape[1] != self.num_frames:
            raise ValueError(f"SIFA-Transformer was built for {self.num_frames} frames, got a clip of {x.shape[1]}; "
                             f"build it with num_frames={x.shape[1]} or sample {self.num_frames} frames")
        x = self.patch_embed.proj(rearrange(x, "b t c h w -> b c t h w"))
        x = self.patch_embed.norm(rearrange(x, "b c t h w -> (b t) h w c"))
        return self.norm(self.layers(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head.global_pool(x)
        x = self.head.drop(x.view(-1, self.feature_frames, x.shape[-1]).mean(dim=1))
        return x if pre_logits else self.head.fc(x)


def _add_temporal_term(block: SwinTransformerBlock, term: nn.Module) -> None:
    # Re-classing the timm block (rather than wrapping it) keeps its parameter names, so checkpoints load as is.
    block.__class__ = FrameMixingSwinBlock
    block.temporal = term


def adapt_swin_checkpoint(state_dict: dict, model: SIFASwinTransformer) -> dict:
    """timm's Swin conversion (old layouts, derived buffers, bias tables resized to the model's windows), then
    the 2D patch embedding inflated by `inflate_centre`."""
    proj = state_dict.get("patch_embed.proj.weight")
    out = swin_checkpoint_filter({k: v for k, v in state_dict.items() if k != "patch_embed.proj.weight"}, model)
    if proj is not None:
        out["patch_embed.proj.weight"] = inflate_centre(proj, model.temporal_stride) if proj.dim() == 4 else proj
    return out


_SWIN = {
    "t": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.1),
    "s": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    "b": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
}
_SIFA_KEYS = ("kernel_size", "deformable", "bidirectional", "attn_norm", "last_frame", "saliency_residual",
              "out_norm")


def _sifa_swin(size, num_classes, num_frames, img_size, pretrained, temporal_stride=4, **options):
    sifa = {k: options.pop(k) for k in _SIFA_KEYS if k in options}
    swin = {**_SWIN[size], "patch_size": 4, "window_size": 7, **options}
    model = SIFASwinTransformer(num_frames=num_frames, temporal_stride=temporal_stride, sifa=sifa,
                                img_size=img_size, num_classes=num_classes, **swin)
    if pretrained:
        load_pretrained(model, pretrained, adapt=adapt_swin_checkpoint)
    return model


@register_model("sifa_swin_t", family="sifa", layout="BTCHW", paper={"frames": 16, "img_size": 224})
def sifa_swin_t(num_classes, num_frames=16, img_size=224, pretrained=None, **options):
    return _sifa_swin("t", num_classes, num_frames, img_size, pretrained, **options)


@register_model("sifa_swin_s", family="sifa", layout="BTCHW", paper={"frames": 16, "img_size": 224})
def sifa_swin_s(num_classes, num_frames=16, img_size=224, pretrained=None, **options):
    return _sifa_swin("s", num_classes, num_frames, img_size, pretrained, **options)


@register_model("sifa_swin_b", family="sifa", layout="BTCHW", paper={"frames": 16, "img_size": 224})
def sifa_swin_b(num_classes, num_frames=16, img_size=224, pretrained=None, **options):
    return _sifa_swin("b", num_classes, num_frames, img_size, pretrained, **options)
