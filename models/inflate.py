"""I3D inflation: start any net of the unified CNN framework from 2D ImageNet weights (Carreira & Zisserman).

The video nets keep torchvision/timm parameter names (ResNet: `layer1.0.conv1.weight`; GoogLeNet:
`inception3a.branch2.1.conv.weight`), so a 2D checkpoint maps key for key:
  2D nets (TSN/TSM/TAM) take every tensor as is; their temporal modules are new and keep their initialisation;
  3D nets repeat each k x k kernel t times along time and divide it by t. On a clip of identical frames a
  t x k x k conv then sums t equal contributions back to the 2D response, so every activation of the inflated
  net equals the 2D net's on that frame (except within the receptive field of the clip's ends, where the zero
  temporal padding removes terms). Factorised nets (S3D, R(2+1)D) take their spatial halves from the 2D conv
  (a 1 x k x k "inflation"); the temporal halves are new.
The classifier of an ImageNet checkpoint (`fc.*`) has no counterpart (the video head is `head.fc`) and is
reported unused; loading goes through `models.weights`, which reports every tensor it could not place.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.weights import LoadReport, StateDict
from models.weights import load_pretrained as _load_local


def inflate_conv_weight(weight: torch.Tensor, temporal_kernel: int) -> torch.Tensor:
    """(O, I, kh, kw) -> (O, I, t, kh, kw), repeated along time and divided by t."""
    return weight.unsqueeze(2).repeat(1, 1, temporal_kernel, 1, 1) / temporal_kernel


def inflate_state_dict(state_dict: StateDict, model: nn.Module) -> StateDict:
    """Inflate every 2D conv kernel whose model counterpart is the same conv with a temporal extent.

    Usable as `adapt=` of `models.weights.load_pretrained`; other tensors pass through unchanged.
    """
    targets = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        target = targets.get(key)
        if (target is not None and value.dim() == 4 and target.dim() == 5
                and target.shape[:2] + target.shape[3:] == value.shape):
            value = inflate_conv_weight(value, target.shape[2])
        out[key] = value
    return out


def load_pretrained(model: nn.Module, source: str | Path | StateDict, **options) -> LoadReport:
    """Load a local 2D (or same-architecture video) checkpoint into a framework net, inflating where needed.

    `source` is a file path (.pth/.safetensors, torchvision or timm layout) or a state dict; `options` go to
    `models.weights.load_pretrained` (`strict`, `trusted`, `prefixes`), which raises when nothing fits.
    """
    return _load_local(model, source, adapt=inflate_state_dict, **options)
