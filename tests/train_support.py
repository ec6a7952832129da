"""Test helpers for train/: an in-memory loader with VideoLoader's interface and tiny registered models.

`SyntheticLoader` takes what train/data.py gives a plugin loader and yields VideoLoader's batch dicts, from
clips rendered in memory: a bright square on a noisy background moving right, left, down or up, so the
class is the direction of motion (classes 0/1 and 2/3 are time reversals of each other). Batches are a
pure function of (seed, epoch, rank, world_size), as the real loader's are. Like the real loader it has
an `index` (every video's key, the class names) and reports the videos it "cannot read" (`broken`) in
`failures`, putting stand-ins flagged valid=False in their places. Importing this module registers the
tiny models below (test-only names, prefix `test_`).
"""
from __future__ import annotations

import os
import time
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

import models
from contract.inputs import super_grid
from models.layouts import to_super_image


def render(label: int, rng: np.random.Generator, num_frames: int, size: int) -> np.ndarray:
    """(T, 3, size, size) float32: a square moving in direction `label` (0 right, 1 left, 2 down, 3 up)."""
    frames = rng.normal(0, 0.3, (1, 3, size, size)).repeat(num_frames, 0).astype(np.float32)
    side = max(2, size // 4)
    travel = size - side
    start = rng.integers(0, travel + 1)
    for t in range(num_frames):
        step = round(travel * t / max(num_frames - 1, 1))
        along = step if label % 2 == 0 else travel - step
        y, x = (start, along) if label // 2 % 2 == 0 else (along, start)
        frames[t, :, y:y + side, x:x + side] = 2.0
    return frames


class SyntheticLoader:
    """shards: "synthetic:<number of videos>"; video v has label v % num_classes and key "vid<v>".

    `class_names` (default class0, class1, ...) is what the shards' classes.txt would say; `broken` lists
    videos whose every view is replaced by a stand-in: the last good view before it, flagged invalid."""

    def __init__(self, shards, batch_size, num_frames=8, sampling="uniform", mode="train", *, contract=None,
                 split=None, num_clips=1, num_crops=1, crop_size=16, layout="BTCHW", device="cpu", device_id=0, rank=0,
                 world_size=1, seed=0, num_classes=4, grid=None, delay=0.0, die_at_batch=None, die_marker=None,
                 class_names=None, broken=(), **_):
        if contract is not None:     # what train/data.py passes a plugin loader: the model's input contract
            num_frames, crop_size, layout, grid = contract.num_frames, contract.crop_size, contract.layout, contract.grid
        self.num_videos = int(str(shards).split(":")[-1])
        names = tuple(class_names) if class_names is not None else tuple(f"class{c}" for c in range(num_classes))
        self.index = SimpleNamespace(keys=np.array([f"vid{v:05d}" for v in range(self.num_videos)]), class_names=names)
        self.broken, self.failures = set(broken), []
        self.batch_size, self.num_frames, self.mode, self.size = batch_size, num_frames, mode, crop_size
        self.views = [(0, 0)] if mode == "train" else [(c, k) for c in range(num_clips) for k in range(num_crops)]
        self.layout, self.grid, self.rank, self.world_size, self.seed = layout, grid, rank, world_size, seed
        self.num_classes, self.delay, self.epoch = num_classes, delay, 0
        self.device = torch.device("cuda", device_id) if device == "gpu" else torch.device("cpu")
        self.die_at_batch, self.die_marker = die_at_batch, die_marker   # a worker that dies once (Ray tests)

    def __len__(self) -> int:
        if self.mode == "train":
            return self.num_videos // self.world_size // self.batch_size
        per_rank = -(-self.num_videos // self.world_size)
        return -(-per_rank * len(self.views) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _views(self):
        """(video, clip, crop, valid) for this rank, padded with invalid copies to whole batches."""
        n, w = self.num_videos, self.world_size
        if self.mode == "train":
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
            rows = order[self.rank::w][: len(self) * self.batch_size]
            views = [(int(v), 0, 0, True) for v in rows]
        else:
            per_rank = -(-n // w)
            rows = range(self.rank * per_rank, min(n, (self.rank + 1) * per_rank))
            views = [(v, c, k, True) for v in rows for c, k in self.views]
        total = len(self) * self.batch_size
        return views + [views[-1][:3] + (False,)] * (total - len(views))

    def _clip(self, video: int, clip: int, crop: int) -> np.ndarray:
        key = [self.seed, self.epoch, video] if self.mode == "train" else [video, clip, crop]
        return render(video % self.num_classes, np.random.default_rng(key), self.num_frames, self.size)

    def _stand_ins(self, views: list) -> tuple[list, list]:
        """The views with those of broken videos replaced by the last good view before them, flagged
        invalid; and for each position the broken video behind it, or None."""
        out, behind, good = [], [], next(v for v in views if v[0] not in self.broken)
        for view in views:
            if view[0] in self.broken:
                out.append(good[:3] + (False,))
                behind.append(view[0])
            else:
                good = view
                out.append(view)
                behind.append(None)
        return out, behind

    def _record(self, video: int) -> None:
        """A broken video goes into `failures` once per iteration, when its batch is delivered."""
        if all(f["video_index"] != video for f in self.failures):
            self.failures.append({"key": f"vid{video:05d}", "video_index": video, "shard": "synthetic",
                                  "stage": "decode", "reason": "made unreadable by the test"})

    def __iter__(self):
        self.failures = []
        views, behind = self._stand_ins(self._views())
        for b in range(len(self)):
            if self.die_at_batch == b and self.rank == self.world_size - 1 and not os.path.exists(self.die_marker):
                open(self.die_marker, "w").close()
                os._exit(1)   # a worker process dies without any cleanup
            if self.delay:
                time.sleep(self.delay)
            chunk = views[b * self.batch_size:(b + 1) * self.batch_size]
            for broken in behind[b * self.batch_size:(b + 1) * self.batch_size]:
                if broken is not None:
                    self._record(broken)
            video = torch.from_numpy(np.stack([self._clip(v, c, k) for v, c, k, _ in chunk]))
            if self.layout == "BCTHW":
                video = video.transpose(1, 2).contiguous()
            elif self.layout == "super":
                video = to_super_image(video, self.grid)
            yield {"video": video.to(self.device), "label": torch.tensor([v % self.num_classes for v, *_ in chunk]),
                   "key": [f"vid{v:05d}" for v, *_ in chunk], "video_index": torch.tensor([v for v, *_ in chunk]),
                   "clip": torch.tensor([c for _, c, _, _ in chunk]), "crop": torch.tensor([k for _, _, k, _ in chunk]),
                   "valid": torch.tensor([ok for *_, ok in chunk])}


class SkippingLoader(SyntheticLoader):
    """A loader that can start an epoch at any batch (set_epoch's `start_batch`), as a fast loader would."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        for i, batch in enumerate(super().__iter__()):
            if i >= getattr(self, "start_batch", 0):
                yield batch


class TinyVideoNet(nn.Module):
    """Two convolutions (3-D for clips, 2-D for super images), global pooling, dropout, one head per dataset."""

    def __init__(self, num_classes, num_frames: int, layout: str, width: int = 8, dropout: float = 0.1,
                 batchnorm: bool = True, heads: dict | None = None):
        super().__init__()
        self.layout = layout
        self.super_grid = super_grid(num_frames) if layout == "super" else None
        norm = (nn.BatchNorm2d if layout == "super" else nn.BatchNorm3d) if batchnorm else (lambda _: nn.Identity())
        if layout == "super":
            layers = [nn.Conv2d(3, width, 3, padding=1), norm(width), nn.ReLU(),
                      nn.Conv2d(width, 2 * width, 3, 2, 1), norm(2 * width)]
        else:   # space, then space-time: cheap on CPU and enough to see which way the square moves
            layers = [nn.Conv3d(3, width, (1, 3, 3), padding=(0, 1, 1)), norm(width), nn.ReLU(),
                      nn.Conv3d(width, 2 * width, 3, stride=(1, 2, 2), padding=1), norm(2 * width)]
        self.features = nn.Sequential(*layers, nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        heads = heads or {"main": num_classes}   # IV-ViT's convention: one head per dataset
        self.heads = nn.ModuleDict({name: nn.Linear(2 * width, n) for name, n in heads.items()})

    def forward(self, x: torch.Tensor, dataset: str | None = None) -> torch.Tensor:
        if self.layout == "super" and x.dim() == 5:
            x = to_super_image(x)
        elif self.layout == "BTCHW":
            x = x.transpose(1, 2)
        pooled = self.features(x).flatten(2).mean(-1)
        return self.heads[dataset or next(iter(self.heads))](self.dropout(pooled))


def _register() -> None:
    known = set(models.list_models())
    for layout in ("BTCHW", "BCTHW", "super"):
        name = f"test_tiny_{layout.lower()}"
        if name not in known:
            models.register_model(name, family="test", layout=layout)(
                lambda num_classes, num_frames, img_size, pretrained=None, _layout=layout, **kw:
                TinyVideoNet(num_classes, num_frames, _layout, **kw))


_register()


def tiny_config(tmp_path, layout: str = "BCTHW", **values) -> dict:
    """A resolved config for a seconds-long CPU run on synthetic clips, written under `tmp_path`."""
    from train.config import load_config
    base = {
        "name": "tiny", "imports": ["train_support"],
        "model": {"name": f"test_tiny_{layout.lower()}", "num_classes": 4, "num_frames": 8, "img_size": 16},
        "data": {"loader": "train_support:SyntheticLoader", "batch_size": 8,
                 "train": {"shards": "synthetic:32"}, "val": {"shards": "synthetic:12"}},
        "optim": {"name": "adamw", "lr": 0.01, "weight_decay": 0.0},
        "sched": {"epochs": 2, "warmup_epochs": 0, "min_lr": 0.0},
        "train": {"log_every": 1, "device": "cpu"},
        "run": {"dir": str(tmp_path / "run")},
    }
    return load_config(None, **deep_merge(base, values))


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
