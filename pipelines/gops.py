"""Cut a video down to the GOPs a view needs before DALI sees it, and say which bytes of it to read.

DALI 2.4's `fn.decoders.video` builds no frame index for in-memory videos, so it cannot seek: to return
frame 280 it decodes frames 0..280. A TSN view of a 10 s Kinetics clip needs 8 frames spread over 300,
and would pay for nearly all of them (a seeking decoder pays for the 8 GOPs they sit in). So on the host
we keep only the packets from each needed frame's keyframe up to that frame, repack them as an IVF stream
(a 32-byte header and a 12-byte header per frame: no muxer, no encoder) and renumber the requested
frames. The packets are untouched, so the decoded pixels are exactly the same; the decode work becomes
proportional to the frames needed, on the CPU and on NVDEC alike.

Only the WebM the shard job writes is cut (VP8/VP9 in SimpleBlocks, one track, no lacing: libavformat's
matroska muxer); any other layout returns None and the loader feeds the whole file.

The shard job stores each WebM member's `PacketTable` in the index (docs/shard_format.md): every frame's
packet (offset in the member, size), the keyframes and a crc32 per GOP. With it a load needs no WebM parse
and no whole-member read: a view's bytes are the GOPs its frames sit in, a few byte ranges.

What the loader calls (numpy and the standard library only, so the shard job imports this module too):

    byte_ranges(table, frames, gap) -> (starts, ends)   the member's bytes to read for `frames` (every
                                                        frame of a row's views), merged where closer than `gap`
    corrupt_gops(table, starts, pieces, frames) -> gops the GOPs of `frames` whose bytes fail their crc32
    MemberParts(table, starts, pieces).cut(frames)      -> (IVF bytes, positions of `frames` in it), as `cut`
    webm_packets(data), cut(packets, frames)            the same from a whole member, for rows without a table

`pipelines.source.ShardReader.read_gops` does the reading and the crc check; the cut runs per view.
"""
from __future__ import annotations

import bisect
import dataclasses
import struct
import zlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np

_EBML, _SEGMENT, _CLUSTER = 0x1A45DFA3, 0x18538067, 0x1F43B675
_TRACKS, _TRACK_ENTRY, _CODEC_ID = 0x1654AE6B, 0xAE, 0x86
_VIDEO, _PIXEL_WIDTH, _PIXEL_HEIGHT = 0xE0, 0xB0, 0xBA
_SIMPLE_BLOCK, _BLOCK_GROUP = 0xA3, 0xA0
_FOURCC = {b"V_VP9": b"VP90", b"V_VP8": b"VP80"}
FOURCC = {"vp9": b"VP90", "vp8": b"VP80"}   # the index's codec -> the IVF header's fourcc


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


