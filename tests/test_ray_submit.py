"""The demos end to end, each with its own Ray head on 127.0.0.1 and `ray job submit --working-dir .`, on a
small version of the sample dataset: `make demo` (the shard job and its summary), then `make train-demo`
(a sample recipe on two Ray Train workers reading the shards the first wrote)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_env(data) -> dict:
    return os.environ | {
        "DEMO_DATA": str(data), "RAY_PORT": str(free_port()), "DASHBOARD_PORT": str(free_port()),
        "RAY_START_ARGS": f"--ray-client-server-port {free_port()} --dashboard-agent-listen-port {free_port()}",
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    data = tmp_path_factory.mktemp("demo") / "data"
    env = head_env(data) | {"SAMPLE_ARGS": "--classes 4 --train-per-class 3 --val-per-class 1"}
    done = subprocess.run(["bash", "infra/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return done, env, data


@pytest.mark.slow
def test_demo_submits_the_shard_job_to_a_local_head_and_reports_the_outcome(demo):
    done, env, data = demo
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = data / "shards"
    assert "succeeded" in done.stdout + done.stderr
    assert f"shards written to {output}" in done.stdout
    assert "failures: 4 (fetch: 2, probe: 2)" in done.stdout
    rows = {name: pq.read_table(output / name, use_threads=False).num_rows   # single-threaded: see summary.py
            for name in ("train/index.parquet", "val/index.parquet", "failures.parquet")}
    assert rows == {"train/index.parquet": 12, "val/index.parquet": 4, "failures.parquet": 4}
    assert not processes_mentioning(f"--gcs_server_port={env['RAY_PORT']}"), "the demo left its Ray head running"


@pytest.mark.slow
def test_train_demo_submits_a_recipe_that_trains_on_two_ray_workers_and_evaluates_every_video(demo):
    assert demo[0].returncode == 0, "the shard demo failed; see the test above"
    data = demo[2]
    small = ("model.num_classes=4 data.batch_size=2 model.img_size=48 data.options.short_side=[48,56] sched.epochs=2 "
             "train.eval_every=0 eval.clips=1 eval.crops=1 eval.orders=[normal,reversed]")
    env = head_env(data) | {"TRAIN_ARGS": small}
    done = subprocess.run(["bash", "infra/train_demo.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr
    (run,) = (data / "runs").iterdir()
    report = json.loads((run / "eval_report.json").read_text())["results"]["main"]
    assert report["normal"]["video"]["count"] == report["reversed"]["video"]["count"] == 4   # every val video once
    checkpoints = sorted((run / "ray" / run.name).glob("checkpoint_*/state.pt"))
    state = torch.load(checkpoints[-1], map_location="cpu", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2                  # two data-parallel ranks
    assert (state["epoch"], state["updates"]) == (2, 6)                          # 12 clips / 2 ranks / 2 per batch
    assert not processes_mentioning(f"--gcs_server_port={env['RAY_PORT']}"), "the demo left its Ray head running"


def processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" "):
                found.append(int(pid))
        except OSError:
            continue
    return found
