"""The checkpoint file: what it holds, how it is named, how it is written and read, local or in a bucket.

One format serves a training run (an exact resume point) and a converted release of the papers'
authors (`python -m models.convert`): every reader of checkpoints (the loop, Ray Train, `train eval`,
`models.load`) goes through this module.

Keys of a checkpoint (a dict saved with `torch.save`):
  format       FORMAT
  model        the model's state dict (plain module: no DDP or torch.compile prefixes)
  build        how to rebuild the model: {"name", "num_classes", "num_frames", "img_size", "options"}
               (`models.build(**build)` gives the architecture the weights belong to)
  contract     the input contract the weights were trained with (`contract.inputs.InputContract.to_dict`)
  classes      class names, line i naming label i (the shards' classes.txt), or None if unknown
  Training runs add: optimizer, scheduler, scaler, ema, epoch, updates, best, sources, rng, world_size,
  config (the resolved recipe, credentials redacted). Converted files add: source (what was converted).

Files are read with `torch.load(weights_only=True)`: a checkpoint is data, never code, so every value
stored must be a tensor, a number, a string, None or a list, tuple or dict of those.
"""
from __future__ import annotations

import io
import re

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

FORMAT = "vidscale-checkpoint/1"
LATEST = "latest"   # a small text object naming the newest checkpoint file, written after it
_NAME = re.compile(r"epoch\d+-update\d+\.pt")


def file_name(epoch: int, updates: int) -> str:
    return f"epoch{epoch:04d}-update{updates:08d}.pt"


def _fs(url: str, storage_options: dict | None):
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def save(state: dict, url: str, storage_options: dict | None = None) -> None:
    """Write `state` to `url` so that a reader never sees a half-written file."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
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
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


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
        name = file_name(state["epoch"], state["updates"])
        save(state, self.url(name), self.storage_options)
        self.fs.pipe_file(f"{self.path}/{LATEST}", name.encode())
        self._prune()
        return self.url(name)

    def names(self) -> list[str]:
        if not self.fs.exists(self.path):
            return []
        found = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)]
        return sorted(n for n in found if _NAME.fullmatch(n))

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
