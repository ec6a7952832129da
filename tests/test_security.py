"""What a security review checks: object-store credentials never reach a file, a log or an output; every Ray
head the project starts or describes refuses callers without its token; Ray started for a lone job listens
on 127.0.0.1 only; the token files are their owner's alone."""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from test_ray_submit import free_port

from contract import checkpoints
from contract.credentials import REDACTED, redact

REPO = Path(__file__).resolve().parent.parent
ENV_KEY, ENV_SECRET = "AKIDcanaryEnvKey5e1f", "canaryEnvSecret/9c2e47d1b0"
OPTION_KEY, OPTION_SECRET = "AKIDcanaryOptKey8a3b", "canaryOptionSecret/41d8f0"
CANARIES = (ENV_KEY, ENV_SECRET, OPTION_KEY, OPTION_SECRET)


# ---------------------------------------------------------------- credentials

@pytest.fixture
def bucket(monkeypatch):
    """A local S3 server; the environment holds canary credentials, as a user's shell would (moto takes any).
    Buckets of their own: every moto server of a test process shares one store."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {"AWS_ACCESS_KEY_ID": ENV_KEY, "AWS_SECRET_ACCESS_KEY": ENV_SECRET,
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("security-data")
    fs.mkdir("security-runs")
    yield fs
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def files_under(*roots) -> list[Path]:
    return [p for root in roots for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink()]


def test_no_canary_credential_reaches_any_file_log_or_output(bucket, tmp_path, capfd):
    """The shard job (S3 to S3 through Ray), a training run and an evaluation, with canary credentials in the
    environment and (other canaries) in the storage options; then everything they wrote is searched."""
    import ray

    from shards.job import JobConfig, run_job, transcode_options
    from shards.sample_dataset import make_sample_dataset
    from train import cli

    sample = make_sample_dataset(tmp_path / "sample", num_classes=2, train_per_class=2, val_per_class=1,
                                 size=(64, 48), fps=10, seconds=1.6, broken=False)
    bucket.put(sample["root"] + "/", "security-data/sample", recursive=True)
    ray_dir = tempfile.mkdtemp(prefix="vs-ray-")          # short: Ray's socket paths must fit 107 bytes
    try:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2,
                 _temp_dir=ray_dir, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        try:
            run_job(JobConfig("s3://security-data/sample/annotations", "s3://security-data/sample/videos",
                              "s3://security-data/shards", transcode=transcode_options(short_side=48), workers=2,
                              progress_every=0.5))
        finally:
            ray.shutdown()

        run_dir, eval_dir = tmp_path / "run", tmp_path / "eval"
        options = f"{{key: {OPTION_KEY}, secret: '{OPTION_SECRET}'}}"
        shards = "s3://security-data/shards"
        cli.main(["fit", "--config", str(REPO / "configs" / "sample_tsm.yaml"), "--run-dir", str(run_dir),
                  f"data.train.shards={shards}", f"data.val.shards={shards}", f"data.options.storage_options={options}",
                  "data.batch_size=2", "data.options.short_side=[36,40]", "data.options.readers=1",
                  "model.num_classes=2", "model.img_size=32", "sched.epochs=1", "sched.warmup_epochs=0",
                  "train.checkpoint_every=1", "train.eval_every=0", "train.log_every=1", "eval.at_end=false",
                  "eval.clips=1", "eval.orders=[normal]", "run.storage=s3://security-runs/tiny/checkpoints",
                  f"run.storage_options={options}"])
        # The checkpoint's own config, read back without its redacted keys: the environment's credentials.
        report = cli.main(["eval", "--checkpoint", "s3://security-runs/tiny/checkpoints", "--run-dir", str(eval_dir)])
        assert report["results"]["main"]["normal"]["video"]["count"] == 2

        written = {str(p): p.read_bytes() for p in files_under(run_dir, eval_dir, ray_dir)}
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    objects = [p for b in ("security-data", "security-runs") for p in bucket.find(b)
               if not p.startswith("security-data/sample/")]
    written |= {f"s3://{p}": bucket.cat_file(p) for p in objects}
    stored = [p for p in objects if p.endswith(".pt")]
    assert len(stored) == 2 and any(p.startswith("security-data/shards/") for p in objects)
    configs = {p: checkpoints.load(f"s3://{p}")["config"] for p in stored}
    out, err = capfd.readouterr()
    assert "videos 6/6" in out and any(".log" in path for path in written)   # the job's lines, Ray's logs
    texts = {"stdout": out, "stderr": err} | {f"{p} config": repr(c) for p, c in configs.items()}
    leaks = [(canary, where) for canary in CANARIES for where, data in written.items() if canary.encode() in data]
    leaks += [(canary, where) for canary in CANARIES for where, text in texts.items() if canary in text]
    assert not leaks, leaks
    assert all(c["data"]["options"]["storage_options"] == c["run"]["storage_options"] == {"key": REDACTED,
               "secret": REDACTED} for c in configs.values())   # kept, as a placeholder


def test_a_redacted_config_reads_back_without_its_placeholders(tmp_path):
    """A run folder's config.yaml and a checkpoint's config hold placeholders; read back, those entries are
    gone, so s3fs takes the credentials from the environment instead of sending the placeholder."""
    from train import cli
    from train.config import load_config, save_config

    options = f"{{key: {OPTION_KEY}, secret: '{OPTION_SECRET}', client_kwargs: {{region_name: us-east-1}}}}"
    cfg = load_config(REPO / "configs" / "sample_tsm.yaml", [f"run.storage_options={options}"])
    save_config(cfg, tmp_path / "config.yaml")
    checkpoints.save({"config": redact(cfg)}, str(tmp_path / "state.pt"))   # as Trainer.state_dict stores it
    assert OPTION_SECRET not in (tmp_path / "config.yaml").read_text()
    path = str(tmp_path / "state.pt")
    from_checkpoint = cli.checkpoint_config(checkpoints.load(path), path, [])
    for read_back in (load_config(tmp_path / "config.yaml"), from_checkpoint):
        assert read_back["run"]["storage_options"] == {"client_kwargs": {"region_name": "us-east-1"}}


# ---------------------------------------------------------------- Ray heads


def manifest(path: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((REPO / path).read_text()) if d]


def containers(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from value if key == "containers" else containers(value)
    elif isinstance(node, list):
        for value in node:
            yield from containers(value)


def secret_env(container: dict) -> dict:
    """The container's env, a secretKeyRef read as 'secret:<name>/<key>'."""
    env = {}
    for entry in container.get("env", []):
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        env[entry["name"]] = f"secret:{ref['name']}/{ref['key']}" if ref else entry["value"]
    return env


