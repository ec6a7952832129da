"""IBM/action-recognition-pytorch: TSN/TAM on ResNet and Inception-v1 (`models/twod_models/`), I3D/S3D on ResNet
and Inception-v1 (`models/threed_models/`).

`train.py` saves {"epoch", "arch", "state_dict", "best_top1", "optimizer", "scheduler"}, the model wrapped in
(Distributed)DataParallel, so every key starts with `module.`. Parameter names are torchvision's, which ours
keep, except three: the classifier is `fc` (ours `head.fc`); a TAM is three depthwise 1x1 convs
`tam.{prev,curr,next}_se.fc1` (ours one grouped conv `temporal.blend`, output channel 3c+k holding channel c for
offset k-1); and the 2D Inception's TAMs are `tam1`..`tam5b` beside the units they follow (ours
`temporal.<unit>`). `arch` ("kinetics400-rgb-TAM-b3-sum-resnet-50-f32-...") names the network, its temporal
pooling (`-ts`) and its frames (`-f32`).
"""
from __future__ import annotations

import re

import torch
from torch import nn

from models.formats.base import ConversionError, Format, Mapper, Plan, Source

_ARCH = re.compile(r".+?-(?P<modality>rgb|flow)-(?P<net>.+?)-f(?P<frames>\d+)(?:-.*)?")
_NETWORKS = [  # network_name as their models spell it -> our method and backbone
    (re.compile(r"(?:(?P<tm>TAM|TSN)-b(?P<b>\d+)-(?P<blend>sum|max)(?P<allc>-allc)?-)?resnet-(?P<depth>\d+)"
                r"(?:-ts-(?P<pool>max|avg))?"), "2d", "r"),
    (re.compile(r"(?:(?P<tm>TAM|TSN)-b(?P<b>\d+)-(?P<blend>sum|max)(?P<allc>-allc)?-)?inception-v1"
                r"(?:-ts-(?P<pool>max|avg))?"), "2d", "inception"),
    (re.compile(r"i3d-resnet-(?P<depth>\d+)(?P<ts>-ts)?"), "i3d", "r"),
    (re.compile(r"s3d-resnet-(?P<depth>\d+)(?P<dw>-dw-t-conv)?(?P<ts>-ts)?"), "s3d", "r"),
    (re.compile(r"i3d_v2(?:-ts-(?P<pool>max|avg))?"), "i3d", "inception"),
    (re.compile(r"s3d(?P<dw>-dw-t-conv)?(?:-ts-(?P<pool>max|avg))?"), "s3d", "inception"),
]
_INCEPTION_TAM = re.compile(r"tam(\d)([a-e]?)\.(prev|curr|next)_se\.fc1\.weight")
_RESNET_TAM = re.compile(r"(layer\d+\.\d+)\.tam\.(prev|curr|next)_se\.fc1\.weight")


