"""One training loop for every model family: the update step, the epoch loop, and `fit`.

The step: batches arrive in the model's own layout (the loader is configured from `model.contract`), get
Mixup/CutMix on the device with one CutMix box for all frames of a clip, run under bf16 autocast where
the device supports it, and accumulate gradients over `optim.accum_steps` micro-batches (and over the
datasets of a multi-dataset run, one batch each in a fixed order) before one clipped optimizer update.
The timm scheduler is stepped per update (warm-up and cosine are smooth within epochs) and the EMA
follows each update. Time spent waiting for the loader is measured around `next(batch)` and reported
as the data-wait share of wall time beside clips/s.

Samples the loader could not read arrive as stand-ins (copies of a good sample flagged valid=False):
they take no part in the loss or in Mixup, and the loader's failures of each epoch are counted in the
progress lines and metrics. An update whose batches hold no valid sample on any rank changes no weight.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable

import fsspec
import numpy as np
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn

import models
from contract import checkpoints
from contract.credentials import redact
from contract.inputs import InputContract
from models.saved import entries
from train import checkpoint as ckpt
from train.clips import autocast, input_memory_format, map_frames
from train.config import ConfigError, datasets_of, save_config
from train.data import (Source, build_loader, check_class_count, check_class_names, class_names, classes_by_dataset,
                        run_classes, stored_classes)
from train.evaluate import (combined, coverage_line, evaluate, evaluate_views, spatiotemporal_effects, summarize,
                            write_report)
from train.metrics import MetricsLogger, Progress, Throughput, plot_curves, say, write_index

# ---------------------------------------------------------------- device and precision


def pick_device(setting: str = "auto") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={setting} but no CUDA device is visible; use train.device=cpu")
    return torch.device(setting)


def pick_amp(setting, device: torch.device) -> torch.dtype | None:
    """bf16 where the device does it natively (CUDA with bf16 support); CPU runs stay in fp32 unless asked."""
    setting = str(setting).lower()
    if setting in ("none", "false"):
        return None
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[setting]


def wants_channels_last(setting, model: nn.Module, device: torch.device) -> bool:
    """Channels-last pays off for convolution-heavy models on CUDA (tensor cores read NHWC)."""
    if setting in (True, False):
        return setting
    convs = sum(isinstance(m, (nn.Conv2d, nn.Conv3d)) for m in model.modules())
    return device.type == "cuda" and convs >= 5


def model_memory_format(model: nn.Module) -> torch.memory_format:
    return torch.channels_last_3d if any(isinstance(m, nn.Conv3d) for m in model.modules()) else torch.channels_last


# ---------------------------------------------------------------- augmentation and loss


def build_mixup(aug: dict, num_classes: int) -> Mixup | None:
    if not (aug["mixup"] > 0 or aug["cutmix"] > 0 or aug["cutmix_minmax"]):
        return None
    return Mixup(mixup_alpha=aug["mixup"], cutmix_alpha=aug["cutmix"], cutmix_minmax=aug["cutmix_minmax"],
                 prob=aug["mixup_prob"], switch_prob=aug["switch_prob"], mode="batch",
                 label_smoothing=aug["label_smoothing"], num_classes=num_classes)


def build_criterion(aug: dict, mixing: bool) -> nn.Module:
    if mixing:   # smoothing is already in the soft targets
        return SoftTargetCrossEntropy()
    if aug["label_smoothing"] > 0:
        return LabelSmoothingCrossEntropy(smoothing=aug["label_smoothing"])
    return nn.CrossEntropyLoss()


def mix_clips(mixup: Mixup, x: torch.Tensor, y: torch.Tensor, layout: str, num_frames: int,
              grid: tuple[int, int] | None = None):
    """timm Mixup/CutMix on clips, one CutMix box shared by every frame of a clip.

    timm cuts its box from the last two dims of a (B, K, H, W) tensor, so frames and channels are
    folded into K: a free view for BTCHW and BCTHW batches; super images are untiled first (the box
    would otherwise land on one region of the grid) and tiled again. An odd batch cannot be paired
    and gets smoothed one-hot targets instead.
    """
    if len(x) % 2:
        return x, mixup_target(y, mixup.num_classes, lam=1.0, smoothing=mixup.label_smoothing)
    if x.dim() == 5:
        x = x.contiguous()
        _, targets = mixup(x.view(len(x), -1, *x.shape[-2:]), y)   # mixes x in place through the view
        return x, targets
    if layout != "super":   # an image batch (the image datasets of IV-ViT)
        return mixup(x, y)
    targets = None

    def mix(tiles: torch.Tensor) -> torch.Tensor:
        nonlocal targets
        b, t, c, h, w = tiles.shape
        folded, targets = mixup(tiles.reshape(b, t * c, h, w), y)
        return folded.view(b, t, c, h, w)

    return map_frames(x, layout, num_frames, mix, grid), targets


# ---------------------------------------------------------------- the trainer


class Trainer:
    """The model, its optimizer state and the loop position; `state_dict()` is an exact resume point."""

    def __init__(self, cfg: dict, model: nn.Module, sources: list[Source], *, device: torch.device,
                 val_loaders: dict | None = None, rank: int = 0, world_size: int = 1,
                 logger: MetricsLogger | None = None, save_checkpoint: Callable[[dict, dict], None] | None = None,
                 classes=None):
        self.cfg, self.model, self.sources, self.device = cfg, model, sources, device
        self.classes = classes   # what checkpoints store (contract.checkpoints: `classes`)
        self.val_loaders = val_loaders or {}
        self.rank, self.world_size = rank, world_size
        self.logger = logger or MetricsLogger(None)
        self.save_checkpoint = save_checkpoint
        self.module = ckpt.unwrap(model)
        self.contract = self.module.contract     # what the loader delivers, and what Mixup untiles by
        self.multi = bool(cfg["data"]["datasets"])
        self.amp = pick_amp(cfg["train"]["amp"], device)
        self.channels_last = wants_channels_last(cfg["train"]["channels_last"], self.module, device)
        optim, sched = cfg["optim"], cfg["sched"]

        self.accum = optim["accum_steps"]
        self.updates_per_epoch = math.ceil(len(sources[0]) / self.accum)
        global_batch = cfg["data"]["batch_size"] * world_size * self.accum
        lr = optim["lr"] * (global_batch / optim["lr_reference_batch"] if optim["lr_reference_batch"] else 1)
        self.optimizer = create_optimizer_v2(self.module, opt=optim["name"], lr=lr,
                                             weight_decay=optim["weight_decay"], momentum=optim["momentum"],
                                             filter_bias_and_bn=optim["filter_bias_and_bn"])
        self.scheduler, self.epochs = create_scheduler_v2(
            self.optimizer, sched=sched["name"], num_epochs=sched["epochs"], warmup_epochs=sched["warmup_epochs"],
            warmup_lr=sched["warmup_lr"], min_lr=sched["min_lr"], cooldown_epochs=sched["cooldown_epochs"],
            decay_milestones=sched["decay_milestones"], decay_rate=sched["decay_rate"],
            step_on_epochs=False, updates_per_epoch=self.updates_per_epoch)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        self.ema = ModelEmaV3(self.module, decay=cfg["train"]["ema_decay"]) if cfg["train"]["ema_decay"] else None

        self.mixups = {name: build_mixup(cfg["aug"], ds["num_classes"]) for name, ds in datasets_of(cfg).items()}
        self.criterion = build_criterion(cfg["aug"], any(self.mixups.values()))
        self.epoch, self.updates, self.best = 0, 0, None
        self._skip, self._pending_rng, self._saved_at = 0, None, None
        self.throughput = Throughput()
        self._loss_sum, self._loss_count = torch.zeros((), device=device), 0
        self.stand_ins, self.empty_updates = 0, 0   # samples left out of the loss, updates without any
        # Counts are summed over ranks on the CPU (gloo), so counting never waits for the GPU.
        distributed = dist.is_available() and dist.is_initialized() and world_size > 1
        self._counts = dist.new_group(backend="gloo") if distributed else None

    # ------------------------------------------------------------ one update

    def forward_loss(self, batch: dict, dataset: str) -> tuple[torch.Tensor, int]:
        """The mean loss over the batch's valid samples, and their number.

        Stand-ins (valid=False) are dropped before Mixup, so no sample is mixed with one. A batch of
        stand-ins only still runs forward and backward, with a loss of zero: DDP needs every rank's
        gradients, and a zero loss adds none.
        """
        x = batch["video"].to(self.device, non_blocking=True)
        y = batch["label"].to(self.device, non_blocking=True)
        keep = torch.as_tensor(batch["valid"]).cpu().nonzero().flatten()
        count = len(keep)
        if 0 < count < len(y):
            keep = keep.to(self.device, non_blocking=True)
            x, y = x.index_select(0, keep), y.index_select(0, keep)
        mixup = self.mixups[dataset]
        target = y
        if mixup is not None:
            if x.data_ptr() == batch["video"].data_ptr():
                x = x.clone()   # Mixup works in place; never write into the loader's own tensor
            x, target = mix_clips(mixup, x, y, self.contract.layout, self.contract.num_frames, self.contract.grid)
        if self.channels_last and (fmt := input_memory_format(x, self.contract.layout)) is not None:
            x = x.contiguous(memory_format=fmt)
        with autocast(self.device, self.amp):
            logits = self.model(x, dataset=dataset) if self.multi else self.model(x)
        loss = self.criterion(logits.float(), target)
        return (loss if count else loss * 0.0), count

    def update(self, micro_batches: int) -> None:
        """`micro_batches` batches from every source, one optimizer update."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        steps = [source for _ in range(micro_batches) for source in self.sources]
        valid = 0
        for n, source in enumerate(steps):
            began = time.perf_counter()
            batch = source.next()
            wait = time.perf_counter() - began
            last = n == len(steps) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                loss, count = self.forward_loss(batch, source.name)
                self.scaler.scale(loss / len(steps)).backward()
            if count:
                self._loss_sum += loss.detach()
                self._loss_count += 1
            valid += count
            self.stand_ins += len(batch["label"]) - count
            self.throughput.add(len(batch["label"]) * self.world_size, wait)
        if self.summed([valid])[0] == 0:   # nothing to learn from on any rank: no step, no momentum, no decay
            self.optimizer.zero_grad(set_to_none=True)
            self.empty_updates += 1
        else:
            if self.cfg["optim"]["clip_grad"]:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg["optim"]["clip_grad"])
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update(self.module, step=self.updates + 1)
        self.updates += 1
        self.scheduler.step_update(self.updates)

    def summed(self, counts: list[int]) -> list[int]:
        """`counts` summed over the ranks (every rank must call this at the same point)."""
        if self._counts is None:
            return counts
        total = torch.tensor(counts, dtype=torch.int64)
        dist.all_reduce(total, group=self._counts)
        return total.tolist()

    def failures(self) -> list[dict]:
        """The samples this rank's training loaders could not read in their current pass."""
        return [f for source in self.sources for f in source.loader.failures]

    # ------------------------------------------------------------ the loop

    @property
    def total_updates(self) -> int:
        """Updates this run will make: the schedule's, or fewer under train.max_updates."""
        planned = self.epochs * self.updates_per_epoch
        return min(planned, self.cfg["train"]["max_updates"] or planned)

    def _position_sources(self) -> None:
        primary = self.sources[0]
        primary.start(self.epoch, self._skip)
        self._skip = 0
        if self._pending_rng is not None:   # after skipping: the skipped batches drew before the checkpoint
            ckpt.restore_rng(self._pending_rng)
            self._pending_rng = None

    def run(self, progress: Progress | None = None) -> dict:
        cfg_t = self.cfg["train"]
        max_updates = cfg_t["max_updates"]
        progress = progress or Progress(self.total_updates, self.updates, enabled=self.rank == 0)
        stopped = False
        while self.epoch < self.epochs and not stopped:
            self._position_sources()
            primary = self.sources[0]
            while primary.consumed < len(primary):
                self.update(min(self.accum, len(primary) - primary.consumed))
                if self.updates % cfg_t["log_every"] == 0:
                    self._log_train(progress)
                if cfg_t["checkpoint_every"] and self.updates % cfg_t["checkpoint_every"] == 0 \
                        and primary.consumed < len(primary):
                    self.checkpoint({})
                if max_updates and self.updates >= max_updates:
                    stopped = True
                    break
            self._log_failures()
            if stopped:
                if self._saved_at != self.updates:
                    self.checkpoint({})   # a short run keeps its final state too
                break
            self.epoch += 1
            metrics = self.validate() if cfg_t["eval_every"] and (
                self.epoch % cfg_t["eval_every"] == 0 or self.epoch == self.epochs) else {}
            self.checkpoint(metrics)
            self.throughput.reset()   # the next window measures training, not validation
        return {"epoch": self.epoch, "updates": self.updates, "stopped_early": stopped, "best": self.best}

    def _log_train(self, progress: Progress) -> None:
        stats = self.throughput.read()
        failures, stand_ins, empty = self.summed([len(self.failures()), self.stand_ins, self.empty_updates])
        loss = (self._loss_sum / self._loss_count).item() if self._loss_count else None   # stand-ins only
        stats.update(loss=loss, lr=self.optimizer.param_groups[0]["lr"], failures=failures, stand_ins=stand_ins,
                     empty_updates=empty)
        progress.line(self.epoch, self.epochs, self.updates, stats)
        self.logger.log("train", stats, epoch=self.epoch, update=self.updates)
        self.throughput.reset()
        self._loss_sum.zero_()
        self._loss_count, self.stand_ins, self.empty_updates = 0, 0, 0

    def _log_failures(self) -> None:
        """The samples the training loaders could not read this epoch, from every rank: a record and a line."""
        failed = self.failures()
        if self._counts is not None:
            ranks: list = [None] * self.world_size
            dist.all_gather_object(ranks, failed, group=self._counts)
            failed = [f for part in ranks for f in part]
        self.logger.log("failures", {"count": len(failed), "samples": failed}, epoch=self.epoch,
                        update=self.updates)
        if failed and self.rank == 0:
            shown = "; ".join(f"{f['key']} ({f['stage']}: {f['reason']})" for f in failed[:3])
            say(f"epoch {self.epoch + 1}: {len(failed)} training samples could not be read and were left out "
                f"of the loss: {shown}{' ...' if len(failed) > 3 else ''} (all in metrics.jsonl)")

    def validate(self) -> dict:
        """Clip-level top-1/top-5 on each dataset's validation split (1 view per video)."""
        metrics, c = {}, self.contract
        for name, loader in self.val_loaders.items():
            kw = dict(device=self.device, layout=c.layout, num_frames=c.num_frames, grid=c.grid,
                      amp_dtype=self.amp, dataset=name if self.multi else None, channels_last=self.channels_last)
            prefix = f"{name}_" if self.multi else ""
            normal = evaluate(self.model, loader, **kw)["normal"]
            video = normal["video"]
            metrics.update({f"{prefix}top1": video["top1"], f"{prefix}top5": video["top5"],
                            f"{prefix}mean_class": video["mean_class"],
                            f"{prefix}missing": len(normal["coverage"]["missing"])})
            if self.ema is not None:
                metrics[f"{prefix}ema_top1"] = evaluate(self.ema.module, loader, **kw)["normal"]["video"]["top1"]
        if metrics:
            self.logger.log("val", metrics, epoch=self.epoch - 1, update=self.updates)
            head = next(iter(metrics.values()))
            self.best = head if self.best is None else max(self.best, head)
            if self.rank == 0:
                say(f"validation after epoch {self.epoch}: " +
                    ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()),
                    sys.stdout)
        return metrics

    # ------------------------------------------------------------ resume points

    def state_dict(self) -> dict:
        rng = ckpt.capture_rng()
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            ranks: list = [None] * self.world_size
            dist.all_gather_object(ranks, rng)   # every rank's random state resumes exactly
        else:
            ranks = [rng]
        return {**entries(self.module), "classes": self.classes, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "epoch": self.epoch, "updates": self.updates, "best": self.best,
                "sources": {s.name: s.state() for s in self.sources}, "rng": ranks,
                "world_size": self.world_size, "config": redact(self.cfg)}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.updates, self.best = state["epoch"], state["updates"], state["best"]
        self.scheduler.step_update(self.updates)
        positions = state["sources"]
        primary = self.sources[0]
        self._skip = positions[primary.name]["consumed"] if positions[primary.name]["epoch"] == self.epoch else 0
        for source in self.sources[1:]:
            source.epoch, source.consumed = positions[source.name]["epoch"], positions[source.name]["consumed"]
        if state["world_size"] == self.world_size:
            self._pending_rng = state["rng"][self.rank]
        elif self.rank == 0:
            say(f"resuming on {self.world_size} workers from a {state['world_size']}-worker checkpoint: "
                f"batches continue exactly, random draws (mixup, drop path) do not", sys.stdout)

    def checkpoint(self, metrics: dict) -> None:
        if self.save_checkpoint is not None:
            self.save_checkpoint(self.state_dict(), metrics)
        self._saved_at = self.updates


