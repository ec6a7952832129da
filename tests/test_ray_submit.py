"""`make demo` end to end: a Ray head on 127.0.0.1, the sample dataset, the shard job through
`ray job submit --working-dir .`, and the summary, on a small version of the sample dataset."""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_demo_submits_the_shard_job_to_a_local_head_and_reports_the_outcome(tmp_path):
    env = os.environ | {
        "DEMO_DATA": str(tmp_path / "data"), "RAY_PORT": str(free_port()), "DASHBOARD_PORT": str(free_port()),
        "SAMPLE_ARGS": "--classes 4 --train-per-class 3 --val-per-class 1",
        "RAY_START_ARGS": f"--ray-client-server-port {free_port()} --dashboard-agent-listen-port {free_port()}",
    }
    done = subprocess.run(["bash", "infra/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = tmp_path / "data" / "shards"
    assert "succeeded" in done.stdout + done.stderr
    assert f"shards written to {output}" in done.stdout
    assert "failures: 4 (fetch: 2, probe: 2)" in done.stdout
    rows = {name: pq.read_table(output / name, use_threads=False).num_rows   # single-threaded: see summary.py
            for name in ("train/index.parquet", "val/index.parquet", "failures.parquet")}
    assert rows == {"train/index.parquet": 12, "val/index.parquet": 4, "failures.parquet": 4}
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