class IbmArFormat(Format):
    name = "ibm-ar"
    repo = "IBM/action-recognition-pytorch"
    families = ("cnn",)

    def claims(self, source: Source) -> bool:
        keys = source.keys
        resnet = {"conv1.weight", "layer1.0.conv1.weight"} <= keys
        return "fc.weight" in keys and (resnet or "inception3a.branch1.conv.weight" in keys) \
            and "fc_dual.weight" not in keys

    def plan(self, source: Source, spec) -> Plan:
        inception = "inception3a.branch1.conv.weight" in source.keys
        if inception != spec.name.endswith("_inception"):
            kind = "an Inception-v1" if inception else "a ResNet"
            raise ConversionError(f"{source.path} is {kind} network, {spec.name} is not; pick "
                                  f"{'tsn/tam/i3d/s3d_inception' if inception else 'tsn/tam/i3d/s3d_r<depth>'}")
        plan = Plan(num_classes=source.shape("fc.weight")[0])
        arch = source.records.get("arch")
        match = _ARCH.fullmatch(arch) if isinstance(arch, str) else None
        if match and match["modality"] != "rgb":
            raise ConversionError(f"{source.path} is a {match['modality']} model (arch {arch}); our models read RGB")
        if match:
            plan.facts["num_frames"] = int(match["frames"])
        network = _our_network(match["net"], arch) if match else None
        if network is None:
            plan.defaults["temporal_pool"] = False
            plan.notes.append(f"arch {arch!r} names no network this converter knows: no temporal pooling assumed "
                              f"(the released models are trained --without_t_stride)")
            return plan
        plan.model, plan.facts["temporal_pool"] = network
        plan.notes.append(f"arch {arch}: {plan.model}, {match['frames']} frames, "
                          f"temporal pooling {'on' if network[1] else 'off'}")
        return plan

    def map(self, source: Source, model: nn.Module) -> Mapper:
        mapper = Mapper(source)
        if blending := mapper.matching(r".*\.blending_layers\..*"):
            raise ConversionError(f"{source.path}: {blending[0]} belongs to a TAM that blends other than 3 frames; "
                                  f"ours blends 3")
        for pattern, prefix in ((_RESNET_TAM, r"\1.tam"), (_INCEPTION_TAM, r"tam\1\2")):
            for key in mapper.matching(pattern.pattern):
                if key.endswith("prev_se.fc1.weight"):
                    _move_tam(mapper, pattern.sub(prefix, key), _our_tam(pattern.sub(prefix, key)))
        mapper.rename([(r"fc\.(weight|bias)", r"head.fc.\1"), (r"(.*)", r"\1")])
        return mapper

    def head_keys(self, model: nn.Module) -> list[str]:
        return ["head.fc.weight", "head.fc.bias"]


def _our_network(net: str, arch: str) -> tuple[str, bool] | None:
    """(our registry name, temporal pooling) of an IBM network name, None for a name it does not know; an
    error for the variants of their code that ours cannot be."""
    for pattern, kind, backbone in _NETWORKS:
        match = pattern.fullmatch(net)
        if match is None:
            continue
        found = match.groupdict()
        if found.get("allc"):
            raise ConversionError(f"arch {arch} has a dense (not depthwise) TAM; our TAM is depthwise")
        if found.get("dw"):
            raise ConversionError(f"arch {arch} has depthwise temporal convs; ours are dense")
        if found.get("b") not in (None, "3") or found.get("blend") not in (None, "sum"):
            raise ConversionError(f"arch {arch} blends {found['b']} frames by {found['blend']}; our TAM sums 3")
        if found.get("pool") == "avg":
            raise ConversionError(f"arch {arch} pools time by averaging; our temporal pooling takes the maximum")
        method = kind if kind != "2d" else "tam" if found.get("tm") == "TAM" else "tsn"
        name = f"{method}_inception" if backbone == "inception" else f"{method}_r{found['depth']}"
        return name, bool(found.get("pool") or found.get("ts"))
    return None


def _our_tam(theirs: str) -> str:
    """layer1.0.tam -> layer1.0.temporal.blend.weight; tam3a -> temporal.inception3a.blend.weight."""
    if theirs.endswith(".tam"):
        return theirs[:-len("tam")] + "temporal.blend.weight"
    stage = theirs[len("tam"):]
    unit = f"conv{stage}" if stage.isdigit() else f"inception{stage}"
    return f"temporal.{unit}.blend.weight"


def _move_tam(mapper: Mapper, prefix: str, ours: str) -> None:
    """Three depthwise (C, 1, 1, 1) kernels for frames t-1, t, t+1 -> one (3C, 1, 1, 1), channel c's at 3c..3c+2."""
    keys = [f"{prefix}.{which}_se.fc1.weight" for which in ("prev", "curr", "next")]
    kernels = [mapper.take(key) for key in keys]
    if any(k.dim() != 4 or k.shape[1:] != (1, 1, 1) for k in kernels):
        raise ConversionError(f"{keys[0]} has shape {list(kernels[0].shape)}: a dense TAM (dw_conv off), which "
                              f"our depthwise TAM cannot represent")
    mapper.put(ours, torch.stack([k.flatten() for k in kernels], dim=1).reshape(-1, 1, 1, 1), ", ".join(keys))


IBM_AR = IbmArFormat()
