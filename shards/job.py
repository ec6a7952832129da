"""The shard job as a function: plan, resume check, Ray execution, final outputs. The CLI is a thin shell.

Resuming is the normal way to recover from anything (a killed driver, a lost node, a storage outage):
rerun the same command. `_job/config.json` records the arguments that define the output and the plan's
fingerprint; a rerun with the same ones skips every committed shard, while a rerun with different ones
is refused (mixing two option sets in one dataset would be silent corruption) unless `overwrite`.
The arguments are recorded with credential fields redacted (`contract.credentials`), and every line the
job logs is scrubbed of the environment's credential values.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import ray

from contract.credentials import redact, scrub

from . import storage
from .execute import Progress, run_shards
from .finalize import read_marker, write_outputs
from .lease import LEASE, Lease
from .plan import Plan, make_plan
from .transcode import ENCODERS, TranscodeOptions

DEFAULT_SHARD_SIZE = 10**9   # 1GB, as the CLI writes it
_NOT_IDENTITY = {"threads"}      # options that change speed, not the output


class ConfigError(ValueError):
    """A job argument is unusable; `argument` names the CLI flag so the message can point at it."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument}: {message}")
        self.argument = argument


class OutputConflict(RuntimeError):
    """The output folder holds something this run must not mix with or delete."""


class JobIncomplete(RuntimeError):
    """Some shards could not be written even after retries; committed ones are kept for the rerun."""


@dataclass(frozen=True)
class JobConfig:
    annotations: str | None     # None only for datasets without annotation files (images)
    videos: str
    output: str
    dataset: str = "kinetics"
    transcode: TranscodeOptions = field(default_factory=TranscodeOptions)
    shard_size: int = DEFAULT_SHARD_SIZE
    seed: int = 0
    splits: tuple[str, ...] | None = None
    workers: int | None = None  # shards in flight at once; None: one per CPU of the Ray cluster
    overwrite: bool = False
    adapter_options: dict = field(default_factory=dict)
    progress_every: float = 5.0

    def identity(self) -> dict:
        """The arguments that determine the output, credentials redacted; a resume must match them exactly
        (JSON-normalised)."""
        options = {k: v for k, v in dataclasses.asdict(self.transcode).items() if k not in _NOT_IDENTITY}
        return redact(json.loads(json.dumps({
            "dataset": self.dataset, "annotations": self.annotations and storage.absolute_url(self.annotations),
            "videos": storage.absolute_url(self.videos), "shard_size": self.shard_size, "seed": self.seed,
            "splits": list(self.splits) if self.splits else None, "adapter_options": self.adapter_options,
            **options}, sort_keys=True)))


def _check_transcode(short_side: int | None, codec: str, gop: int, fps: float | None) -> None:
    if codec not in ENCODERS:
        raise ConfigError("--codec", f"{codec!r} is not supported; use one of {sorted(ENCODERS)}")
    if short_side is not None and (short_side <= 0 or short_side % 2):
        raise ConfigError("--short-side", f"{short_side} must be a positive even number of pixels "
                                          "(yuv420p video needs even sizes), e.g. 320")
    if gop < 1:
        raise ConfigError("--gop", f"{gop} must be at least 1 (a keyframe every N frames), e.g. 8")
    if fps is not None and not fps > 0:
        raise ConfigError("--fps", f"{fps} must be positive, or left out to keep the source rate")


def transcode_options(short_side: int | None = 320, codec: str = "vp9", gop: int = 8, fps: float | None = None,
                      **extra) -> TranscodeOptions:
    """TranscodeOptions from job arguments, with errors that name the flag to fix."""
    _check_transcode(short_side, codec, gop, fps)
    return TranscodeOptions(short_side=short_side, codec=codec, gop=gop, fps=fps, **extra)


