"""Cut a video down to the GOPs a view needs before DALI sees it.

DALI 2.4's `fn.decoders.video` builds no frame index for in-memory videos, so it cannot seek: to return
frame 280 it decodes frames 0..280. A TSN view of a 10 s Kinetics clip needs 8 frames spread over 300,
and would pay for nearly all of them (a seeking decoder pays for the 8 GOPs they sit in). So on the host
we keep only the packets from each needed frame's keyframe up to that frame, repack them as an IVF stream
(a 32-byte header and a 12-byte header per frame: no muxer, no encoder) and renumber the requested
frames. The packets are untouched, so the decoded pixels are exactly the same; the decode work becomes
proportional to the frames needed, on the CPU and on NVDEC alike.

Only the WebM the shard job writes is cut (VP8/VP9 in SimpleBlocks, one track, no lacing: libavformat's
matroska muxer); any other layout returns None and the loader feeds the whole file.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

_EBML, _SEGMENT, _CLUSTER = 0x1A45DFA3, 0x18538067, 0x1F43B675
_TRACKS, _TRACK_ENTRY, _CODEC_ID = 0x1654AE6B, 0xAE, 0x86
_VIDEO, _PIXEL_WIDTH, _PIXEL_HEIGHT = 0xE0, 0xB0, 0xBA
_SIMPLE_BLOCK, _BLOCK_GROUP = 0xA3, 0xA0
_FOURCC = {b"V_VP9": b"VP90", b"V_VP8": b"VP80"}


@dataclass(frozen=True)
class Packets:
    """Where each frame's compressed data sits in the file, in decode (= display) order."""
    data: memoryview
    spans: list[tuple[int, int]]     # (offset, size) per frame
    keyframe: np.ndarray             # bool per frame
    fourcc: bytes
    width: int
    height: int


def _vint(buf: memoryview, pos: int, keep_marker: bool) -> tuple[int, int]:
    """An EBML variable-length integer at `pos`: (value, position after it)."""
    first = buf[pos]
    length = 9 - first.bit_length() if first else 9
    if length > 8:
        raise ValueError("bad EBML length")
    value = first if keep_marker else first & (0xFF >> length)
    for b in buf[pos + 1:pos + length]:
        value = value << 8 | b
    return value, pos + length


def _elements(buf: memoryview, start: int, end: int):
    """(id, data start, data end) of the EBML elements in [start, end)."""
    pos = start
    while pos < end:
        element, pos = _vint(buf, pos, keep_marker=True)
        size_at = pos
        size, pos = _vint(buf, pos, keep_marker=False)
        if size == (1 << 7 * (pos - size_at)) - 1 or pos + size > end:
            raise ValueError("an element of unknown size, or longer than its parent")
        yield element, pos, pos + size
        pos += size


def webm_packets(data: bytes) -> Packets | None:
    """The frames of a one-track VP8/VP9 WebM, or None if the file is laid out otherwise."""
    buf = memoryview(data)
    try:
        spans, keys, track, fourcc, size = [], [], None, None, (0, 0)
        for element, start, end in _elements(buf, 0, len(buf)):
            if element != _SEGMENT:
                continue
            for child, c_start, c_end in _elements(buf, start, end):
                if child == _TRACKS:
                    entries = [e for e in _elements(buf, c_start, c_end) if e[0] == _TRACK_ENTRY]
                    if len(entries) != 1:
                        return None
                    for field, f_start, f_end in _elements(buf, *entries[0][1:]):
                        if field == _CODEC_ID:
                            fourcc = _FOURCC.get(bytes(buf[f_start:f_end]).rstrip(b"\0"))
                        elif field == _VIDEO:
                            dims = {k: int.from_bytes(buf[s:e], "big") for k, s, e in _elements(buf, f_start, f_end)}
                            size = (dims.get(_PIXEL_WIDTH, 0), dims.get(_PIXEL_HEIGHT, 0))
                elif child == _CLUSTER:
                    for block, b_start, b_end in _elements(buf, c_start, c_end):
                        if block == _BLOCK_GROUP:
                            return None
                        if block != _SIMPLE_BLOCK:
                            continue
                        number, pos = _vint(buf, b_start, keep_marker=False)
                        flags = buf[pos + 2]
                        if flags & 0x06 or (track is not None and number != track):
                            return None      # laced frames or a second track
                        track = number
                        spans.append((pos + 3, b_end - pos - 3))
                        keys.append(bool(flags & 0x80))
        if fourcc is None or not spans or not keys[0]:
            return None
        return Packets(buf, spans, np.array(keys), fourcc, *size)
    except (ValueError, IndexError):
        return None


def cut(packets: Packets, frames: np.ndarray) -> tuple[bytes, np.ndarray]:
    """An IVF stream holding, for each needed frame, the packets from its keyframe to it; and the
    requested frames' positions in that stream (same order, repeats kept)."""
    frames = np.asarray(frames, dtype=np.int64)
    n = len(packets.spans)
    if frames.min() < 0 or frames.max() >= n:
        raise ValueError(f"frames {frames.min()}..{frames.max()} outside the video's {n} frames")
    keyframes = np.flatnonzero(packets.keyframe)
    gop_of = keyframes[np.searchsorted(keyframes, np.arange(n), side="right") - 1]
    last = {}                                    # GOP start -> last needed frame in it
    for f in np.unique(frames).tolist():
        last[int(gop_of[f])] = f
    kept = np.concatenate([np.arange(start, stop + 1) for start, stop in sorted(last.items())])
    position = np.full(n, -1)
    position[kept] = np.arange(len(kept))
    header = struct.pack("<4sHH4sHHIII4x", b"DKIF", 0, 32, packets.fourcc, packets.width, packets.height,
                         1, 1, len(kept))
    parts = [header]
    for i, k in enumerate(kept.tolist()):
        offset, size = packets.spans[k]
        parts += [struct.pack("<IQ", size, i), packets.data[offset:offset + size]]
    return b"".join(parts), position[frames]