def launcher_start(command: str) -> tuple[dict, list[str]]:
    """(VAR=value assignments, `ray start` arguments) of a cluster launcher start command."""
    words = shlex.split(command)
    at = words.index("ray")
    assert words[at + 1] == "start", command
    return dict(w.split("=", 1) for w in words[:at]), words[at + 2:]


def test_every_manifest_turns_token_auth_on_and_opens_the_dashboard_only_with_it():
    cluster, *jobs = (manifest(f"infra/k8s/{n}.yaml")[0] for n in ("raycluster", "rayjob-shard", "rayjob-train"))
    pods = list(containers(cluster)) + [c for job in jobs for c in containers(job)]
    assert len(pods) == 4
    for container in pods:   # head, workers and both jobs' submitters: one token, from a Secret
        env = secret_env(container)
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == "secret:vidscale-ray-token/auth_token"
    aws = manifest("infra/ray-cluster-aws.yaml")[0]
    assert aws["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = [launcher_start(c) for c in aws["head_start_ray_commands"] + aws["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2 and all(env == {"RAY_AUTH_MODE": "token"} for env, _ in starts)
    dashboards = [cluster["spec"]["headGroupSpec"]["rayStartParams"].get("dashboard-host"),
                  next(a.split("=", 1)[1] for a in starts[0][1] if a.startswith("--dashboard-host="))]
    assert dashboards == ["0.0.0.0", "127.0.0.1"]   # 0.0.0.0 only on KubeRay, where every pod has the token


def kuberay_head(token: str, home: Path) -> tuple[dict, dict]:
    """How KubeRay starts the head: `ray start --head` with rayStartParams, in the container's env."""
    spec = manifest("infra/k8s/raycluster.yaml")[0]["spec"]["headGroupSpec"]
    (container,) = spec["template"]["spec"]["containers"]
    env = {k: token if v == "secret:vidscale-ray-token/auth_token" else v for k, v in secret_env(container).items()}
    return dict(spec["rayStartParams"]), env


def launcher_head(token: str, home: Path) -> tuple[dict, dict]:
    """How the cluster launcher starts the head: its command, the head type's resources in
    RAY_OVERRIDE_RESOURCES (as the launcher passes them), the token file file_mounts puts in ~."""
    aws = manifest("infra/ray-cluster-aws.yaml")[0]
    env, args = launcher_start(next(c for c in aws["head_start_ray_commands"] if "ray start" in c))
    env["RAY_OVERRIDE_RESOURCES"] = json.dumps(aws["available_node_types"][aws["head_node_type"]]["resources"])
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(token)
    params = dict(a[2:].split("=", 1) for a in args if a != "--head")   # every other flag has a value there
    params.pop("autoscaling-config")   # the launcher writes that file on the head; it sets up scaling, not access
    return params, env


def post_job(dashboard: str, token: str | None) -> int:
    request = urllib.request.Request(f"{dashboard}/api/jobs/", method="POST", data=b'{"entrypoint": "true"}',
                                     headers={"Content-Type": "application/json"} |
                                     ({"Authorization": f"Bearer {token}"} if token else {}))
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def accepted(dashboard: str, token: str) -> int | None:
    """The status of a job submitted with `token`, once the head can take jobs: its dashboard answers
    before its job agent is up (500 "No available agent", or a dropped connection)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            status = post_job(dashboard, token)
        except OSError:
            status = None
        if status not in (None, 500) or time.monotonic() > deadline:
            return status
        time.sleep(2)


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/api/version", timeout=5).close()
    except urllib.error.HTTPError:
        pass
    except OSError:
        return False
    return True


def start_head(params: dict, env: dict, home: Path, temp_dir: Path) -> tuple[str, subprocess.Popen]:
    """`ray start --head` with `params` in `env`, on 127.0.0.1 with free ports (a sandbox has no pod network:
    the host address, the dashboard's too, becomes 127.0.0.1) and its own temp dir; returns its dashboard's
    URL and the process, at once."""
    dashboard_port = free_port()
    params = params | {"node-ip-address": "127.0.0.1", "dashboard-host": "127.0.0.1", "port": free_port(),
                       "dashboard-port": dashboard_port, "ray-client-server-port": free_port(),
                       "dashboard-agent-listen-port": free_port()}
    if "object-manager-port" in params:
        params["object-manager-port"] = free_port()
    args = ["--head", "--block", "--disable-usage-stats", "--temp-dir", str(temp_dir)]
    args += [f"--{k}={v}" for k, v in params.items()]
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    head = subprocess.Popen([shutil.which("ray") or "ray", "start", *args], env=base | env | {"HOME": str(home)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    return f"http://127.0.0.1:{dashboard_port}", head


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> dict:
    """{how: (dashboard URL, token)} for a head started as each manifest starts it; both run at once, and
    are stopped by their process groups (never `ray stop`, which ends every Ray on the machine)."""
    started, temp_dirs = {}, []
    try:
        for how, describe in (("kuberay", kuberay_head), ("cluster-launcher", launcher_head)):
            home, token = tmp_path_factory.mktemp(how), secrets.token_hex(16)
            temp_dirs.append(tempfile.mkdtemp(prefix="vs-head-"))   # short: Ray's socket paths must fit 107 bytes
            started[how] = (*start_head(*describe(token, home), home, temp_dirs[-1]), token)
        deadline = time.monotonic() + 300
        for how, (url, process, _) in started.items():
            while not answers(url):
                assert process.poll() is None and time.monotonic() < deadline, f"the {how} head did not start"
                time.sleep(1)
        yield {how: (url, token) for how, (url, _, token) in started.items()}
    finally:
        for _, process, _ in started.values():
            os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5   # a graceful stop gets a few seconds, then the group is killed
        for _, process, _ in started.values():
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for folder in temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("started_by", ["kuberay", "cluster-launcher"])
def test_a_head_started_as_the_manifest_starts_it_refuses_a_job_without_the_token(heads, started_by):
    dashboard, token = heads[started_by]
    assert accepted(dashboard, token) == 200
    assert post_job(dashboard, None) == 401
    assert post_job(dashboard, secrets.token_hex(16)) in (401, 403)


# ---------------------------------------------------------------- a lone job's Ray

PROBE = """
import json, sys
import ray                               # imported first, as the CLI does, before anything sets its variables
import psutil                            # Ray's own copy
sys.path.insert(0, sys.argv[1])
from pipelines.shard_kinetics import connect_ray
connect_ray(None)
listening = sorted({c.laddr.ip for p in psutil.Process().children(recursive=True)
                    for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN})
print(json.dumps({"node": ray.util.get_node_ip_address(), "listening": listening}))
ray.shutdown()
"""


def test_the_shard_jobs_own_ray_listens_on_loopback_only_and_its_token_file_is_private(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" and
           not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", PROBE, str(REPO)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    addresses = [ipaddress.ip_address(a) for a in found["listening"]]
    assert found["node"] == "127.0.0.1" and addresses
    assert all((getattr(a, "ipv4_mapped", None) or a).is_loopback for a in addresses), found["listening"]
    assert (tmp_path / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600


def test_the_token_file_the_demo_head_makes_is_private(tmp_path):
    made = subprocess.run(["bash", "-c", "source infra/local_head.sh && make_auth_token"], cwd=REPO,
                          env=os.environ | {"HOME": str(tmp_path)}, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600
