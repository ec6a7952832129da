"""`python -m train`: fit and evaluate any registered model from a recipe.

    python -m train fit  --config configs/sample_tsm.yaml [key=value ...]
    python -m train fit  --config configs/sifar_b14_k400.yaml --workers 8 --gpus-per-worker 1
    python -m train eval --checkpoint runs/<run>                      # its latest checkpoint
    python -m train eval --checkpoint s3://bucket/runs/<run>/checkpoint_<time> eval.clips=4
    python -m train eval --checkpoint k400_tsm_r50.pt data.val.shards=s3://bucket/k400-shards
    python -m train predict a.mp4 b.mkv --checkpoint k400_tsm_r50.pt eval.clips=4 eval.crops=3 [--json]

`key=value` overrides any config key (dotted, YAML values: optim.lr=3e-4 eval.orders=[normal,shuffled]).
With --workers or --gpus-per-worker the same run goes through Ray Train (train.ray_train).
`eval` without --config takes the checkpoint's own config and model (its build record), but never code:
a checkpoint whose config imports modules or names a loader class needs --config, or those keys restated.
`predict` prints the top-5 classes of each video file, through the evaluation path (train.predict).
Exit status: 0 done; 1 an evaluation that left videos out (the report lists them; --allow-missing
accepts it), or a video predict could not read; 2 an error in what was given (recipe, paths, shards,
classes), printed as one line.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import yaml

from contract.credentials import scrub, secret_env_values, secret_values, without_redacted
from train.config import (DEFAULTS, ConfigError, apply_overrides, datasets_of, load_config, parse_override,
                          plugin_loader, validate)

REPO = Path(__file__).resolve().parent.parent
PAPER_RECIPES = REPO / "configs"
# Local paths a run reads: those that exist are made absolute on the driver, since Ray Train workers run
# in another folder (anything else, a URL or a plugin loader's own spec, is left as it is).
INPUT_PATHS = ("init_from", "model.pretrained", "run.resume", "eval.reference", "data.train.shards", "data.val.shards")
CODE_KEYS = ("imports", "data.loader")   # config keys that name code to import: never taken from a checkpoint


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
            c.add_argument("--checkpoint", required=True,
                           help="a run folder, a checkpoint folder (checkpoints/, Ray's checkpoint_<time>/) or a "
                                "checkpoint file; local or a URL (s3://...)")
            c.add_argument("--ema", action="store_true", help="evaluate the EMA weights the checkpoint holds")
            c.add_argument("--allow-missing", action="store_true",
                           help="exit 0 even when videos of the split could not be evaluated (they are listed)")
    c = sub.add_parser("predict", help="top-5 classes of video files (any container or codec PyAV reads)")
    c.add_argument("inputs", nargs="+", metavar="VIDEO",
                   help="video files or URLs (any container or codec PyAV reads), and key=value config overrides "
                        "(eval.clips=4 eval.crops=3 data.options.protocol=ibm)")
    c.add_argument("--checkpoint", required=True, help="a checkpoint file or folder (as eval), or a converted release")
    c.add_argument("--config", help="recipe YAML whose views and loader options to use (default: the checkpoint's)")
    c.add_argument("--classes", help="class names, one per line in label order (default: the checkpoint's)")
    c.add_argument("--dataset", help="which dataset's head and classes, for a run over several (default: the first)")
    c.add_argument("--short-side", type=int, default=320,
                   help="normalise as the shard job's --short-side did for the training shards (default 320; 0 keeps)")
    c.add_argument("--fps", type=float, default=None, help="as the shard job's --fps (default: the source's rate)")
    c.add_argument("--json", action="store_true", help="print JSON (with every class's mean logit) instead of a table")
    return p


def overrides_of(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"ray.workers={args.workers}")
    if args.gpus_per_worker is not None:
        overrides.append(f"ray.gpus_per_worker={args.gpus_per_worker}")
    if args.run_dir and args.command == "fit":
        overrides.append(f"run.dir={args.run_dir}")
    if getattr(args, "resume", None):
        overrides.append(f"run.resume={args.resume}")
    return overrides


def absolute_paths(cfg: dict) -> dict:
    """`cfg` with the existing local paths of INPUT_PATHS (and of every dataset's shards) made absolute."""
    cfg = copy.deepcopy(cfg)
    places = [key.split(".") for key in INPUT_PATHS]
    places += [["data", "datasets", name, split, "shards"] for name in cfg["data"]["datasets"]
               for split in ("train", "val")]
    for *parents, key in places:
        node = cfg
        for part in parents:
            node = node.get(part) or {}   # a dataset without that split: nothing to change
        value = node.get(key)
        if isinstance(value, str) and "://" not in value and os.path.exists(os.path.expanduser(value)):
            node[key] = os.path.abspath(os.path.expanduser(value))
    return cfg


def from_scratch_warning(cfg: dict, recipe: str) -> str | None:
    """A paper recipe (configs/*, not sample_*) trained from random weights cannot reach the paper's numbers."""
    path = Path(recipe).resolve()
    if path.parent != PAPER_RECIPES or path.stem.startswith("sample_"):
        return None
    if cfg["model"]["pretrained"] or cfg["init_from"] or cfg["run"]["resume"]:
        return None
    return (f"warning: {path.name} is a paper recipe, but neither model.pretrained nor init_from is set: "
            f"{cfg['model']['name']} starts from random weights and will not reach the paper's accuracy; "
            f"give model.pretrained=<weights file> (see the recipe's comments)")

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


def checkpoint_config(state: dict, checkpoint: str, overrides: list[str]) -> dict:
    """The config `eval` runs with when no --config is given: the checkpoint's own (a converted release
    has none: its build record names the model), with the overrides applied.

    Code is never taken from a checkpoint: its `imports` and `data.loader` are used only when the command
    line restates them, else the checkpoint is refused with the fix."""

    if state.get("config") is None:
        if "build" not in state:
            raise ConfigError(f"checkpoint {checkpoint} holds neither a config nor a build record; pass --config "
                              f"<the recipe that trained it>")
        build = state["build"]
        saved = copy.deepcopy(DEFAULTS)
        saved["name"] = Path(checkpoint).stem
        saved["model"].update(name=build["name"], num_classes=build["num_classes"], num_frames=build["num_frames"],
                              img_size=build["img_size"], options=dict(build["options"]))
        return validate(apply_overrides(saved, overrides))
    saved = without_redacted(state["config"])
    given = {".".join(parse_override(text)[0]) for text in overrides}
    code = {"imports": saved["imports"], "data.loader": plugin_loader(saved)}
    defaults = {"imports": DEFAULTS["imports"], "data.loader": DEFAULTS["data"]["loader"]}
    unsafe = {key: value for key, value in code.items() if value != defaults[key] and key not in given}
    if unsafe:
        named = " ".join(f"{key}=[{','.join(value)}]" if isinstance(value, list) else f"{key}={value}"
                         for key, value in unsafe.items())
        raise ConfigError(f"checkpoint {checkpoint} names code to import ({named}), and code is never taken from a "
                          f"checkpoint; pass --config <the recipe>, or restate it on the command line: {named}")
    saved["imports"], saved["data"]["loader"] = defaults["imports"], defaults["data.loader"]
    return validate(apply_overrides(saved, overrides))


def eval_run_dir(cfg: dict, checkpoint: str) -> Path:
    """<run folder>/eval-<time>: beside the run the checkpoint came from when that is known, else in runs/.

    A plain run's checkpoint is <run>/checkpoints/<file>; a Ray Train one <storage>/<run>/checkpoint_<time>/
    state.pt, where <storage> is <run>/ray unless ray.storage_path moved it.
    """
    from contract import checkpoints
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(checkpoint)
    if "://" not in checkpoint:
        if checkpoints.FOLDER in path.parts:
            return Path(*path.parts[:path.parts.index(checkpoints.FOLDER)]) / f"eval-{stamp}"
        if path.parent.name.startswith(checkpoints.RAY_PREFIX):
            ray_run = path.parent.parent
            run = ray_run.parent.parent if ray_run.parent.name == checkpoints.RAY_FOLDER else ray_run
            return run / f"eval-{stamp}"
    if cfg["run"]["dir"]:
        return Path(cfg["run"]["dir"]) / f"eval-{stamp}"
    return Path(cfg["run"]["root"]) / f"{cfg['name']}-eval-{stamp}"


def evaluate_checkpoint(cfg: dict, checkpoint: str, *, ema: bool = False, run_dir: Path | None = None,
                        rank: int = 0, world_size: int = 1, device=None, model_from_checkpoint: bool = True,
                        state: dict | None = None) -> dict:
    """Run the final evaluation protocol on a checkpoint (any `contract.checkpoints.resolve` accepts).

    The model is the checkpoint's own (its build record and input contract, `models.load`) unless
    `model_from_checkpoint` is False or the checkpoint has no build record; then it is the config's.
    The checkpoint's class names must be the validation shards'. `state`: the checkpoint, already loaded.
    """
    import models
    from contract import checkpoints
    from train import checkpoint as ckpt
    from train.data import classes_by_dataset
    from train.evaluate import write_report
    from train.loop import final_evaluation, import_plugins, setup
    from train.metrics import say, write_index

    state = state if state is not None else checkpoints.load(checkpoint, cfg["run"]["storage_options"])
    built = None
    if model_from_checkpoint and "build" in state:
        import_plugins(cfg)
        built = models.load(state)
    model, device = setup({**cfg, "init_from": None}, rank=rank, world_size=world_size, device=device, model=built)
    weights = state["model"]
    if ema:
        if not state.get("ema"):
            raise ConfigError(f"checkpoint {checkpoint!r} holds no EMA weights (train.ema_decay was not set)")
        weights = {k.removeprefix("module."): v for k, v in state["ema"].items()}
    try:
        ckpt.unwrap(model).load_state_dict(weights)
    except RuntimeError as e:   # torch lists every mismatch, one per line after a heading
        first = (str(e).splitlines()[1:2] or [str(e)])[0].strip()
        raise ConfigError(f"checkpoint {checkpoint} does not fit the config's model {cfg['model']['name']} ({first}); "
                          f"evaluate without --config and model.* overrides to use the checkpoint's own model") from e
    classes = classes_by_dataset(state.get("classes"), list(datasets_of(cfg)))
    report, scores = final_evaluation(cfg, model, device, rank=rank, world_size=world_size, checkpoint=checkpoint,
                                      classes=classes, classes_from=f"checkpoint {checkpoint}")
    report["weights"] = "ema" if ema else "model"
    if rank == 0 and run_dir is not None:
        paths = write_report(report, run_dir, scores)
        write_index(run_dir)
        say(f"wrote {', '.join(str(p) for p in paths)}")
    return report


def user_error(error: BaseException) -> BaseException | None:
    """The error in what the user gave (recipe, paths, shards, classes) behind `error`, if there is one:
    `error` itself, its cause, or what a Ray Train worker raised."""
    from pipelines.loader import LoaderError
    pending = [error]
    while pending:
        e = pending.pop(0)
        inner = getattr(e, "cause", None)   # Ray's RayTaskError wraps a task's exception
        if isinstance(inner, BaseException):
            pending.insert(0, inner)
            continue
        if isinstance(e, (ConfigError, FileNotFoundError, LoaderError)):
            return e
        pending += [c for c in (e.__cause__,) if c is not None] + list(getattr(e, "worker_failures", {}).values())
    return None


def run(args: argparse.Namespace) -> dict:
    if args.command == "predict":
        from train.predict import run as predict
        return predict(args)
    from train.metrics import say
    overrides = overrides_of(args)
    if args.command == "fit":
        if not args.config:
            raise ConfigError("fit needs --config configs/<recipe>.yaml")
        cfg = absolute_paths(load_config(args.config, overrides))
        if (warning := from_scratch_warning(cfg, args.config)) is not None:
            say(warning)
        if use_ray(cfg):
            from train.ray_train import fit_with_ray
            return fit_with_ray(cfg)
        from train.loop import fit
        summary = fit(cfg)
        print(f"run folder: {summary['run_dir']}")
        return summary

    from contract import checkpoints
    from train.evaluate import coverage_line, missing_count
    given = load_config(args.config, overrides) if args.config else apply_overrides(DEFAULTS, overrides)
    checkpoint = checkpoints.resolve(args.checkpoint, given["run"]["storage_options"])
    state = checkpoints.load(checkpoint, given["run"]["storage_options"])
    cfg = absolute_paths(given if args.config else checkpoint_config(state, checkpoint, overrides))
    model_from_checkpoint = not args.config and not any(text.startswith("model.") for text in overrides)
    run_dir = Path(args.run_dir) if args.run_dir else eval_run_dir(cfg, checkpoint)
    if use_ray(cfg):
        from train.ray_train import eval_with_ray
        report = eval_with_ray(cfg, checkpoint, ema=args.ema, run_dir=run_dir,
                               model_from_checkpoint=model_from_checkpoint)
    else:
        report = evaluate_checkpoint(cfg, checkpoint, ema=args.ema, run_dir=run_dir,
                                     model_from_checkpoint=model_from_checkpoint, state=state)
    say(coverage_line(report))
    if missing_count(report) and not args.allow_missing:
        say(f"error: {missing_count(report)} videos of the split were not evaluated (listed in {run_dir}/"
            f"eval_report.md); fix or reshard them, or pass --allow-missing to accept the evaluation without them")
        raise SystemExit(1)
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "predict" and not any(text.startswith("-") for text in extra):
        args.inputs += extra   # argparse reads one run of positionals: VIDEO... --checkpoint X key=value
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return run(args)
    except Exception as error:   # noqa: BLE001 - a user's error becomes one line; anything else is a bug
        cause = user_error(error)
        if cause is None:
            raise
        from train.metrics import say
        say(f"error: {scrub(' '.join(str(cause).split()), secrets_of(getattr(args, 'overrides', [])))}")
        raise SystemExit(2) from None
