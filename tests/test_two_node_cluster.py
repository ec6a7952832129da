"""A real two-node Ray cluster: two test hosts (network namespaces joined by a veth pair), token auth on,
an S3 server on the head host. The shard job writes the embedded dataset into a bucket from both nodes,
then Ray Train trains TSM with one worker per node streaming those shards and checkpointing to the
bucket; one worker is killed on purpose and the run finishes from its last checkpoint with the planned
number of updates."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import netns_cluster
from netns_cluster import HEAD_NS, WORKER_NS

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(netns_cluster.available() is not None, reason=str(netns_cluster.available()))]

REPO = Path(__file__).resolve().parent.parent
BATCH, EPOCHS = 4, 2


def s3(cluster, code: str) -> str:
    """Run `code` on the head host with `fs`, an s3fs filesystem on the cluster's bucket server."""
    prelude = "import json, s3fs; fs = s3fs.S3FileSystem(skip_instance_cache=True)\n"
    out = cluster.run(HEAD_NS, [sys.executable, "-c", prelude + code], timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def train_worker_pids(namespace: str) -> list[int]:
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    found = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "RayTrainWorker" in cmdline:
            found.append(int(pid))
    return found


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from shards.sample_dataset import make_sample_dataset
    root = tmp_path_factory.mktemp("sample")
    make_sample_dataset(root, num_classes=4, train_per_class=6, val_per_class=2, size=(64, 48), fps=10,
                        seconds=1.6, broken=False)
    return root


def test_two_hosts_shard_to_a_bucket_and_train_through_a_lost_worker(dataset, tmp_path):
    env = {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with netns_cluster.two_node_cluster(cpus_per_node=1, env=env) as cluster:
        s3(cluster, "fs.mkdir('data'); fs.mkdir('runs')")

        shard = cluster.run(HEAD_NS, [sys.executable, "pipelines/shard_kinetics.py", "--annotations",
                                      str(dataset / "annotations"), "--videos", str(dataset / "videos"),
                                      "--output", "s3://data/shards", "--ray-address", cluster.address,
                                      "--workers", "2", "--shard-size", "200KB", "--short-side", "48"],
                            timeout=600, cwd=REPO)
        assert shard.returncode == 0, shard.stdout[-3000:] + shard.stderr[-3000:]
        counts = json.loads(s3(cluster, "print(json.dumps(json.loads(fs.cat('data/shards/manifest.json'))"
                                        "['splits']))"))
        n_train = counts["train"]["indexed"]
        assert n_train == 24

        run_dir = tmp_path / "tsm-two-nodes"
        overrides = ["data.train.shards=s3://data/shards", "data.val.shards=s3://data/shards",
                     f"data.batch_size={BATCH}", "data.options.readers=1", "data.options.short_side=[48,56]",
                     "model.num_classes=4", "model.img_size=48", f"sched.epochs={EPOCHS}", "sched.warmup_epochs=0",
                     "train.checkpoint_every=1", "train.eval_every=0", "eval.at_end=false",
                     f"ray.address={cluster.address}", "ray.workers=2", "ray.max_failures=1",
                     "ray.storage_path=s3://runs/ray"]
        log = open(tmp_path / "fit.log", "w")
        fit = cluster.popen(HEAD_NS, [sys.executable, "-m", "train", "fit", "--config", "configs/sample_tsm.yaml",
                                      "--run-dir", str(run_dir), *overrides], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)
        try:
            killed = None
            deadline = time.monotonic() + 400
            while killed is None and time.monotonic() < deadline and fit.poll() is None:
                stored = s3(cluster, f"print(len(fs.glob('runs/ray/{run_dir.name}/checkpoint_2*')))")
                workers = train_worker_pids(WORKER_NS)
                if int(stored) >= 1 and workers:
                    os.kill(workers[0], 9)      # the worker host loses its training process
                    killed = workers[0]
                time.sleep(1)
            assert killed, "no checkpoint was reported, or no training worker ran on the worker host"
            assert fit.wait(timeout=500) == 0, (tmp_path / "fit.log").read_text()[-4000:]
        finally:
            fit.kill()
        output = (tmp_path / "fit.log").read_text()
        expected_updates = EPOCHS * ((n_train // 2) // BATCH)
        last = json.loads(s3(cluster, f"""
import io, torch
ckpts = sorted(fs.glob('runs/ray/{run_dir.name}/checkpoint_2*'))   # checkpoint_<time>
state = torch.load(io.BytesIO(fs.cat(ckpts[-1] + '/state.pt')), map_location='cpu', weights_only=True)
print(json.dumps({{"updates": state["updates"], "epoch": state["epoch"], "world_size": state["world_size"]}}))
""").strip().splitlines()[-1])
        assert last["updates"] == expected_updates and last["world_size"] == 2, (last, output[-3000:])
        assert "[FailurePolicy] RETRY" in output      # Ray Train saw the lost worker and restarted the group
