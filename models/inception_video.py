"""InceptionV1 (GoogLeNet with BN) video nets of the unified 2D/3D CNN framework (Chen et al., CVPR 2021).

The paper's second backbone, with the same temporal switch as `models.resnet_video`:
  "none" (TSN), "tsm", "tam": 2D nets on (B, T, C, H, W); Inception has no residual branch, so the temporal
      module follows the stem convs and every inception module (12 places), as the reference TAM-InceptionV1;
  "i3d": every k x k conv inflated to k x k x k (stem 7x7x7), max-pools 3 deep in time (Carreira & Zisserman);
  "s3d": every 3x3 conv factorised into 1x3x3 -> BN -> ReLU -> 3x1x1 -> BN -> ReLU, stem 3x7x7 (Xie et al.).
`temporal_pool` halves time three times, where space is halved after the stem and after inception 3b and 4e:
by a max-pool over time in 2D nets, by temporal stride 2 in those 3D max-pools. Parameter names follow
torchvision's GoogLeNet, so `models.inflate` loads its ImageNet weights into every variant.

The 3D nets' four max-pools between stages come in two sets (`pools`): "ibm", the default, is the authors'
network (IBM/action-recognition-pytorch, models/threed_models/i3d.py and s3d.py): padded floor-mode pools, a
1x3x3 one after the stem, then 3x3x3 ones, except S3D's last, 2x2x2 unpadded, which shortens time by one
when it does not stride it. "googlenet" keeps GoogLeNet's unpadded ceil-mode spatial grid and pads time, so
an inflated net reproduces its 2D parent exactly on a static clip and time is never cut. The 2D nets use
GoogLeNet's pools, as the authors' 2D Inception does, whatever `pools` says.
"""
from __future__ import annotations

import torch
from torch import nn

from contract.inputs import INCEPTION_MEAN, INCEPTION_STD
from models.registry import register_model
from models.temporal import (ClipClassifier, FrameHead, FrameMaxPool2d, TemporalAggregation, TemporalMaxPool,
                             TemporalShift, check_clip, conv_layer, norm_layer)

TEMPORAL_KINDS = ("none", "tsm", "tam", "i3d", "s3d")
POOLS = ("ibm", "googlenet")
# name: (1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5" (a 3x3, as in torchvision), pool projection)
INCEPTIONS = {
    "inception3a": (64, 96, 128, 16, 32, 32), "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64), "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64), "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128), "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}


class ConvUnit(nn.Module):
    """conv -> BN -> ReLU; in S3D a k x k conv (k > 1) gets its temporal half (conv_t -> BN -> ReLU).

    An explicit `temporal_kernel` (the stems) asks for one plain conv of that temporal extent instead.
    """

    def __init__(self, style: str, cin: int, cout: int, kernel_size: int, stride: int = 1,
                 temporal_kernel: int | None = None):
        super().__init__()
        kind = "2d" if style == "2d" else "3d"
        factorised = style == "s3d" and kernel_size > 1 and temporal_kernel is None
        if temporal_kernel is None:  # i3d inflates k x k to k x k x k; s3d's spatial half has no time
            temporal_kernel = kernel_size if style == "i3d" else 1
        self.conv = conv_layer(kind, cin, cout, kernel_size, stride, temporal_kernel=temporal_kernel)
        self.bn = norm_layer(kind, cout, eps=1e-3)
        self.conv_t = self.bn_t = None
        if factorised:
            self.conv_t = conv_layer("3d", cout, cout, 1, temporal_kernel=kernel_size, bias=True)
            self.bn_t = nn.BatchNorm3d(cout, eps=1e-3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.relu(self.bn(self.conv(x)))
        return x if self.conv_t is None else self.relu(self.bn_t(self.conv_t(x)))


class SpaceTimeMaxPool(nn.Module):
    """A t x k x k max-pool done as k x k (GoogLeNet's ceil-mode grid) then t over time (zero-free padding).

    Max over a box is separable, so this is the 3D pool; keeping the 2D net's spatial grid makes an inflated
    net reproduce its 2D parent exactly on a static clip, and padding time (not ceil mode) keeps T/2 exact.
    """

    def __init__(self, kernel_size: int, stride: int, temporal_kernel: int = 1, temporal_stride: int = 1):
        super().__init__()
        self.space = nn.MaxPool3d((1, kernel_size, kernel_size), (1, stride, stride), ceil_mode=True)
        self.time = (nn.MaxPool3d((temporal_kernel, 1, 1), (temporal_stride, 1, 1), (temporal_kernel // 2, 0, 0))
                     if temporal_kernel > 1 or temporal_stride > 1 else nn.Identity())

    def forward(self, x):
        return self.time(self.space(x))


def pools_3d(style: str, pools: str, t_stride: int) -> tuple[nn.Module, ...]:
    """maxpool1-4 of a 3D net; pools 2-4 stride time by `t_stride` (the `temporal_pool` option)."""
    if pools == "googlenet":
        return (SpaceTimeMaxPool(3, 2), SpaceTimeMaxPool(3, 2, 3, t_stride), SpaceTimeMaxPool(3, 2, 3, t_stride),
                SpaceTimeMaxPool(2, 2, 3, t_stride))
    stride = (t_stride, 2, 2)
    last = nn.MaxPool3d(2, stride) if style == "s3d" else nn.MaxPool3d(3, stride, 1)
    return nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)), nn.MaxPool3d(3, stride, 1), nn.MaxPool3d(3, stride, 1), last


class Inception(nn.Module):
    def __init__(self, style: str, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool_proj: int):
        super().__init__()
        self.channel_dim = 2 if style == "2d" else 1
        pool = (FrameMaxPool2d(3, stride=1, padding=1, ceil_mode=True) if style == "2d"
                else nn.MaxPool3d(3, stride=1, padding=1, ceil_mode=True))
        self.branch1 = ConvUnit(style, cin, c1, 1)
        self.branch2 = nn.Sequential(ConvUnit(style, cin, c3r, 1), ConvUnit(style, c3r, c3, 3))
        self.branch3 = nn.Sequential(ConvUnit(style, cin, c5r, 1), ConvUnit(style, c5r, c5, 3))
        self.branch4 = nn.Sequential(pool, ConvUnit(style, cin, pool_proj, 1))
        self.out_channels = c1 + c3 + c5 + pool_proj

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], self.channel_dim)


