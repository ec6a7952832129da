"""Loaders for a run, built from its config, and the bookkeeping that makes resuming exact.

Each key of `data.options` (and of a split's `options`) is a field of `pipelines.config.LoaderConfig`,
by its name: `readers`, `train_crop`, `max_failures`, ... and the fields of the model's input contract
(`num_frames: 1` for images) and of the augmentations (`color_jitter`, ...); a key no field takes is
refused in one line naming the nearest one. The model's contract (`model.contract`) gives frames, crop
size, layout, grid, mean and std; `data.sampling` and `data.batch_size` the fields of those names.

A plugin loader (`data.loader: "module:Class"`, imported after the config's `imports`) is called as
`Class(shards, batch_size, contract=..., mode=, split=, sampling=, device=, device_id=, rank=,
world_size=, seed=[, num_clips=, num_crops=], **options)`, its options passed through unchecked. It yields
dicts {video, label, key, valid, ...}, has len() (batches per epoch on this rank), set_epoch(epoch) and
`failures` (the samples of the current iteration it could not read, as dicts {key, video_index, shard,
stage, reason}; their places in the batches hold stand-ins flagged valid=False), and its batches are a
pure function of (seed, epoch, rank, world_size). A loader may have an `index` with `keys` (every video
of its split) and `class_names` (the shards' classes.txt, or None); without one, the classes cannot be
checked and the evaluation's coverage is counted from what was delivered and what failed. A `Source` remembers how many
batches of the current epoch were consumed, so a resumed run can start at the next one. A loader whose
set_epoch takes `start_batch` jumps there directly; any other is advanced by reading and dropping.
"""
from __future__ import annotations

import importlib
import inspect

import torch

from contract.inputs import InputContract
from pipelines.config import CONTRACT_KEYS, OPTIONS, LoaderConfig, contract_of, nearest_option
from train.config import ConfigError, datasets_of, plugin_loader

SHOWN_CLASSES = 8   # class names an error message lists before "... (N in all)"


def import_object(spec: str):
    module, _, attr = spec.partition(":")
    if not attr:
        raise ConfigError(f"{spec!r} is not 'module:Name' (for example my_plugin:MyLoader)")
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
    where = f"data.datasets.{dataset}.{split}" if cfg["data"]["datasets"] else f"data.{split}"
    if not spec.get("shards"):
        raise ConfigError(f"{where}.shards is not set; give the shard folder or URL written by the shard job")
    sections = {"data.options": cfg["data"]["options"], f"{where}.options": spec.get("options") or {}}
    options = {key: value for section in sections.values() for key, value in section.items()}
    device = torch.device(device)
    batch_size = batch_size or cfg["data"]["batch_size"]
    keywords = {"mode": "train" if split == "train" else "eval", "split": split, "sampling": cfg["data"]["sampling"],
                "device": "gpu" if device.type == "cuda" else "cpu",
                "device_id": device.index if device.index is not None else 0,
                "rank": rank, "world_size": world_size, "seed": cfg["seed"]}
    if split != "train":
        keywords.update(num_clips=views[0], num_crops=views[1])
    keywords.update({key: value for key, value in options.items() if key not in CONTRACT_KEYS})
    try:
        delivered = contract_of(contract, {key: options[key] for key in CONTRACT_KEYS if key in options})
    except ValueError as e:
        raise ConfigError(f"{' / '.join(sections)}: {e}") from e
    _check_against_the_model(delivered, contract, options)
    if plugin_loader(cfg) is not None:
        return import_object(plugin_loader(cfg))(spec["shards"], batch_size, contract=delivered, **keywords)
    for section, given in sections.items():
        for key in given:
            if key not in OPTIONS:
                near = nearest_option(key)
                hint = f"did you mean {section}.{near}?" if near else f"the keys are LoaderConfig's: {', '.join(OPTIONS)}"
                raise ConfigError(f"{section}.{key} is not a loader setting; {hint}")
    try:
        config = LoaderConfig.of(batch_size, contract=delivered, **keywords)
    except ValueError as e:
        raise ConfigError(f"{' / '.join(sections)}: {e}") from e
    from pipelines.loader import VideoLoader

    return VideoLoader(spec["shards"], config=config)


def _check_against_the_model(delivered: InputContract, contract: InputContract, options: dict) -> None:
    """The layout and grid are the model's: data options may not change them."""
    if delivered.layout != contract.layout:
        raise ConfigError(f"the data options ask for layout {delivered.layout!r} but the model reads "
                          f"{contract.layout!r}; drop layout from the data options")
    if delivered.grid != contract.grid:
        raise ConfigError(f"the data options tile a {options.get('grid', delivered.grid_text)} grid but the model "
                          f"reads {contract.grid_text}; set the grid once, as model.options.grid, and drop it from "
                          f"the data options")


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


# ---------------------------------------------------------------- classes


def class_names(loader) -> tuple[str, ...] | None:
    """The class names of the shards a loader reads (line i names label i); None when the loader has no
    index (a plugin loader) or its shards have no classes.txt."""
    index = getattr(loader, "index", None)
    return None if index is None else index.class_names


def _listed(names) -> str:
    shown = ", ".join(names[:SHOWN_CLASSES])
    return f"[{shown}, ... ({len(names)} in all)]" if len(names) > SHOWN_CLASSES else f"[{shown}]"


def check_class_count(num_classes: int, key: str, names, source: str) -> None:
    """The model's class count must be the number of classes its shards name."""
    if names is not None and len(names) != num_classes:
        raise ConfigError(f"{key}={num_classes} but {source} name {len(names)} classes {_listed(names)}; "
                          f"set {key}={len(names)} or give shards with {num_classes} classes")


def check_class_names(expected, expected_from: str, found, found_from: str, fix: str) -> None:
    """Two class lists that must be the same list, label for label (either may be unknown: None)."""
    if expected is None or found is None or list(expected) == list(found):
        return
    first = next((i for i, (a, b) in enumerate(zip(expected, found)) if a != b), min(len(expected), len(found)))
    raise ConfigError(f"{expected_from} and {found_from} name different classes: {_listed(list(expected))} vs "
                      f"{_listed(list(found))} (from label {first} on); {fix}")


def run_classes(cfg: dict, train_loaders: dict, val_loaders: dict) -> dict:
    """{dataset: class names or None} of a run's shards, each split checked against the configured class
    count and against the other split."""
    several = bool(cfg["data"]["datasets"])
    found = {}
    for name, ds in datasets_of(cfg).items():
        key = f"data.datasets.{name}.num_classes" if several else "model.num_classes"
        first, first_from = None, None
        for split, loaders in (("train", train_loaders), ("val", val_loaders)):
            if name not in loaders:
                continue
            names, source = class_names(loaders[name]), f"the {split} shards ({ds[split]['shards']})"
            check_class_count(ds["num_classes"], key, names, source)
            check_class_names(first, first_from, names, source, fix="give the splits of one dataset's shards")
            if first is None:
                first, first_from = names, source
        found[name] = first
    return found


def classes_by_dataset(stored, datasets: list[str]) -> dict:
    """A checkpoint's `classes` entry as {dataset: names or None}: one list for a single dataset, a dict
    for a run over several (contract.checkpoints)."""
    if isinstance(stored, dict):
        return {name: stored.get(name) for name in datasets}
    return {name: stored if i == 0 else None for i, name in enumerate(datasets)}


def stored_classes(classes: dict, several: bool):
    """What a checkpoint stores: the single dataset's names, or {dataset: names} for several."""
    if several:
        return {name: list(names) if names is not None else None for name, names in classes.items()}
    names = next(iter(classes.values()))
    return list(names) if names is not None else None
