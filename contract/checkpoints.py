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
  classes      class names, line i naming label i (the shards' classes.txt), or None if unknown;
               a run over several datasets (IV-ViT) stores {dataset: names or None}
  Training runs add: optimizer, scheduler, scaler, ema, epoch, updates, best, sources, rng, world_size,
  config (the resolved recipe, credentials redacted). Converted files add: source (what was converted).

Where checkpoints live:
  <run>/checkpoints/epoch<E>-update<U>.pt and a `latest` pointer    a plain run (or run.storage)
  <storage>/<run name>/checkpoint_<time>/state.pt                   Ray Train (ray.storage_path, by default
                                                                    <run>/ray); a folder per reported checkpoint
`resolve` turns any of these folders, or a file, into the file to read.

Files are read with `torch.load(weights_only=True)`: a checkpoint is data, never code, so every value
stored must be a tensor, a number, a string, None or a list, tuple or dict of those.
"""
from __future__ import annotations

import io
import os
import re

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

FORMAT = "vidscale-checkpoint/1"
LATEST = "latest"        # a small text object naming the newest checkpoint file, written after it
FOLDER = "checkpoints"   # a plain run's checkpoint folder, inside its run folder
STATE = "state.pt"       # the file inside a Ray Train checkpoint folder
RAY_FOLDER = "ray"       # Ray Train's storage inside the run folder when ray.storage_path is not set
RAY_PREFIX = "checkpoint_"   # Ray Train's checkpoint folders: checkpoint_<time>, newest last by name
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


def resolve(url: str, storage_options: dict | None = None) -> str:
    """The checkpoint file that `url` names, local or in a bucket.

    `url` is a checkpoint file; a checkpoint folder (a plain run's `checkpoints/`: its latest file; a Ray
    `checkpoint_<time>/`: its state.pt); or a run folder (a plain run's, or Ray's `<storage>/<run name>`:
    its newest checkpoint_<time>/; or a Ray run's folder that keeps Ray's storage in `ray/`). Local paths
    come back absolute, so the name still holds in a process with another working directory (Ray workers).
    """
    url = url.rstrip("/")
    if "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    fs, path = _fs(url, storage_options)
    if fs.isfile(path):
        return url
    if not fs.isdir(path):
        raise FileNotFoundError(f"checkpoint {url!r} does not exist; give a run folder (runs/<run>), its "
                                f"checkpoints folder, a Ray checkpoint_<time> folder or a checkpoint file")
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    if STATE in names:
        return f"{url}/{STATE}"
    latest = CheckpointStore(url, storage_options=storage_options).latest()
    if latest is not None:
        return latest
    if FOLDER in names:
        return resolve(f"{url}/{FOLDER}", storage_options)
    reported = sorted(n for n in names if n.startswith(RAY_PREFIX) and fs.exists(f"{path}/{n}/{STATE}"))
    if reported:
        return f"{url}/{reported[-1]}/{STATE}"
    run_name = path.rstrip("/").rsplit("/", 1)[-1]
    if RAY_FOLDER in names and fs.isdir(f"{path}/{RAY_FOLDER}/{run_name}"):
        return resolve(f"{url}/{RAY_FOLDER}/{run_name}", storage_options)
    raise FileNotFoundError(f"folder {url!r} holds no checkpoint yet (no {FOLDER}/, no *.pt with a {LATEST!r} "
                            f"pointer, no {RAY_PREFIX}<time>/{STATE}); give the folder of a run that saved one")


def load(url: str, storage_options: dict | None = None) -> dict:
    """The checkpoint that `url` names (any file or folder `resolve` accepts)."""
    url = resolve(url, storage_options)
    fs, path = _fs(url, storage_options)
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