# ---------------------------------------------------------------- a whole run


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def import_plugins(cfg: dict) -> None:
    import importlib
    for name in cfg["imports"]:
        importlib.import_module(name)


def build_model(cfg: dict) -> nn.Module:
    """The configured model; a multi-dataset run asks for one head per dataset (`heads={name: classes}`)."""
    m = cfg["model"]
    options = dict(m["options"])
    num_classes = m["num_classes"]
    if cfg["data"]["datasets"]:
        options["heads"] = {name: d["num_classes"] for name, d in cfg["data"]["datasets"].items()}
        num_classes = next(iter(options["heads"].values()))
    return models.build(m["name"], num_classes=num_classes, num_frames=m["num_frames"], img_size=m["img_size"],
                        pretrained=m["pretrained"], **options)


def new_run_dir(cfg: dict) -> Path:
    if cfg["run"]["dir"]:
        return Path(cfg["run"]["dir"])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg["run"]["root"]) / f"{cfg['name']}-{stamp}"


def checkpoint_root(cfg: dict, run_dir: Path) -> str:
    return cfg["run"]["storage"] or str(run_dir / "checkpoints")


def setup(cfg: dict, *, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
          prepare_model: Callable[[nn.Module], nn.Module] | None = None,
          model: nn.Module | None = None) -> tuple[nn.Module, torch.device]:
    """Model on its device, initialised from `init_from` if set, wrapped by `prepare_model` (DDP).
    `model`: one already built (from a checkpoint's build record) instead of the config's."""
    import_plugins(cfg)
    device = device or pick_device(cfg["train"]["device"])
    if cfg["train"]["deterministic"]:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    seed_everything(cfg["seed"])   # identical initial weights on every rank
    model = model if model is not None else build_model(cfg)
    if cfg["init_from"]:
        report = ckpt.load_weights(model, cfg["init_from"], cfg["run"]["storage_options"])
        if rank == 0:
            say(f"initialised {report['loaded']} tensors from {cfg['init_from']}; kept the initial value of "
                f"{len(report['skipped'])}: {report['skipped'][:8]}{' ...' if len(report['skipped']) > 8 else ''}",
                sys.stdout)
    model.to(device)
    if wants_channels_last(cfg["train"]["channels_last"], model, device):
        model.to(memory_format=model_memory_format(model))
    if prepare_model is not None:
        model = prepare_model(model)
    if cfg["train"]["compile"]:
        model = torch.compile(model)
    seed_everything(cfg["seed"] + rank)   # different augmentation and drop-path draws per rank
    return model, device