def validate(config: JobConfig) -> None:
    """Fail fast, before any Ray work, with the flag and the fix in the message."""
    options = config.transcode
    _check_transcode(options.short_side, options.codec, options.gop, options.fps)
    if config.shard_size <= 0:
        raise ConfigError("--shard-size", f"{config.shard_size} bytes must be positive, e.g. 1GB")
    if config.workers is not None and config.workers < 1:
        raise ConfigError("--workers", f"{config.workers} must be at least 1")
    for flag, url in (("--annotations", config.annotations), ("--videos", config.videos)):
        if url is None:
            if flag == "--annotations" and config.dataset == "images":
                continue
            raise ConfigError(flag, f"is required for --dataset {config.dataset}")
        try:
            fs, path = storage.resolve(url)
            found = fs.exists(path)
        except Exception as e:   # noqa: BLE001 - bad scheme, unreachable endpoint, missing credentials
            raise ConfigError(flag, f"cannot reach {url!r} ({type(e).__name__}: {e}); check the URL and "
                                    "credentials (AWS_* / FSSPEC_* variables for object storage)") from e
        if not found:
            raise ConfigError(flag, f"{url!r} does not exist; check the path")
    try:
        storage.check_writable(config.output)
    except Exception as e:   # noqa: BLE001
        raise ConfigError("--output", f"cannot write to {config.output!r} ({type(e).__name__}: {e}); choose a "
                                      "writable folder or bucket") from e


def _describe_changes(before: dict, now: dict) -> str:
    changes = []
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            flag = "--" + key.replace("_", "-")
            changes.append(f"{flag} was {before.get(key)!r}, now {now.get(key)!r}")
    return "; ".join(changes)


def _conflict(config: JobConfig, changes: str) -> OutputConflict:
    return OutputConflict(f"--output {config.output} already holds a shard job made differently: {changes}. Rerun "
                          "with the original arguments to resume it, choose another --output, or pass --overwrite "
                          "to delete it and start over.")


def refuse_foreign_output(config: JobConfig) -> None:
    """Never write into a non-empty folder that holds no shard job (checked before the lease is taken there)."""
    fs, root = storage.resolve(config.output)
    fs.invalidate_cache()
    if fs.exists(storage.join(root, "_job", "config.json")):
        return
    others = [p for p in (fs.ls(root, detail=False) if fs.isdir(root) else [])
              if p.rstrip("/").rsplit("/", 1)[-1] != "_job"]
    if others:
        raise OutputConflict(f"--output {config.output} is not empty and holds no shard job (found {others[0]}); "
                             "choose an empty or new folder (--overwrite never deletes folders the job did not make)")


def _clear_output(fs, root: str) -> None:
    """What `overwrite` deletes: the earlier job's output, all but the lease this job holds on it."""
    keep = {storage.join(root, LEASE), storage.join(root, "_job", "lease.lock")}
    doomed = [path for path in fs.find(root) if path not in keep]
    if doomed:
        fs.rm(doomed)   # S3 deletes up to 1000 keys per request
    if storage.is_local(fs):   # object stores have no empty folders to leave behind
        for folder, _, _ in sorted(os.walk(root), reverse=True):
            if folder not in (root, storage.join(root, "_job")) and not os.listdir(folder):
                os.rmdir(folder)


def claim_output(config: JobConfig) -> dict | None:
    """Under the lease, before any work: the earlier run's state if this run resumes it, else None (a fresh output).

    Refuses an output made with other arguments (unless `overwrite`, which deletes it).
    """
    fs, root = storage.resolve(config.output)
    fs.invalidate_cache()
    state_path = storage.join(root, "_job", "config.json")
    if not fs.exists(state_path):
        return None
    previous = storage.read_json(fs, state_path)
    if previous["arguments"] == config.identity():
        return previous
    if not config.overwrite:
        raise _conflict(config, _describe_changes(previous["arguments"], config.identity()))
    _clear_output(fs, root)
    return None


def record_plan(config: JobConfig, plan: Plan, previous: dict | None) -> bool:
    """Tie the output to this plan; True when resuming (the earlier run planned exactly the same shards)."""
    fs, root = storage.resolve(config.output)
    if previous is not None:
        if previous["plan"] == plan.fingerprint():
            return True
        if not config.overwrite:
            raise _conflict(config, "the arguments are the same but the inputs changed (annotations or videos)")
        _clear_output(fs, root)
    storage.write_json(fs, storage.join(root, "_job", "config.json"),
                       {"arguments": config.identity(), "plan": plan.fingerprint()})
    return False


