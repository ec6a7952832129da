"""The shard job end to end on small real datasets and a real local Ray: nothing lost, nothing doubled,
resumable after a kill, on local disk and on an S3 server, with clear errors for bad arguments."""
from __future__ import annotations

import hashlib
import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import pyarrow.parquet as pq
import pytest
import ray

from bad_inputs import write_bad_inputs
from pipelines import shard_kinetics
from shards.adapters.kinetics import clip_name
from shards.job import ConfigError, JobConfig, OutputConflict, load_plan, run_job, transcode_options
from shards.sample_dataset import make_sample_dataset

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "pipelines" / "shard_kinetics.py"


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module", autouse=True)
def ray_session(s3_server):
    """One small local Ray for the module (never an existing cluster: address='local'). Its workers read
    the S3 server's endpoint and credentials from the environment Ray started with, as a cluster's nodes
    read theirs: the job hands its tasks no credentials."""
    import s3fs

    env = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield
    ray.shutdown()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    s3fs.S3FileSystem.clear_instance_cache()   # fsspec caches clients; this one's server is gone


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> dict:
    """4 classes x (4 train + 2 val) clips of 2 s, plus the generator's 4 broken train entries."""
    made = make_sample_dataset(tmp_path_factory.mktemp("sample"), num_classes=4, train_per_class=4, val_per_class=2)
    sizes = sorted(p.stat().st_size for p in Path(made["videos"]).rglob("*.mp4"))
    return made | {"shard_size": 5 * sizes[len(sizes) // 2]}   # about five videos per shard


def config(sample: dict, output, **overrides) -> JobConfig:
    args = dict(annotations=sample["annotations"], videos=sample["videos"], output=str(output),
                shard_size=sample.get("shard_size", 10**6), workers=2, progress_every=0.5)
    return JobConfig(**(args | overrides))


@pytest.fixture(scope="module")
def finished(sample, tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("job") / "shards"
    lines: list[str] = []
    manifest = run_job(config(sample, output), log=lines.append)
    return {"output": output, "manifest": manifest, "log": lines}


def rows_of(path, **kwargs) -> list[dict]:
    """Single-threaded: pyarrow 26 sometimes aborts at interpreter exit after threaded reads."""
    return pq.read_table(path, use_threads=False, **kwargs).to_pylist()


def read_index(output: Path, split: str) -> list[dict]:
    return rows_of(output / split / "index.parquet")


def annotation_keys(sample: dict) -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {}
    for split in ("train", "val"):
        lines = Path(sample["annotations"], f"{split}.csv").read_text().splitlines()[1:]
        keys[split] = {f"{y}_{int(s):06d}_{int(e):06d}" for _, y, s, e, _ in (line.split(",") for line in lines)}
    return keys


# ---------------------------------------------------------------- planning

def test_plan_is_deterministic_and_every_shard_mixes_classes(sample, tmp_path):
    plan = load_plan(config(sample, tmp_path))
    assert load_plan(config(sample, tmp_path)).fingerprint() == plan.fingerprint()
    assert load_plan(config(sample, tmp_path, seed=1)).fingerprint() != plan.fingerprint()
    assert len(plan.shards) >= 3
    for spec in plan.shards:
        if len(spec.records) >= 4:
            assert len({r.label for r in spec.records}) >= 2, spec.name


# ---------------------------------------------------------------- a finished job

def test_every_annotated_video_is_indexed_or_failed_exactly_once(sample, finished):
    failures = rows_of(finished["output"] / "failures.parquet")
    for split, keys in annotation_keys(sample).items():
        indexed = [row["key"] for row in read_index(finished["output"], split)]
        failed = [f["key"] for f in failures if f["split"] == split]
        assert sorted(indexed + failed) == sorted(keys)
    assert {f["key"]: f["stage"] for f in failures} == {k: v["stage"] for k, v in sample["expected_failures"].items()}
    assert all(f["reason"] for f in failures)


def test_index_ranges_and_manifest_checksums_match_the_shards(finished):
    output, manifest = finished["output"], finished["manifest"]
    assert manifest["shards"], "the job wrote no shards"
    for entry in manifest["shards"]:
        data = (output / entry["path"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["size"], entry["sha256"])
        assert (output / entry["index"]).read_text().startswith(f"v1.2 {entry['samples']}\n")
    for split in ("train", "val"):
        for row in read_index(output, split):
            with open(output / row["shard"], "rb") as f:
                f.seek(row["offset"])
                video = f.read(row["size"])
            assert hashlib.sha256(video).hexdigest() == row["sha256"]
            with av.open(io.BytesIO(video)) as container:
                assert sum(1 for _ in container.decode(video=0)) == row["num_frames"]


def test_classes_are_sorted_and_labels_point_into_them(finished):
    classes = (finished["output"] / "classes.txt").read_text().splitlines()
    assert classes == sorted(classes) and len(classes) == 4
    for row in read_index(finished["output"], "train"):
        assert classes[row["label"]] == row["label_name"]


def test_manifest_counts_agree_with_the_indexes(finished):
    manifest = finished["manifest"]
    for split, counts in manifest["splits"].items():
        assert counts["indexed"] == len(read_index(finished["output"], split))
        assert counts["shards"] == sum(s["split"] == split for s in manifest["shards"])
    assert manifest["versions"]["ray"] == ray.__version__


def test_progress_reports_count_rate_eta_and_failures(finished):
    assert finished["log"][0].startswith("plan:")
    assert any("videos " in line and "videos/s" in line and "ETA" in line and "failures" in line
               for line in finished["log"])


def test_rerun_of_a_finished_job_rewrites_no_shard_and_needs_no_cluster(sample, finished):
    tars = sorted(finished["output"].glob("*/shard-*.tar"))
    before = {p: p.stat().st_mtime_ns for p in tars}
    lines: list[str] = []

    def no_cluster():
        raise AssertionError("nothing is left to transcode, so Ray must not be needed")
    again = run_job(config(sample, finished["output"]), log=lines.append, connect=no_cluster)
    assert {p: p.stat().st_mtime_ns for p in tars} == before
    assert again["shards"] == finished["manifest"]["shards"]
    assert "0 to write" in lines[0]


def test_changed_arguments_are_refused_naming_the_difference(sample, finished):
    with pytest.raises(OutputConflict, match=r"--codec was 'vp9', now 'h264'.*--overwrite"):
        run_job(config(sample, finished["output"], transcode=transcode_options(codec="h264")))


def test_overwrite_replaces_an_output_made_with_other_arguments(sample, tmp_path):
    run_job(config(sample, tmp_path, splits=("val",)), log=lambda _: None)
    manifest = run_job(config(sample, tmp_path, splits=("val",), transcode=transcode_options(gop=4),
                              overwrite=True), log=lambda _: None)
    rows = read_index(tmp_path, "val")
    assert manifest["options"]["gop"] == 4 and rows and {r["gop"] for r in rows} == {4}


def test_a_folder_that_is_not_a_job_output_is_never_touched(sample, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(OutputConflict, match="not empty"):
        run_job(config(sample, tmp_path, overwrite=True))
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_unknown_split_is_a_config_error(sample, tmp_path):
    with pytest.raises(ConfigError, match=r"--splits.*\['nosuch'\].*\['train', 'val'\]"):
        run_job(config(sample, tmp_path, splits=("nosuch",)))


# ---------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("dataset", ["kinetics", "csv"])
def test_a_split_that_is_not_a_folder_name_is_a_failure_of_its_row_and_nothing_leaves_the_output(
        sample, tmp_path, dataset):
    """A split becomes a folder of the output; `../../x` would put a shard, its index and the split's
    index.parquet two folders above it."""
    rows = [line.split(",") for line in Path(sample["annotations"], "train.csv").read_text().splitlines()[1:3]]
    label = rows[0][0]   # one class for both: the train split defines the classes
    rows = [(yid, start, end, split) for (_, yid, start, end, _), split in zip(rows, ("train", "../../x"))]
    if dataset == "kinetics":
        annotations = tmp_path / "annotations.csv"
        lines = [f"{label},{yid},{start},{end},{split}" for yid, start, end, split in rows]
        annotations.write_text("\n".join(["label,youtube_id,time_start,time_end,split", *lines]) + "\n")
    else:
        videos = {p.stem: p.relative_to(sample["videos"]) for p in Path(sample["videos"]).rglob("*.mp4")}
        annotations = tmp_path / "list.csv"
        lines = [f"{videos[clip_name(yid, int(start), int(end))]},{label},{split}" for yid, start, end, split in rows]
        annotations.write_text("\n".join(["path,label,split", *lines]) + "\n")
    job = tmp_path / "job"
    output = job / "deep" / "shards"
    manifest = run_job(JobConfig(str(annotations), sample["videos"], str(output), dataset=dataset, workers=1),
                       log=lambda _: None)
    assert all(output in p.parents for p in job.rglob("*") if p.is_file()), sorted(job.rglob("*"))
    assert list(manifest["splits"]) == ["train"] and manifest["splits"]["train"]["indexed"] == 1
    (failure,) = rows_of(output / "failures.parquet")
    assert failure["stage"] == "annotations" and failure["split"] == "../../x"
    assert "'../../x' is not a folder name" in failure["reason"] and "fix the split" in failure["reason"]


def test_every_bad_input_lands_in_failures_with_a_clear_reason(tmp_path):
    expected = write_bad_inputs(tmp_path / "bad")
    output = tmp_path / "shards"
    run_job(JobConfig(str(tmp_path / "bad" / "annotations"), str(tmp_path / "bad" / "videos"), str(output),
                      shard_size=200_000), log=lambda _: None)
    failures = rows_of(output / "failures.parquet")
    rows = {r["key"]: r for split in ("train", "val") for r in read_index(output, split)}
    for case, want in expected.items():
        if want["stage"] is None:
            assert want["key"] in rows, f"{case} should have been sharded"
            if want["note"]:
                assert any(want["note"] in n for n in rows[want["key"]]["notes"]), (case, rows[want["key"]]["notes"])
            continue
        by_key = want["key"] and case != "duplicate_row"
        match = [f for f in failures if (f["key"] == want["key"] if by_key else f["source"].endswith(want["source"]))]
        assert len(match) == 1, f"{case}: {match}"
        assert match[0]["stage"] == want["stage"] and len(match[0]["reason"]) > 20, (case, match[0])


# ---------------------------------------------------------------- workers dying

def running_shard_task() -> int | None:
    """PID of a Ray worker busy with a shard (Ray titles it `ray::write_shard` while the task runs)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::write_shard"):
                return int(pid)
        except OSError:
            continue
    return None


def test_a_killed_worker_is_retried_and_nothing_is_lost(sample, tmp_path):
    """SIGKILL the process running a shard task; Ray reruns the task and the output is still complete."""
    result, killed = {}, []
    job = threading.Thread(target=lambda: result.update(run_job(config(sample, tmp_path, shard_size=1),
                                                                log=lambda _: None)))
    job.start()
    deadline = time.monotonic() + 60
    while not killed and job.is_alive() and time.monotonic() < deadline:
        if (pid := running_shard_task()) is not None:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        time.sleep(0.01)
    job.join(timeout=120)
    assert killed, "no shard task was caught running"
    indexed = sum(c["indexed"] for c in result["splits"].values())
    failed = sum(c["failed"] for c in result["splits"].values())
    assert indexed + failed == sum(len(k) for k in annotation_keys(sample).values())
    assert failed == len(sample["expected_failures"])


# ---------------------------------------------------------------- the CLI

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flag, value, says", [
    ("--codec", "av1", "invalid choice: 'av1'"),
    ("--short-side", "0", "positive even"),
    ("--short-side", "321", "positive even"),
    ("--gop", "0", "at least 1"),
    ("--shard-size", "1XB", "e.g. 1GB"),
    ("--videos", "/nonexistent/videos", "does not exist"),
    ("--output", "/etc/hostname/shards", "choose a writable folder"),
])
def test_invalid_arguments_stop_the_driver_naming_the_flag_and_the_fix(sample, tmp_path, capsys, flag, value, says):
    args = {"--annotations": sample["annotations"], "--videos": sample["videos"], "--output": str(tmp_path / "o")}
    args[flag] = value
    with pytest.raises(SystemExit) as stopped:
        shard_kinetics.main([x for kv in args.items() for x in kv])
    stderr = capsys.readouterr().err
    assert stopped.value.code == 2
    assert flag in stderr and says in stderr, stderr


def kill_session(sid: int) -> None:
    """SIGKILL every process of the session the test started (Ray workers leave the process group, not the session)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) == sid:
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            continue


@pytest.mark.slow
def test_cli_resumes_after_being_killed_without_losing_or_rewriting_shards(sample, tmp_path):
    output = tmp_path / "shards"
    args = ["--annotations", sample["annotations"], "--videos", sample["videos"], "--output", str(output),
            "--shard-size", "1", "--workers", "1"]
    first = subprocess.Popen([sys.executable, str(CLI), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    markers = output / "_job" / "done"
    deadline = time.monotonic() + 120
    while len(list(markers.glob("*/*.json"))) < 3 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_session(first.pid)   # the driver and the whole Ray it started: a crash, not a shutdown
    first.wait()
    committed = {p: p.stat().st_mtime_ns for p in markers.glob("*/*.json")}
    total = len(list(load_plan(config(sample, output, shard_size=1)).shards))
    assert 3 <= len(committed) < total, "the job must be killed midway for this test to mean anything"
    # A tar already in place without its marker was not committed when the job died: resume redoes it.
    tars_before = {p: p.stat().st_mtime_ns for p in output.glob("*/shard-*.tar")
                   if markers / p.parent.name / f"{p.stem}.json" in committed}
    assert not (output / "manifest.json").exists()

    second = run_cli(*args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resuming: {len(committed)} shards already committed" in second.stdout
    assert "videos/s" in second.stdout and "ETA" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in committed} == committed
    assert len(tars_before) == len(committed)
    assert {p: p.stat().st_mtime_ns for p in tars_before} == tars_before
    assert not list(output.rglob(".*.tmp-*")), "temporaries left behind"
    failures = rows_of(output / "failures.parquet")
    for split, keys in annotation_keys(sample).items():
        indexed = [row["key"] for row in read_index(output, split)]
        assert sorted(indexed + [f["key"] for f in failures if f["split"] == split]) == sorted(keys)


# ---------------------------------------------------------------- object storage

def test_s3_input_and_output_through_aws_environment_variables_with_resume(sample):
    import s3fs

    fs = s3fs.S3FileSystem()   # AWS_* from the environment (ray_session)
    fs.mkdir("data")
    fs.put(str(Path(sample["root"])) + "/", "data/sample", recursive=True)
    s3 = config(sample | {"annotations": "s3://data/sample/annotations", "videos": "s3://data/sample/videos"},
                "s3://data/shards")
    first = run_job(s3, log=lambda _: None)
    annotated = sum(len(keys) for keys in annotation_keys(sample).values())
    assert sum(c["indexed"] for c in first["splits"].values()) == annotated - len(sample["expected_failures"])

    # a crash before the commit of one shard: its marker and tar are gone, the rest stay committed
    lost = first["shards"][0]
    fs.rm(f"data/shards/_job/done/{lost['path'][:-4]}.json")
    fs.rm(f"data/shards/{lost['path']}")
    others = {s["path"]: fs.info(f"data/shards/{s['path']}")["LastModified"] for s in first["shards"][1:]}
    time.sleep(1.1)   # LastModified has one-second resolution
    lines: list[str] = []
    second = run_job(s3, log=lines.append)
    fs.invalidate_cache()
    assert f"{len(first['shards']) - 1} shards already committed, 1 to write" in lines[0]
    assert {p: fs.info(f"data/shards/{p}")["LastModified"] for p in others} == others
    assert [s["path"] for s in second["shards"]] == [s["path"] for s in first["shards"]]
    row = rows_of("data/shards/train/index.parquet", filesystem=fs)[0]
    with fs.open(f"data/shards/{row['shard']}", "rb") as f:
        f.seek(row["offset"])
        assert hashlib.sha256(f.read(row["size"])).hexdigest() == row["sha256"]
    assert row["source"].startswith("s3://data/sample/videos/")
