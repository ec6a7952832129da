"""Training recipes: YAML files with `base:` inheritance, dotted `key=value` overrides, one resolved dict.

A recipe names only what differs from `DEFAULTS`; the resolved config (every key, after inheritance and
overrides) is what a run saves to its folder, so a run can always be repeated from its own folder.
Saved configs have their credentials redacted (`contract.credentials`); reading one back drops the
redacted entries, so the storage credentials come from the environment again.
Keys are checked against `DEFAULTS`: a typo is an error that names the key and the nearest real one,
never a silently ignored setting. Values are checked against their default's type (or `TYPES`, where
the default is None) and against `MINIMUM`, so `optim.lr=abc` or `sched.epochs=0` is refused in one line
before anything runs. Sections marked free-form (`{}` defaults such as `model.options`) are passed
through to the component that owns them.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml

from contract.credentials import redact, without_redacted


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string (it wants `1.0e-4`); learning rates are written the short way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+"
               r"(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))

DEFAULTS: dict[str, Any] = {
    "name": None,                 # run name; defaults to the recipe's file name
    "seed": 0,
    "imports": [],                # modules imported first (plugins that register models or loaders)
    "init_from": None,            # checkpoint whose weights start this run (fine-tuning; optimizer not taken)
    "model": {
        "name": None,             # a registered name, see `python -m models.describe --list`
        "num_classes": None,      # int; multi-dataset runs take one per dataset from data.datasets
        "num_frames": 8,
        "img_size": 224,
        "pretrained": None,       # local weights file for the backbone (never a hub download)
        "options": {},            # builder keyword arguments, e.g. drop_path_rate
    },
    "data": {
        "loader": None,           # None: pipelines.loader.VideoLoader; "module:Class": a plugin (train/data.py)
        "name": "main",           # dataset name (the head an IV-ViT model uses)
        "batch_size": 8,          # per worker
        "sampling": "uniform",    # "uniform" (TSN segments) or "dense"
        "options": {},            # LoaderConfig fields for every split (pipelines/config.py), e.g. readers: 4
        "train": {"shards": None, "options": {}},
        "val": {"shards": None, "options": {}},
        "datasets": {},           # several datasets trained together, in this fixed order (IV-ViT):
                                  # {name: {num_classes, train: {shards, options}, val: {...}}}
    },
    "optim": {
        "name": "adamw",          # any timm optimizer name (sgd, adamw, lamb, ...)
        "lr": 1e-4,
        "lr_reference_batch": None,  # if set: lr *= global batch / this (linear scaling rule)
        "weight_decay": 0.05,
        "momentum": 0.9,
        "filter_bias_and_bn": True,  # no weight decay on biases and norm layers
        "clip_grad": None,        # max gradient norm
        "accum_steps": 1,         # micro-batches per optimizer update
    },
    "sched": {
        "name": "cosine",         # any timm scheduler name; stepped per update, not per epoch
        "epochs": 30,
        "warmup_epochs": 0,
        "warmup_lr": 1e-6,
        "min_lr": 1e-6,
        "cooldown_epochs": 0,
        "decay_milestones": [30, 60, 90],  # epochs, for "multistep"
        "decay_rate": 0.1,
    },
    "aug": {
        "mixup": 0.0,             # Beta(alpha) of mixup; 0 disables
        "cutmix": 0.0,            # Beta(alpha) of cutmix; 0 disables (one box for all frames of a clip)
        "cutmix_minmax": None,
        "mixup_prob": 1.0,
        "switch_prob": 0.5,
        "label_smoothing": 0.0,
    },
    "train": {
        "device": "auto",         # auto | cpu | cuda
        "amp": "auto",            # auto (bf16 where the device supports it) | bf16 | fp16 | none
        "channels_last": "auto",  # auto (CNNs on CUDA) | true | false
        "compile": False,         # torch.compile the model
        "deterministic": False,   # torch.use_deterministic_algorithms (exact repeatability, slower)
        "ema_decay": None,        # timm ModelEmaV3 decay, e.g. 0.9998; None disables
        "log_every": 10,          # updates between progress lines
        "eval_every": 1,          # epochs between validation passes; 0 disables
        "checkpoint_every": 0,    # updates between mid-epoch checkpoints; 0 = end of each epoch only
        "keep_checkpoints": 2,
        "max_updates": None,      # stop after this many updates (smoke runs, benchmarks)
    },
    "eval": {
        "clips": 1,               # views per video for the final video-level evaluation
        "crops": 1,
        "orders": ["normal"],     # any of normal, reversed, shuffled (SIFAR's temporal-order test)
        "at_end": True,           # evaluate and write the report when fit finishes
        "reference": None,        # a TSN run's eval_report.json, for the Phi / Psi effects
        "batch_size": None,       # defaults to data.batch_size
    },
    "run": {
        "root": "runs",           # run folders are <root>/<name>-<timestamp>/
        "dir": None,              # an explicit run folder (resuming, tests)
        "storage": None,          # fsspec URL for checkpoints (s3://bucket/prefix); default <run>/checkpoints
        "storage_options": {},    # fsspec options, e.g. {client_kwargs: {endpoint_url: ...}}
        "resume": None,           # "auto" (latest checkpoint in storage) or a checkpoint URL
    },
    "ray": {
        "workers": 1,
        "gpus_per_worker": 0,
        "cpus_per_worker": 1,
        "address": None,          # existing cluster (ray://... or host:port); None starts a local one
        "max_failures": 0,        # worker-group restarts from the last checkpoint
        "storage_path": None,     # Ray's RunConfig storage (local folder or s3://bucket/prefix)
        "s3_endpoint": None,      # endpoint override for an S3-compatible server
    },
}


NUMBER = (int, float)
# The type of each key whose default is None, or whose default's type says too little; every other key
# takes its default's type (an int default takes integers, a float default any number).
TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str, "init_from": str, "model.name": str, "model.num_classes": int, "model.pretrained": str,
    "data.loader": str, "data.train.shards": str, "data.val.shards": str, "optim.lr_reference_batch": NUMBER, "optim.clip_grad": NUMBER,
    "aug.cutmix_minmax": list, "train.amp": (str, bool), "train.channels_last": (str, bool),
    "train.ema_decay": NUMBER, "train.max_updates": int, "eval.reference": str, "eval.batch_size": int,
    "run.dir": str, "run.storage": str, "run.resume": str, "ray.address": str, "ray.gpus_per_worker": NUMBER,
    "ray.cpus_per_worker": NUMBER, "ray.storage_path": str, "ray.s3_endpoint": str,
}
MINIMUM = {"model.num_classes": 1, "model.num_frames": 1, "model.img_size": 1, "data.batch_size": 1, "optim.lr": 0,
           "optim.accum_steps": 1, "sched.epochs": 1, "sched.warmup_epochs": 0, "train.log_every": 1,
           "train.eval_every": 0, "train.checkpoint_every": 0, "train.keep_checkpoints": 1, "train.max_updates": 1,
           "eval.clips": 1, "eval.crops": 1, "eval.batch_size": 1, "ray.workers": 1, "ray.gpus_per_worker": 0,
           "ray.cpus_per_worker": 0, "ray.max_failures": 0}
_TYPE_NAMES = {int: "an integer", NUMBER: "a number", bool: "true or false", str: "a string", list: "a list",
               dict: "a section of key: value", (str, bool): "a string or true/false"}


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names it and the fix."""


