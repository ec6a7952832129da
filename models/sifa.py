"""SIFA: stand-alone inter-frame attention, and SIFA-Net (Long, Qiu, Pan, Yao, Luo, Mei, CVPR 2022).

Every position (y, x) of frame t is a query; its keys and values are the k x k neighbours of (y, x) in frame
t+1, each moved by an offset that a 3x3 conv predicts from the motion saliency sigmoid(f[t+1] - f[t]) * f[t+1],
and read by bilinear sampling. Query-key dot products, normalised by a softmax over the k^2 neighbours, weight
the values: Y[t] = Q[t] + A[t+1]. The block has no projections (keys and values are the features themselves),
so it costs little more than the offset conv.

Variants: SIFA_R (`deformable=False`: the regular k x k grid, no offset conv) and SIFA* (`bidirectional=True`:
frame t also attends to frame t-1, Y[t] = Q[t] + A[t+1] + A[t-1]).

SIFA-Net puts the block after the 3x3 conv of every bottleneck of res3-res5 of a ResNet (timm's, frames
flattened into the batch), behind a stem that strides 4 in time as the authors' code does. Where that code
differs from the paper each difference is an option here, the paper's choice the default; the list and the
cost figures are in docs/models_sifa_ivvit.md.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.models.resnet import Bottleneck, ResNet
from torch import nn

from models.registry import register_model
from models.temporal import check_clip
from models.weights import load_pretrained

ATTN_NORMS = ("softmax", "scaled_softmax", "linear")
LAST_FRAME = ("self", "zero")


def unfold_neighbourhood(frames: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, k*k, H, W): the regular k x k grid around every position, zeros outside the map."""
    n, c, h, w = frames.shape
    cols = F.unfold(frames, kernel_size, padding=kernel_size // 2)
    return cols.view(n, c, kernel_size * kernel_size, h, w)


def sample_neighbourhood(frames: torch.Tensor, offsets: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(N, C, H, W), offsets (N, 2*k*k, H, W) -> (N, C, k*k, H, W) by bilinear sampling, zeros outside the map.

    Offsets come in (dy, dx) pairs per grid position, grid positions in row-major order (the layout of
    torchvision's deform_conv2d), in pixels: neighbour j of (y, x) is read at (y + gy_j + dy_j, x + gx_j + dx_j).
    """
    n, c, h, w = frames.shape
    kk = kernel_size * kernel_size
    r = torch.arange(kernel_size, device=frames.device, dtype=frames.dtype) - kernel_size // 2
    grid_y, grid_x = torch.meshgrid(r, r, indexing="ij")
    ys = torch.arange(h, device=frames.device, dtype=frames.dtype).view(1, 1, h, 1)
    xs = torch.arange(w, device=frames.device, dtype=frames.dtype).view(1, 1, 1, w)
    py = ys + grid_y.reshape(1, kk, 1, 1) + offsets[:, 0::2]
    px = xs + grid_x.reshape(1, kk, 1, 1) + offsets[:, 1::2]
    # Pixel centres to grid_sample's [-1, 1] (align_corners=False): p -> (2p + 1) / size - 1.
    grid = torch.stack(((2 * px + 1) / w - 1, (2 * py + 1) / h - 1), dim=-1)
    out = F.grid_sample(frames, grid.view(n, kk * h, w, 2), mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out.view(n, c, kk, h, w)


class SIFA(nn.Module):
    """Inter-frame attention on (B*T, C, H, W) features, frames of a clip consecutive in the batch.

    Options (paper default first):
      kernel_size        k, odd; k = 1 attends to the single co-located position of the next frame.
      deformable         True: offsets from the motion saliency; False: SIFA_R, the regular grid.
      bidirectional      False; True: SIFA*, the previous frame is attended too.
      attn_norm          "softmax" of q.k; "scaled_softmax" of q.k / sqrt(C); "linear": q.k / C, no softmax,
                         what the released CUDA kernel computes.
      last_frame         "self": the last frame (the first, for the backward term) attends to its own
                         neighbourhood; "zero": it gets no inter-frame term (released code).
      saliency_residual  False; True adds f[t+1] to the saliency map (released code: sigmoid(d) * f + f).
    """

    def __init__(self, dim: int, num_frames: int, kernel_size: int = 3, deformable: bool = True,
                 bidirectional: bool = False, attn_norm: str = "softmax", last_frame: str = "self",
                 saliency_residual: bool = False):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"SIFA kernel_size must be odd and >= 1 (a centred neighbourhood), got {kernel_size}")
        if attn_norm not in ATTN_NORMS:
            raise ValueError(f"SIFA attn_norm must be one of {ATTN_NORMS}, got {attn_norm!r}")
        if last_frame not in LAST_FRAME:
            raise ValueError(f"SIFA last_frame must be one of {LAST_FRAME}, got {last_frame!r}")
        self.num_frames = num_frames
        self.kernel_size = kernel_size
        self.attn_norm = attn_norm
        self.last_frame = last_frame
        self.saliency_residual = saliency_residual
        self.offset_next = self._offset_conv(dim) if deformable else None
        self.offset_prev = self._offset_conv(dim) if deformable and bidirectional else None
        self.bidirectional = bidirectional

    def _offset_conv(self, dim: int) -> nn.Conv2d:
        # Zero weights: a fresh block starts on the regular grid (SIFA_R) and learns to move from there.
        conv = nn.Conv2d(dim, 2 * self.kernel_size ** 2, 3, padding=1, bias=False)
        nn.init.zeros_(conv.weight)
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inter_frame(x)

    def inter_frame(self, x: torch.Tensor) -> torch.Tensor:
        """The attended term alone: A[t+1] (+ A[t-1] for SIFA*)."""
        n, c, h, w = x.shape
        t = self.num_frames
        if n % t:
            raise ValueError(f"SIFA expects the {t} frames of each clip consecutive in the batch; got a batch of "
                             f"{n} feature maps, not a multiple of {t}")
        clips = x.view(n // t, t, c, h, w)
        nxt = torch.cat([clips[:, 1:], clips[:, -1:]], dim=1).view_as(x)
        out = self._edge_mask(t, last=True, like=x) * self._attend(x, nxt, self.offset_next)
        if self.bidirectional:
            prev = torch.cat([clips[:, :1], clips[:, :-1]], dim=1).view_as(x)
            out = out + self._edge_mask(t, last=False, like=x) * self._attend(x, prev, self.offset_prev)
        return out

    def _attend(self, query: torch.Tensor, frame: torch.Tensor, offset_conv: nn.Conv2d | None) -> torch.Tensor:
        """A: the neighbours of every query position in `frame`, weighted by their similarity to the query."""
        if offset_conv is None:
            keys = unfold_neighbourhood(frame, self.kernel_size)
        else:
            saliency = torch.sigmoid(frame - query) * frame
            if self.saliency_residual:
                saliency = saliency + frame
            keys = sample_neighbourhood(frame, offset_conv(saliency), self.kernel_size)
        logits = torch.einsum("nchw,nckhw->nkhw", query, keys)
        c = query.shape[1]
        if self.attn_norm == "softmax":
            weights = logits.softmax(dim=1)
        elif self.attn_norm == "scaled_softmax":
            weights = (logits / math.sqrt(c)).softmax(dim=1)
        else:
            weights = logits / c
        return torch.einsum("nkhw,nckhw->nchw", weights, keys)

    def _edge_mask(self, t: int, last: bool, like: torch.Tensor) -> torch.Tensor | float:
        """1 everywhere, or with last_frame="zero", 0 on the frame that has no neighbour in that direction."""
        if self.last_frame == "self":
            return 1.0
        keep = torch.ones(t, device=like.device, dtype=like.dtype)
        keep[-1 if last else 0] = 0
        return keep.repeat(like.shape[0] // t).view(-1, 1, 1, 1)

    def extra_repr(self) -> str:
        return (f"num_frames={self.num_frames}, kernel_size={self.kernel_size}, attn_norm={self.attn_norm}, "
                f"last_frame={self.last_frame}, bidirectional={self.bidirectional}")


class ClipContext(nn.Module):
    """The released code's global-context term: x + MLP(mean of x over the clip's T, H, W), per channel.

    Only used with `sifa_blocks="odd"`, where it takes the place of SIFA in the even-indexed bottlenecks.
    """

    def __init__(self, channels: int, num_frames: int, reduction: int = 16):
        super().__init__()
        self.num_frames = num_frames
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        pooled = x.view(n // self.num_frames, self.num_frames, c, -1).mean(dim=(1, 3))
        context = self.fc2(F.relu(self.fc1(pooled)))
        return x + context.repeat_interleave(self.num_frames, dim=0).view(n, c, 1, 1)


class SIFANet(ResNet):
    """timm's ResNet on (B, T, 3, H, W) clips: a space-time stem, SIFA in res3-res5, logits of the clip.

    The stem conv is t x 7 x 7 with temporal stride t (`temporal_stride`, 4 in the paper config: 16 frames
    -> 4 feature frames, the stride the authors' code applies and the reported cost implies). Parameter
    names are timm's/torchvision's, so ImageNet ResNet checkpoints load with only conv1 inflated.

    Released-code options: `sifa_blocks="odd"` puts SIFA only in odd-indexed bottlenecks of each stage and a
    clip-global context term (`ClipContext`) in the others; `dual_layer4=True` adds a second res5 at spatial
    stride 1 on 2x temporally max-pooled res4 features, with its own classifier; the two logits are averaged.
    """

    def __init__(self, layers, num_frames: int, temporal_stride: int = 4, sifa_stages=(2, 3, 4),
                 sifa_blocks: str = "all", dual_layer4: bool = False, sifa: dict | None = None,
                 drop_rate: float = 0.5, **resnet_kwargs):
        super().__init__(block=Bottleneck, layers=layers, drop_rate=drop_rate, **resnet_kwargs)
        if num_frames % temporal_stride:
            raise ValueError(f"SIFA-Net: num_frames={num_frames} is not a multiple of temporal_stride="
                             f"{temporal_stride}; sample {temporal_stride * max(1, num_frames // temporal_stride)} "
                             f"frames or set temporal_stride to a divisor of {num_frames}")
        if sifa_blocks not in ("all", "odd"):
            raise ValueError(f"SIFA-Net sifa_blocks must be 'all' (paper) or 'odd' (released code), "
                             f"got {sifa_blocks!r}")
        self.num_frames = num_frames
        self.temporal_stride = temporal_stride
        self.feature_frames = num_frames // temporal_stride
        stem = self.conv1
        self.conv1 = nn.Conv3d(stem.in_channels, stem.out_channels, (temporal_stride, *stem.kernel_size),
                               stride=(temporal_stride, *stem.stride), padding=(0, *stem.padding), bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        sifa = dict(sifa or {})
        for stage in sifa_stages:
            _insert_sifa(getattr(self, f"layer{stage}"), self.feature_frames, sifa_blocks, sifa)
        self.layer4_dual = self.fc_dual = None
        if dual_layer4:
            if self.feature_frames % 2:
                raise ValueError(f"SIFA-Net dual_layer4 pools res4 2x in time; {self.feature_frames} feature "
                                 f"frames ({num_frames} / {temporal_stride}) is odd")
            self.layer4_dual = _dual_layer4(self.layer4, self.feature_frames // 2)
            self.fc_dual = copy.deepcopy(self.fc)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._trunk(x)[0]

    def _trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        check_clip(x, "BTCHW", "SIFA-Net")
        if x.shape[1] != self.num_frames:
            raise ValueError(f"SIFA-Net was built for {self.num_frames} frames, got a clip of {x.shape[1]}; "
                             f"build it with num_frames={x.shape[1]} or sample {self.num_frames} frames")
        x = rearrange(self.conv1(rearrange(x, "b t c h w -> b c t h w")), "b c t h w -> (b t) c h w")
        x = self.maxpool(self.act1(self.bn1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        dual = None
        if self.layer4_dual is not None:
            pooled = rearrange(x, "(b t) c h w -> b c t h w", t=self.feature_frames)
            pooled = F.max_pool3d(pooled, kernel_size=(2, 1, 1))
            dual = self.layer4_dual(rearrange(pooled, "b c t h w -> (b t) c h w"))
        return self.layer4(x), dual

    def _classify(self, x: torch.Tensor, fc: nn.Linear, frames: int, pre_logits: bool) -> torch.Tensor:
        x = self.global_pool(x)
        x = x.view(-1, frames, x.shape[-1]).mean(dim=1)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else fc(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self._classify(x, self.fc, self.feature_frames, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, dual = self._trunk(x)
        logits = self.forward_head(x)
        if dual is not None:
            logits = (logits + self._classify(dual, self.fc_dual, self.feature_frames // 2, False)) / 2
        return logits


def _insert_sifa(stage: nn.Sequential, frames: int, sifa_blocks: str, options: dict) -> None:
    """Put SIFA right after the 3x3 conv (+BN+ReLU) of each bottleneck, inside its `act2` slot.

    Wrapping `act2` keeps every pretrained parameter name; the block's own forward is untouched.
    """
    for i, block in enumerate(stage):
        if sifa_blocks == "all" or i % 2 == 1:
            sifa = SIFA(block.conv2.out_channels, frames, **options)
            block.act2 = nn.Sequential(OrderedDict(act=block.act2, sifa=sifa))
        else:
            block.se = ClipContext(block.conv3.out_channels, frames)


def _dual_layer4(layer4: nn.Sequential, frames: int) -> nn.Sequential:
    """A copy of res5 without its spatial stride, for `frames` temporally pooled feature frames."""
    dual = copy.deepcopy(layer4)
    first = dual[0]
    first.conv2.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    for module in dual.modules():
        if isinstance(module, (SIFA, ClipContext)):
            module.num_frames = frames
    return dual


def inflate_centre(weight: torch.Tensor, frames: int) -> torch.Tensor:
    """(O, I, kh, kw) -> (O, I, t, kh, kw): the 2D kernel on frame t // 2, zeros elsewhere (the authors'
    inflation; models.inflate's I3D inflation spreads it evenly instead). A static clip gives the image response."""
    inflated = weight.new_zeros(weight.shape[0], weight.shape[1], frames, *weight.shape[2:])
    inflated[:, :, frames // 2] = weight
    return inflated


def inflate_stem(state_dict: dict, model: SIFANet) -> dict:
    """Adapt an image ResNet checkpoint: conv1 7x7 -> t x 7 x 7 by `inflate_centre`; res5 copied into the dual res5."""
    out = dict(state_dict)
    weight = out.get("conv1.weight")
    if weight is not None and weight.dim() == 4:
        out["conv1.weight"] = inflate_centre(weight, model.temporal_stride)
    if model.layer4_dual is not None:
        for key, value in state_dict.items():
            if key.startswith("layer4."):
                out.setdefault("layer4_dual." + key[len("layer4."):], value)
    return out


def _sifa_net(num_classes, num_frames, img_size, pretrained, *, layers, kernel_size=3, deformable=True,
              bidirectional=False, attn_norm="softmax", last_frame="self", saliency_residual=False, **kwargs):
    sifa = dict(kernel_size=kernel_size, deformable=deformable, bidirectional=bidirectional, attn_norm=attn_norm,
                last_frame=last_frame, saliency_residual=saliency_residual)
    model = SIFANet(layers, num_frames=num_frames, num_classes=num_classes, sifa=sifa, **kwargs)
    if pretrained:
        load_pretrained(model, pretrained, adapt=inflate_stem)
    return model


_R50, _R101 = (3, 4, 6, 3), (3, 4, 23, 3)
_PAPER_R50 = {"gflops": 25, "frames": 16, "img_size": 224,
              "source": "SIFA (CVPR 2022), SIFA-Net R50, 16 frames, per view"}


@register_model("sifa_r50", family="sifa", layout="BTCHW", paper=_PAPER_R50)
def sifa_r50(num_classes, num_frames=16, img_size=224, pretrained=None, **options):
    return _sifa_net(num_classes, num_frames, img_size, pretrained, **{"layers": _R50, **options})


@register_model("sifa_r101", family="sifa", layout="BTCHW", paper={"frames": 16, "img_size": 224})
def sifa_r101(num_classes, num_frames=16, img_size=224, pretrained=None, **options):
    return _sifa_net(num_classes, num_frames, img_size, pretrained, **{"layers": _R101, **options})


@register_model("sifa_r_r50", family="sifa", layout="BTCHW", paper={"frames": 16, "img_size": 224})
def sifa_r_r50(num_classes, num_frames=16, img_size=224, pretrained=None, **options):
    """SIFA_R: the regular k x k grid of the next frame, no offsets."""
    return _sifa_net(num_classes, num_frames, img_size, pretrained,
                     **{"layers": _R50, "deformable": False, **options})


@register_model("sifa_star_r50", family="sifa", layout="BTCHW", paper={"frames": 16, "img_size": 224})
def sifa_star_r50(num_classes, num_frames=16, img_size=224, pretrained=None, **options):
    """SIFA*: each frame attends to both neighbours."""
    return _sifa_net(num_classes, num_frames, img_size, pretrained,
                     **{"layers": _R50, "bidirectional": True, **options})


# The authors' released SIFA-Net: SIFA in every other bottleneck (global context in the rest), a second res5
# at stride 1 with its own classifier, q.k / C without softmax, no term for the last frame, saliency + f.
# Its cost is the one the paper reports; the paper-described network (sifa_r50) costs less (see the docs).
RELEASED_R50 = dict(sifa_blocks="odd", dual_layer4=True, attn_norm="linear", last_frame="zero",
                    saliency_residual=True)


@register_model("sifa_r50_released", family="sifa", layout="BTCHW", paper=_PAPER_R50)
def sifa_r50_released(num_classes, num_frames=16, img_size=224, pretrained=None, **options):
    return _sifa_net(num_classes, num_frames, img_size, pretrained, **{"layers": _R50, **RELEASED_R50, **options})
