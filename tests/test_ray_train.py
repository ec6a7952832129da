"""Training through Ray Train: two CPU workers (DDP over gloo) on a private Ray on 127.0.0.1, checkpoints
reported to a bucket on a local S3 server, and a worker that dies restarted from the last checkpoint."""
from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from train_support import deep_merge, tiny_config

pytestmark = pytest.mark.slow   # each Ray run starts a worker group (about a minute on 2 busy cores)

REPO = Path(__file__).resolve().parent.parent
RECIPE = dict(aug={"mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1}, model={"options": {"dropout": 0.3}},
              sched={"epochs": 2}, train={"log_every": 2}, eval={"orders": ["normal", "shuffled"]})


@pytest.fixture(scope="module")
def bucket():
    """A real S3-protocol server on loopback, with credentials in the environment as a user would set them."""
    from moto.server import ThreadedMotoServer
    import s3fs

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()         # no client cached for another test's server
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.call_s3("create_bucket", Bucket="runs")
    yield fs
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def local_ray(bucket):
    import ray
    # The workers inherit the bucket's credentials from the environment Ray starts in (as a cluster's nodes
    # have theirs); a runtime_env would write them to Ray's logs.
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2,
             logging_level="ERROR", runtime_env={"env_vars": {"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}})
    yield ray
    ray.shutdown()


def ray_config(tmp_path, max_failures: int = 0, **extra):
    ray = {"workers": 2, "storage_path": "s3://runs/ray", "max_failures": max_failures}
    run = {"dir": str(tmp_path / tmp_path.name)}            # the run's name in the bucket: unique per test
    return tiny_config(tmp_path, **deep_merge(RECIPE, {"ray": ray, "run": run, **extra}))


def state_in(fs, checkpoint_path: str) -> dict:
    return torch.load(io.BytesIO(fs.cat_file(f"{checkpoint_path}/state.pt")), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, local_ray):
    from train.ray_train import fit_with_ray
    return fit_with_ray(ray_config(tmp_path_factory.mktemp("whole")))


def test_two_workers_train_data_parallel_and_report_checkpoints_to_the_bucket(two_workers, bucket):
    assert two_workers["metrics"]["epoch"] == 2 and two_workers["metrics"]["updates"] == 4   # 32 clips / 2 ranks / 8
    run = Path(two_workers["run_dir"]).name
    stored = [p for p in bucket.ls(f"runs/ray/{run}") if bucket.isdir(p) and "/checkpoint_" in p]
    assert len(stored) == 2                                                                 # keep_checkpoints=2
    assert bucket.exists(f"{two_workers['checkpoint']}/state.pt")
    assert bucket.exists(f"runs/ray/{run}/run/eval_report.json")                            # the run folder too
    state = state_in(bucket, two_workers["checkpoint"])
    assert len(state["rng"]) == 2 and state["world_size"] == 2                             # both ranks' RNG


def test_the_distributed_evaluation_counts_every_video_once_and_matches_one_process(two_workers, bucket, tmp_path):
    import json

    from train.cli import evaluate_checkpoint
    report = json.loads((Path(two_workers["run_dir"]) / "eval_report.json").read_text())
    distributed = report["results"]["main"]
    assert distributed["normal"]["video"]["count"] == 12                                   # synthetic:12 val videos
    checkpoint = f"s3://{two_workers['checkpoint']}/state.pt"
    cfg = ray_config(tmp_path)
    single = evaluate_checkpoint({**cfg, "ray": {**cfg["ray"], "workers": 1}}, checkpoint)["results"]["main"]
    assert single == distributed


def test_a_worker_that_dies_is_restarted_from_the_last_checkpoint_and_ends_with_the_same_weights(
        two_workers, bucket, tmp_path, capfd):
    from train.ray_train import fit_with_ray
    marker = tmp_path / "died"
    cfg = ray_config(tmp_path, max_failures=1, train={"log_every": 2, "checkpoint_every": 1},
                     data={"options": {"die_at_batch": 1, "die_marker": str(marker)}}, eval={"at_end": False})
    restarted = fit_with_ray(cfg)
    assert marker.exists()                       # rank 1 did exit mid-epoch, after the update-1 checkpoint
    assert restarted["metrics"]["updates"] == 4
    a, b = state_in(bucket, two_workers["checkpoint"]), state_in(bucket, restarted["checkpoint"])
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    # Ray Train patches print() in its workers; the loop's lines reach the driver once each all the same
    captured = capfd.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines()
             if "| update " in line or "validation after epoch" in line]
    assert any("| update " in line for line in lines) and any("validation after" in line for line in lines)
    assert len(set(lines)) == len(lines), lines


def test_eval_takes_a_ray_run_folder_or_checkpoint_folder_in_the_bucket(two_workers, bucket):
    from contract import checkpoints
    run = Path(two_workers["run_dir"]).name
    newest = f"s3://{two_workers['checkpoint']}/state.pt"
    assert checkpoints.resolve(f"s3://runs/ray/{run}") == newest
    assert checkpoints.resolve(f"s3://{two_workers['checkpoint']}") == newest


def test_the_command_line_evaluates_a_ray_run_folder_given_by_a_relative_path_over_two_workers(
        two_workers, bucket, tmp_path, monkeypatch):
    """Ray Train runs its workers in another folder: the driver resolves the path before they start."""
    import json

    from train import cli
    run = Path(two_workers["run_dir"]).name
    bucket.get(f"runs/ray/{run}", str(tmp_path / "ray" / run), recursive=True)
    monkeypatch.chdir(tmp_path)
    returned = cli.main(["eval", "--checkpoint", f"ray/{run}", "--workers", "2", "--run-dir", str(tmp_path / "eval"),
                         "imports=[train_support]", "data.loader=train_support:SyntheticLoader"])
    written = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    trained = json.loads((Path(two_workers["run_dir"]) / "eval_report.json").read_text())
    assert written["results"] == returned["results"] == trained["results"]
    assert written["checkpoint"] == str(tmp_path / "ray" / run / Path(two_workers["checkpoint"]).name / "state.pt")
    assert (tmp_path / "eval" / "scores.parquet").exists() and (tmp_path / "eval" / "README.md").exists()
