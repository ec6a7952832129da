"""`python -m train`: fit and evaluate any registered model from a recipe.

    python -m train fit  --config configs/sample_tsm.yaml [key=value ...]
    python -m train fit  --config configs/sifar_b14_k400.yaml --workers 8 --gpus-per-worker 1
    python -m train eval --config configs/sample_tsm.yaml --checkpoint runs/<run>/checkpoints/<file>.pt
    python -m train eval --checkpoint s3://bucket/runs/<run>/checkpoint_<time>/state.pt eval.clips=4

`key=value` overrides any config key (dotted, YAML values: optim.lr=3e-4 eval.orders=[normal,shuffled]).
With --workers or --gpus-per-worker the same run goes through Ray Train (train.ray_train).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml

from contract.credentials import scrub, secret_env_values, secret_values, without_redacted
from train.config import ConfigError, apply_overrides, load_config, parse_override, validate


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("fit", "train a model (and evaluate it at the end)"), ("eval", "evaluate a checkpoint")):
        c = sub.add_parser(name, help=text)
        c.add_argument("--config", help="recipe YAML (configs/*.yaml); eval may take the checkpoint's own")
        c.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=3e-4")
        c.add_argument("--workers", type=int, default=None, help="Ray Train workers (data-parallel ranks)")
        c.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per Ray worker (0: CPU)")
        c.add_argument("--run-dir", default=None, help="run folder (fit: default runs/<name>-<timestamp>; "
                                                        "eval: default <the checkpoint's run>/eval-<timestamp>)")
        if name == "fit":
            c.add_argument("--resume", default=None, help="'auto' (latest checkpoint of --run-dir) or a checkpoint URL")
        else:
            c.add_argument("--checkpoint", required=True, help="checkpoint file or URL (s3://...)")
            c.add_argument("--ema", action="store_true", help="evaluate the EMA weights the checkpoint holds")
    return p


def resolve(args: argparse.Namespace) -> dict:
    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"ray.workers={args.workers}")
    if args.gpus_per_worker is not None:
        overrides.append(f"ray.gpus_per_worker={args.gpus_per_worker}")
    if args.run_dir and args.command == "fit":
        overrides.append(f"run.dir={args.run_dir}")
    if getattr(args, "resume", None):
        overrides.append(f"run.resume={args.resume}")
    if args.config or args.command == "fit":
        if not args.config:
            raise ConfigError("fit needs --config configs/<recipe>.yaml")
        return load_config(args.config, overrides)
    from contract.checkpoints import load   # eval without --config: the checkpoint's own resolved config
    # stored redacted: without those entries the storage credentials come from the environment again
    return validate(apply_overrides(without_redacted(load(args.checkpoint)["config"]), overrides))


def secrets_of(overrides: list[str]) -> list[str]:
    """The credential values an error message must not repeat: the environment's and the overrides'."""
    found = secret_env_values()
    for text in overrides:
        try:
            keys, value = parse_override(text)
        except (ConfigError, yaml.YAMLError):   # an unreadable override is the error being reported
            continue
        found += secret_values({keys[-1]: value})
    return found


def use_ray(cfg: dict) -> bool:
    return cfg["ray"]["workers"] > 1 or cfg["ray"]["gpus_per_worker"] > 0 or cfg["ray"]["address"] is not None


def eval_run_dir(cfg: dict, checkpoint: str) -> Path:
    """<run folder>/eval-<time>: beside the run the checkpoint came from when that is known, else in runs/."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(checkpoint)
    if "://" not in checkpoint and "checkpoints" in path.parts:
        return Path(*path.parts[:path.parts.index("checkpoints")]) / f"eval-{stamp}"
    if cfg["run"]["dir"]:
        return Path(cfg["run"]["dir"]) / f"eval-{stamp}"
    return Path(cfg["run"]["root"]) / f"{cfg['name']}-eval-{stamp}"


def evaluate_checkpoint(cfg: dict, checkpoint: str, *, ema: bool = False, run_dir: Path | None = None,
                        rank: int = 0, world_size: int = 1, device=None) -> dict:
    """Load a checkpoint's weights into the configured model and run the final evaluation protocol."""
    from contract import checkpoints
    from train import checkpoint as ckpt
    from train.evaluate import write_report
    from train.loop import final_evaluation, setup

    model, device = setup({**cfg, "init_from": None}, rank=rank, world_size=world_size, device=device)
    state = checkpoints.load(checkpoint, cfg["run"]["storage_options"])
    weights = state["model"]
    if ema:
        if not state.get("ema"):
            raise ConfigError(f"checkpoint {checkpoint!r} holds no EMA weights (train.ema_decay was not set)")
        weights = {k.removeprefix("module."): v for k, v in state["ema"].items()}
    ckpt.unwrap(model).load_state_dict(weights)
    report = final_evaluation(cfg, model, device, rank=rank, world_size=world_size, checkpoint=checkpoint)
    report["weights"] = "ema" if ema else "model"
    if rank == 0 and run_dir is not None:
        paths = write_report(report, run_dir)
        print(f"wrote {paths[0]} and {paths[1]}")
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        cfg = resolve(args)
    except ConfigError as e:
        parser.error(scrub(str(e), secrets_of(args.overrides)))
    if args.command == "fit":
        if use_ray(cfg):
            from train.ray_train import fit_with_ray
            return fit_with_ray(cfg)
        from train.loop import fit
        summary = fit(cfg)
        print(f"run folder: {summary['run_dir']}")
        return summary
    run_dir = Path(args.run_dir) if args.run_dir else eval_run_dir(cfg, args.checkpoint)
    if use_ray(cfg):
        from train.ray_train import eval_with_ray
        return eval_with_ray(cfg, args.checkpoint, ema=args.ema, run_dir=run_dir)
    return evaluate_checkpoint(cfg, args.checkpoint, ema=args.ema, run_dir=run_dir)
