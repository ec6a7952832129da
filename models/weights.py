"""Pretrained weights from local files, for every model family; nothing is ever fetched from a hub.

A video model usually starts from an image checkpoint whose geometry differs: Swin windows grow
(7 -> 14, or global), ViT patch grids change with the input size, classifier heads change with the
dataset. The helpers here turn such a checkpoint into one the model accepts and say exactly what was
adapted, what was left out and what the model had to keep from its own initialisation.
"""
from __future__ import annotations

import logging
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table_simple
from torch import nn

_log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
# Checkpoints written by training scripts nest the weights under one of these keys.
NESTING_KEYS = ("state_dict", "model", "model_state", "module", "net")
# Buffers Swin recomputes from its window size; original checkpoints saved them, timm does not.
SWIN_DERIVED_BUFFERS = ("relative_position_index", "attn_mask")


def read_state_dict(path: str | Path, *, trusted: bool = False) -> StateDict:
    """Tensors of a local .pth/.pt/.bin/.ckpt or .safetensors file, unwrapped from "model"/"state_dict".

    Pickled files are read with `weights_only=True`; `trusted=True` allows arbitrary pickled objects
    (training checkpoints that also saved their argparse namespace), only for files you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {str(path)!r} not found; give the path of a local checkpoint "
                                f"file (.pth, .pt, .bin, .ckpt or .safetensors), weights are never downloaded")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix not in {".pth", ".pt", ".bin", ".ckpt", ".tar"}:
        raise ValueError(f"pretrained weights {str(path)!r}: unknown file type {path.suffix!r}; "
                         f"use a PyTorch (.pth/.pt/.bin/.ckpt) or a .safetensors file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as e:
        raise ValueError(f"pretrained weights {str(path)!r} hold pickled objects besides tensors; "
                         f"if you trust the file, pass trusted=True ({e})") from None
    return unwrap_state_dict(obj, source=str(path))


def unwrap_state_dict(obj, source: str = "checkpoint") -> StateDict:
    """Descend through the usual nesting keys until a flat {name: tensor} mapping is reached."""
    while isinstance(obj, dict) and not _is_state_dict(obj):
        key = next((k for k in NESTING_KEYS if k in obj), None)
        if key is None:
            raise ValueError(f"{source}: no weights found; top-level keys are {sorted(obj)[:8]}, expected a "
                             f"state dict or one nested under one of {NESTING_KEYS}")
        obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{source}: expected a mapping of parameter names to tensors, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def strip_prefixes(state_dict: StateDict, prefixes=("module.", "_orig_mod.")) -> StateDict:
    """Drop wrapper prefixes (DistributedDataParallel's "module.", torch.compile's "_orig_mod.", a
    "backbone." or "encoder." of your choice) from every key that carries them, repeatedly."""
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def resize_rel_pos_bias_tables(state_dict: StateDict, model: nn.Module) -> StateDict:
    """Fit every Swin relative-position bias table to the window of the model's block, bicubically.

    The table of a (h, w) window holds one bias per relative offset, a (2h-1) x (2w-1) grid per head;
    a larger window sees offsets the checkpoint never learned, so the grid is interpolated, as the Swin
    authors do when fine-tuning at a new window size. The index and mask buffers derived from the
    window are dropped: the model recomputes them for its own windows.
    """
    targets = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        if key.rsplit(".", 1)[-1] in SWIN_DERIVED_BUFFERS:
            continue
        if key.endswith("relative_position_bias_table") and key in targets and value.shape != targets[key].shape:
            attn = model.get_submodule(key.rsplit(".", 1)[0])
            side = math.isqrt(value.shape[0])
            if side * side != value.shape[0] or value.ndim != 2:
                raise ValueError(f"{key}: a table of {tuple(value.shape)} is not from a square window; "
                                 f"only square source windows can be resized")
            value = resize_rel_pos_bias_table_simple(value, new_window_size=tuple(attn.window_size),
                                                     new_bias_shape=tuple(targets[key].shape))
        out[key] = value
    return out


def from_original_swin(state_dict: StateDict) -> StateDict:
    """Rename Microsoft's Swin layout to timm's: they merge patches at the end of a stage, timm at the
    start of the next, and their classifier is `head`, timm's `head.fc`. timm-layout input is returned as is."""
    if "layers.0.downsample.reduction.weight" not in state_dict:
        return state_dict
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)
        out[re.sub(r"^head\.", "head.fc.", key)] = value
    return out