def build_sources(cfg: dict, contract: InputContract, device, rank: int,
                  world_size: int) -> tuple[list[Source], dict]:
    """Each dataset's training Source and validation loader (when it has val shards: their classes are
    checked at the start, even if the run validates only at its end)."""
    train, val = [], {}
    kw = dict(contract=contract, device=device, rank=rank, world_size=world_size)
    for i, name in enumerate(datasets_of(cfg)):
        train.append(Source(name, build_loader(cfg, name, "train", **kw), cycle=i > 0))
        if (datasets_of(cfg)[name].get("val") or {}).get("shards"):
            val[name] = build_loader(cfg, name, "val", **kw)
    return train, val


def final_evaluation(cfg: dict, model: nn.Module, device, *, rank: int = 0, world_size: int = 1,
                     checkpoint: str | None = None, classes: dict | None = None,
                     classes_from: str = "the model") -> tuple[dict, dict]:
    """The papers' test protocol: clips x crops views per video, every configured frame order.

    `classes` ({dataset: names} of `classes_from`: a checkpoint, the training shards) must be the
    validation shards' classes, else the accuracy would compare labels of two lists. Returns the
    report (JSON-ready) and the scores behind it ({dataset: {order: ViewScores}}, every rank's views).
    """
    module = ckpt.unwrap(model)
    ev = cfg["eval"]
    amp = pick_amp(cfg["train"]["amp"], device)
    multi = bool(cfg["data"]["datasets"])
    contract = module.contract
    results, scores, coverage, names = {}, {}, {}, {}
    for name, ds in datasets_of(cfg).items():
        loader = build_loader(cfg, name, "val", contract=contract, device=device, rank=rank,
                              world_size=world_size, views=(ev["clips"], ev["crops"]), batch_size=ev["batch_size"])
        names[name] = class_names(loader)
        source = f"the val shards ({ds['val']['shards']})"
        check_class_count(ds["num_classes"], f"data.datasets.{name}.num_classes" if multi else "model.num_classes",
                          names[name], source)
        check_class_names((classes or {}).get(name), classes_from, names[name], source,
                          fix="evaluate on shards of the classes the model was trained on")
        views = evaluate_views(model, loader, orders=tuple(ev["orders"]), device=device, layout=contract.layout,
                               num_frames=contract.num_frames, grid=contract.grid, amp_dtype=amp,
                               dataset=name if multi else None, seed=cfg["seed"], progress=True,
                               channels_last=wants_channels_last(cfg["train"]["channels_last"], module, device))
        scores[name] = {order: v for order, (v, _) in views.items()}
        results[name] = {order: summarize(v) for order, v in scores[name].items()}
        coverage[name] = combined([c for _, c in views.values()])
        names[name] = names[name] if names[name] is not None else (classes or {}).get(name)
    report = {"model": cfg["model"]["name"], "dataset": ", ".join(results), "checkpoint": checkpoint,
              "views": ev["clips"] * ev["crops"], "clips": ev["clips"], "crops": ev["crops"],
              "num_frames": contract.num_frames, "coverage": coverage,
              "classes": {n: list(v) if v is not None else None for n, v in names.items()}, "results": results}
    if ev["reference"]:
        with fsspec.open(ev["reference"]) as f:
            tsn = json.load(f)
        report["effects"] = {name: spatiotemporal_effects(results[name], tsn["results"][name])
                             for name in results if name in tsn["results"]}
    return report, scores