class VideoInception(ClipClassifier):
    def __init__(self, temporal: str = "none", num_classes: int = 400, temporal_pool: bool = False,
                 width_mult: float = 1.0, dropout: float = 0.5, tsm_fold_div: int = 8, pools: str = "ibm"):
        super().__init__()
        if temporal not in TEMPORAL_KINDS:
            raise ValueError(f"temporal must be one of {TEMPORAL_KINDS}, got {temporal!r}")
        if pools not in POOLS:
            raise ValueError(f"pools must be one of {POOLS}, got {pools!r}")
        self.temporal_kind, self.temporal_pool = temporal, temporal_pool
        self.is_3d = temporal in ("i3d", "s3d")
        self.layout = "BCTHW" if self.is_3d else "BTCHW"
        style = temporal if self.is_3d else "2d"

        def ch(c):
            return max(int(round(c * width_mult)), 1)

        self.conv1 = ConvUnit(style, 3, ch(64), 7, stride=2, temporal_kernel={"i3d": 7, "s3d": 3}.get(style, 1))
        self.conv2 = ConvUnit(style, ch(64), ch(64), 1)
        self.conv3 = ConvUnit(style, ch(64), ch(192), 3)
        if self.is_3d:
            self.maxpool1, self.maxpool2, self.maxpool3, self.maxpool4 = pools_3d(style, pools,
                                                                                  2 if temporal_pool else 1)
        else:
            self.maxpool1, self.maxpool2, self.maxpool3 = (FrameMaxPool2d(3, 2, ceil_mode=True) for _ in range(3))
            self.maxpool4 = FrameMaxPool2d(2, 2, ceil_mode=True)
        cin = ch(192)
        channels = {"conv1": ch(64), "conv2": ch(64), "conv3": ch(192)}
        for name, cfg in INCEPTIONS.items():
            module = Inception(style, cin, *(ch(c) for c in cfg))
            self.add_module(name, module)
            cin = channels[name] = module.out_channels
        self.temporal = nn.ModuleDict()
        if temporal in ("tsm", "tam"):
            for name, c in channels.items():
                self.temporal[name] = TemporalShift(tsm_fold_div) if temporal == "tsm" else TemporalAggregation(c)
        self.tpool = TemporalMaxPool() if temporal_pool and not self.is_3d else None
        self.num_features = cin
        self.head = FrameHead(cin, num_classes, dropout, self.layout)
        self.init_convs()

    _PLAN = ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a", "inception3b", "maxpool3",
             "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4",
             "inception5a", "inception5b")

    def forward_features(self, x):
        check_clip(x, self.layout, type(self).__name__ + f"({self.temporal_kind})")
        for name in self._PLAN:
            x = getattr(self, name)(x)
            if name in self.temporal:
                x = self.temporal[name](x)
            if self.tpool is not None and name in ("maxpool2", "maxpool3", "maxpool4"):
                x = self.tpool(x)
        return x


for _method, _temporal in {"tsn": "none", "tsm": "tsm", "tam": "tam", "i3d": "i3d", "s3d": "s3d"}.items():
    register_model(f"{_method}_inception", family="cnn", layout="BCTHW" if _temporal in ("i3d", "s3d") else "BTCHW",
                   mean=INCEPTION_MEAN, std=INCEPTION_STD, temporal=_temporal)(VideoInception.build)