def _is_free_form(default: Any) -> bool:
    return isinstance(default, dict) and not default


def _check_key(key: str, schema: dict, where: str) -> None:
    if key not in schema:
        near = difflib.get_close_matches(key, list(schema), n=1)
        hint = f"; did you mean '{where}{near[0]}'?" if near else f"; known keys: {sorted(schema)}"
        raise ConfigError(f"unknown config key '{where}{key}'{hint}")


def _merge(base: dict, update: dict, schema: dict, where: str) -> dict:
    """`update` over `base`: sections merge key by key; a free-form section given whole replaces the old
    one (a derived recipe that switches model family must not inherit the other family's options)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        _check_key(key, schema, where)
        sub = schema[key]
        if isinstance(value, dict) and isinstance(sub, dict) and sub and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, sub, f"{where}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _set(cfg: dict, keys: list[str], value: Any) -> None:
    """One dotted override: checked down to the first free-form section, created below it."""
    node, schema, where = cfg, DEFAULTS, ""
    for i, key in enumerate(keys):
        if schema is not None:
            _check_key(key, schema, where)
        sub = schema.get(key) if schema is not None else None
        if i == len(keys) - 1:
            if isinstance(value, dict) and isinstance(sub, dict) and sub:
                node[key] = _merge(node.get(key) or {}, value, sub, f"{where}{key}.")
            else:
                node[key] = copy.deepcopy(value)
            return
        if node.get(key) is None:
            node[key] = {}
        if not isinstance(node[key], dict):
            raise ConfigError(f"{where}{key} is a value ({node[key]!r}), not a section; set it as {where}{key}=...")
        node, schema, where = node[key], (sub if isinstance(sub, dict) and sub else None), f"{where}{key}."


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist; recipes live in configs/*.yaml")
    with open(path) as f:
        data = yaml.load(f, Loader=_Loader) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return without_redacted(data)


def _load_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The recipe merged over its `base:` chain (a path relative to the recipe)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {str(path)!r} inherits from itself through `base:`")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    parent = _load_chain((path.parent / base), seen + (path,))
    return _merge(parent, data, DEFAULTS, "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=3e-4` -> (["optim", "lr"], 0.0003); values are YAML, so lists and null work too."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not key=value (for example optim.lr=3e-4)")
    return key.strip().split("."), yaml.load(value, Loader=_Loader)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = (), **values: Any) -> dict:
    """DEFAULTS <- recipe at `path` (with its bases) <- dotted overrides <- `values` (nested dicts)."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        cfg = _merge(cfg, _load_chain(path), DEFAULTS, "")
        if cfg["name"] is None:
            cfg["name"] = path.stem
    cfg = apply_overrides(cfg, overrides)
    if values:
        cfg = _merge(cfg, values, DEFAULTS, "")
    return validate(cfg)


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """`cfg` with dotted key=value overrides applied (checked against DEFAULTS)."""
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        _set(cfg, *parse_override(text))
    return cfg


