"""ViTs with a shifted class token: VideoNetworks/TokShift-Transformer and shuki0shimizu/IV-ViT, into `ivvit_*`.

Two ViT layouts reach our timm ViT:
* the one of TokShift's `vit_models/modeling_tokshift.py` (after jeonsworld/ViT-pytorch), which IV-ViT's
  `models/shift_model.py` reuses for its "tokenshift" model: `transformer.embeddings.{patch_embeddings,
  position_embeddings, cls_token}`, `transformer.encoder.layer.<i>.{attention_norm, attn.{query, key, value,
  out}, ffn_norm, ffn.fc1, ffn.fc2}`, `transformer.encoder.encoder_norm`;
* torchvision's, as IV-ViT's `models/vit.py` copies it for its "ViT" model: `conv_proj`, `class_token`,
  `encoder.pos_embedding`, `encoder.layers.encoder_layer_<i>.{ln_1, self_attention.{in_proj_*, out_proj},
  ln_2, mlp.linear_1, mlp.linear_2}`, `encoder.ln`.
Separate query/key/value projections are stacked into timm's `qkv` in that order, as `in_proj_weight` already is.

TokShift's `main_ddp_shift_v3.py` saves {"epoch", "state_dict", "best_acc1", "optimizer", "scheduler"} of its
`VideoNet` in DistributedDataParallel (`module.base_model.` keys, one classifier `base_model.head`, applied per
frame and averaged). IV-ViT's `util.save_checkpoint` saves the bare state dict of its model (`base_model.` keys,
one head per dataset: `base_model.head.head.<dataset>` or `base_model.heads.head.<dataset>`), which our IV-ViT
holds as `heads.<dataset>`. Neither file records its frame count.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from contract.inputs import KINETICS_MEAN, KINETICS_STD
from models.formats.base import ConversionError, Format, Mapper, Plan, Source

_TOKSHIFT = [
    (r"transformer\.embeddings\.patch_embeddings\.(.*)", r"patch_embed.proj.\1"),
    (r"transformer\.embeddings\.position_embeddings", r"pos_embed"),
    (r"transformer\.embeddings\.cls_token", r"cls_token"),
    (r"transformer\.encoder\.layer\.(\d+)\.attention_norm\.(.*)", r"blocks.\1.norm1.\2"),
    (r"transformer\.encoder\.layer\.(\d+)\.attn\.out\.(.*)", r"blocks.\1.attn.proj.\2"),
    (r"transformer\.encoder\.layer\.(\d+)\.ffn_norm\.(.*)", r"blocks.\1.norm2.\2"),
    (r"transformer\.encoder\.layer\.(\d+)\.ffn\.(fc\d)\.(.*)", r"blocks.\1.mlp.\2.\3"),
    (r"transformer\.encoder\.encoder_norm\.(.*)", r"norm.\1"),
]
_TORCHVISION = [
    (r"conv_proj\.(.*)", r"patch_embed.proj.\1"),
    (r"encoder\.pos_embedding", r"pos_embed"),
    (r"class_token", r"cls_token"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_1\.(.*)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.(.*)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_2\.(.*)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:linear_1|0)\.(.*)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:linear_2|3)\.(.*)", r"blocks.\1.mlp.fc2.\2"),
    (r"encoder\.ln\.(.*)", r"norm.\1"),
]
_HEADS = re.compile(r"base_model\.heads?\.head\.([^.]+)\.weight")
_PREFIX = "base_model."


class _ViTFormat(Format):
    families = ("ivvit",)

    def map(self, source: Source, model: nn.Module) -> Mapper:
        mapper = Mapper(source)
        for key in mapper.matching(r"base_model\.transformer\.encoder\.layer\.\d+\.attn\.query\.weight"):
            block = key[len(_PREFIX):].split(".")[3]
            for part in ("weight", "bias"):
                keys = [f"{_PREFIX}transformer.encoder.layer.{block}.attn.{p}.{part}"
                        for p in ("query", "key", "value")]
                mapper.put(f"blocks.{block}.attn.qkv.{part}", torch.cat([mapper.take(k) for k in keys]),
                           ", ".join(keys))
        for key in list(mapper.left):
            if match := _HEADS.fullmatch(key):
                for part in ("weight", "bias"):
                    mapper.move(key[:-len("weight")] + part, f"heads.{match.group(1)}.{part}")
        if f"{_PREFIX}head.weight" in mapper.left:
            name = next(iter(model.heads))
            mapper.rename([(rf"{_PREFIX}head\.(weight|bias)", rf"heads.{name}.\1")])
        rules = _TORCHVISION if f"{_PREFIX}conv_proj.weight" in source.keys else _TOKSHIFT
        mapper.rename([(re.escape(_PREFIX) + pattern, repl) for pattern, repl in rules])
        return mapper

    def head_keys(self, model: nn.Module) -> list[str]:
        return [f"heads.{name}.{part}" for name in model.heads for part in ("weight", "bias")]


def _img_size(source: Source, key: str, patch_key: str) -> int:
    """The square input the position embedding was learned for: (1 + (S/p)^2) tokens for patch size p."""
    tokens, patch = source.shape(key)[1] - 1, source.shape(patch_key)[-1]
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ConversionError(f"{source.path}: {key} holds {tokens} patch tokens, not a square grid")
    return side * patch


class TokShiftFormat(_ViTFormat):
    name = "tokshift"
    repo = "VideoNetworks/TokShift-Transformer"

    def claims(self, source: Source) -> bool:
        return {f"{_PREFIX}transformer.embeddings.patch_embeddings.weight", f"{_PREFIX}head.weight"} <= source.keys

    def plan(self, source: Source, spec) -> Plan:
        plan = Plan(num_classes=source.shape(f"{_PREFIX}head.weight")[0], mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        plan.facts["img_size"] = _img_size(source, f"{_PREFIX}transformer.embeddings.position_embeddings",
                                           f"{_PREFIX}transformer.embeddings.patch_embeddings.weight")
        plan.required["num_frames"] = "the file does not record it; TokShift released 8-, 12- and 16-frame models"
        # Every released TokShift config (config/custom/kinetics400/*.yml) shifts with SHIFT_DIV 4; its plain-ViT
        # baseline (NET: 'ViT') has the same keys and needs token_shift=False.
        plan.defaults.update(token_shift=True, fold_div=4)
        plan.notes.append("normalised with mean = std = 0.5 (PIXEL_MEAN 127.5, PIXEL_STD 0.5 in every config)")
        return plan


class IvvitFormat(_ViTFormat):
    name = "ivvit"
    repo = "shuki0shimizu/IV-ViT"

    def claims(self, source: Source) -> bool:
        heads = any(_HEADS.fullmatch(key) for key in source.keys)
        layout = bool({f"{_PREFIX}conv_proj.weight", f"{_PREFIX}transformer.embeddings.patch_embeddings.weight"}
                      & source.keys)
        return heads and layout

    def plan(self, source: Source, spec) -> Plan:
        heads = {m.group(1): source.shape(m.group(0))[0] for key in source.tensors if (m := _HEADS.fullmatch(key))}
        torchvision = f"{_PREFIX}conv_proj.weight" in source.keys
        pos, patch = (("encoder.pos_embedding", "conv_proj.weight") if torchvision else
                      ("transformer.embeddings.position_embeddings", "transformer.embeddings.patch_embeddings.weight"))
        plan = Plan(num_classes=next(iter(heads.values())), mean=KINETICS_MEAN, std=KINETICS_STD)
        plan.facts.update(heads=heads, img_size=_img_size(source, _PREFIX + pos, _PREFIX + patch))
        plan.defaults["num_frames"] = 16
        # Their "ViT" model (torchvision layout) shifts nothing; their "tokenshift" model shifts with fold_div 8
        # (models/configs.py). Both read 16 frames (config.ini) normalised by 0.45 / 0.225 (transform_factory.py).
        plan.facts["token_shift"] = not torchvision
        if not torchvision:
            plan.defaults["fold_div"] = 8
        plan.notes.append(f"heads {heads}; {'no class-token shift' if torchvision else 'class-token shift 1/8'}; "
                          f"16 frames and mean 0.45, std 0.225, as in the authors' config")
        return plan


TOKSHIFT = TokShiftFormat()
IVVIT = IvvitFormat()
