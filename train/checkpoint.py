"""Checkpoints that resume a run exactly, on local disk or any fsspec URL (s3://, gs://).

Exact means the resumed run sees the batch the interrupted one would have seen next and draws the same
random numbers: besides model, optimizer, scheduler, grad scaler and EMA, a checkpoint holds the epoch,
the number of micro-batches consumed in it (per data source) and the torch / CUDA / numpy / python RNG
states at the moment it was taken. Checkpoints are only taken between optimizer updates, so no
half-accumulated gradient is ever lost.
"""
from __future__ import annotations

import io
import random
import re
import fsspec
from fsspec.implementations.local import LocalFileSystem
import numpy as np
import torch
from torch import nn

LATEST = "latest"   # a small text object naming the newest checkpoint file, written after it


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
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fs(url: str, storage_options: dict | None):
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def save(state: dict, url: str, storage_options: dict | None = None) -> None:
    """Write `state` to `url` so that a reader never sees a half-written file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    fs, path = _fs(url, storage_options)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = path + ".tmp"
        with fs.open(tmp, "wb") as f:
            f.write(buffer.getvalue())
        fs.mv(tmp, path)           # a rename: atomic on one filesystem
    else:
        fs.pipe_file(path, buffer.getvalue())   # object stores publish a PUT whole or not at all


def load(url: str, storage_options: dict | None = None) -> dict:
    """A checkpoint file, or the latest one of a checkpoint folder (runs/<run>/checkpoints)."""
    fs, path = _fs(url, storage_options)
    if fs.isdir(path):
        latest = CheckpointStore(url, storage_options=storage_options).latest()
        if latest is None:
            raise FileNotFoundError(f"checkpoint folder {url!r} holds no checkpoint yet")
        return load(latest, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"checkpoint {url!r} does not exist; give a checkpoint file written by "
                                f"`python -m train fit` (runs/<name>-<time>/checkpoints/*.pt)")
    with fs.open(path, "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)


class CheckpointStore:
    """Numbered checkpoints under one folder or prefix, a `latest` pointer, the newest `keep` kept."""

    def __init__(self, root: str, keep: int = 2, storage_options: dict | None = None):
        self.root = root.rstrip("/")
        self.keep = max(1, keep)
        self.storage_options = storage_options or {}
        self.fs, self.path = _fs(self.root, self.storage_options)

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def save(self, state: dict) -> str:
        name = f"epoch{state['epoch']:04d}-update{state['updates']:08d}.pt"
        save(state, self.url(name), self.storage_options)
        self.fs.pipe_file(f"{self.path}/{LATEST}", name.encode())
        self._prune()
        return self.url(name)

    def names(self) -> list[str]:
        if not self.fs.exists(self.path):
            return []
        found = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)]
        return sorted(n for n in found if re.fullmatch(r"epoch\d+-update\d+\.pt", n))

    def latest(self) -> str | None:
        pointer = f"{self.path}/{LATEST}"
        if self.fs.exists(pointer):
            name = self.fs.cat_file(pointer).decode().strip()
            if self.fs.exists(f"{self.path}/{name}"):
                return self.url(name)
        names = self.names()   # pointer lost or stale: the newest complete file still counts
        return self.url(names[-1]) if names else None

    def _prune(self) -> None:
        for name in self.names()[:-self.keep]:
            self.fs.rm(f"{self.path}/{name}")


def load_weights(model: nn.Module, url: str, storage_options: dict | None = None) -> dict:
    """Initialise `model` from a checkpoint's weights where names and shapes match (fine-tuning).

    Returns {"loaded": n, "skipped": [names]} so a caller can say what was left at its initial value,
    e.g. a classifier for another label set or position embeddings for another frame count.
    """
    state = load(url, storage_options)
    weights = state.get("model", state)
    target = unwrap(model).state_dict()
    usable = {k: v for k, v in weights.items() if k in target and target[k].shape == v.shape}
    skipped = sorted(set(target) - set(usable))
    unwrap(model).load_state_dict(usable, strict=False)
    return {"loaded": len(usable), "skipped": skipped}
