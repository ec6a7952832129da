"""Loaders for a run, built from its config, and the bookkeeping that makes resuming exact.

Any class with VideoLoader's constructor works (`data.loader: "module:Class"`): it yields dicts
{video, label, key, ...}, has len() (batches per epoch on this rank) and set_epoch(epoch), and its
batches are a pure function of (seed, epoch, rank, world_size). A `Source` remembers how many
batches of the current epoch were consumed, so a resumed run can start at the next one. A loader whose
set_epoch takes `start_batch` jumps there directly; any other is advanced by reading and dropping.
"""
from __future__ import annotations

import importlib
import inspect

import torch

from contract.inputs import InputContract, super_grid
from train.config import ConfigError, datasets_of


def import_object(spec: str):
    module, _, attr = spec.partition(":")
    if not attr:
        raise ConfigError(f"{spec!r} is not 'module:Name' (for example pipelines.loader:VideoLoader)")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import {spec!r} ({e}); check data.loader") from e


def build_loader(cfg: dict, dataset: str, split: str, *, contract: InputContract, device, rank: int = 0,
                 world_size: int = 1, views: tuple[int, int] = (1, 1), batch_size: int | None = None):
    """This rank's loader of one dataset's split, shaped by the model's input `contract`; `views=(clips,
    crops)` per video when evaluating.

    The split's name is the split inside the shards unless its options say `split:`; frames, crop size and
    normalisation are the contract's unless the options override them (`num_frames: 1` for image
    datasets, say), while the layout and a super-image grid are the model's alone (model.options.grid).
    """
    spec = datasets_of(cfg)[dataset].get(split) or {}
    if not spec.get("shards"):
        where = f"data.datasets.{dataset}.{split}" if cfg["data"]["datasets"] else f"data.{split}"
        raise ConfigError(f"{where}.shards is not set; give the shard folder or URL written by the shard job")
    device = torch.device(device)
    kwargs = {"batch_size": batch_size or cfg["data"]["batch_size"], "num_frames": contract.num_frames,
              "sampling": cfg["data"]["sampling"], "mode": "train" if split == "train" else "eval",
              "split": split, "crop_size": contract.crop_size, "layout": contract.layout,
              "mean": contract.mean, "std": contract.std,
              "device": "gpu" if device.type == "cuda" else "cpu",
              "device_id": device.index if device.index is not None else 0,
              "rank": rank, "world_size": world_size, "seed": cfg["seed"]}
    if split != "train":
        kwargs.update(num_clips=views[0], num_crops=views[1])
    kwargs.update({**cfg["data"]["options"], **(spec.get("options") or {})})   # e.g. num_frames: 1 for images
    if kwargs["layout"] != contract.layout:
        raise ConfigError(f"the data options ask for layout {kwargs['layout']!r} but the model reads "
                          f"{contract.layout!r}; drop layout from the data options")
    if contract.grid is not None:
        asked = kwargs.setdefault("grid", contract.grid_text)
        if super_grid(kwargs["num_frames"], asked) != contract.grid:
            raise ConfigError(f"the data options tile a {asked} grid but the model reads {contract.grid_text}; "
                              f"set the grid once, as model.options.grid, and drop it from the data options")
    return import_object(cfg["data"]["loader"])(spec["shards"], **kwargs)


class Source:
    """One training dataset's loader and its position: (epoch, batches consumed in it)."""

    def __init__(self, name: str, loader, cycle: bool = False):
        self.name, self.loader, self.cycle = name, loader, cycle
        self.epoch, self.consumed, self._it = 0, 0, None

    def __len__(self) -> int:
        return len(self.loader)

    def start(self, epoch: int, skip: int = 0) -> None:
        """Position at batch `skip` of `epoch`."""
        self.epoch, self.consumed = epoch, skip
        set_epoch = self.loader.set_epoch
        if skip and "start_batch" in inspect.signature(set_epoch).parameters:
            set_epoch(epoch, start_batch=skip)
            self._it = iter(self.loader)
            return
        set_epoch(epoch)
        self._it = iter(self.loader)
        for _ in range(skip):
            next(self._it)

    def next(self) -> dict:
        if self._it is None:
            self.start(self.epoch, self.consumed)
        try:
            batch = next(self._it)
        except StopIteration:
            if not self.cycle:
                raise
            self.start(self.epoch + 1)   # a secondary dataset runs on into its next epoch
            batch = next(self._it)
        self.consumed += 1
        return batch

    def close(self) -> None:
        """Stop the current epoch's iteration (and the loader threads behind it)."""
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None

    def state(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}