def committed_counts(config: JobConfig, plan: Plan) -> dict[str, tuple[int, int]]:
    """(samples, failures) of every shard whose commit marker matches the plan; read in parallel for object stores."""
    fs, root = storage.resolve(config.output)
    fs.invalidate_cache()

    def check(spec):
        marker = read_marker(fs, root, spec)
        if marker is None or marker["fingerprint"] != spec.fingerprint():
            return None
        return spec.name, (len(marker["rows"]), len(marker["failures"]))
    with ThreadPoolExecutor(16) as pool:
        return dict(r for r in pool.map(check, plan.shards) if r is not None)


def load_plan(config: JobConfig) -> Plan:
    from . import adapters   # imported here: adapters pull in dataset-specific parsers the workers never need

    try:
        result = adapters.load(config.dataset, config.annotations and storage.absolute_url(config.annotations),
                               storage.absolute_url(config.videos), **config.adapter_options)
    except TypeError as e:      # an option this dataset's adapter does not take
        raise ConfigError("--adapter-option", str(e)) from e
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:   # the adapter's words name the input
        raise ConfigError("--videos" if str(e).startswith("videos") else "--annotations", str(e)) from e
    try:
        return make_plan(list(result.records), list(result.failures), list(result.classes), config.videos,
                         config.shard_size, config.seed, config.splits)
    except ValueError as e:
        raise ConfigError("--splits", str(e)) from e


def _connect() -> None:
    if not ray.is_initialized():
        ray.init()


def _rejected(plan: Plan) -> str:
    """The plan's early failures by stage, as the summary and failures.parquet file them."""
    stages = Counter(f.stage for f in plan.failures)
    detail = f" ({', '.join(f'{stage}: {n}' for stage, n in sorted(stages.items()))})" if stages else ""
    return f"{len(plan.failures)} rejected before transcoding{detail}"


def run_job(config: JobConfig, log: Callable[[str], None] = print, connect: Callable[[], None] = _connect) -> dict:
    """Run (or resume) the job and return the manifest.

    Every check that can fail runs before `connect` (which defaults to `ray.init()` unless connected), and
    a rerun of a finished job rebuilds its outputs without starting Ray at all. The run holds the output's
    lease (`shards/lease.py`) from before it reads the output's state to after the manifest: a second job
    on the same output is refused, and the lease is released however this one ends, Ctrl-C included.
    """
    def say(line: str) -> None:
        log(scrub(line))

    validate(config)
    refuse_foreign_output(config)
    with Lease(config.output, log=say) as lease:
        return _run_leased(config, lease, say, connect)


def _run_leased(config: JobConfig, lease: Lease, log: Callable[[str], None], connect: Callable[[], None]) -> dict:
    previous = claim_output(config)
    plan = load_plan(config)
    resuming = record_plan(config, plan, previous)
    committed = committed_counts(config, plan) if resuming else {}
    todo = [s for s in plan.shards if s.name not in committed]
    done, failed = sum(s + f for s, f in committed.values()), sum(f for _, f in committed.values())
    log(f"plan: {plan.num_records} videos in {len(plan.shards)} shards over splits {list(plan.splits)}, "
        f"{_rejected(plan)}; "
        + (f"resuming: {len(committed)} shards already committed, {len(todo)} to write" if resuming
           else f"{len(todo)} shards to write"))
    if todo:
        connect()
        progress = Progress(total=plan.num_records, done=done, failed=failed, resumed=done)
        workers = config.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        errors = run_shards(todo, config.transcode, storage.absolute_url(config.output), workers,
                            progress, log, config.progress_every, check=lease.check)
        if errors:
            raise JobIncomplete(f"{len(errors)} of {len(plan.shards)} shards failed after retries "
                                f"({'; '.join(f'{k}: {v}' for k, v in list(errors.items())[:3])}). "
                                "Committed shards are kept: rerun the same command to retry the rest.")
    lease.check()
    return write_outputs(plan, storage.absolute_url(config.output), config.dataset, config.identity())