@dataclass(frozen=True)
class PacketTable:
    """Where a member's frames and GOPs sit: enough to range-read and cut it without parsing WebM.

    A GOP runs from a keyframe to the frame before the next one. Its bytes are one contiguous range of the
    member, from its keyframe's packet to the end of its last packet (the block headers between packets
    included), so reading a GOP is one range read and checking it one crc32.
    """
    offset: np.ndarray             # per frame: its packet's first byte, counted from the member's first byte
    size: np.ndarray               # per frame: its packet's length
    keyframes: np.ndarray          # the frames that start a GOP, ascending, the first 0
    gop_crc32: np.ndarray | None   # per GOP: zlib.crc32 of its bytes; None where nothing was checksummed
    fourcc: bytes
    width: int
    height: int

    @property
    def num_frames(self) -> int:
        return len(self.offset)

    @cached_property
    def gop_spans(self) -> tuple[np.ndarray, np.ndarray]:
        """[start, end) of each GOP's bytes in the member."""
        last = np.append(self.keyframes[1:], self.num_frames) - 1
        return self.offset[self.keyframes].astype(np.int64), self.offset[last] + self.size[last].astype(np.int64)

    def gops_of(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`frames` sorted, each once, and the GOP each sits in."""
        needed = np.unique(frames)
        if needed[0] < 0 or needed[-1] >= self.num_frames:
            raise ValueError(f"frames {needed[0]}..{needed[-1]} outside the video's {self.num_frames} frames")
        return needed, np.searchsorted(self.keyframes, needed, side="right") - 1


def packet_table(data: bytes) -> PacketTable | None:
    """The table of a WebM member, with its GOPs' crc32s; None where `webm_packets` cannot read it."""
    packets = webm_packets(data)
    if packets is None:
        return None
    table = _table(packets, None)
    crcs = [zlib.crc32(packets.data[s:e]) for s, e in zip(*(span.tolist() for span in table.gop_spans))]
    return dataclasses.replace(table, gop_crc32=np.array(crcs, dtype=np.uint32))


def _table(packets: Packets, gop_crc32: np.ndarray | None) -> PacketTable:
    offset, size = np.array(packets.spans, dtype=np.int64).reshape(-1, 2).T
    return PacketTable(offset, size, np.flatnonzero(packets.keyframe), gop_crc32, packets.fourcc,
                       packets.width, packets.height)


def byte_ranges(table: PacketTable, frames: np.ndarray, gap: int) -> tuple[list[int], list[int]]:
    """[starts, ends) in the member of the GOPs `frames` sit in, neighbours at most `gap` bytes apart read
    as one range (the bytes between come along: on object storage a request costs more than a few KB)."""
    gops = np.unique(table.gops_of(frames)[1])
    starts, ends = [], []
    for start, end in zip(*(span[gops].tolist() for span in table.gop_spans)):
        if ends and start - ends[-1] <= gap:
            ends[-1] = end
        else:
            starts.append(start)
            ends.append(end)
    return starts, ends


def corrupt_gops(table: PacketTable, starts: list[int], pieces: list, frames: np.ndarray) -> list[int]:
    """The GOPs of `frames` whose bytes in `pieces` (piece i holds the member from `starts[i]`) fail their crc32."""
    gops = np.unique(table.gops_of(frames)[1])
    bad = []
    for gop, begin, end in zip(gops.tolist(), *(span[gops].tolist() for span in table.gop_spans)):
        i = bisect.bisect_right(starts, begin) - 1
        if zlib.crc32(memoryview(pieces[i])[begin - starts[i]:end - starts[i]]) != table.gop_crc32[gop]:
            bad.append(gop)
    return bad


@dataclass(frozen=True)
class MemberParts:
    """The ranges of one member that were read (piece i holds its bytes from `starts[i]`): enough to cut any
    view whose frames were among those they were read for."""
    table: PacketTable
    starts: list[int]
    pieces: list

    @property
    def nbytes(self) -> int:
        return sum(len(piece) for piece in self.pieces)

    def cut(self, frames: np.ndarray) -> tuple[bytes, np.ndarray]:
        return cut_ranges(self.table, self.starts, self.pieces, frames)


def cut(packets: Packets, frames: np.ndarray) -> tuple[bytes, np.ndarray]:
    """An IVF stream holding, for each needed frame, the packets from its keyframe to it; and the
    requested frames' positions in that stream (same order, repeats kept)."""
    return cut_ranges(_table(packets, None), [0], [packets.data], frames)


_IVF_FRAME = struct.Struct("<IQ")   # before each frame: its size and timestamp


def cut_ranges(table: PacketTable, starts: list[int], pieces: list, frames: np.ndarray) -> tuple[bytes, np.ndarray]:
    """`cut` from parts of the member: piece i holds its bytes from `starts[i]`, and must hold every packet
    from the keyframe of each of `frames` to that frame.

    A view keeps tens of packets, too few for numpy to beat a loop: numpy finds the GOPs and gathers the
    kept packets' offsets and sizes, a loop assembles the stream.
    """
    frames = np.asarray(frames, dtype=np.int64)
    needed, gop = table.gops_of(frames)
    last = dict(zip(table.keyframes[gop].tolist(), needed.tolist()))   # GOP's keyframe -> last needed frame
    kept = [k for first, stop in last.items() for k in range(first, stop + 1)]
    views = [memoryview(piece) for piece in pieces]
    parts = [struct.pack("<4sHH4sHHIII4x", b"DKIF", 0, 32, table.fourcc, table.width, table.height, 1, 1, len(kept))]
    i = 0
    for pts, (offset, size) in enumerate(zip(table.offset[kept].tolist(), table.size[kept].tolist())):
        while i + 1 < len(starts) and starts[i + 1] <= offset:
            i += 1
        begin = offset - starts[i]
        if begin < 0 or begin + size > len(views[i]):
            raise ValueError(f"the bytes read do not hold frame {kept[pts]}'s packet")
        parts += [_IVF_FRAME.pack(size, pts), views[i][begin:begin + size]]
    position = {frame: pts for pts, frame in enumerate(kept)}
    return b"".join(parts), np.array([position[f] for f in frames.tolist()], dtype=np.int64)