def check_run(cfg: dict, store: checkpoints.CheckpointStore, resuming: bool) -> None:
    """Refuse, before any work, what would spoil a run: another run's checkpoints, a missing reference."""
    if not resuming and store.names():
        raise ConfigError(f"the run folder's checkpoint store {store.root} already holds checkpoints; continue "
                          f"that run with run.resume=auto, or give another run.dir")
    reference = cfg["eval"]["reference"]
    if reference and not fsspec.core.url_to_fs(reference)[0].exists(reference):
        raise ConfigError(f"eval.reference {reference!r} does not exist; give the eval_report.json of a finished "
                          f"TSN run (configs/sample_tsn.yaml) or set eval.reference=null")


def fit(cfg: dict, *, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
        prepare_model: Callable[[nn.Module], nn.Module] | None = None,
        save_checkpoint: Callable[[dict, dict], None] | None = None, resume_state: dict | None = None,
        run_dir: str | Path | None = None) -> dict:
    """Train (and finally evaluate) one run; returns a summary with the run folder and final metrics.

    The defaults run one process that writes checkpoints to `run.storage` (or the run folder) and
    resumes from `run.resume`; Ray Train passes its own `prepare_model`, `save_checkpoint` and
    `resume_state` instead (train.ray_train). Nothing is written before the model, the loaders and the
    classes have been checked, so a run that cannot start leaves no run folder behind.
    """
    run_dir = Path(run_dir) if run_dir else new_run_dir(cfg)
    lead = rank == 0
    store = checkpoints.CheckpointStore(checkpoint_root(cfg, run_dir), cfg["train"]["keep_checkpoints"],
                                 cfg["run"]["storage_options"])
    check_run(cfg, store, resuming=resume_state is not None or bool(cfg["run"]["resume"]))
    resumed_from = "the Ray checkpoint"
    if resume_state is None and cfg["run"]["resume"]:
        resumed_from = store.latest() if cfg["run"]["resume"] == "auto" else cfg["run"]["resume"]
        if resumed_from:
            resume_state = checkpoints.load(resumed_from, cfg["run"]["storage_options"])
    model, device = setup(cfg, rank=rank, world_size=world_size, device=device, prepare_model=prepare_model)
    module = ckpt.unwrap(model)
    sources, val_loaders = build_sources(cfg, module.contract, device, rank, world_size)
    classes = run_classes(cfg, {s.name: s.loader for s in sources}, val_loaders)
    if resume_state is not None:
        for name, stored in classes_by_dataset(resume_state.get("classes"), list(classes)).items():
            check_class_names(stored, f"checkpoint {resumed_from}", classes[name],
                              f"the train shards ({datasets_of(cfg)[name]['train']['shards']})",
                              fix="resume on the shards the run was started on")
    if lead:
        for name in (n for n, names in classes.items() if names is None):
            say(f"note: the {name} shards list no classes (no classes.txt beside their splits), so the class "
                f"count and names are not checked")
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if resume_state is not None:
            say(f"resuming from {resumed_from}: epoch {resume_state['epoch']}, update {resume_state['updates']}",
                sys.stdout)
    if save_checkpoint is None:
        def save_checkpoint(state: dict, metrics: dict) -> None:
            if lead:
                store.save(state)
    logger = MetricsLogger(run_dir, enabled=lead)
    several = bool(cfg["data"]["datasets"])
    trainer = Trainer(cfg, model, sources, device=device, val_loaders=val_loaders, rank=rank,
                      world_size=world_size, logger=logger, save_checkpoint=save_checkpoint,
                      classes=stored_classes(classes, several))
    if resume_state is not None:
        trainer.load_state_dict(resume_state)
    try:
        summary = trainer.run()
        if cfg["eval"]["at_end"]:
            report, scores = final_evaluation(cfg, trainer.ema.module if trainer.ema else model, device, rank=rank,
                                              world_size=world_size, checkpoint=store.latest() if lead else None,
                                              classes=classes, classes_from="the training shards")
            report["weights"] = "ema" if trainer.ema else "model"
            summary["eval"] = report
            if lead:
                write_report(report, run_dir, scores)
                say(coverage_line(report))
    finally:
        logger.close()
    if lead:
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
        write_index(run_dir)
    summary.update(run_dir=str(run_dir), model=module)
    return summary
