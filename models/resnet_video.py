"""ResNet-18/34/50/101 video nets of the unified 2D/3D CNN framework (Chen et al., CVPR 2021).

One backbone, one switch for how a residual block sees time (`temporal`):
  "none"      TSN: a per-frame 2D net, frame logits averaged;
  "tsm"       temporal shift at the start of a residual branch (2D, zero cost): every block, or every other
              block of each stage in nets as deep as R101, as in the TSM reference code;
  "tam"       temporal aggregation (depthwise t-1/t/t+1 blend) at the start of each residual branch (2D);
  "3d"        every 3x3 conv becomes 3x3x3 and the stem 3x7x7 (I3D-ResNet of the paper; R3D is the same net
              trained from scratch rather than inflated from ImageNet);
  "s3d"       every 3x3 conv becomes 1x3x3 -> BN -> ReLU -> 3x1x1 (S3D-style factorisation);
  "r2plus1d"  as "s3d" but with Tran et al.'s middle width, so each pair has a 3x3x3 conv's parameters.
Everything else is shared: stem, stage widths, a frame-level head averaged over time, and two options the paper
studies: `temporal_pool` (2D nets: max-pool time by 2 after stages 1-3; 3D nets: temporal stride 2 in the first
block of stages 2-4; either way T/8 at the last stage) and `non_local` (embedded-Gaussian blocks after every
other residual block of stages 2 and 3, five in a ResNet-50, as in Wang et al.). 2D nets take (B, T, C, H, W)
clips, 3D nets (B, C, T, H, W). Parameter names follow torchvision/timm ResNets so `models.inflate` can load
ImageNet weights into any variant.
"""
from __future__ import annotations

from torch import nn

from models.registry import register_model
from models.temporal import (ClipClassifier, FrameHead, FrameMaxPool2d, NonLocal, TemporalAggregation,
                             TemporalMaxPool, TemporalShift, check_clip, conv_layer, norm_layer,
                             r2plus1d_mid_channels)

TEMPORAL_KINDS = ("none", "tsm", "tam", "3d", "s3d", "r2plus1d")
TWO_D = ("none", "tsm", "tam")
PLACEMENTS = ("all", "bottom", "top", "every_other")
DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
          50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}


def _conv_kind(temporal: str) -> str:
    return "2d" if temporal in TWO_D else "3d"


def _spatiotemporal_conv(temporal: str, cin: int, cout: int, stride: int, t_stride: int):
    """(conv, bn, conv_t, bn_t) replacing a 3x3 conv; conv_t/bn_t are None unless the conv is factorised."""
    if temporal in TWO_D:
        return conv_layer("2d", cin, cout, 3, stride), norm_layer("2d", cout), None, None
    if temporal == "3d":
        conv = conv_layer("3d", cin, cout, 3, stride, temporal_kernel=3, temporal_stride=t_stride)
        return conv, norm_layer("3d", cout), None, None
    mid = cout if temporal == "s3d" else r2plus1d_mid_channels(cin, cout)
    conv = conv_layer("3d", cin, mid, 3, stride)
    conv_t = conv_layer("3d", mid, cout, 1, temporal_kernel=3, temporal_stride=t_stride)
    return conv, norm_layer("3d", mid), conv_t, norm_layer("3d", cout)


class _Block(nn.Module):
    """What both block types share: the temporal module in front of the residual branch (TSM/TAM), the
    projection shortcut, and the non-local block behind the sum."""

    def __init__(self, cin: int, cout: int, stride: int, t_stride: int, temporal: str,
                 temporal_module: nn.Module | None, non_local: bool):
        super().__init__()
        kind = _conv_kind(temporal)
        self.temporal = temporal_module if temporal_module is not None else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or t_stride != 1 or cin != cout:
            self.downsample = nn.Sequential(conv_layer(kind, cin, cout, 1, stride, temporal_stride=t_stride),
                                            norm_layer(kind, cout))
        self.nl = NonLocal(cout, time_dim=1 if kind == "2d" else 2) if non_local else None

    def _residual(self, x, out):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(out + shortcut)
        return out if self.nl is None else self.nl(out)


class BasicBlock(_Block):
    expansion = 1

    def __init__(self, cin, planes, stride, t_stride, temporal, temporal_module=None, non_local=False):
        super().__init__(cin, planes, stride, t_stride, temporal, temporal_module, non_local)
        self.conv1, self.bn1, self.conv1_t, self.bn1_t = _spatiotemporal_conv(temporal, cin, planes, stride, t_stride)
        self.conv2, self.bn2, self.conv2_t, self.bn2_t = _spatiotemporal_conv(temporal, planes, planes, 1, 1)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(self.temporal(x))))
        if self.conv1_t is not None:
            out = self.relu(self.bn1_t(self.conv1_t(out)))
        out = self.bn2(self.conv2(out))
        if self.conv2_t is not None:  # the block's last BN comes after the temporal half, before the sum
            out = self.bn2_t(self.conv2_t(self.relu(out)))
        return self._residual(x, out)


class Bottleneck(_Block):
    expansion = 4

    def __init__(self, cin, planes, stride, t_stride, temporal, temporal_module=None, non_local=False):
        super().__init__(cin, planes * 4, stride, t_stride, temporal, temporal_module, non_local)
        kind = _conv_kind(temporal)
        self.conv1, self.bn1 = conv_layer(kind, cin, planes, 1), norm_layer(kind, planes)
        self.conv2, self.bn2, self.conv2_t, self.bn2_t = _spatiotemporal_conv(temporal, planes, planes, stride,
                                                                              t_stride)
        self.conv3, self.bn3 = conv_layer(kind, planes, planes * 4, 1), norm_layer(kind, planes * 4)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(self.temporal(x))))
        out = self.relu(self.bn2(self.conv2(out)))
        if self.conv2_t is not None:
            out = self.relu(self.bn2_t(self.conv2_t(out)))
        out = self.bn3(self.conv3(out))
        return self._residual(x, out)