def _expected_type(key: str, default: Any) -> type | tuple[type, ...] | None:
    if key in TYPES:
        return TYPES[key]
    if default is None:
        return None
    if isinstance(default, bool):
        return bool
    return NUMBER if isinstance(default, float) else type(default)


def _is_a(value: Any, expected: type | tuple[type, ...]) -> bool:
    if isinstance(value, bool):   # YAML's true/false are ints to Python; only a bool key takes them
        return expected is bool or (isinstance(expected, tuple) and bool in expected)
    return isinstance(value, expected)


def _check_values(cfg: dict, schema: dict, where: str) -> None:
    """Every value against its key's type and minimum; a section given a value is named as a section."""
    for key, default in schema.items():
        name, value = f"{where}{key}", cfg.get(key)
        if isinstance(default, dict) and default:
            if not isinstance(value, dict):
                raise ConfigError(f"{name}={value!r}: {name} is a section, not a value; set its keys, e.g. "
                                  f"{name}.{next(iter(default))}=...")
            _check_values(value, default, f"{name}.")
            continue
        expected = _expected_type(name, default)
        if value is None and default is None:
            continue
        if expected is not None and not _is_a(value, expected):
            raise ConfigError(f"{name}={value!r}: expected {_TYPE_NAMES.get(expected, expected)}, got "
                              f"{type(value).__name__}")
        if name in MINIMUM and value is not None and value < MINIMUM[name]:
            raise ConfigError(f"{name}={value!r}: must be at least {MINIMUM[name]}")


def validate(cfg: dict) -> dict:
    """`cfg` checked: every value's type and range, then the settings that depend on each other."""
    _check_values(cfg, DEFAULTS, "")
    if not cfg["model"]["name"]:
        raise ConfigError("model.name is not set; pick one from `python -m models.describe --list`")
    datasets = cfg["data"]["datasets"]
    if not datasets and cfg["model"]["num_classes"] is None:
        raise ConfigError("model.num_classes is not set (or give data.datasets with num_classes each)")
    for name, ds in datasets.items():
        if not isinstance(ds, dict) or "num_classes" not in ds:
            raise ConfigError(f"data.datasets.{name} needs num_classes (and train/val shards)")
        if not _is_a(ds["num_classes"], int) or ds["num_classes"] < 1:
            raise ConfigError(f"data.datasets.{name}.num_classes={ds['num_classes']!r}: expected an integer of "
                              f"at least 1")
    if cfg["optim"]["accum_steps"] < 1:
        raise ConfigError(f"optim.accum_steps must be >= 1, got {cfg['optim']['accum_steps']}")
    amp = str(cfg["train"]["amp"]).lower()
    if amp not in ("auto", "bf16", "fp16", "none", "false"):
        raise ConfigError(f"train.amp must be auto, bf16, fp16 or none, got {cfg['train']['amp']!r}")
    bad = set(cfg["eval"]["orders"]) - {"normal", "reversed", "shuffled"}
    if bad:
        raise ConfigError(f"eval.orders has {sorted(bad)}; use normal, reversed and/or shuffled")
    return cfg


# `data.loader` values meaning the built-in VideoLoader: none, or what configs saved before it took a LoaderConfig
BUILT_IN_LOADER = (None, "pipelines.loader:VideoLoader")


def plugin_loader(cfg: dict) -> str | None:
    """The "module:Class" of the config's plugin loader; None for the built-in VideoLoader."""
    return None if cfg["data"]["loader"] in BUILT_IN_LOADER else cfg["data"]["loader"]


def datasets_of(cfg: dict) -> dict[str, dict]:
    """The run's datasets in their fixed training order: {name: {num_classes, train, val}}."""
    if cfg["data"]["datasets"]:
        return cfg["data"]["datasets"]
    d = cfg["data"]
    return {d["name"]: {"num_classes": cfg["model"]["num_classes"], "train": d["train"], "val": d["val"]}}


def save_config(cfg: dict, path: str | os.PathLike) -> None:
    """Write the resolved config, credentials redacted (`load_config` reads it back)."""
    with open(path, "w") as f:
        yaml.safe_dump(redact(cfg), f, sort_keys=False)
