"""What a training run adds to a checkpoint to resume exactly; the file itself is `contract.checkpoints`.

Exact means the resumed run sees the batch the interrupted one would have seen next and draws the same
random numbers: besides model, optimizer, scheduler, grad scaler and EMA, a checkpoint holds the epoch,
the number of micro-batches consumed in it (per data source) and the torch / CUDA / numpy / python RNG
states at the moment it was taken. Checkpoints are only taken between optimizer updates, so no
half-accumulated gradient is ever lost.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from contract import checkpoints


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers (what checkpoints and EMA hold)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def capture_rng() -> dict:
    """Every RNG's state as tensors, numbers and lists (a checkpoint holds no other objects)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_weights(model: nn.Module, url: str, storage_options: dict | None = None) -> dict:
    """Initialise `model` from a checkpoint's weights where names and shapes match (fine-tuning).

    Returns {"loaded": n, "skipped": [names]} so a caller can say what was left at its initial value,
    e.g. a classifier for another label set or position embeddings for another frame count.
    """
    state = checkpoints.load(url, storage_options)
    weights = state.get("model", state)
    target = unwrap(model).state_dict()
    usable = {k: v for k, v in weights.items() if k in target and target[k].shape == v.shape}
    skipped = sorted(set(target) - set(usable))
    unwrap(model).load_state_dict(usable, strict=False)
    return {"loaded": len(usable), "skipped": skipped}
