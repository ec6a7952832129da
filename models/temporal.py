"""Spatio-temporal building blocks of the unified 2D/3D CNN framework (Chen et al., CVPR 2021).

Two tensor conventions, one per model family, so that no layer needs to be told the clip length:
  2D nets carry frame sequences (B, T, C, H, W): `flatten(0, 1)` gives the (B*T, C, H, W) batch a 2D conv
  wants without a copy, and `unflatten` restores it, so the `Frame*` layers below run 2D ops per frame and
  the temporal modules (shift, TAM, temporal pooling) see time on dim 1;
  3D nets carry clips (B, C, T, H, W) straight through `nn.Conv3d`.
The I3D-style inflation in `models.inflate` relies on the 2D and 3D layers keeping the same parameter names.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.inflate import load_pretrained


class _PerFrame:
    """Mixin: apply a 2D module to every frame of a (B, T, C, H, W) sequence; parameter names stay the 2D ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(0, 1)).unflatten(0, (x.shape[0], x.shape[1]))


class FrameConv2d(_PerFrame, nn.Conv2d):
    pass


class FrameBatchNorm2d(_PerFrame, nn.BatchNorm2d):
    pass


class FrameMaxPool2d(_PerFrame, nn.MaxPool2d):
    pass


def shift_time(x: torch.Tensor, offset: int, dim: int = 1) -> torch.Tensor:
    """y[t] = x[t + offset] along `dim`, zeros where t + offset falls outside the clip."""
    if offset == 0:
        return x
    length = x.shape[dim]
    kept = x.narrow(dim, max(offset, 0), length - abs(offset))
    pad = [0, 0] * (x.dim() - 1 - dim) + ([0, abs(offset)] if offset > 0 else [abs(offset), 0])
    return F.pad(kept, pad)


class TemporalShift(nn.Module):
    """TSM (Lin et al., ICCV 2019) on (B, T, C, H, W): zero FLOPs, zero parameters.

    Convention (TSM's "shift left" for the first fold): channels [0, C/d) of frame t take frame t+1's values
    (from the future), channels [C/d, 2C/d) take frame t-1's (from the past), the rest stay. Frames shifted in
    from outside the clip are zeros. In a ResNet it sits inside the residual branch, before conv1.
    """

    def __init__(self, fold_div: int = 8):
        super().__init__()
        self.fold_div = fold_div

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fold = x.shape[2] // self.fold_div
        future = shift_time(x[:, :, :fold], +1)
        past = shift_time(x[:, :, fold:2 * fold], -1)
        return torch.cat([future, past, x[:, :, 2 * fold:]], dim=2)

    def extra_repr(self) -> str:
        return f"fold_div={self.fold_div}"


