"""The shard job end to end on small real datasets and a real local Ray: nothing lost, nothing doubled,
resumable after a kill, on local disk and on an S3 server, with clear errors for bad arguments."""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import av
import pyarrow.parquet as pq
import pytest
import ray

from bad_inputs import write_bad_inputs
from pipelines import shard_kinetics
from shards import storage
from shards.finalize import IncompleteOutput
from shards.adapters.kinetics import clip_name
from shards.job import ConfigError, JobConfig, OutputConflict, load_plan, run_job, transcode_options
from shards.lease import LEASE, Lease, LeaseHeld, LeaseLost
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


def test_the_plan_line_counts_early_rejections_under_the_stage_failures_parquet_gives_them(sample, finished, tmp_path):
    early = load_plan(config(sample, tmp_path)).failures
    stage_of = {f["key"]: f["stage"] for f in rows_of(finished["output"] / "failures.parquet")}
    stages = Counter(stage_of[f.key] for f in early)
    assert stages == {"fetch": 1}   # the sample's row without a video: no file, so nothing to transcode
    assert f"{len(early)} rejected before transcoding (fetch: 1)" in finished["log"][0]


def test_the_same_input_and_options_give_byte_identical_shards(sample, finished, tmp_path):
    again = run_job(config(sample, tmp_path, splits=("val",)), log=lambda _: None)
    first = [entry for entry in finished["manifest"]["shards"] if entry["split"] == "val"]
    assert first and again["shards"] == first
    for entry in first:
        assert (tmp_path / entry["path"]).read_bytes() == (finished["output"] / entry["path"]).read_bytes()


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


def test_no_manifest_when_a_tar_does_not_match_its_marker_and_a_rerun_rewrites_that_shard(sample, finished, tmp_path):
    output = tmp_path / "shards"
    shutil.copytree(finished["output"], output)
    damaged = finished["manifest"]["shards"][0]
    other = next(e for e in finished["manifest"]["shards"] if e["size"] != damaged["size"])
    (output / damaged["path"]).write_bytes((output / other["path"]).read_bytes())   # another writer's tar
    with pytest.raises(IncompleteOutput, match=f"{damaged['path'][:-4]}: its tar has {other['size']} bytes"):
        run_job(config(sample, output), log=lambda _: None, connect=stop_at_connect)
    assert not (output / "manifest.json").exists()
    assert not (output / "_job" / "done" / f"{damaged['path'][:-4]}.json").exists()

    lines: list[str] = []
    manifest = run_job(config(sample, output), log=lines.append)
    assert "1 to write" in lines[0]
    assert manifest["shards"] == finished["manifest"]["shards"]
    assert (output / damaged["path"]).read_bytes() == (finished["output"] / damaged["path"]).read_bytes()


# ---------------------------------------------------------------- one job per output (the lease)

class Stopped(Exception):
    """Raised by a test's `connect`: the job ends where it would start transcoding."""


def stop_at_connect():
    raise Stopped


def read_lease(output: str) -> dict | None:
    fs, root = storage.resolve(output)
    fs.invalidate_cache()
    path = storage.join(root, LEASE)
    return storage.read_json(fs, path) if fs.exists(path) else None


def fresh_output(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "shards")
    if request.param == "memory":
        return f"memory://locks/{uuid.uuid4().hex[:8]}"
    import s3fs

    s3fs.S3FileSystem().makedirs("locks", exist_ok=True)   # AWS_* from the environment (ray_session)
    return f"s3://locks/{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["local", "s3", "memory"])
def output_url(request, tmp_path) -> str:
    """A fresh output on a local disk, on the local S3 server, or on a store without conditional writes
    (fsspec's in-memory one stands for gs:// and the rest)."""
    return fresh_output(request, tmp_path)


@pytest.fixture(params=["local", "s3"])
def conditional_output_url(request, tmp_path) -> str:
    """A fresh output on a store that writes conditionally (the others only narrow races, docs/shard_format.md)."""
    return fresh_output(request, tmp_path)


def test_a_second_job_on_a_locked_output_is_refused_naming_the_owner(sample, output_url, capsys):
    reached, go_on, outcome = threading.Event(), threading.Event(), []

    def hold():   # the first job keeps its lease where it would start transcoding, until told to stop
        reached.set()
        go_on.wait(60)
        raise Stopped

    def first_job():
        try:
            run_job(config(sample, output_url, splits=("val",)), log=lambda _: None, connect=hold)
        except Stopped:
            outcome.append("stopped")
    first = threading.Thread(target=first_job)
    first.start()
    try:
        assert reached.wait(60), "the first job never got going"
        owner = read_lease(output_url)["owner"]
        code = shard_kinetics.main(["--annotations", sample["annotations"], "--videos", sample["videos"], "--output",
                                    output_url, "--splits", "val", "--shard-size", str(sample["shard_size"])])
    finally:
        go_on.set()
        first.join(60)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "being written by another shard job" in err and "rerun" in err
    assert f"host {owner['host']}, pid {owner['pid']}, job id {owner['id']}" in err
    assert outcome == ["stopped"] and read_lease(output_url) is None   # released, although the first job failed


def test_a_stale_lease_is_taken_over_with_a_message(sample, output_url):
    stale = Lease(output_url, ttl=0.05)
    stale.acquire()   # then stops renewing, as a hung job or one on a lost node does
    time.sleep(0.2)
    lines: list[str] = []
    with pytest.raises(Stopped):
        run_job(config(sample, output_url, splits=("val",)), log=lines.append, connect=stop_at_connect)
    took_over = [line for line in lines if line.startswith("took over the lease of")]
    assert took_over == [line for line in lines if stale.owner["id"] in line] and len(took_over) == 1
    assert f"--output {output_url} from a job that did not release it" in took_over[0] and "expired" in took_over[0]
    assert lines[-1].startswith("plan:")
    assert read_lease(output_url) is None


