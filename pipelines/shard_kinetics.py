"""Shard a video dataset into WebDataset tars with Parquet indexes (the offline half of the system).

    python pipelines/shard_kinetics.py --annotations A --videos V --output O [options]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python pipelines/shard_kinetics.py ...

A, V and O are local paths or fsspec URLs (s3://, gs://). Rerunning the same command resumes. Object
storage is configured the usual way: AWS_* variables (AWS_ENDPOINT_URL for S3-compatible servers),
fsspec's FSSPEC_S3_ENDPOINT_URL or an instance profile. Each Ray node reads its own: a local Ray this
script starts inherits the script's environment, a cluster's nodes have theirs (docs/infra.md).
"""
from __future__ import annotations

import os
import sys

# Run as a script (also inside `ray job submit`), Python puts pipelines/ on the path, not the repo root.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import argparse  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402

from contract.credentials import scrub  # noqa: E402
from contract.local_ray import start_local_ray  # noqa: E402
from shards.adapters import ADAPTERS  # noqa: E402
from shards.finalize import IncompleteOutput  # noqa: E402
from shards.job import (DEFAULT_SHARD_SIZE, ConfigError, JobConfig, JobIncomplete,  # noqa: E402
                        OutputConflict, run_job, transcode_options)
from shards.lease import LeaseHeld, LeaseLost  # noqa: E402
from shards.summary import describe  # noqa: E402

# What a standalone run must not upload to Ray with the code (datasets, outputs, caches).
UPLOAD_EXCLUDES = [".git/", "data/", "runs/", "build/", "**/__pycache__/", "*.tar", "*.mp4", "*.webm"]
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'1GB', '512MiB', '2.5GB' or plain bytes; decimal units are powers of 10, *iB ones powers of 2."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).upper()
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a size; use a number with a unit, "
                                         "e.g. 1GB, 512MB, 2GiB, or a plain number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])


def adapter_option(text: str) -> tuple[str, object]:
    """KEY=VALUE; VALUE is read as JSON when it parses (numbers, lists), else kept as text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE, e.g. split=2")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shard_kinetics.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--annotations", default=None,
                   help="annotation file or folder in the dataset's own format (not needed for --dataset images)")
    p.add_argument("--videos", required=True, help="folder holding the source videos")
    p.add_argument("--output", required=True, help="folder or bucket prefix for shards and indexes")
    p.add_argument("--dataset", choices=sorted(ADAPTERS), default="kinetics", help="annotation format (default: kinetics)")
    p.add_argument("--short-side", type=int, default=320, help="downscale so the short side is at most this many pixels (even; default 320)")
    p.add_argument("--codec", choices=["vp9", "h264"], default="vp9",
                   help="vp9 (.webm, default) decodes in DALI on CPU and GPU; h264 (.mp4) on GPU only")
    p.add_argument("--gop", type=int, default=8, help="a keyframe every N frames (default 8)")
    p.add_argument("--fps", type=float, default=None, help="resample to this rate (default: keep the source rate)")
    p.add_argument("--shard-size", type=parse_size, default=DEFAULT_SHARD_SIZE,
                   help="target shard size in source bytes, e.g. 1GB (default), 512MB (see docs/shard_format.md)")
    p.add_argument("--workers", type=int, default=None,
                   help="shards transcoded at once, one core each (default: every CPU of the Ray cluster)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed: which videos share a shard (default 0)")
    p.add_argument("--splits", default=None, help="comma-separated splits to shard (default: all)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to use (default: the submitted job's cluster, or a new local one)")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier job's output made with other arguments")
    p.add_argument("--classes", default=None, metavar="FILE",
                   help="class names in label order, one per line (kinetics, csv); default: the adapter's order "
                        "(see docs/datasets.md)")
    p.add_argument("--adapter-option", action="append", default=[], metavar="KEY=VALUE", type=adapter_option,
                   help="passed to the dataset adapter, e.g. split=2 (hmdb51/ucf101) or classes=URL; repeatable")
    return p


def in_submitted_job() -> bool:
    """True under `ray job submit`: Ray then owns the runtime env (working dir, env vars) of the whole job."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def connect_ray(address: str | None) -> None:
    """Join the job's cluster, the given one, or a new one on 127.0.0.1; ship this repo to workers unless Ray
    already does. Workers take storage credentials from their own node's environment (shards/storage.py)."""
    import ray

    if ray.is_initialized():   # called from Python with Ray already up
        return
    if in_submitted_job():
        ray.init(address=address or "auto")
        return
    runtime_env = {"working_dir": REPO_ROOT, "excludes": UPLOAD_EXCLUDES}
    if address:
        ray.init(address=address, runtime_env=runtime_env)
    else:
        start_local_ray(runtime_env=runtime_env, include_dashboard=False)


def config_from_args(args: argparse.Namespace) -> JobConfig:
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip()) if args.splits else None
    for flag in ("annotations", "videos", "output"):
        url = getattr(args, flag)
        if url and in_submitted_job() and "://" not in url and not os.path.isabs(url):
            raise ConfigError(f"--{flag}", f"{url!r} is relative, but a submitted job runs in Ray's copy of the "
                                           "working dir; pass an absolute path")
    options = dict(args.adapter_option)
    if args.classes is not None:
        if "classes" not in inspect.signature(ADAPTERS[args.dataset]).parameters:
            raise ConfigError("--classes", f"--dataset {args.dataset} takes its classes from its own annotation "
                                           "files; leave --classes out")
        if "classes" in options:
            raise ConfigError("--classes", "given twice (also as --adapter-option classes=); keep one")
        options["classes"] = args.classes
    return JobConfig(annotations=args.annotations, videos=args.videos, output=args.output, dataset=args.dataset,
                     transcode=transcode_options(args.short_side, args.codec, args.gop, args.fps),
                     shard_size=args.shard_size, seed=args.seed, splits=splits, workers=args.workers,
                     overwrite=args.overwrite, adapter_options=options)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        run_job(config, log=lambda line: print(line, flush=True), connect=lambda: connect_ray(args.ray_address))
    except ConfigError as e:
        parser.error(scrub(str(e)))
    except (OutputConflict, LeaseHeld) as e:
        print(f"shard_kinetics.py: error: {scrub(str(e))}", file=sys.stderr)
        return 2
    except (JobIncomplete, IncompleteOutput, LeaseLost) as e:
        print(f"shard_kinetics.py: incomplete: {scrub(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("shard_kinetics.py: interrupted; committed shards are kept and the output's lease is released: "
              "rerun the same command to resume", file=sys.stderr)
        return 130
    print(describe(config.output), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
