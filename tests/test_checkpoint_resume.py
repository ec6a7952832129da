"""Checkpoints resume a run exactly: same batches next, same random draws, same final weights."""
from __future__ import annotations

import pytest
import torch
from train_support import SkippingLoader, SyntheticLoader, tiny_config

from contract import checkpoints
from train import checkpoint as ckpt
from train.data import Source
from train.loop import fit

# Everything that draws random numbers or carries state across updates is switched on: dropout (torch RNG),
# Mixup/CutMix (numpy RNG), label smoothing, gradient accumulation and clipping, warm-up, EMA, BatchNorm.
RECIPE = dict(
    model={"options": {"dropout": 0.3}},
    data={"batch_size": 4},
    aug={"mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1},
    optim={"accum_steps": 2, "clip_grad": 1.0},
    sched={"epochs": 2, "warmup_epochs": 1},          # 32 clips / 4 / 2 = 4 updates per epoch
    train={"ema_decay": 0.9, "checkpoint_every": 2, "eval_every": 0, "log_every": 100},
    eval={"at_end": False},
)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def final_state(run_dir) -> dict:
    return checkpoints.load(checkpoints.CheckpointStore(f"{run_dir}/checkpoints").latest())


def test_a_stopped_and_resumed_run_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path):
    whole = fit(tiny_config(tmp_path / "whole", **RECIPE))

    # Stop after update 3: its final state is saved, mid-epoch (6 of 8 batches consumed).
    stopped = fit(tiny_config(tmp_path / "parts", **{**RECIPE, "train": {**RECIPE["train"], "max_updates": 3}}))
    assert stopped["stopped_early"] and stopped["updates"] == 3
    point = final_state(stopped["run_dir"])
    assert (point["epoch"], point["updates"], point["sources"]["main"]["consumed"]) == (0, 3, 6)

    resumed = fit(tiny_config(tmp_path / "parts", **{**RECIPE, "run": {"resume": "auto"}}))
    assert resumed["updates"] == whole["updates"] == 8
    assert_same_weights(whole["model"].state_dict(), resumed["model"].state_dict())
    assert_same_weights(final_state(whole["run_dir"])["ema"], final_state(resumed["run_dir"])["ema"])


def test_checkpoints_go_to_an_s3_bucket_and_a_run_resumes_from_there(tmp_path, monkeypatch):
    from moto.server import ThreadedMotoServer
    import s3fs

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
            monkeypatch.setenv(name, value)
        s3fs.S3FileSystem(skip_instance_cache=True).call_s3("create_bucket", Bucket="runs")
        bucket = {"run": {"storage": "s3://runs/tiny/checkpoints"}}
        stopped = fit(tiny_config(tmp_path, **{**RECIPE, **bucket, "train": {**RECIPE["train"], "max_updates": 3}}))
        names = checkpoints.CheckpointStore("s3://runs/tiny/checkpoints").names()
        assert names == ["epoch0000-update00000002.pt", "epoch0000-update00000003.pt"]   # update 3: the final state
        resumed = fit(tiny_config(tmp_path, **{**RECIPE, "run": {**bucket["run"], "resume": "auto"}}))
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()   # fsspec caches clients; this one's server is gone
    whole = fit(tiny_config(tmp_path / "whole", **RECIPE))
    assert stopped["updates"] == 3 and resumed["updates"] == 8
    assert_same_weights(whole["model"].state_dict(), resumed["model"].state_dict())


def test_the_store_keeps_the_newest_checkpoints_and_points_at_the_latest(tmp_path):
    store = checkpoints.CheckpointStore(str(tmp_path / "ckpt"), keep=2)
    for update in (1, 2, 3):
        store.save({"epoch": 0, "updates": update, "weights": torch.full((2,), float(update))})
    assert store.names() == ["epoch0000-update00000002.pt", "epoch0000-update00000003.pt"]
    assert store.latest().endswith("epoch0000-update00000003.pt")
    assert torch.equal(checkpoints.load(store.latest())["weights"], torch.full((2,), 3.0))
    (tmp_path / "ckpt" / "latest").unlink()   # a lost pointer: the newest complete file still counts
    assert store.latest().endswith("update00000003.pt")


def test_a_missing_checkpoint_is_an_error_that_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        checkpoints.load(str(tmp_path / "nothing.pt"))


def test_fine_tuning_takes_the_matching_weights_and_names_the_rest(tmp_path):
    """Progressive fine-tuning (8 -> 16 frames) and a new label set: what fits is taken, the head is not."""
    first = fit(tiny_config(tmp_path / "f8", sched={"epochs": 1}, train={"eval_every": 0}, eval={"at_end": False}))
    source = checkpoints.CheckpointStore(f"{first['run_dir']}/checkpoints").latest()
    cfg = tiny_config(tmp_path / "f16", model={"num_frames": 16, "num_classes": 6}, init_from=source,
                      sched={"epochs": 1}, train={"max_updates": 1}, eval={"at_end": False})
    from train.loop import build_model
    model = build_model(cfg)
    report = ckpt.load_weights(model, source)
    assert report["skipped"] == ["heads.main.bias", "heads.main.weight"]
    trained = first["model"].state_dict()
    for name, value in model.state_dict().items():
        if name not in report["skipped"]:
            assert torch.equal(value, trained[name])


def test_a_loader_that_can_start_mid_epoch_is_told_where_to_start_instead_of_being_read_through():
    fast = Source("main", SkippingLoader("synthetic:32", 4, 4))
    fast.start(epoch=1, skip=5)
    slow = Source("main", SyntheticLoader("synthetic:32", 4, 4))
    slow.start(epoch=1, skip=5)
    assert fast.loader.start_batch == 5
    a, b = fast.next(), slow.next()
    assert a["key"] == b["key"] and torch.equal(a["video"], b["video"])
    assert fast.state() == slow.state() == {"epoch": 1, "consumed": 6}


def test_a_run_folder_that_holds_checkpoints_is_not_reused_unless_resumed(tmp_path):
    recipe = dict(sched={"epochs": 1}, train={"max_updates": 1, "checkpoint_every": 1, "eval_every": 0},
                  data={"batch_size": 4}, eval={"at_end": False})
    fit(tiny_config(tmp_path, **recipe))
    config_before = (tmp_path / "run" / "config.yaml").read_text()
    from train.config import ConfigError
    with pytest.raises(ConfigError, match="already holds checkpoints.*run.resume=auto"):
        fit(tiny_config(tmp_path, **{**recipe, "optim": {"lr": 0.5}}))
    assert (tmp_path / "run" / "config.yaml").read_text() == config_before   # refused before touching it