class TemporalAggregation(nn.Module):
    """TAM (Fan et al., NeurIPS 2019) on (B, T, C, H, W): relu(w_prev*x[t-1] + w_curr*x[t] + w_next*x[t+1]).

    The weights are per channel (a depthwise temporal kernel of size 3, 3*C parameters); they are held as one
    grouped 1x1 conv producing the three weighted copies so its cost shows up in FLOP counts, then two of the
    copies are shifted in time. Sits at the start of each residual branch, as in the reference code.
    """

    def __init__(self, channels: int):
        super().__init__()
        # Output channel 3c+k holds input channel c weighted for offset k-1 (prev, curr, next).
        self.blend = FrameConv2d(channels, 3 * channels, kernel_size=1, groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = x.shape
        y = self.blend(x).view(b, t, c, 3, h, w)
        out = shift_time(y[:, :, :, 0], -1) + y[:, :, :, 1] + shift_time(y[:, :, :, 2], +1)
        return F.relu(out)

    def set_kernel(self, prev: float, curr: float, nxt: float) -> None:
        """Give every channel the same temporal kernel (used by tests and analyses)."""
        with torch.no_grad():
            self.blend.weight.view(-1, 3).copy_(torch.tensor([prev, curr, nxt]))


class TemporalMaxPool(nn.Module):
    """Max-pool over time on (B, T, C, H, W), kernel 3, stride 2, padding 1: T -> ceil(T / 2).

    The 2D nets' "temporal pooling" (after stages 1-3 of a ResNet), the counterpart of a 3D net's temporal stride.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool3d(x.transpose(1, 2), kernel_size=(3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0))
        return y.transpose(1, 2).contiguous()


def conv_layer(kind: str, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
               temporal_kernel: int = 1, temporal_stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Module:
    """One convolution in the framework's vocabulary.

    kind "2d": per-frame k x k conv on (B, T, C, H, W) (no temporal extent);
    kind "3d": t x k x k conv on (B, C, T, H, W) (t = `temporal_kernel`; 1 x k x k is the spatial half of a
    factorised conv, t x 1 x 1 its temporal half). Padding keeps sizes ("same"), so only strides shrink them.
    """
    if kind == "2d":
        if temporal_kernel != 1 or temporal_stride != 1:
            raise ValueError("a 2D (per-frame) conv has no temporal extent; use temporal pooling instead")
        return FrameConv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                           groups=groups, bias=bias)
    if kind == "3d":
        return nn.Conv3d(in_channels, out_channels, (temporal_kernel, kernel_size, kernel_size),
                         stride=(temporal_stride, stride, stride),
                         padding=(temporal_kernel // 2, kernel_size // 2, kernel_size // 2), groups=groups, bias=bias)
    raise ValueError(f"conv kind must be '2d' or '3d', got {kind!r}")


def norm_layer(kind: str, channels: int, eps: float = 1e-5) -> nn.Module:
    return FrameBatchNorm2d(channels, eps=eps) if kind == "2d" else nn.BatchNorm3d(channels, eps=eps)


def r2plus1d_mid_channels(in_channels: int, out_channels: int, kernel_size: int = 3, temporal_kernel: int = 3) -> int:
    """Tran et al. (CVPR 2018): M = floor(t d^2 N_in N_out / (d^2 N_in + t N_out)), matching a t x d x d conv's size."""
    d2, t = kernel_size ** 2, temporal_kernel
    return (t * d2 * in_channels * out_channels) // (d2 * in_channels + t * out_channels)


class NonLocal(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al., CVPR 2018) over all T x H x W positions of a clip.

    theta/phi/g project to `channels // 2`; phi and g are max-pooled 2x2 in space (the paper's subsampling);
    the output projection is followed by a BN whose scale starts at zero, so a fresh block is the identity and
    can be dropped into a pretrained net. `time_dim` says where time is: 1 for (B, T, C, H, W), 2 for (B, C, T, H, W).
    """

    def __init__(self, channels: int, time_dim: int = 2, subsample: bool = True):
        super().__init__()
        inner = max(channels // 2, 1)
        self.time_dim = time_dim
        self.theta = nn.Conv3d(channels, inner, 1)
        self.phi = nn.Conv3d(channels, inner, 1)
        self.g = nn.Conv3d(channels, inner, 1)
        self.pool = nn.MaxPool3d((1, 2, 2)) if subsample else nn.Identity()
        self.out = nn.Conv3d(inner, channels, 1)
        self.bn = nn.BatchNorm3d(channels)
        nn.init.zeros_(self.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clip = x.transpose(1, 2) if self.time_dim == 1 else x  # (B, C, T, H, W)
        q = self.theta(clip).flatten(2)                  # (B, C', N)
        k = self.pool(self.phi(clip)).flatten(2)         # (B, C', M)
        v = self.pool(self.g(clip)).flatten(2)           # (B, C', M)
        attn = torch.softmax(q.transpose(1, 2) @ k, dim=-1)   # (B, N, M); no 1/sqrt(d), as in the paper
        y = (v @ attn.transpose(1, 2)).view(q.shape[0], -1, *clip.shape[2:])
        y = clip + self.bn(self.out(y))
        return y.transpose(1, 2).contiguous() if self.time_dim == 1 else y


class FrameHead(nn.Module):
    """Classify every time step of the final feature map, then average the logits over time.

    Pools space away from a (B, T, C, H, W) or (B, C, T, H, W) map (per `layout`); for a 2D net the time
    steps are its (possibly pooled) frames, for a 3D net the remaining temporal positions. Averaging logits
    equals classifying the time-averaged feature at test time, but dropout acts per time step in training,
    as in the reference implementation.
    """

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.5, layout: str = "BTCHW"):
        super().__init__()
        self.time_first = layout == "BTCHW"
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)
        nn.init.normal_(self.fc.weight, std=0.001)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        feats = feature_map.mean(dim=(-2, -1))
        feats = feats if self.time_first else feats.transpose(1, 2)  # (B, T, C)
        return self.fc(self.dropout(feats)).mean(dim=1)


class ClipClassifier(nn.Module):
    """What the framework's backbones share around their own `forward_features`: He-initialised convs,
    a `FrameHead` named `head`, timm's features/head split, and the registry builder."""

    def init_convs(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_head(self, x):
        return self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    @classmethod
    def build(cls, num_classes: int, num_frames: int, img_size: int, pretrained: str | None = None, **options):
        """Registry builder; the clip length and size are free at run time, so `num_frames`/`img_size` only
        matter to callers (FLOP counts, pipelines). 2D checkpoints are inflated where the net is 3D."""
        model = cls(num_classes=num_classes, **options)
        if pretrained:
            load_pretrained(model, pretrained)
        return model


def check_clip(x: torch.Tensor, layout: str, model_name: str) -> None:
    """Fail early, naming the fix, when a clip arrives in the other layout (a conv error would not say why)."""
    channel_dim = {"BTCHW": 2, "BCTHW": 1}[layout]
    if x.dim() != 5 or x.shape[channel_dim] != 3:
        other = "b c t h w -> b t c h w" if layout == "BTCHW" else "b t c h w -> b c t h w"
        raise ValueError(f"{model_name} consumes RGB clips in layout {layout}; got a tensor of shape "
                         f"{tuple(x.shape)}. Configure the pipeline with the model's layout, or convert with "
                         f"einops.rearrange(x, '{other}').")
