"""infra/: the files parse, and every script, recipe, module and image they name exists in this repo."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
YAMLS = sorted(INFRA.rglob("*.yaml"))
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"vidscale:{VERSION}"
DOCKER_INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "ADD", "USER", "CMD", "ENTRYPOINT",
                       "EXPOSE", "LABEL", "SHELL", "VOLUME", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD"}


# A repo file named in a command or script: every one must exist.
NAMED_FILE = re.compile(r"\b((?:pipelines|configs|infra|benchmarks|shards|tests|docs)/[\w./-]+\.(?:py|yaml|sh|md))")


def module_exists(module: str) -> bool:
    """`python -m module` finds it in this repo (a module file or a package with __main__.py)."""
    path = REPO / module.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__main__.py").exists()


def documents(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def walk(node, key=None):
    """(key, value) for every scalar in a YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, key)
    else:
        yield key, node


def commands() -> list[str]:
    """Every shell command the infra files run: RayJob entrypoints and the cluster's start commands."""
    found = []
    for path in YAMLS:
        for doc in documents(path):
            found += [v for k, v in walk(doc) if k in ("entrypoint",) or (isinstance(v, str) and "python" in v)]
    return found


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (INFRA / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_file_parses(path):
    assert documents(path)


def test_the_dockerfile_has_only_known_instructions_starts_from_a_base_and_copies_what_exists():
    instructions = dockerfile_instructions()
    assert {name for name, _ in instructions} <= DOCKER_INSTRUCTIONS
    assert [name for name, _ in instructions if name != "ARG"][0] == "FROM"
    for name, args in instructions:
        if name == "COPY":
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repo"


def test_the_image_installs_every_dependency_with_the_projects_pins_and_copies_every_package():
    """The Dockerfile installs dependencies before the code (a cached layer), so it lists them again; a pin
    bumped in pyproject.toml alone would give the cluster other versions than the tests ran with."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    specs = {word.strip("'\"") for name, args in dockerfile_instructions() if name == "RUN"
             for command in args.split("&&") if "pip install" in command for word in shlex.split(command)}
    missing = [d for d in project["project"]["dependencies"] if d not in specs]
    assert not missing, f"infra/Dockerfile does not install {missing} as pyproject.toml pins them"
    copied = {shlex.split(args)[0] for name, args in dockerfile_instructions() if name == "COPY"}
    packages = {pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied


def test_the_image_every_file_names_is_the_one_build_image_sh_builds_from_the_dockerfile():
    script = (INFRA / "build_image.sh").read_text()
    assert "-f infra/Dockerfile" in script and 'vidscale:${VERSION}' in script
    images = [v for path in YAMLS for doc in documents(path) for k, v in walk(doc) if k == "image"]
    assert images and set(images) == {IMAGE}


def test_every_script_recipe_and_module_the_jobs_run_exists():
    runs = commands()
    assert any("shard_kinetics.py" in c for c in runs) and any("-m train fit" in c for c in runs)
    for command in runs:
        for path in NAMED_FILE.findall(command):
            assert (REPO / path).exists(), f"{path} (in {command!r}) is not in the repo"
        for module in re.findall(r"python -m ([\w.]+)", command):
            assert module_exists(module), f"python -m {module}: no such module"


def test_the_training_job_overrides_only_keys_the_recipe_has():
    from train.config import load_config
    for command in commands():
        if "-m train fit" not in command:
            continue
        words = shlex.split(command.split("&&")[-1])
        recipe = words[words.index("--config") + 1]
        overrides = [w for w in words if "=" in w and not w.startswith("-")]
        load_config(REPO / recipe, overrides)     # raises ConfigError on an unknown key


def test_jobs_attach_to_the_cluster_the_manifests_define():
    kinds = {doc["kind"]: doc for path in (INFRA / "k8s").glob("*.yaml") for doc in documents(path)}
    cluster = kinds["RayCluster"]["metadata"]["name"]
    jobs = [doc for path in (INFRA / "k8s").glob("*.yaml") for doc in documents(path) if doc["kind"] == "RayJob"]
    assert len(jobs) == 2
    for job in jobs:
        assert job["apiVersion"] == "ray.io/v1" and job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster}


def test_credentials_come_from_a_secret_never_from_a_file():
    for path in YAMLS:
        text = path.read_text()
        assert not re.search(r"(?i)(secret_access_key|access_key_id|password|token)\s*[:=]\s*['\"]?\w{8,}", text), path
        for doc in documents(path):
            for key, value in walk(doc):
                assert not (isinstance(value, str) and value.startswith(("AKIA", "ASIA"))), f"{path}: an AWS key id"
    pods = [c for path in (INFRA / "k8s").glob("*.yaml") for doc in documents(path) for k, c in walk_containers(doc)]
    assert pods and all({"secretRef": {"name": "vidscale-object-store"}} in c.get("envFrom", []) for c in pods)


def walk_containers(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "containers":
                for c in v:
                    yield k, c
            else:
                yield from walk_containers(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk_containers(v)


def test_the_gpu_checks_script_parses_and_names_what_exists():
    """infra/gpu_checks.sh runs only on a lent GPU machine, so its names are checked here, where CI runs."""
    script = INFRA / "gpu_checks.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for path in NAMED_FILE.findall(text):
        assert (REPO / path).exists(), f"{path} (named in {script.name}) is not in the repo"
    for module in re.findall(r"-m (benchmarks\.\w+)", text):
        assert module_exists(module), f"python -m {module}: no such module"


def test_the_gpu_checks_pass_only_options_their_benchmarks_take():
    """A renamed option would end a step on the lent machine, after its start and transfers were paid for."""
    text = (INFRA / "gpu_checks.sh").read_text()
    for name, module in (("PIPELINE_ARGS", "benchmarks.pipeline_throughput"), ("TRAIN_ARGS", "benchmarks.train_throughput")):
        usage = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO,
                               check=True).stdout
        flags = {flag for args in re.findall(rf"{name}=\((.*)\)", text) for flag in re.findall(r"--[a-z][a-z-]*", args)}
        assert flags, f"no {name} in {INFRA / 'gpu_checks.sh'}"
        for flag in flags:
            assert re.search(rf"{flag}(?![\w-])", usage), f"{module} takes no {flag} (gpu_checks.sh passes it)"

def test_the_gpu_checks_stage_the_ray_and_timm_the_project_pins():
    wheels = subprocess.run(["bash", str(INFRA / "gpu_checks.sh"), "--wheels"], capture_output=True, text=True,
                            check=True).stdout.split()
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {name.split("[")[0]: version for name, version in (d.split("==") for d in dependencies if "==" in d)}
    for name in ("ray", "timm"):
        assert f"{name}=={pins[name]}" in wheels


def gpu_image_python(code: str) -> subprocess.CompletedProcess:
    """`python -c code` with the modules the GPU machine's image lacks hidden, as in a rehearsal."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(INFRA / "gpu_image"), str(REPO), str(REPO / "tests")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)


def test_the_gpu_image_rehearsal_hides_what_the_gpu_machine_lacks():
    hidden = gpu_image_python("import importlib.util as u; assert u.find_spec('s3fs') is None; import s3fs")
    assert "No module named 's3fs' (not on the GPU machine's image)" in hidden.stderr


def test_what_the_gpu_checks_run_imports_with_only_the_gpu_machines_packages():
    """A top-level import of a package only `make install` brings (s3fs, pydantic, ...) would end the
    checks on the lent machine; here it fails in CI instead."""
    done = gpu_image_python("import benchmarks.pipeline_throughput, benchmarks.train_throughput, train.loop, "
                            "test_video_pipeline, test_loader; print('imported')")
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-2000:]


def test_the_gpu_checks_start_no_step_once_their_budget_is_spent(tmp_path):
    env = {**os.environ, "GPU_CHECKS_DEVICE": "cpu", "GPU_CHECKS_BUDGET": "0", "OUT": str(tmp_path),
           "BENCH_DATA": str(tmp_path / "bench")}
    run = subprocess.run(["bash", str(INFRA / "gpu_checks.sh")], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 1
    assert "== tests: skipped" in run.stdout and "== pipeline_throughput: skipped" in run.stdout
    assert not (tmp_path / "bench").exists()


def test_the_gpu_training_benchmark_recipes_load_with_their_overrides():
    from train.config import load_config
    text = (INFRA / "gpu_checks.sh").read_text()
    recipes = [shlex.split(arg)[0].split() for arg in re.findall(r'--config ("[^"]*"|[^\s)]+)', text)]
    assert len(recipes) >= 2
    for recipe, *overrides in recipes:
        load_config(REPO / recipe, overrides + ["data.batch_size=32"])   # raises on an unknown key
