"""The schema every dataset adapter produces and every stage of the shard job consumes.

Adapters turn a dataset's own annotation format into `VideoRecord`s (plus `Failure`s for rows that
cannot even be planned); `transcode` turns a record into a `Clip` or raises `VideoError`; the writer
packs clips into shards. Keeping this one schema is what lets Kinetics, SSv2, UCF101, HMDB51, generic
CSVs and image folders share the same job core.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class VideoRecord:
    key: str                   # sample key inside the shards, unique per split (Kinetics: <id>_<start:06d>_<end:06d>)
    split: str                 # "train", "val", "test", ...
    label: int                 # index into the sorted class list; -1 when the split has no labels
    label_name: str
    source: str                # fsspec URL of the source video (or image)
    time_start: float | None = None   # seconds; None = the whole file (already-trimmed clips)
    time_end: float | None = None
    media: str = "video"       # "video" or "image"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Failure:
    """One input that could not be sharded, with the stage that stopped it and a reason a person can act on."""
    source: str
    split: str
    stage: str                 # "annotations", "fetch", "probe", "decode", "encode", "write"
    reason: str
    key: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class VideoError(Exception):
    """A single video cannot be sharded; the job records it as a `Failure` and goes on."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


@dataclass
class Clip:
    """A transcoded sample, ready to be packed: encoded bytes plus what the index needs to know."""
    data: bytes
    ext: str                   # "webm" (vp9), "mp4" (h264) or "jpg" (images)
    num_frames: int            # frames actually written (counted, not estimated)
    fps: float
    width: int
    height: int
    codec: str
    gop: int
    notes: list[str] = field(default_factory=list)   # repairs made on the way, e.g. "vfr->cfr", "rotated 90"

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps if self.fps else 0.0