def test_a_lease_left_by_a_killed_job_on_this_host_is_taken_over_at_once(sample, tmp_path):
    holds_and_exits = "import sys; from shards.lease import Lease; Lease(sys.argv[1]).acquire()"
    subprocess.run([sys.executable, "-c", holds_and_exits, str(tmp_path)], check=True, cwd=REPO, timeout=120)
    left = read_lease(str(tmp_path))
    assert left["expires"] > time.time() + 10, "the lease must still be unexpired for this test to mean anything"
    lines: list[str] = []
    with pytest.raises(Stopped):
        run_job(config(sample, tmp_path, splits=("val",)), log=lines.append, connect=stop_at_connect)
    assert f"its process {left['owner']['pid']} is no longer running on this host" in lines[0]


@pytest.mark.parametrize("state", ["free", "stale"])
def test_exactly_one_of_several_jobs_racing_for_a_lease_wins(conditional_output_url, state):
    if state == "stale":
        Lease(conditional_output_url, ttl=0.01).acquire()
        time.sleep(0.1)
    contenders = [Lease(conditional_output_url, log=lambda _: None) for _ in range(6)]
    winners, start = [], threading.Barrier(len(contenders))

    def contend(lease):
        start.wait()
        with contextlib.suppress(LeaseHeld):
            lease.acquire()
            winners.append(lease.owner["id"])
    racing = [threading.Thread(target=contend, args=(lease,)) for lease in contenders]
    for thread in racing:
        thread.start()
    for thread in racing:
        thread.join(60)
    assert len(winners) == 1 and read_lease(conditional_output_url)["owner"]["id"] == winners[0]


def test_a_held_lease_is_renewed_by_its_heartbeat(tmp_path):
    with Lease(str(tmp_path), ttl=60.0, heartbeat=0.05) as held:
        first = read_lease(str(tmp_path))
        deadline = time.monotonic() + 60
        while read_lease(str(tmp_path))["heartbeat"] == first["heartbeat"] and time.monotonic() < deadline:
            time.sleep(0.05)
        renewed = read_lease(str(tmp_path))
        assert renewed["heartbeat"] > first["heartbeat"] and renewed["expires"] > first["expires"]
        assert renewed["owner"] == first["owner"]
        with pytest.raises(LeaseHeld):
            Lease(str(tmp_path)).acquire()
        held.check()


def test_a_job_whose_lease_was_taken_over_stops_writing(tmp_path):
    stalled = Lease(str(tmp_path), ttl=0.05)
    stalled.acquire()   # its heartbeat then stalls past the ttl
    time.sleep(0.2)
    Lease(str(tmp_path), log=lambda _: None).acquire()
    stalled.renew()
    with pytest.raises(LeaseLost, match="another job took it over"):
        stalled.check()


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


def test_classes_flag_sets_the_label_order_of_datasets_that_take_a_class_list(sample, tmp_path):
    videos = sorted(Path(sample["videos"]).rglob("*.mp4"))[:2]
    (tmp_path / "list.csv").write_text(f"{videos[0]},2\n{videos[1]},10\n")
    (tmp_path / "classes.txt").write_text("10\n2\n")
    args = ["--annotations", str(tmp_path / "list.csv"), "--videos", sample["videos"], "--output", str(tmp_path / "o")]
    parser = shard_kinetics.build_parser()
    given = shard_kinetics.config_from_args(parser.parse_args(args + ["--dataset", "csv", "--classes",
                                                                      str(tmp_path / "classes.txt")]))
    assert load_plan(given).classes == ("10", "2")
    default = shard_kinetics.config_from_args(parser.parse_args(args + ["--dataset", "csv"]))
    assert load_plan(default).classes == ("2", "10")
    with pytest.raises(ConfigError, match="--classes: --dataset ssv2 takes its classes from its own annotation files"):
        shard_kinetics.config_from_args(parser.parse_args(args + ["--dataset", "ssv2", "--classes", "c.txt"]))


def test_ctrl_c_ends_with_one_line_on_how_to_resume_exit_130_and_the_lease_released(sample, tmp_path, capsys):
    output, running = tmp_path / "shards", threading.Event()
    # Ctrl-C as in a fresh process: a Ray Train fit run earlier in this one leaves its own SIGINT handler
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def press_ctrl_c_after_the_first_commit():
        deadline = time.monotonic() + 120
        while running.is_set() and not list(output.glob("_job/done/*/*.json")) and time.monotonic() < deadline:
            time.sleep(0.02)
        if running.is_set():
            os.kill(os.getpid(), signal.SIGINT)
    running.set()
    threading.Thread(target=press_ctrl_c_after_the_first_commit, daemon=True).start()
    try:
        code = shard_kinetics.main(["--annotations", sample["annotations"], "--videos", sample["videos"],
                                    "--output", str(output), "--splits", "val", "--shard-size", "1", "--workers", "1"])
    finally:
        running.clear()
    out, err = capsys.readouterr()
    assert code == 130
    assert err.strip().splitlines()[-1] == ("shard_kinetics.py: interrupted; committed shards are kept and the "
                                            "output's lease is released: rerun the same command to resume")
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err
    assert read_lease(str(output)) is None and not (output / "manifest.json").exists()


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
    assert second["shards"] == first["shards"]   # the rewritten shard too, byte for byte (same size and sha256)
    row = rows_of("data/shards/train/index.parquet", filesystem=fs)[0]
    with fs.open(f"data/shards/{row['shard']}", "rb") as f:
        f.seek(row["offset"])
        assert hashlib.sha256(f.read(row["size"])).hexdigest() == row["sha256"]
    assert row["source"].startswith("s3://data/sample/videos/")