def adapt_swin(state_dict: StateDict, model: nn.Module) -> StateDict:
    """An image Swin checkpoint (either layout) made to fit a Swin with other windows."""
    return resize_rel_pos_bias_tables(from_original_swin(state_dict), model)


def resize_pos_embed(state_dict: StateDict, model: nn.Module, key: str = "pos_embed") -> StateDict:
    """Interpolate a ViT absolute position embedding to the model's patch grid (class/register tokens kept).

    The new grid comes from `model.patch_embed.grid_size`; the old one is taken as square.
    """
    if key not in state_dict or key not in model.state_dict():
        return state_dict
    old, new = state_dict[key], model.state_dict()[key]
    if old.shape == new.shape:
        return state_dict
    grid = tuple(model.patch_embed.grid_size)
    num_prefix_tokens = new.shape[1] - grid[0] * grid[1]
    return {**state_dict, key: resample_abs_pos_embed(old, list(grid), num_prefix_tokens=num_prefix_tokens)}


@dataclass
class LoadReport:
    """What a pretrained load did; `str()` is the summary a person reads in the log."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)      # model keys the checkpoint lacks: kept as initialised
    unexpected: list[str] = field(default_factory=list)   # checkpoint keys the model has no place for: ignored
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, checkpoint, model shape)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        if self.mismatched:
            lines.append("shape mismatch, kept the model's initialisation: " + ", ".join(
                f"{k} {list(a)} vs model {list(b)}" for k, a, b in self.mismatched))
        if self.missing:
            lines.append(f"missing from the checkpoint ({len(self.missing)}): " + _abbrev(self.missing))
        if self.unexpected:
            lines.append(f"not used by the model ({len(self.unexpected)}): " + _abbrev(self.unexpected))
        return "\n".join(lines)


def _abbrev(keys: list[str], n: int = 12) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def load_pretrained(model: nn.Module, source: str | Path | StateDict, *,
                    adapt: Callable[[StateDict, nn.Module], StateDict] | None = None,
                    prefixes=("module.", "_orig_mod."), strict: bool = False, trusted: bool = False) -> LoadReport:
    """Load a local checkpoint into `model` and report what matched.

    `adapt(state_dict, model)` rewrites the checkpoint for the model first (resize tables, rename keys).
    Tensors whose shape still differs, typically a classifier trained on other classes, are left out and
    listed. `strict=True` raises instead when anything is missing, unexpected or mismatched.
    """
    name = "state dict" if isinstance(source, dict) else str(source)
    state_dict = dict(source) if isinstance(source, dict) else read_state_dict(source, trusted=trusted)
    state_dict = strip_prefixes(state_dict, prefixes)
    if adapt is not None:
        state_dict = adapt(state_dict, model)
    targets = model.state_dict()
    report = LoadReport(name)
    usable = {}
    for key, value in state_dict.items():
        if key not in targets:
            report.unexpected.append(key)
        elif value.shape != targets[key].shape:
            report.mismatched.append((key, tuple(value.shape), tuple(targets[key].shape)))
        else:
            usable[key] = value
    mismatched = {key for key, _, _ in report.mismatched}
    report.missing = [k for k in targets if k not in usable and k not in mismatched]
    if not usable:
        raise ValueError(f"none of the {len(state_dict)} tensors of {name} fit {type(model).__name__}: the checkpoint "
                         f"has {_abbrev(list(state_dict), 3)}, the model {_abbrev(list(targets), 3)}; is it the "
                         f"right file, or does it need a prefix stripped (prefixes=...)?")
    if strict and (report.missing or report.unexpected or report.mismatched):
        raise RuntimeError(f"strict load of {name} into {type(model).__name__} failed:\n{report}")
    model.load_state_dict(usable, strict=False)
    report.loaded = list(usable)
    _log.info("%s", report)
    return report
