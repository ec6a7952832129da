"""IV-ViT: one ViT for images and videos (Shimizu and Tamaki, "Joint learning of images and videos with a
single Vision Transformer", MVA 2023).

A video is a batch of frames to the ViT (frames flattened into the batch), an image a batch of one frame; the
clip's class tokens are averaged over time (late fusion) and one linear head per dataset classifies the result,
so every parameter but the heads is shared between image and video datasets. Between frames, a fold of the
class token's channels is shifted in time before each LayerNorm (TokenShift, Zhang et al., ACM MM 2021): channels
[0, C/d) take frame t+1's values, [C/d, 2C/d) frame t-1's, zeros past the clip ends; patch tokens never move,
and images (one frame) are never shifted. As in the reference code the shift acts on the residual stream.
"""
from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from contract.inputs import KINETICS_MEAN, KINETICS_STD
from models.registry import register_model
from models.temporal import TemporalShift, check_clip
from models.weights import load_pretrained, resize_pos_embed


class TokenShiftBlock(Block):
    """timm's ViT block with the class token shifted in time before each of its two LayerNorms."""

    def __init__(self, *args, fold_div: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        self.shift = TemporalShift(fold_div) if fold_div else None

    def forward(self, x: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        x = self._shift_class_token(x, num_frames)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = self._shift_class_token(x, num_frames)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _shift_class_token(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        if self.shift is None or num_frames == 1:
            return x
        cls = self.shift(x[:, 0].view(-1, num_frames, x.shape[-1]))
        return torch.cat([cls.view(-1, 1, x.shape[-1]), x[:, 1:]], dim=1)


class IVViT(VisionTransformer):
    """timm's ViT on image batches (B, 3, H, W) and clips (B, T, 3, H, W), with one classifier per dataset.

    `forward(x, dataset=name)` picks the head; without `dataset`, the first of `heads` is used.
    `token_shift=False` gives the plain frame-wise ViT with class tokens averaged over time.
    """

    def __init__(self, heads: dict[str, int], token_shift: bool = True, fold_div: int = 8, **vit_kwargs):
        if not heads:
            raise ValueError("IV-ViT needs at least one head, e.g. heads={'k400': 400, 'imagenet': 1000}")
        if token_shift and fold_div < 2:
            raise ValueError(f"IV-ViT fold_div must be >= 2 (two folds of C/fold_div channels move), got {fold_div}")
        block_fn = partial(TokenShiftBlock, fold_div=fold_div if token_shift else 0)
        super().__init__(num_classes=0, block_fn=block_fn, **vit_kwargs)
        if self.cls_token is None:
            raise ValueError("IV-ViT shifts and averages class tokens; build the ViT with class_token=True")
        self.heads = nn.ModuleDict({name: nn.Linear(self.embed_dim, n) for name, n in heads.items()})
        for head in self.heads.values():
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        self.token_shift = token_shift

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B*T, N, C) of every frame; images count as clips of one frame."""
        frames = _num_frames(x)
        x = self.patch_embed(x.flatten(0, 1) if x.dim() == 5 else x)
        x = self.norm_pre(self.patch_drop(self._pos_embed(x)))
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, frames, use_reentrant=False)
            else:
                x = block(x, frames)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, num_frames: int = 1, dataset: str | None = None,
                     pre_logits: bool = False) -> torch.Tensor:
        x = self.fc_norm(self.pool(x))
        x = self.head_drop(x.view(-1, num_frames, x.shape[-1]).mean(dim=1))
        return x if pre_logits else self._head(dataset)(x)

    def forward(self, x: torch.Tensor, dataset: str | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), _num_frames(x), dataset)

    def _head(self, dataset: str | None) -> nn.Linear:
        if dataset is None:
            return next(iter(self.heads.values()))
        if dataset not in self.heads:
            raise KeyError(f"IV-ViT has no head for dataset {dataset!r}; its heads are {sorted(self.heads)}. "
                           f"Build it with heads={{..., {dataset!r}: num_classes}}")
        return self.heads[dataset]


def _num_frames(x: torch.Tensor) -> int:
    if x.dim() == 5:
        check_clip(x, "BTCHW", "IV-ViT")
        return x.shape[1]
    if x.dim() == 4 and x.shape[1] == 3:
        return 1
    raise ValueError(f"IV-ViT takes images (B, 3, H, W) or clips (B, T, 3, H, W); got a tensor of shape "
                     f"{tuple(x.shape)}")


_VIT = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}


def _ivvit(size, num_classes, num_frames, img_size, pretrained, heads=None, **options):
    model = IVViT(heads=heads or {"default": num_classes}, img_size=img_size, patch_size=16,
                  **{**_VIT[size], **options})
    if pretrained:
        load_pretrained(model, pretrained, adapt=resize_pos_embed)
    return model


_PAPER = {"frames": 16, "img_size": 224, "source": "IV-ViT (MVA 2023): ViT-B/16, 16 frames"}


@register_model("ivvit_tiny_patch16_224", family="ivvit", layout="BTCHW", mean=KINETICS_MEAN, std=KINETICS_STD)
def ivvit_tiny_patch16_224(num_classes, num_frames=16, img_size=224, pretrained=None, **options):
    return _ivvit("tiny", num_classes, num_frames, img_size, pretrained, **options)


@register_model("ivvit_small_patch16_224", family="ivvit", layout="BTCHW", mean=KINETICS_MEAN, std=KINETICS_STD)
def ivvit_small_patch16_224(num_classes, num_frames=16, img_size=224, pretrained=None, **options):
    return _ivvit("small", num_classes, num_frames, img_size, pretrained, **options)


@register_model("ivvit_base_patch16_224", family="ivvit", layout="BTCHW", mean=KINETICS_MEAN, std=KINETICS_STD,
                paper=_PAPER)
def ivvit_base_patch16_224(num_classes, num_frames=16, img_size=224, pretrained=None, **options):
    return _ivvit("base", num_classes, num_frames, img_size, pretrained, **options)
