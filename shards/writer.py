"""Packs transcoded clips into one WebDataset tar shard, with DALI's index and our per-sample index rows.

Samples are streamed: each clip is written to the tar as soon as it is added, so memory holds one clip,
never the shard. The writer records where every member's data starts while writing, which gives both
DALI's `.idx` (no second pass with `tar --list` as DALI's wds2idx does) and the Parquet index's
byte ranges: a range read of (offset, size) on the shard returns exactly the stored video file, so a
loader can fetch one sample from object storage without reading the tar. A WebM member's row also holds its
packet table (where each frame's packet and each GOP sit, and a crc32 per GOP), so a loader can read and
cut just the GOPs a view needs without parsing the file. The table comes from `pipelines.gops`, the one
reader of the WebM layout the loader cuts; that module imports numpy and the standard library only (and
`pipelines/__init__` nothing), so the job's workers do not pay for DALI or torch.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from typing import IO

import numpy as np
from pipelines.gops import packet_table

from .finalize import PACKET_COLUMNS
from .records import Clip, VideoRecord

DALI_INDEX_VERSION = "v1.2"   # what nvidia.dali's wds2idx writes and fn.readers.webdataset reads
_MTIME = 0                    # fixed member times: the same clips give byte-identical shards


class _CountingHash(io.RawIOBase):
    """Passes writes through while counting bytes and hashing them: the shard's size and sha256 for free."""

    def __init__(self, sink: IO[bytes]):
        self.sink, self.size, self.hash = sink, 0, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sink.write(data)
        self.hash.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


def sample_metadata(record: VideoRecord, clip: Clip) -> dict:
    """The `<key>.json` member: what a training loader needs without opening the index."""
    return {
        "key": record.key, "split": record.split, "label": record.label, "label_name": record.label_name,
        "num_frames": clip.num_frames, "fps": clip.fps, "width": clip.width, "height": clip.height,
        "duration": clip.duration, "source": record.source, "time_start": record.time_start,
        "time_end": record.time_end, "codec": clip.codec, "gop": clip.gop, "notes": list(clip.notes),
    }


def packet_columns(ext: str, data: bytes) -> dict:
    """A member's packet-table columns of the index (docs/shard_format.md); nulls unless it is a WebM the
    loader can cut. Offsets are stored as the gaps between packets (container headers: a few bytes), which
    cost a quarter of the offsets on disk; a member whose gaps or size do not fit the columns gets no table."""
    table = packet_table(data) if ext == "webm" and len(data) < 1 << 32 else None
    if table is None:
        return dict.fromkeys(PACKET_COLUMNS)
    gap = table.offset - np.append(0, table.offset[:-1] + table.size[:-1])
    if gap.max() >= 1 << 16:
        return dict.fromkeys(PACKET_COLUMNS)
    return {"frame_size": table.size.tolist(), "frame_gap": gap.tolist(), "keyframes": table.keyframes.tolist(),
            "gop_crc32": table.gop_crc32.tolist()}


class ShardWriter:
    """Writes one shard to `sink` (any writable binary file, e.g. from `storage.atomic_write`).

    `shard` is the shard's path relative to the output root; it goes into every index row.
    Call `add` per sample, then `close`; `rows` and `dali_index()` are complete after `close`.
    """

    def __init__(self, sink: IO[bytes], shard: str):
        self.shard = shard
        self._out = _CountingHash(sink)
        self._tar = tarfile.open(fileobj=self._out, mode="w", format=tarfile.GNU_FORMAT)
        self._samples: list[list[tuple[str, int, int, str]]] = []   # per sample: (ext, offset, size, name)
        self.rows: list[dict] = []
        self.size = 0
        self.sha256 = ""

    def _member(self, name: str, data: bytes) -> tuple[int, int]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
        self._tar.addfile(info, io.BytesIO(data))
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        return self._tar.offset - padded, len(data)

    def add(self, record: VideoRecord, clip: Clip) -> dict:
        """Append one sample (video, json, cls members, in that order) and return its index row."""
        if not record.key or "." in record.key or "/" in record.key:
            raise ValueError(f"sample key {record.key!r} must be non-empty without '.' or '/': "
                             "WebDataset groups members by the name before the first dot")
        meta = sample_metadata(record, clip)
        members = [(clip.ext, clip.data), ("json", json.dumps(meta, sort_keys=True).encode()),
                   ("cls", str(record.label).encode())]
        entries = []
        for ext, data in members:
            name = f"{record.key}.{ext}"
            offset, size = self._member(name, data)
            entries.append((ext, offset, size, name))
        self._samples.append(entries)
        _, offset, size, _ = entries[0]
        row = {**meta, "shard": self.shard, "offset": offset, "size": size, "ext": clip.ext,
               "sha256": hashlib.sha256(clip.data).hexdigest(), **packet_columns(clip.ext, clip.data)}
        self.rows.append(row)
        return row

    def close(self) -> None:
        """Finish the tar (end-of-archive blocks); the sink itself stays open for the caller to commit."""
        self._tar.close()
        self.size, self.sha256 = self._out.size, self._out.hash.hexdigest()

    def dali_index(self) -> str:
        """The text of DALI's `<shard>.idx`: a version line, then per sample `ext offset size name` per member."""
        lines = [f"{DALI_INDEX_VERSION} {len(self._samples)}"]
        lines += [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in sample)
                  for sample in self._samples]
        return "\n".join(lines) + "\n"
