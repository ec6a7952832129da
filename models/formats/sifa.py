"""FuchenUSTC/SIFA: SIFA-Net (`model/c2d_sifa_resnet.py`) and SIFA-Transformer (`model/c2d_sifa_swin.py`).

`train_val_3d.py` saves {"opt", "model", "optimizer", "scheduler", "epoch"}, the model wrapped in
DistributedDataParallel (`module.` keys). What their modules hold and where it goes in ours:

* SIFA-Net (a 3D-conv ResNet whose convs have no temporal extent but the 4x7x7 stem): 1x1x1 / 1x3x3 kernels
  become 2D ones; in layers 2-4 the even blocks are `GBottleneck`s whose global-context MLP `fc1`/`fc2` is our
  `se` (`ClipContext`), the odd ones `DEFLocalTransBottleneck`s whose `conv_offset` is our
  `act2.sifa.offset_next`; `layer4_dual` and `fc_dual` keep their names.
* SIFA-Transformer: Microsoft's Swin layout; each block holds `tda_norm` (the LayerNorm on the SIFA term) and
  `conv` (the 3-tap temporal conv), but runs only one of them: SIFA where its windows are unshifted, the
  conv where they are shifted. The one it runs is ours `temporal.norm` / `temporal.conv`; the other is
  dropped. The tubelet embedding `patch_embed.proj` is a bare 3D conv and the classifier is `fc`.
* Both: `def_cor.weight` is frozen at 1/C (`DefCorFixW`): the correlation q.k / C, our `attn_norm="linear"`.
  It is checked and dropped. Its shape (C, frames / stride, k, k) gives the clip length and the kernel.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from models.formats.base import ConversionError, Format, Mapper, Plan, Source, abbrev, check_derived_buffers
from models.sifa import RELEASED_R50
from models.sifa_swin import SIFATerm, TemporalConvTerm
from models.weights import from_original_swin

# The released SIFA-Transformer's SIFA: offsets fixed at zero, q.k / C, no term for the last frame, its output
# through a LayerNorm; a temporal conv in the shifted blocks; no LayerNorm after the tubelet embedding.
RELEASED_SWIN = dict(deformable=False, attn_norm="linear", last_frame="zero", out_norm=True,
                     shifted_temporal_conv=True, patch_norm=False)


class SifaFormat(Format):
    name = "sifa"
    repo = "FuchenUSTC/SIFA"
    families = ("sifa",)

    def claims(self, source: Source) -> bool:
        return any(key.endswith(("def_cor.weight", "tda_norm.weight")) or key == "fc_dual.weight"
                   for key in source.keys)

    def plan(self, source: Source, spec) -> Plan:
        swin = "patch_embed.proj.weight" in source.keys
        if swin != spec.name.startswith("sifa_swin"):
            raise ConversionError(f"{source.path} is a SIFA-{'Transformer' if swin else 'Net'}, {spec.name} is "
                                  f"not; pick {'sifa_swin_t/s/b' if swin else 'sifa_r50_released or sifa_r101'}")
        stem = source.shape("patch_embed.proj.weight" if swin else "conv1.weight")
        stride = stem[2]
        kernels = {key: source.shape(key) for key in source.keys if key.endswith("def_cor.weight")}
        if not kernels:
            raise ConversionError(f"{source.path} has no def_cor.weight, so its clip length and SIFA kernel are "
                                  f"unknown; convert the file as the authors' training saved it")
        sizes = {shape[-1] for shape in kernels.values()}
        if len(sizes) > 1:
            raise ConversionError(f"{source.path}: SIFA kernels of sizes {sorted(sizes)} in one network; ours has "
                                  f"one size")
        first = min(key for key in kernels if "_dual" not in key)   # the dual res5 sees half the frames
        plan = Plan(num_classes=source.shape("fc.weight")[0])
        plan.facts.update(num_frames=kernels[first][1] * stride, temporal_stride=stride, kernel_size=sizes.pop())
        plan.defaults.update(RELEASED_SWIN if swin else RELEASED_R50)
        plan.notes.append(f"{plan.facts['num_frames']} frames, stride {stride} in time, {plan.facts['kernel_size']}x"
                          f"{plan.facts['kernel_size']} SIFA neighbourhood ({first})")
        return plan

    def map(self, source: Source, model: nn.Module) -> Mapper:
        mapper = Mapper(source)
        for key in mapper.matching(r".*def_cor\.weight"):
            _drop_fixed_correlation(mapper, key)
        if "patch_embed.proj.weight" in source.keys:
            _map_swin(mapper, model)
        else:
            _map_net(mapper, model)
        return mapper

    def head_keys(self, model: nn.Module) -> list[str]:
        if hasattr(model, "fc_dual"):
            return ["fc.weight", "fc.bias"] + (["fc_dual.weight", "fc_dual.bias"] if model.fc_dual is not None else [])
        return ["head.fc.weight", "head.fc.bias"]


def _drop_fixed_correlation(mapper: Mapper, key: str) -> None:
    weight = mapper.left[key]
    if not torch.allclose(weight, torch.full_like(weight, 1.0 / weight.shape[0])):
        raise ConversionError(f"{mapper.source.path}: {key} is not the constant 1/C the released correlation "
                              f"uses; a learned correlation weight cannot be represented")
    mapper.drop(key, "the released correlation's frozen 1/C (attn_norm='linear')")


def squeeze_time(key: str):
    """(O, I, 1, k, k) -> (O, I, k, k): a 3D conv the authors wrote with a temporal kernel of one, as a 2D conv."""
    def transform(value: torch.Tensor) -> torch.Tensor:
        if value.dim() != 5 or value.shape[2] != 1:
            raise ConversionError(f"{key}: expected a 1 x k x k kernel, got shape {list(value.shape)}; our model "
                                  f"has no temporal extent there, so this network cannot be represented")
        return value.squeeze(2)
    return transform


def _map_net(mapper: Mapper, model: nn.Module) -> None:
    ours = model.state_dict()
    for key in list(mapper.left):
        target = re.sub(r"^(layer4_dual|layer\d)\.(\d+)\.(fc[12])\.", r"\1.\2.se.\3.", key)
        target = re.sub(r"\.conv_offset\.", ".act2.sifa.offset_next.", target)
        value = mapper.left[key]
        if target in ours and value.dim() == 5 and ours[target].dim() == 4:
            mapper.move(key, target, squeeze_time(key))
        else:
            mapper.move(key, target)


def _map_swin(mapper: Mapper, model: nn.Module) -> None:
    names = {old: new for new, old in from_original_swin({k: k for k in mapper.left}).items()}
    names["fc.weight"], names["fc.bias"] = "head.fc.weight", "head.fc.bias"
    check_derived_buffers(mapper, model, rename=names.get)
    shifted = {key.rsplit(".", 1)[0] for key in mapper.dropped if key.endswith(".attn_mask")}
    roles = {}
    for name, module in model.named_modules():
        if isinstance(module, (SIFATerm, TemporalConvTerm)):
            roles[name[:-len(".temporal")]] = "conv" if isinstance(module, TemporalConvTerm) else "sifa"
    wrong = sorted(block for block, role in roles.items() if (role == "conv") != (block in shifted))
    if wrong:
        raise ConversionError(f"{mapper.source.path}: blocks {abbrev(wrong)} run the other temporal term than in "
                              f"the authors' network (SIFA where windows are unshifted, the conv where shifted)")
    for key in list(mapper.left):
        kind = "norm" if ".tda_norm." in key else "conv" if ".conv." in key else None
        if kind is None:
            mapper.move(key, names[key])
            continue
        block, leaf = key.split(".tda_norm." if kind == "norm" else ".conv.")
        if kind == ("conv" if block in shifted else "norm"):
            mapper.move(key, f"{block}.temporal.{kind}.{leaf}")
        else:
            mapper.drop(key, "held by every block of the authors' code, used only by the blocks that run the "
                             "other temporal term")


SIFA = SifaFormat()
