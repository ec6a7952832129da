"""The same `fit` and evaluation on a Ray cluster: one Ray Train worker per data-parallel rank.

Each worker builds its own loader for its rank (ray.train.get_context()), wraps the model in DDP with
ray.train.torch.prepare_model, and hands checkpoints to Ray with ray.train.report(); Ray persists them
to RunConfig's storage (a folder, or a bucket through pyarrow's S3 filesystem with an endpoint override
for S3-compatible servers). When a worker dies, FailureConfig restarts the worker group and every
worker resumes exactly from the last reported checkpoint (ray.train.get_checkpoint()). Object-store
credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), never from configs.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from contract import checkpoints
from contract.local_ray import start_local_ray
from train.config import ConfigError, save_config
from train.loop import fit, new_run_dir
from train.metrics import run_files, write_index

REPO_ROOT = Path(__file__).resolve().parent.parent
UPLOAD_EXCLUDES = [".git/", "data/", "runs/", "build/", "**/__pycache__/", "*.tar", "*.mp4", "*.webm", "*.pt"]


def connect(address: str | None) -> None:
    """Join `address`, the submitted job's cluster, or start a private local Ray on 127.0.0.1."""
    if ray.is_initialized():
        return
    if address or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        ray.init(address=address or "auto")
        return
    start_local_ray(include_dashboard=False, runtime_env={"working_dir": str(REPO_ROOT), "excludes": UPLOAD_EXCLUDES})


def storage(cfg: dict, run_dir: Path):
    """(storage_path, pyarrow filesystem or None) for RunConfig. Bucket URLs (s3://, gs://) go through
    fsspec (s3fs, gcsfs) wrapped for pyarrow, so Ray reaches a bucket exactly as the loader and checkpoint
    code do: credentials and AWS_ENDPOINT_URL from the environment, or ray.s3_endpoint."""
    path = cfg["ray"]["storage_path"] or str((run_dir / "ray").resolve())
    if "://" not in path:
        return path, None
    import fsspec
    import pyarrow.fs
    options = {}
    if cfg["ray"]["s3_endpoint"] and path.startswith("s3://"):
        options["client_kwargs"] = {"endpoint_url": cfg["ray"]["s3_endpoint"]}
    fs, root = fsspec.core.url_to_fs(path, **options)
    return root, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def scaling(cfg: dict) -> ScalingConfig:
    r = cfg["ray"]
    resources = {"CPU": r["cpus_per_worker"]} | ({"GPU": r["gpus_per_worker"]} if r["gpus_per_worker"] else {})
    return ScalingConfig(num_workers=r["workers"], use_gpu=r["gpus_per_worker"] > 0, resources_per_worker=resources)


def _rank() -> tuple[int, int]:
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _train_worker(config: dict) -> None:
    cfg, run_dir = config["cfg"], Path(config["run_dir"])
    rank, world_size = _rank()
    resume_state = None
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder:
            resume_state = checkpoints.load(str(Path(folder) / checkpoints.STATE))
    # Each dataset of a multi-dataset run trains its own head: the others' heads get no gradient.
    ddp_options = {"find_unused_parameters": True} if cfg["data"]["datasets"] else None

    def prepare_model(model):
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_options)

    def save_checkpoint(state: dict, metrics: dict) -> None:
        metrics = {"epoch": state["epoch"], "updates": state["updates"], **metrics}
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            checkpoints.save(state, str(Path(folder) / checkpoints.STATE))
            for path in run_files(run_dir):
                shutil.copy(path, folder)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))

    summary = fit(cfg, rank=rank, world_size=world_size, device=ray.train.torch.get_device(),
                  prepare_model=prepare_model, save_checkpoint=save_checkpoint, resume_state=resume_state,
                  run_dir=run_dir)
    if rank == 0 and "eval" in summary:
        _publish(run_dir, config["storage"])


def _publish(run_dir: Path, target: tuple[str, object]) -> None:
    """Copy the run folder's files (not checkpoints: Ray holds those) next to Ray's checkpoints."""
    path, fs = target
    write_index(run_dir)
    files = run_files(run_dir) + [run_dir / "README.md"]
    if fs is None:
        dest = Path(path) / run_dir.name / "run"
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, dest)
        return
    for f in files:
        with fs.open_output_stream(f"{path}/{run_dir.name}/run/{f.name}") as out:
            out.write(f.read_bytes())


