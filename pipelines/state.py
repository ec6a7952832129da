"""What the loader's stages change while an epoch runs, in one place: the epoch's failures, and whether
views are still cut to GOPs. The feeder thread and the DALI driver threads share one `LoaderState`; every
change goes through its methods, under its lock."""
from __future__ import annotations

import threading
import warnings

from pipelines.source import SampleError


class LoaderError(RuntimeError):
    """The epoch cannot go on: too many broken samples, or none usable where one is needed."""


class LoaderState:
    """`failures`: the videos of the current epoch that could not be delivered, one dict each (key,
    video_index, shard, stage, reason), first failure first. `cut_gops`: whether views are cut to the GOPs
    they need; it turns False for good when a decoder rejects a cut that it decodes whole."""

    def __init__(self, index, cut_gops: bool, max_failures: int | float, samples_per_epoch: int, device: str):
        self.index, self.max_failures, self.samples_per_epoch, self.device = index, max_failures, samples_per_epoch, device
        self.cut_gops = cut_gops
        self.failures: list[dict] = []
        self._failed: set[str] = set()
        self._lock = threading.Lock()

    def new_epoch(self) -> None:
        with self._lock:
            self.failures, self._failed = [], set()

    def record(self, row: int, error: SampleError) -> None:
        """One failed sample (once per video); past `max_failures`, the epoch ends with a LoaderError."""
        key = str(self.index.keys[row])
        with self._lock:
            if key in self._failed:
                return
            self._failed.add(key)
            self.failures.append({"key": key, "video_index": int(row), "shard": str(self.index["shard"][row]),
                                  "stage": error.stage, "reason": error.reason})
            if len(self.failures) > self.allowed_failures():
                raise LoaderError(self._too_many())

    def stop_cutting(self, reason: str) -> None:
        """A decoder rejected a GOP cut it decodes whole: feed whole videos from now on (said once)."""
        with self._lock:
            if not self.cut_gops:
                return
            self.cut_gops = False
        warnings.warn(f"the {self.device} video decoder rejected a GOP-cut stream that it decodes whole ({reason}); "
                      f"decoding whole videos from now on (cut_gops=False)")

    def allowed_failures(self) -> float:
        if isinstance(self.max_failures, float):
            return self.max_failures * self.samples_per_epoch
        return self.max_failures

    def _too_many(self) -> str:
        limit = f"max_failures={self.max_failures}"
        if isinstance(self.max_failures, float):
            limit += f", a fraction: {self.allowed_failures():g} of them"
        shards = len({f["shard"] for f in self.failures})
        first = self.failures[0]
        return (f"{len(self.failures)} of the {self.samples_per_epoch} samples this rank reads failed this epoch, "
                f"more than {limit}; they sit in {shards} shard(s), the first: {first['key']} in {first['shard']}, "
                f"{first['stage']}: {first['reason']}")
