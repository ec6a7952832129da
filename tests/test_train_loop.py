"""The training step and loop: augmentation on clips, accumulation, schedules, EMA, multi-dataset runs,
what a run writes, recipes and the command line."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from timm.data import Mixup
from train_support import tiny_config

from models.layouts import to_super_image
import models
from contract import checkpoints
from train import checkpoint as ckpt
from train import cli
from train.clips import untile
from train.config import ConfigError, load_config
from train.loop import Trainer, fit, mix_clips, pick_amp
from train.metrics import MetricsLogger, Progress, read_metrics

REPO = Path(__file__).resolve().parent.parent


def cutmix_only(num_classes=4) -> Mixup:
    return Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, label_smoothing=0.0, num_classes=num_classes)


def frames_with_ids(batch=4, frames=8, size=12) -> torch.Tensor:
    """(B, T, C, H, W) where every pixel holds 100 * clip + frame + 1: a mixed pixel shows its source clip."""
    clip = torch.arange(batch).view(-1, 1, 1, 1, 1) * 100.0
    frame = torch.arange(frames).view(1, -1, 1, 1, 1) + 1.0
    return (clip + frame).expand(batch, frames, 3, size, size).contiguous()


# ---------------------------------------------------------------- augmentation on clips

@pytest.mark.parametrize("layout", ["BTCHW", "BCTHW", "super"])
def test_cutmix_cuts_one_box_shared_by_every_frame_of_a_clip(layout):
    np.random.seed(3)
    clips = frames_with_ids()
    to_layout = {"BTCHW": lambda f: f.clone(), "BCTHW": lambda f: f.transpose(1, 2).contiguous(),
                 "super": to_super_image}[layout]
    from_layout = {"BTCHW": lambda x: x, "BCTHW": lambda x: x.transpose(1, 2),
                   "super": lambda x: untile(x, 8)[:, :8]}[layout]
    mixed, targets = mix_clips(cutmix_only(), to_layout(clips), torch.arange(4), layout, num_frames=8)
    frames = from_layout(mixed)
    pasted = frames != clips                        # where clip b got pixels of the flipped batch
    assert pasted.any()
    for t in range(8):
        assert torch.equal(pasted[:, t], pasted[:, 0]), f"frame {t} has another box"
    assert torch.equal(frames[pasted], clips.flip(0)[pasted])   # pasted pixels come from the partner clip
    box_share = pasted[0, 0, 0].float().mean().item()
    assert torch.allclose(targets[0, 0], torch.tensor(1 - box_share)) and torch.allclose(targets.sum(1), torch.ones(4))


def test_mixing_super_images_keeps_blank_tiles_blank():
    np.random.seed(0)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, label_smoothing=0.1, num_classes=4)
    x = to_super_image(frames_with_ids(frames=7))    # 7 frames on a 3x3 grid: 2 blank tiles
    mixed, _ = mix_clips(mixup, x, torch.arange(4), "super", num_frames=7)
    assert mixed.shape == x.shape
    assert (untile(mixed, 7)[:, 7:] == 0).all()


def test_an_odd_batch_is_not_mixed_but_gets_smoothed_targets():
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, label_smoothing=0.1, num_classes=4)
    x = frames_with_ids(batch=3)
    mixed, targets = mix_clips(mixup, x.clone(), torch.tensor([0, 1, 2]), "BTCHW", num_frames=8)
    assert torch.equal(mixed, x)
    assert torch.allclose(targets[0], torch.tensor([0.925, 0.025, 0.025, 0.025]))


# ---------------------------------------------------------------- the loop

def test_training_learns_classes_that_only_motion_tells_apart(tmp_path):
    summary = fit(tiny_config(tmp_path, sched={"epochs": 5}, data={"train": {"shards": "synthetic:64"}},
                              train={"log_every": 100}, eval={"at_end": False}))
    assert summary["best"] >= 50      # chance is 25 %: four directions of motion


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    recipe = dict(model={"options": {"dropout": 0.0, "batchnorm": False}}, optim={"name": "sgd", "lr": 0.5},
                  sched={"epochs": 1}, train={"eval_every": 0}, eval={"at_end": False})
    large = fit(tiny_config(tmp_path / "large", data={"batch_size": 8}, **recipe))
    accumulated = fit(tiny_config(tmp_path / "accum", data={"batch_size": 4}, **{**recipe, "optim": {
        **recipe["optim"], "accum_steps": 2}}))
    assert large["updates"] == accumulated["updates"] == 4
    for (name, a), b in zip(large["model"].state_dict().items(), accumulated["model"].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_learning_rate_warms_up_then_follows_the_cosine_per_update(tmp_path):
    run = fit(tiny_config(tmp_path, sched={"epochs": 4, "warmup_epochs": 1, "warmup_lr": 1e-4, "min_lr": 1e-5},
                          train={"eval_every": 0}, eval={"at_end": False}))
    lrs = [r["lr"] for r in read_metrics(Path(run["run_dir"]) / "metrics.jsonl") if r["split"] == "train"]
    assert len(lrs) == 16                   # 4 updates per epoch; record n holds the rate update n+1 uses
    rising, falling = lrs[:4], lrs[3:]
    assert rising == sorted(rising) and falling == sorted(falling, reverse=True)
    # timm's warm-up replaces the cosine's first epoch: it joins the cosine at update 4 of 16
    assert math.isclose(max(lrs), 1e-5 + (0.01 - 1e-5) * (1 + math.cos(math.pi * 4 / 16)) / 2, rel_tol=1e-6)
    assert math.isclose(lrs[-1], 1e-5, rel_tol=1e-6)


def test_the_learning_rate_scales_linearly_with_the_global_batch(tmp_path):
    cfg = tiny_config(tmp_path, optim={"lr": 0.1, "lr_reference_batch": 256, "accum_steps": 2})
    from train.loop import build_sources, setup
    model, device = setup(cfg)
    sources, _ = build_sources(cfg, ckpt.unwrap(model).contract, device, rank=0, world_size=4)
    trainer = Trainer(cfg, model, sources, device=device, world_size=4)
    assert trainer.optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.1 * 8 * 4 * 2 / 256)


def test_progress_lines_and_metrics_report_rate_data_wait_and_eta(tmp_path, capsys):
    run = fit(tiny_config(tmp_path, data={"options": {"delay": 0.3}}, train={"max_updates": 3, "eval_every": 0},
                          eval={"at_end": False}))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch")]
    assert len(lines) == 3 and all("clips/s" in line and "data wait" in line and "ETA" in line for line in lines)
    records = [r for r in read_metrics(Path(run["run_dir"]) / "metrics.jsonl") if r["split"] == "train"]
    assert all(r["clips_per_s"] > 0 for r in records)
    assert np.mean([r["data_wait"] for r in records]) > 0.3   # the loader sleeps 0.3 s before each batch


class Batches:
    """A loader that hands out given batches (an update's worth, made by the test)."""

    def __init__(self, batches: list[dict]):
        self.batches, self.failures = batches, []

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return iter(self.batches)


def trainer_on(tmp_path, batches: list[dict], **values) -> Trainer:
    from train.data import Source
    from train.loop import setup
    cfg = tiny_config(tmp_path, **values)
    model, device = setup(cfg)
    return Trainer(cfg, model, [Source("main", Batches(batches))], device=device)


def some_clips(n=8) -> dict:
    from train_support import SyntheticLoader
    return next(iter(SyntheticLoader(f"synthetic:{n}", batch_size=n, num_frames=8, crop_size=16, layout="BCTHW")))


def test_stand_ins_take_no_part_in_the_loss_or_in_mixup(tmp_path):
    """The loss over a batch with stand-ins is the loss over its valid samples alone, Mixup included."""
    batch = some_clips()
    valid = torch.tensor([True, True, False, True, True, False, True, True])
    flagged = {**batch, "valid": valid}
    kept = {k: v[valid] if isinstance(v, torch.Tensor) else [x for x, ok in zip(v, valid) if ok]
            for k, v in batch.items()}
    trainer = trainer_on(tmp_path, [batch], aug={"mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1},
                         model={"options": {"dropout": 0.0, "batchnorm": False}})
    losses = {}
    for name, b in (("flagged", flagged), ("kept", kept), ("all", batch)):
        np.random.seed(0)                                   # the same Mixup draws for each
        losses[name] = trainer.forward_loss(b, "main")
    assert losses["flagged"][1] == losses["kept"][1] == 6
    assert torch.equal(losses["flagged"][0], losses["kept"][0])
    assert not torch.equal(losses["flagged"][0], losses["all"][0])   # the two stand-ins would have counted


def test_an_update_of_stand_ins_only_changes_no_weight_and_logs_no_nan(tmp_path):
    batch = {**some_clips(), "valid": torch.zeros(8, dtype=torch.bool)}
    # SGD with momentum and weight decay would move every weight even on a zero gradient
    trainer = trainer_on(tmp_path, [batch], optim={"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.1})
    before = {k: v.clone() for k, v in trainer.module.named_parameters()}
    trainer.logger = MetricsLogger(tmp_path / "run")
    trainer.update(1)
    trainer._log_train(Progress(trainer.total_updates, enabled=False))
    trainer.logger.close()
    for name, value in trainer.module.named_parameters():
        assert torch.equal(value, before[name]), name
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert trainer.updates == 1 and record["empty_updates"] == 1 and record["stand_ins"] == 8
    assert record["loss"] is None                          # no loss over no sample: not NaN


def test_progress_lines_and_metrics_carry_the_loader_failures_of_each_epoch(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = fit(tiny_config(tmp_path, data={"train": {"options": {"broken": [3, 7]}}}, train={"eval_every": 0},
                          eval={"at_end": False}))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch")]
    progress = [line for line in lines if "| update " in line]
    assert len(progress) == 8 and all("| failed " in line for line in progress)
    assert progress[3].split("| failed ")[1].startswith("2 |") and progress[7].split("| failed ")[1].startswith("2 |")
    assert sum("2 training samples could not be read" in line for line in lines) == 2   # a line per epoch
    records = read_metrics(Path(run["run_dir"]) / "metrics.jsonl")
    per_epoch = [r for r in records if r["split"] == "failures"]
    assert [(r["epoch"], r["count"]) for r in per_epoch] == [(0, 2), (1, 2)]
    assert {s["key"] for s in per_epoch[0]["samples"]} == {"vid00003", "vid00007"}
    train = [r for r in records if r["split"] == "train"]
    for epoch in (0, 1):                 # each broken video stood in once per epoch, left out of the loss
        assert sum(r["stand_ins"] for r in train if r["epoch"] == epoch) == 2
    assert max(r["failures"] for r in train if r["epoch"] == 1) == 2   # counted afresh in the second epoch
    events = EventAccumulator(str(Path(run["run_dir"]) / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("failures/count")] == [2, 2]


def test_a_run_stopped_by_max_updates_saves_its_final_state_and_counts_its_eta_to_that_stop(tmp_path, capsys):
    run = fit(tiny_config(tmp_path, sched={"epochs": 30}, train={"max_updates": 3, "eval_every": 0},
                          eval={"at_end": False}))
    state = checkpoints.load(str(tmp_path / "run"))          # the README's next step: eval --checkpoint runs/<run>
    assert run["updates"] == state["updates"] == 3
    lines = [line for line in capsys.readouterr().err.splitlines() if "| update " in line]
    # the ETA is the time for the updates left of these 3, not of the schedule's 120
    assert [line.split("| update ")[1].split(" |")[0] for line in lines] == ["1/3", "2/3", "3/3"]


def test_a_run_folder_holds_config_metrics_tensorboard_checkpoints_curves_and_report(tmp_path):
    cfg = tiny_config(tmp_path, sched={"epochs": 1}, eval={"clips": 2, "crops": 3, "orders": ["normal", "reversed"]})
    run = Path(fit(cfg)["run_dir"])
    assert load_config(run / "config.yaml") == cfg
    splits = {r["split"] for r in read_metrics(run / "metrics.jsonl")}
    assert splits == {"train", "failures", "val"}
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "latest").read_text().startswith("epoch0001")
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((run / "eval_report.json").read_text())
    assert report["views"] == 6 and set(report["results"]["main"]) == {"normal", "reversed"}
    assert report["results"]["main"]["normal"]["video"]["count"] == 12
    assert "| reversed |" in (run / "eval_report.md").read_text()


def test_ema_weights_follow_the_model_and_are_validated_too(tmp_path):
    run = fit(tiny_config(tmp_path, sched={"epochs": 1}, train={"ema_decay": 0.5}, eval={"at_end": False}))
    val = [r for r in read_metrics(Path(run["run_dir"]) / "metrics.jsonl") if r["split"] == "val"]
    assert "ema_top1" in val[-1]
    state = checkpoints.load(checkpoints.CheckpointStore(f"{run['run_dir']}/checkpoints").latest())
    name = "features.0.weight"
    ema, model = state["ema"][f"module.{name}"], state["model"][name]
    assert not torch.equal(ema, model)


def test_several_datasets_train_in_a_fixed_alternating_order_one_batch_each(tmp_path):
    """IV-ViT's recipe: per update, one batch of each dataset, each through its own head."""
    datasets = {"videos": {"num_classes": 4, "train": {"shards": "synthetic:32"}, "val": {"shards": "synthetic:8"}},
                "images": {"num_classes": 2, "train": {"shards": "synthetic:16", "options": {"num_classes": 2}},
                           "val": {"shards": "synthetic:8", "options": {"num_classes": 2}}}}
    cfg = tiny_config(tmp_path, data={"datasets": datasets}, sched={"epochs": 1}, eval={"orders": ["normal"]})
    from train_support import TinyVideoNet
    calls = []
    original = TinyVideoNet.forward

    def spy(self, x, dataset=None):
        if self.training:
            calls.append(dataset)
        return original(self, x, dataset)

    TinyVideoNet.forward = spy
    try:
        run = fit(cfg)
    finally:
        TinyVideoNet.forward = original
    assert calls == ["videos", "images"] * 4           # the video set's 4 batches set the epoch; images cycle
    heads = run["model"].heads
    assert heads["videos"].out_features == 4 and heads["images"].out_features == 2
    report = json.loads((Path(run["run_dir"]) / "eval_report.json").read_text())
    assert set(report["results"]) == {"videos", "images"}


@pytest.mark.parametrize("layout", ["BTCHW", "BCTHW", "super"])
def test_every_layout_trains_with_mixup_cutmix_label_smoothing_and_channels_last(tmp_path, layout):
    run = fit(tiny_config(tmp_path, layout=layout, aug={"mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1},
                          train={"max_updates": 2, "eval_every": 0, "channels_last": True}, eval={"at_end": False}))
    losses = [r["loss"] for r in read_metrics(Path(run["run_dir"]) / "metrics.jsonl") if r["split"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


FAMILIES = {   # a small instance of each family the registry holds: (options, frame size, frames)
    "tsm_r18": ({"width_mult": 0.125}, 32, 4),
    "tam_r18": ({"width_mult": 0.125}, 32, 4),
    "i3d_r18": ({"width_mult": 0.125}, 32, 4),
    "r2plus1d_r18": ({"width_mult": 0.125}, 32, 4),
    "sifar_base_12_8x192": ({"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]}, 64, 8),
    "sifa_r50": ({}, 32, 4),
    "ivvit_tiny_patch16_224": ({"depth": 2}, 32, 4),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_every_model_family_trains_and_evaluates_through_the_same_loop(tmp_path, name):
    options, size, frames = FAMILIES[name]
    run = fit(tiny_config(tmp_path, model={"name": name, "options": options, "img_size": size, "num_frames": frames},
                          data={"batch_size": 2, "train": {"shards": "synthetic:4"}, "val": {"shards": "synthetic:2"}},
                          aug={"mixup": 0.8, "cutmix": 1.0}, train={"max_updates": 1, "eval_every": 0},
                          eval={"orders": ["normal", "reversed"]}))
    results = run["eval"]["results"]["main"]
    assert run["updates"] == 1 and results["reversed"]["video"]["count"] == 2


def test_a_super_image_model_with_its_own_grid_gets_that_grid_in_training_and_evaluation(tmp_path):
    """SIFAR checks the super image's shape, so a loader tiling the default 3x3 would fail here."""
    run = fit(tiny_config(tmp_path, layout="super", model={"name": "sifar_resnet50",
                                                           "options": {"arch": "resnet18", "grid": "1x8"}},
                          aug={"mixup": 0.8, "cutmix": 1.0}, train={"max_updates": 2, "eval_every": 0},
                          eval={"orders": ["normal", "reversed"]}))
    assert run["model"].super_grid == (1, 8)
    assert run["updates"] == 2 and run["eval"]["results"]["main"]["reversed"]["video"]["count"] == 12


def test_a_loader_grid_that_differs_from_the_models_is_refused_and_names_both(tmp_path):
    cfg = tiny_config(tmp_path, layout="super", model={"name": "sifar_resnet50",
                                                       "options": {"arch": "resnet18", "grid": "1x8"}},
                      data={"options": {"grid": "2x4"}})
    with pytest.raises(ConfigError, match="tile a 2x4 grid but the model reads 1x8"):
        fit(cfg)


def test_bf16_autocast_is_used_where_asked_and_auto_keeps_the_cpu_in_fp32(tmp_path):
    assert pick_amp("auto", torch.device("cpu")) is None
    assert pick_amp("bf16", torch.device("cpu")) == torch.bfloat16
    run = fit(tiny_config(tmp_path, train={"amp": "bf16", "max_updates": 2, "eval_every": 0}, eval={"at_end": False}))
    train = [r for r in read_metrics(Path(run["run_dir"]) / "metrics.jsonl") if r["split"] == "train"]
    assert train and all(math.isfinite(r["loss"]) for r in train)


def test_fp16_autocast_trains_with_a_grad_scaler_whose_state_the_checkpoint_carries(tmp_path):
    run = fit(tiny_config(tmp_path, train={"amp": "fp16", "max_updates": 2, "checkpoint_every": 1, "eval_every": 0},
                          eval={"at_end": False}))
    train = [r for r in read_metrics(Path(run["run_dir"]) / "metrics.jsonl") if r["split"] == "train"]
    assert train and all(math.isfinite(r["loss"]) for r in train)
    scaler = checkpoints.load(checkpoints.CheckpointStore(f"{run['run_dir']}/checkpoints").latest())["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] == 2     # two steps taken without overflow


def test_a_compiled_model_trains_and_checkpoints_weights_that_a_plain_model_loads(tmp_path):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    run = fit(tiny_config(tmp_path, train={"compile": True, "max_updates": 2, "checkpoint_every": 1,
                                           "eval_every": 0}, eval={"at_end": False}))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1     # the steps ran through dynamo
    weights = checkpoints.load(checkpoints.CheckpointStore(f"{run['run_dir']}/checkpoints").latest())["model"]
    plain = models.build("test_tiny_bcthw", num_classes=4, num_frames=8, img_size=16)
    plain.load_state_dict(weights)                         # no `_orig_mod.` prefixes: strict load succeeds
    clips = torch.randn(2, 3, 8, 16, 16)
    torch.testing.assert_close(plain.eval()(clips), run["model"].eval()(clips), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- recipes and the command line

def test_a_missing_tsn_reference_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="eval.reference .*nothing.json.* does not exist"):
        fit(tiny_config(tmp_path, eval={"reference": str(tmp_path / "nothing.json")}))
    assert not (tmp_path / "run").exists()


def test_a_mistyped_key_is_an_error_that_names_the_nearest_real_key():
    with pytest.raises(ConfigError, match=r"'optim\.lr_reference_bach'; did you mean 'optim\.lr_reference_batch'"):
        load_config(REPO / "configs" / "sample_tsm.yaml", ["optim.lr_reference_bach=256"])


def test_numbers_in_exponent_form_are_numbers_in_recipes_and_overrides(tmp_path):
    (tmp_path / "r.yaml").write_text("model: {name: tsn_r18, num_classes: 8}\noptim: {lr: 1e-4}\n")
    cfg = load_config(tmp_path / "r.yaml", ["optim.weight_decay=5e-5"])
    assert cfg["optim"]["lr"] == 1e-4 and cfg["optim"]["weight_decay"] == 5e-5


def test_a_recipe_inherits_its_base_and_overrides_win(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": {"name": "tsn_r18", "num_classes": 8},
                                                        "optim": {"lr": 0.01, "name": "sgd"}}))
    (tmp_path / "f16.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "model": {"num_frames": 16}}))
    cfg = load_config(tmp_path / "f16.yaml", ["optim.lr=0.02", "eval.orders=[normal,shuffled]"])
    assert (cfg["model"]["name"], cfg["model"]["num_frames"], cfg["optim"]["name"]) == ("tsn_r18", 16, "sgd")
    assert cfg["optim"]["lr"] == 0.02 and cfg["eval"]["orders"] == ["normal", "shuffled"] and cfg["name"] == "f16"


def test_a_free_form_section_given_whole_replaces_the_base_one_and_a_dotted_key_sets_one_entry(tmp_path):
    (tmp_path / "swin.yaml").write_text(yaml.safe_dump({"model": {"name": "sifar_base_12_8x192", "num_classes": 8,
                                                                  "options": {"embed_dim": 32, "depths": [1, 1, 2, 1]}}}))
    (tmp_path / "cnn.yaml").write_text(yaml.safe_dump({"base": "swin.yaml", "model": {
        "name": "sifar_resnet50", "options": {"arch": "resnet18"}}}))
    cfg = load_config(tmp_path / "cnn.yaml", ["model.options.drop_rate=0.2", "data.datasets.k400.num_classes=400"])
    assert cfg["model"]["options"] == {"arch": "resnet18", "drop_rate": 0.2}
    assert cfg["data"]["datasets"] == {"k400": {"num_classes": 400}}
    assert load_config(tmp_path / "cnn.yaml", ["model.options={arch: resnet34}"])["model"]["options"] == {"arch": "resnet34"}


CODE = ["imports=[train_support]", "data.loader=train_support:SyntheticLoader"]   # never read from a checkpoint


def test_the_command_line_fits_then_evaluates_a_checkpoint(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    cfg = tiny_config(tmp_path)
    recipe.write_text(yaml.safe_dump({k: cfg[k] for k in ("imports", "model", "data", "optim")}))
    run = cli.main(["fit", "--config", str(recipe), "sched.epochs=1", "train.eval_every=0", "eval.at_end=false",
                    "--run-dir", str(tmp_path / "run")])
    checkpoint = str(sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))[-1])
    report = cli.main(["eval", "--checkpoint", checkpoint, *CODE, "eval.clips=2", "eval.orders=[normal,shuffled]"])
    assert run["updates"] == 4
    assert report["results"]["main"]["shuffled"]["video"]["count"] == 12 and report["views"] == 2
    assert len(list((tmp_path / "run").glob("eval-*/eval_report.md"))) == 1   # beside the run, not over its report


# ---------------------------------------------------------------- end to end on real shards

@pytest.fixture(scope="module")
def sample_shards(tmp_path_factory) -> str:
    """The embedded motion dataset (4 classes, small) written as real VP9 shards by the real shard job."""
    from test_video_pipeline import loopback_ray, run_shard_job

    from shards.job import transcode_options
    from shards.sample_dataset import make_sample_dataset
    root = tmp_path_factory.mktemp("sample")
    source = make_sample_dataset(root / "source", num_classes=4, train_per_class=4, val_per_class=2,
                                 size=(96, 72), fps=15, seconds=1, broken=False)
    with loopback_ray():
        run_shard_job(source, root / "shards", transcode=transcode_options(short_side=72, codec="vp9", gop=8))
    return str(root / "shards")


@pytest.mark.parametrize("recipe", ["sample_tsm", "sample_sifar"])
def test_a_sample_recipe_trains_and_evaluates_end_to_end_on_real_shards(tmp_path, sample_shards, recipe):
    shards = [f"data.train.shards={sample_shards}", f"data.val.shards={sample_shards}", "model.num_classes=4"]
    run = cli.main(["fit", "--config", str(REPO / "configs" / f"{recipe}.yaml"), *shards, "sched.epochs=1",
                    "data.batch_size=4", "--run-dir", str(tmp_path / "run")])
    assert run["updates"] == 4                                     # 16 training clips, 4 per batch
    report = json.loads((tmp_path / "run" / "eval_report.json").read_text())
    assert {o: r["video"]["count"] for o, r in report["results"]["main"].items()} == \
        {"normal": 8, "reversed": 8, "shuffled": 8}                # every validation video, once per order
    again = cli.main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoints"), "eval.orders=[normal]"])
    assert again["results"]["main"]["normal"] == report["results"]["main"]["normal"]


def test_a_damaged_shard_shows_its_failures_in_the_fit_metrics_and_fails_eval_unless_allowed(tmp_path,
                                                                                             sample_shards):
    """Half a training tar cut off: the samples past the cut are counted in the run's metrics, and an
    evaluation of that split exits non-zero, listing them, unless --allow-missing is given."""
    import shutil

    import pyarrow.parquet as pq
    shards = tmp_path / "shards"
    shutil.copytree(sample_shards, shards)
    index = pq.read_table(shards / "train" / "index.parquet").to_pylist()
    tar = shards / index[0]["shard"]
    cut = tar.stat().st_size // 2
    tar.write_bytes(tar.read_bytes()[:cut])
    lost = {r["key"] for r in index if r["shard"] == index[0]["shard"] and r["offset"] + r["size"] > cut}
    assert 0 < len(lost) < len(index)

    data = [f"data.train.shards={shards}", f"data.val.shards={shards}", "data.val.options.split=train",
            "model.num_classes=4", "model.img_size=32", "data.batch_size=4", "eval.clips=1", "eval.orders=[normal]"]
    cli.main(["fit", "--config", str(REPO / "configs" / "sample_tsm.yaml"), *data, "sched.epochs=1",
              "train.eval_every=0", "train.log_every=1", "eval.at_end=false", "--run-dir", str(tmp_path / "run")])
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    epoch = next(r for r in records if r["split"] == "failures")
    assert epoch["count"] == len(lost) and {s["key"] for s in epoch["samples"]} == lost
    assert all(s["stage"] == "fetch" for s in epoch["samples"])
    assert [r for r in records if r["split"] == "train"][-1]["failures"] == len(lost)

    with pytest.raises(SystemExit) as refused:
        cli.main(["eval", "--checkpoint", str(tmp_path / "run"), "--run-dir", str(tmp_path / "eval")])
    assert refused.value.code != 0
    written = (tmp_path / "eval" / "eval_report.md").read_text()              # the report is there all the same
    assert f"{len(index) - len(lost)} of {len(index)} videos evaluated" in written
    report = cli.main(["eval", "--checkpoint", str(tmp_path / "run"), "--allow-missing"])
    coverage = report["coverage"]["main"]
    assert (coverage["videos"], coverage["evaluated"]) == (len(index), len(index) - len(lost))
    assert {m["key"] for m in coverage["missing"]} == lost
    assert report["results"]["main"]["normal"]["video"]["count"] == len(index) - len(lost)
