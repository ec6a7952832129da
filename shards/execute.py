"""Runs the plan on Ray: one task per shard, a bounded number in flight, a progress line on the driver.

A shard is the unit of work and of commit. The task transcodes its videos one after another, streams
them into the tar, and commits with a marker (`_job/done/<split>/shard-NNNNNN.json`) holding the
shard's index rows and failures. The marker is written last and atomically, so it is the commit: a
killed task leaves no marker and its shard is redone on resume, while a committed shard is never
touched again. Because the marker carries the rows, the final indexes are rebuilt from markers without
re-reading tars or re-transcoding.

Failure policy: an error transcoding one video becomes that video's `Failure` and the shard goes on
(bad videos are never retried); an `OSError` while writing the shard is taken as transient storage
trouble and fails the task, which Ray retries (`retry_exceptions`), as it does when a worker process
dies (`max_retries`).

Progress travels as per-shard counters to a small actor, at most once a second per task, so the
driver never sees a message per video.

Tasks get no runtime environment from the driver: Ray writes a task's `runtime_env` in full to its
session logs, so storage credentials reach workers through their own node's environment instead
(shards/storage.py). Failure reasons and error lines pass through `contract.credentials.scrub`.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray

from contract.credentials import scrub

from . import storage
from .plan import ShardSpec
from .records import Clip, Failure, VideoError, VideoRecord
from .transcode import TranscodeOptions, transcode
from .writer import ShardWriter

TASK_RETRIES = 3
REPORT_EVERY_S = 1.0


def transcode_one(record: VideoRecord, options: TranscodeOptions) -> Clip | Failure:
    """The clip, or the failure that explains why this one video cannot be sharded."""
    try:
        return transcode(record, options)
    except VideoError as e:
        return Failure(record.source, record.split, e.stage, scrub(e.reason), record.key)
    except Exception as e:   # noqa: BLE001 - transcode promises VideoError; anything else is a bug, kept per video
        return Failure(record.source, record.split, "transcode", scrub(f"unexpected {type(e).__name__}: {e}"),
                       record.key)


def write_shard(spec: ShardSpec, options: TranscodeOptions, output: str, board=None) -> dict:
    """Transcode and pack one shard, then commit it; returns the counts (the rows live in the marker)."""
    fs, root = storage.resolve(output)
    tar_rel = spec.name + ".tar"
    tar_path, idx_path, marker_path = (storage.join(root, p) for p in (tar_rel, spec.name + ".idx", spec.marker))
    for path in (tar_path, idx_path, marker_path):
        storage.remove_stale_temporaries(fs, path)
    failures: list[Failure] = []
    writer, last_report = None, 0.0
    with contextlib.ExitStack() as stack:
        for done, record in enumerate(spec.records, 1):
            result = transcode_one(record, options)
            if isinstance(result, Failure):
                failures.append(result)
            else:
                if writer is None:   # opened on the first good clip: a shard of only failures writes no tar
                    writer = ShardWriter(stack.enter_context(storage.atomic_write(fs, tar_path)), tar_rel)
                writer.add(record, result)
            if board is not None and (time.monotonic() - last_report > REPORT_EVERY_S or done == len(spec.records)):
                board.update.remote(spec.name, done, len(failures))
                last_report = time.monotonic()
        if writer is not None:
            writer.close()
    marker = {"shard": spec.name, "fingerprint": spec.fingerprint(), "failures": [f.to_dict() for f in failures],
              "rows": [], "tar": None, "idx": None, "size": 0, "sha256": None}
    if writer is not None:
        with storage.atomic_write(fs, idx_path) as f:
            f.write(writer.dali_index().encode())
        marker.update(rows=writer.rows, tar=tar_rel, idx=spec.name + ".idx", size=writer.size, sha256=writer.sha256)
    storage.write_json(fs, marker_path, marker)
    return {"shard": spec.name, "samples": len(marker["rows"]), "failures": len(failures), "size": marker["size"]}


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Latest (done, failed) per in-flight shard; a retried shard simply overwrites its own counters."""

    def __init__(self):
        self.counts: dict[str, tuple[int, int]] = {}

    def update(self, shard: str, done: int, failed: int) -> None:
        self.counts[shard] = (done, failed)

    def totals(self, shards: list[str]) -> tuple[int, int]:
        """Summed over `shards` only: a finished shard's late update must not count twice."""
        counts = [self.counts.get(s, (0, 0)) for s in shards]
        return sum(d for d, _ in counts), sum(f for _, f in counts)


@dataclass
class Progress:
    """Formats the driver's progress line: videos done/total, rate, ETA and failures so far."""
    total: int
    done: int = 0            # finished shards, including those committed by earlier runs
    failed: int = 0
    resumed: int = 0         # videos already done when this run started (not counted in the rate)

    def __post_init__(self):
        self.started = time.monotonic()

    def line(self, in_flight: tuple[int, int] = (0, 0)) -> str:
        done, failed = self.done + in_flight[0], self.failed + in_flight[1]
        elapsed = time.monotonic() - self.started
        rate = (done - self.resumed) / elapsed if elapsed > 0 else 0.0
        eta = f"{(self.total - done) / rate:.0f}s" if rate > 0 else "?"
        percent = 100.0 * done / self.total if self.total else 100.0
        return (f"videos {done}/{self.total} ({percent:.1f}%)  {rate:.2f} videos/s  ETA {eta}  "
                f"failures {failed}")


def run_shards(specs: list[ShardSpec], options: TranscodeOptions, output: str, workers: int,
               progress: Progress, log: Callable[[str], None], interval: float = 5.0,
               check: Callable[[], None] = lambda: None) -> dict[str, str]:
    """Run every spec as a Ray task, at most `workers` at once; returns {shard: error} for shards lost for good.

    `check` runs between waits and stops the run by raising (the job's lease was lost). Whatever stops it,
    Ctrl-C included, cancels the tasks still in flight: their shards are uncommitted and redone on resume.
    """
    task = ray.remote(write_shard).options(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=[OSError])
    board = ProgressBoard.remote()
    pending, in_flight, errors = list(reversed(specs)), {}, {}
    last_log, last_counts = time.monotonic(), None
    try:
        while pending or in_flight:
            check()
            while pending and len(in_flight) < workers:
                spec = pending.pop()
                in_flight[task.remote(spec, options, output, board)] = spec
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=min(interval, 1.0))
            for ref in ready:
                spec = in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                    progress.done += result["samples"] + result["failures"]
                    progress.failed += result["failures"]
                except Exception as e:   # noqa: BLE001 - reported per shard; a rerun resumes them
                    cause = getattr(e, "cause", None) or e
                    last_line = (str(cause).strip().splitlines() or [""])[-1]   # not Ray's whole remote traceback
                    errors[spec.name] = scrub(f"{type(cause).__name__}: {last_line}")
                    log(f"shard {spec.name} failed (retried up to {TASK_RETRIES} times): {errors[spec.name]}")
            if time.monotonic() - last_log >= interval:
                running = ray.get(board.totals.remote([s.name for s in in_flight.values()]))
                log(progress.line(running))
                last_log, last_counts = time.monotonic(), (progress.done + running[0], progress.failed + running[1])
    except BaseException:
        for ref in in_flight:
            ray.cancel(ref)
        raise
    finally:
        ray.kill(board)
    if last_counts != (progress.done, progress.failed):
        log(progress.line())
    return errors