def reference_placement(temporal: str, blocks_per_stage: tuple[int, ...]) -> str:
    """Where the code each 2D module comes from puts it. TSM (mit-han-lab/temporal-shift-module,
    `make_temporal_shift`, place "blockres") shifts every other block of every stage once the third stage has
    23 blocks or more (R101), every block otherwise; TAM (IBM/action-recognition-pytorch) sits in every block."""
    return "every_other" if temporal == "tsm" and blocks_per_stage[2] >= 23 else "all"


def placement_mask(placement: str, blocks_per_stage: tuple[int, ...]) -> list[list[bool]]:
    """Which residual blocks get the 2D temporal module: all of them, the bottom half of the stages (1-2),
    the top half (3-4), or every other block of each stage (counted from each stage's first block, which is
    included)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"tam_placement must be one of {PLACEMENTS}, got {placement!r}")
    return [[{"all": True, "bottom": stage < 2, "top": stage >= 2, "every_other": i % 2 == 0}[placement]
             for i in range(n)] for stage, n in enumerate(blocks_per_stage)]


class VideoResNet(ClipClassifier):
    def __init__(self, depth: int = 50, temporal: str = "none", num_classes: int = 400, temporal_pool: bool = False,
                 tam_placement: str | None = None, non_local: bool = False, width_mult: float = 1.0,
                 dropout: float = 0.5, tsm_fold_div: int = 8):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        if temporal not in TEMPORAL_KINDS:
            raise ValueError(f"temporal must be one of {TEMPORAL_KINDS}, got {temporal!r}")
        block_type, blocks = DEPTHS[depth]
        block_cls = BasicBlock if block_type == "basic" else Bottleneck
        self.temporal_kind, self.temporal_pool = temporal, temporal_pool
        self.is_3d = temporal not in TWO_D
        self.layout = "BCTHW" if self.is_3d else "BTCHW"
        kind = _conv_kind(temporal)

        width = max(int(round(64 * width_mult)), 1)
        self.conv1 = conv_layer(kind, 3, width, 7, stride=2, temporal_kernel=3 if self.is_3d else 1)
        self.bn1 = norm_layer(kind, width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = (nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)) if self.is_3d
                        else FrameMaxPool2d(3, stride=2, padding=1))
        mask = placement_mask(tam_placement or reference_placement(temporal, blocks), blocks)

        def temporal_module(channels):
            if temporal == "tsm":
                return TemporalShift(tsm_fold_div)
            return TemporalAggregation(channels) if temporal == "tam" else None

        cin = width
        for stage, n in enumerate(blocks):
            planes = width * 2 ** stage
            layer = []
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                t_stride = 2 if self.is_3d and temporal_pool and stage > 0 and i == 0 else 1
                module = temporal_module(cin) if mask[stage][i] else None
                nl = non_local and stage in (1, 2) and i % 2 == 0
                layer.append(block_cls(cin, planes, stride, t_stride, temporal, module, nl))
                cin = planes * block_cls.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layer))
        self.tpool = TemporalMaxPool() if temporal_pool and not self.is_3d else None
        self.num_features = cin
        self.head = FrameHead(cin, num_classes, dropout, self.layout)
        self.init_convs()

    def forward_features(self, x):
        check_clip(x, self.layout, type(self).__name__ + f"({self.temporal_kind})")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            if self.tpool is not None and stage is not self.layer4:
                x = self.tpool(x)
        return x


_METHODS = {"tsn": "none", "tsm": "tsm", "tam": "tam", "i3d": "3d", "r3d": "3d", "s3d": "s3d",
            "r2plus1d": "r2plus1d"}
_PAPER = {
    "tsm_r50": {"gflops": 33, "params_m": 24.3, "frames": 8, "img_size": 224,
                "source": "Lin et al. ICCV 2019 (TSM-R50, 8 frames, Kinetics-400)"},
    # Chen et al., CVPR 2021, Kinetics-400 comparison: 32-frame models without temporal pooling; the released
    # models are evaluated at 256 px (reference README), and the figures only add up at 256 px
    # (32 x 4.1 GMACs x (256/224)^2 = 171 for TAM, 32 x 8.0 x 1.31 = 335 for I3D).
    "tam_r50": {"gflops": 171.5, "params_m": 24.4, "frames": 32, "img_size": 256,
                "source": "Chen et al. CVPR 2021, K400 table (TAM-R50, 32 frames, no temporal pooling)"},
    "i3d_r50": {"gflops": 335.3, "params_m": 47.0, "frames": 32, "img_size": 256,
                "source": "Chen et al. CVPR 2021, K400 table (I3D-R50, 32 frames, no temporal pooling)"},
}

for _method, _temporal in _METHODS.items():
    for _depth in DEPTHS:
        _name = f"{_method}_r{_depth}"
        register_model(_name, family="cnn", layout="BTCHW" if _temporal in TWO_D else "BCTHW",
                       paper=_PAPER.get(_name), depth=_depth, temporal=_temporal)(VideoResNet.build)
for _depth in (50, 101):
    register_model(f"i3d_r{_depth}_nl", family="cnn", layout="BCTHW", depth=_depth, temporal="3d",
                   non_local=True)(VideoResNet.build)
