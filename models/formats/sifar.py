"""IBM/sifar-pytorch: SIFAR on Swin (`my_models/sifar_swin.py`) and on ResNet (`my_models/action_conv.py`).

`main.py` saves {"model": the bare model's state dict, "optimizer", "lr_scheduler", "epoch", "args", "scaler",
"max_accuracy"[, "model_ema"]}. The Swin is Microsoft's original layout (patch merging at the end of a stage,
classifier `head`, the window-derived `relative_position_index` / `attn_mask` buffers saved) plus, with
`--hpe_to_token`, one `frame_pos_embed` (1, tiles, C) added to every token of a tile. The ResNet is timm's
`resnet50` / `tv_resnet101` as `backbone` (its ImageNet `fc` kept but never called) and a new `head`.
"""
from __future__ import annotations

import re

from torch import nn

from contract.inputs import super_grid
from models.formats.base import ConversionError, Format, Mapper, Plan, Source, check_derived_buffers
from models.registry import get_spec, list_models
from models.sifar import SWIN_ARCHS
from models.weights import from_original_swin

_THEIR_SWIN = re.compile(r"sifar_(base|large)_patch4_window(\d+)_(\d+)(?:_\dx\d)?")
_THEIR_CNN = re.compile(r"action_conv_(resnet\d+)")


class SifarFormat(Format):
    name = "sifar"
    repo = "IBM/sifar-pytorch"
    families = ("sifar",)

    def claims(self, source: Source) -> bool:
        keys = source.keys
        swin = ("layers.0.blocks.0.attn.qkv.weight" in keys and "head.weight" in keys
                and source.tensors.get("patch_embed.proj.weight") is not None
                and source.tensors["patch_embed.proj.weight"].dim() == 4)
        return swin or {"backbone.conv1.weight", "head.weight"} <= keys

    def plan(self, source: Source, spec) -> Plan:
        swin = "backbone.conv1.weight" not in source.keys
        if swin != _is_swin(spec.name):
            kind = "Swin" if swin else "ResNet"
            choices = [name for name in list_models("sifar") if _is_swin(name) == swin]
            raise ConversionError(f"{source.path} is a {kind} SIFAR, {spec.name} is not; pick one of "
                                  f"{', '.join(choices)}")
        plan = Plan(num_classes=source.shape("head.weight")[0])
        if swin:
            plan.facts["frame_pos_embed"] = "frame_pos_embed" in source.keys
        args = source.records.get("args")
        if args is not None:
            frames, rows = getattr(args, "duration", None), getattr(args, "super_img_rows", None)
            if frames:
                plan.facts["num_frames"] = frames
            if frames and rows and super_grid(frames)[0] != rows:
                raise ConversionError(f"{source.path} tiles {frames} frames in {rows} rows (its args); our models "
                                      f"tile them as {super_grid(frames)[0]}x{super_grid(frames)[1]}, so this layout "
                                      f"cannot be represented")
            plan.model = _our_name(getattr(args, "model", ""), frames)
        return plan

    def map(self, source: Source, model: nn.Module) -> Mapper:
        mapper = Mapper(source)
        if "backbone.conv1.weight" in source.keys:
            for key in mapper.matching(r"backbone\.fc\..*"):
                mapper.drop(key, "the timm backbone's ImageNet classifier, never called: the authors classify "
                                 "with `head`")
            mapper.rename([(r"backbone\.(.*)", r"net.\1"), (r"head\.(weight|bias)", r"net.fc.\1")])
            return mapper
        renamed = {old: new for new, old in from_original_swin({k: k for k in source.tensors}).items()}
        check_derived_buffers(mapper, model, rename=renamed.get)
        if "frame_pos_embed" in mapper.left:
            rows, cols = model.super_grid
            if rows != cols:
                raise ConversionError(f"{source.path}: the authors place frame position embeddings by tile index "
                                      f"modulo the rows, which only matches a square grid; {rows}x{cols} cannot "
                                      f"be represented")
            mapper.move("frame_pos_embed", "frame_pos_embed", lambda v: v.squeeze(0))
        for key in list(mapper.left):
            mapper.move(key, renamed[key])
        return mapper

    def head_keys(self, model: nn.Module) -> list[str]:
        return ["net.fc.weight", "net.fc.bias"] if hasattr(model, "net") else ["head.fc.weight", "head.fc.bias"]


def _is_swin(name: str) -> bool:
    return get_spec(name).defaults["arch"] in SWIN_ARCHS


def _our_name(theirs: str, frames: int | None) -> str | None:
    """The registered config that the authors' `--model` (and `--duration`) built, if it is registered."""
    if match := _THEIR_SWIN.fullmatch(theirs):
        size, window, img = match.groups()
        name = f"sifar_{size}_{window}_{frames}x{img}"
    elif match := _THEIR_CNN.fullmatch(theirs):
        name = f"sifar_{match.group(1)}"
    else:
        return None
    return name if name in list_models("sifar") else None


SIFAR = SifarFormat()