def _has_run(target, name: str) -> bool:
    path, fs = target
    snapshot = f"{path}/{name}/checkpoint_manager_snapshot.json"   # what Ray Train restores a run from
    if fs is None:
        return Path(snapshot).exists()
    import pyarrow.fs
    return fs.get_file_info(snapshot).type != pyarrow.fs.FileType.NotFound


def run_config(cfg: dict, run_dir: Path, target) -> RunConfig:
    path, fs = target
    return RunConfig(name=run_dir.name, storage_path=path, storage_filesystem=fs,
                     failure_config=FailureConfig(max_failures=cfg["ray"]["max_failures"]),
                     checkpoint_config=CheckpointConfig(num_to_keep=cfg["train"]["keep_checkpoints"]))


def fit_with_ray(cfg: dict) -> dict:
    """Train on `ray.workers` workers; returns the run folder, Ray's result and the last checkpoint.

    Rank 0 writes the run folder once the run has started (on its node); the driver's copy of the config
    follows when the run is over, so a run that cannot start leaves no config behind."""
    run_dir = new_run_dir(cfg).resolve()
    connect(cfg["ray"]["address"])
    target = storage(cfg, run_dir)
    if not cfg["run"]["resume"] and _has_run(target, run_dir.name):
        raise ConfigError(f"Ray storage {target[0]}/{run_dir.name} already holds that run's checkpoints; continue it "
                          f"with run.resume=auto (Ray then restores it), or give another run.dir")
    trainer = TorchTrainer(_train_worker, train_loop_config={"cfg": cfg, "run_dir": str(run_dir), "storage": target},
                           scaling_config=scaling(cfg), run_config=run_config(cfg, run_dir, target))
    result = trainer.fit()
    if not (run_dir / "config.yaml").exists():   # rank 0 ran on another node
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    write_index(run_dir)
    checkpoint = result.checkpoint.path if result.checkpoint else None
    print(f"run folder: {run_dir}; checkpoints: {target[0]}/{run_dir.name}; last: {checkpoint}")
    return {"run_dir": str(run_dir), "result": result, "checkpoint": checkpoint, "metrics": result.metrics}


def _eval_worker(config: dict) -> None:
    from train.cli import evaluate_checkpoint
    rank, world_size = _rank()
    with tempfile.TemporaryDirectory() as folder:   # the report's files travel to the driver through Ray's storage
        report = evaluate_checkpoint(config["cfg"], config["checkpoint"], ema=config["ema"], rank=rank,
                                     world_size=world_size, device=ray.train.torch.get_device(),
                                     model_from_checkpoint=config["model_from_checkpoint"],
                                     run_dir=Path(folder) if rank == 0 else None)
        first = next(iter(next(iter(report["results"].values())).values()))   # first dataset, first frame order
        metrics = {"video_top1": first["video"]["top1"], "clip_top1": first["clip"]["top1"],
                   "videos": first["video"]["count"]}
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder) if rank == 0 else None)


def eval_with_ray(cfg: dict, checkpoint: str, *, ema: bool = False, run_dir: Path | None = None,
                  model_from_checkpoint: bool = True) -> dict:
    """The final evaluation protocol spread over `ray.workers` ranks (every video counted once); the
    report's files are copied to `run_dir` on the driver and the report returned. `checkpoint` must be
    a URL or an absolute path: the workers run in another folder (contract.checkpoints.resolve)."""
    import json

    run_dir = Path(run_dir or new_run_dir(cfg)).resolve()
    connect(cfg["ray"]["address"])
    target = storage(cfg, run_dir)
    trainer = TorchTrainer(_eval_worker, scaling_config=scaling(cfg),
                           train_loop_config={"cfg": cfg, "checkpoint": checkpoint, "ema": ema,
                                              "model_from_checkpoint": model_from_checkpoint},
                           run_config=RunConfig(name=f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                                storage_path=target[0], storage_filesystem=target[1]))
    result = trainer.fit()
    run_dir.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as folder:
        for path in run_files(folder):
            shutil.copy(path, run_dir)
    write_index(run_dir)
    print(f"wrote the evaluation to {run_dir}")
    return json.loads((run_dir / "eval_report.json").read_text())
