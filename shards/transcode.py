"""One video (or image) in, one normalised clip out: the unit of work the shard job parallelises.

The normalised form is what lets the training pipelines stay simple and fast: constant frame rate
(frame index = time), a fixed keyframe every `gop` frames and no B-frames (a GPU decoder can start at
any multiple of `gop` and read frames in order), small even dimensions, yuv420p, no audio. Everything
runs in-process on one thread because the job already runs one transcode per core.

Every way a file can be bad ends as `VideoError(stage, reason)`; library exceptions never escape,
except storage trouble while fetching (OSError), which is the job's to retry. Stages: fetch (cannot get the bytes), probe (bytes are not a usable video), decode (too few frames
come out), encode (the encoder failed).
"""
from __future__ import annotations

import io
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import PurePosixPath

import av
import numpy as np
from av.video.frame import PictureType
from fsspec.core import url_to_fs
from PIL import Image, ImageOps, UnidentifiedImageError

from shards.records import Clip, VideoError, VideoRecord

ENCODERS = {"vp9": ("libvpx-vp9", "webm"), "h264": ("libx264", "mp4")}
# Chosen by measurement (docs/datasets.md): the fastest settings whose quality is still well above
# what training at <= 224 px can see.
CODEC_OPTIONS = {
    "vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b:v": "0"},
    "h264": {"preset": "veryfast", "crf": "23"},
}


@dataclass(frozen=True)
class TranscodeOptions:
    fps: float | None = None       # None: the source's average rate, snapped to a common rate
    max_fps: float = 60.0          # caps `fps=None` (phones' 120-240 fps, bogus container rates)
    short_side: int | None = 320   # downscale only: upscaling adds bytes, never information
    codec: str = "vp9"             # "vp9" (.webm, DALI decodes it on CPU and GPU) or "h264" (.mp4)
    gop: int = 8                   # keyframe every `gop` frames, exactly
    threads: int = 1               # per codec; the job parallelises across processes
    min_frames: int = 8            # fewer frames than this is a failure, not a clip
    max_seconds: float = 600.0     # untrimmed sources are cut here, so one bad file cannot fill a shard
    max_side: int = 8192           # beyond 8K the header is far more likely wrong than the video real
    max_aspect: float = 4.0        # a 1:20 frame is not a natural video (or its size is corrupt)
    jpeg_quality: int = 90

    def __post_init__(self):
        if self.codec not in ENCODERS:
            raise ValueError(f"codec must be one of {sorted(ENCODERS)}, got {self.codec!r}")
        if self.gop < 1 or self.min_frames < 1:
            raise ValueError(f"gop and min_frames must be >= 1, got gop={self.gop}, min_frames={self.min_frames}")


def transcode(record: VideoRecord, options: TranscodeOptions = TranscodeOptions()) -> Clip:
    """The normalised clip, or VideoError; only transient storage errors (OSError while fetching) escape."""
    name = PurePosixPath(record.source).name or record.source
    src = _fetch(record.source, name, whole=record.media == "image")
    with _stage("decode", name):  # the fallback stage for anything the steps below do not label
        if record.media == "image":
            return _transcode_image(src, options, name)
        return _transcode_video(record, src, options, name)


@contextmanager
def _stage(stage: str, name: str, hint: str = ""):
    """Turn any library exception inside the block into a VideoError of `stage` that names the file."""
    try:
        yield
    except VideoError:
        raise
    except Exception as e:  # noqa: BLE001 - PyAV, fsspec, PIL and OS errors all become one recorded failure
        raise VideoError(stage, f"{name}: {_message(e)}{hint}") from e


def _message(e: Exception) -> str:
    """FFmpeg errors repeat the path and errno; the reason already names the file."""
    if isinstance(e, av.FFmpegError) and e.strerror:
        return e.strerror
    return str(e).strip() or type(e).__name__


# ---------------------------------------------------------------- fetch and probe

def _fetch(source: str, name: str, whole: bool = False):
    """A local path (ffmpeg's own I/O is fastest) or the bytes of a remote file, read once.

    Timeouts and dropped connections are not the video's fault: they escape as OSError so the job
    can retry the shard instead of recording a good video as failed.
    """
    try:
        if "://" not in source and not whole:  # a plain local path: skip fsspec's per-call setup
            fs, path, local = None, source, True
        else:
            fs, path = url_to_fs(source)
            local = "file" in fs.protocol and not whole
        got = os.path.getsize(path) if local else fs.cat_file(path)
    except FileNotFoundError:
        raise VideoError("fetch", f"{name}: no file at {source}: download it or drop its annotation row") from None
    except (PermissionError, IsADirectoryError, NotADirectoryError) as e:
        raise VideoError("fetch", f"{name}: cannot read {source} ({_message(e)}); check the path and permissions") from e
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - unknown protocol, bad URL, missing credentials
        raise VideoError("fetch", f"{name}: cannot read {source} ({_message(e)}); check the URL and credentials") from e
    if (got if local else len(got)) == 0:
        raise VideoError("fetch", f"{name}: the file is empty (0 bytes); the download failed, download it again")
    return path if local else io.BytesIO(got)


def _not_a_video(src, name: str, detail: str) -> VideoError:
    """Say what kind of bytes these are, because 'invalid data' alone does not tell a person what to do.

    Only the kind and size: the reason lands in failures.parquet and on stdout, and the file may be any
    file a row can name (`file:///etc/passwd`), so none of its content is copied."""
    if isinstance(src, str):
        size = os.path.getsize(src)
        with open(src, "rb") as f:
            head = f.read(256)
    else:
        size, head = len(src.getvalue()), src.getvalue()[:256]
    text = b"\0" not in head and sum(32 <= c < 127 or c in b"\r\n\t" for c in head) > 0.95 * len(head)
    if text:
        return VideoError("probe", f"{name}: not a video but text (ASCII, {size:,} bytes), probably an error "
                                   f"page saved as the video; download it again")
    return VideoError("probe", f"{name}: cannot read the container ({detail}): the file is truncated or "
                               f"corrupt; download it again")


def _open(src, name: str, options: TranscodeOptions):
    try:
        container = av.open(src, metadata_errors="ignore")
    except Exception as e:  # noqa: BLE001
        raise _not_a_video(src, name, _message(e)) from e
    videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not videos:
        audio = [s.codec_context.name for s in container.streams.audio]
        container.close()
        if audio:
            raise VideoError("probe", f"{name}: no video stream, only audio ({', '.join(audio)}): this is an audio "
                                      f"file; fetch the video itself")
        raise _not_a_video(src, name, "no video stream")
    stream = videos[0]
    w, h = stream.codec_context.width, stream.codec_context.height
    problem = None
    if w <= 0 or h <= 0:
        problem = "has no frame size"
    elif max(w, h) > options.max_side:
        problem = f"is {w}x{h}, beyond max_side={options.max_side}"
    elif max(w, h) > options.max_aspect * min(w, h):
        problem = f"is {w}x{h}, an aspect ratio beyond max_aspect={options.max_aspect:g}"
    if problem:
        container.close()
        raise VideoError("probe", f"{name}: the video {problem}; its header is likely corrupt (or raise the limit)")
    stream.codec_context.thread_count = options.threads
    return container, stream


# ---------------------------------------------------------------- timing

def snap_rate(rate: float) -> Fraction:
    """Round a measured average rate to the common rate it came from (29.97 stays NTSC, 24.6 becomes 25)."""
    ntsc = Fraction(round(rate * 1.001) * 1000, 1001)
    candidates = [Fraction(round(rate))] + ([ntsc] if round(rate * 1.001) in (24, 30, 48, 60, 120) else [])
    best = min(candidates, key=lambda c: abs(c - rate))
    if best > 0 and abs(best - rate) <= 0.02 * rate:
        return best
    return Fraction(round(rate * 100), 100) or Fraction(1, 100)


def _frames_in_order(container, stream, notes: list[str]):
    """Decoded frames with their times in seconds; corrupt packets are skipped and counted, not fatal."""
    demux, bad, last = container.demux(stream), 0, None
    while True:
        try:
            packet = next(demux)
        except StopIteration:
            break
        except av.FFmpegError as e:
            notes.append(f"container unreadable after {last or 0:.2f}s ({_message(e)}); kept what came before")
            break
        try:
            frames = packet.decode()
        except av.FFmpegError:
            bad += 1
            continue
        for frame in frames:
            t = float(frame.time) if frame.pts is not None else (last or 0.0) + 1e-3
            if last is not None and t <= last:
                bad += 1  # a frame that goes back in time cannot be placed on a constant-rate grid
                continue
            last = t
            yield frame, t
    if bad:
        notes.append(f"skipped {bad} corrupt packets or out-of-order frames")


def _constant_rate(frames, rate: Fraction, start: float | None, end: float, notes: list[str]):
    """Resample to a constant rate: output slot k (time start + k/rate) shows the decoded frame nearest to it."""
    step, k, prev, intervals = 1 / float(rate), 0, None, []
    for frame, t in frames:
        if start is None:
            start = t
        if prev is not None:
            intervals.append(t - prev[1])
            while start + k * step < min((prev[1] + t) / 2, end):
                yield prev[0]
                k += 1
            if start + k * step >= end:
                break
        prev = (frame, t)
    else:  # the stream ended: the last frame lasts one typical interval
        if prev is not None:
            tail = prev[1] + (sorted(intervals)[len(intervals) // 2] if intervals else step) / 2
            while start + k * step < min(tail, end):
                yield prev[0]
                k += 1
    if intervals:  # one dropped frame is not VFR; a phone's jittery clock is
        typical = sorted(intervals)[len(intervals) // 2]
        if sum(abs(i - typical) > 0.25 * typical for i in intervals) > 0.1 * len(intervals):
            notes.append("vfr->cfr")


# ---------------------------------------------------------------- encode

def _output_size(width: float, height: float, short_side: int | None) -> tuple[int, int]:
    scale = short_side / min(width, height) if short_side and min(width, height) > short_side else 1.0
    return max(2, int(width * scale / 2) * 2), max(2, int(height * scale / 2) * 2)


class _Encoder:
    """Muxes into memory and counts what it writes; checks the keyframe layout on the packets for free."""

    def __init__(self, options: TranscodeOptions, rate: Fraction, width: int, height: int, name: str):
        encoder, self.ext = ENCODERS[options.codec]
        self.name, self.gop, self.count, self.sent = name, options.gop, 0, 0
        self.buffer = io.BytesIO()
        # bitexact: no random WebM TrackUID and no library version strings, so the same input and options
        # give the same bytes on every run and machine with the same encoder (docs/shard_format.md)
        self.container = av.open(self.buffer, "w", format=self.ext, options={"fflags": "+bitexact"})
        self.stream = self.container.add_stream(encoder, rate=rate)
        self.time_base = 1 / rate
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        ctx = self.stream.codec_context
        ctx.thread_count, ctx.gop_size, ctx.max_b_frames = options.threads, options.gop, 0
        extra = {"keyint_min": str(options.gop)} if options.codec == "vp9" else {
            "x264-params": f"keyint={options.gop}:min-keyint={options.gop}:scenecut=0:bframes=0"}
        self.stream.options = CODEC_OPTIONS[options.codec] | extra

    def write(self, frame) -> None:
        frame.pts, frame.time_base = self.sent, self.time_base  # slot k at k / rate
        frame.pict_type = PictureType.NONE  # a source keyframe would otherwise force one here
        self.sent += 1
        self._mux(self.stream.encode(frame))

    def _mux(self, packets) -> None:
        for packet in packets:
            if packet.is_keyframe != (self.count % self.gop == 0):
                raise VideoError("encode", f"{self.name}: frame {self.count} broke the fixed keyframe interval "
                                           f"{self.gop}; the encoder settings are wrong (a bug, please report)")
            self.container.mux(packet)
            self.count += 1

    def finish(self) -> bytes:
        self._mux(self.stream.encode())
        self.container.close()
        return self.buffer.getvalue()


def _timing(stream, record: VideoRecord, options: TranscodeOptions, notes: list[str]):
    """(output rate, start, end) in the stream's clock; start None = from the first frame."""
    rate = Fraction(options.fps).limit_denominator(1001) if options.fps else None
    if rate is None:
        measured = stream.average_rate or stream.guessed_rate
        rate = snap_rate(min(float(measured), options.max_fps)) if measured else Fraction(30)
        if not measured:
            notes.append("no frame rate in the file; assumed 30")
    offset = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    if record.time_start is None:
        return rate, None, offset + options.max_seconds
    start = offset + record.time_start
    end = offset + record.time_end if record.time_end is not None else math.inf
    return rate, start, min(end, start + options.max_seconds)


def _display_size(stream, notes: list[str]) -> tuple[int, int]:
    """Width in whole square pixels (anamorphic DVD-style sources are stretched back) and height.

    Rounded here, once: parity and scaling must see the width the clip is shown at, not 192.3 for a
    176-pixel row of 59:54 pixels.
    """
    width, height = stream.codec_context.width, stream.codec_context.height
    sar = stream.sample_aspect_ratio
    if sar and sar != 1 and 0.25 < sar < 4:
        notes.append(f"anamorphic {sar} -> square pixels")
        return round(width * sar), height
    return width, height


def _transcode_video(record: VideoRecord, src, options: TranscodeOptions, name: str) -> Clip:
    with _stage("probe", name):
        container, stream = _open(src, name, options)
    notes: list[str] = []
    with container:
        width, height = _display_size(stream, notes)
        rate, start, end = _timing(stream, record, options, notes)
        if start is not None and record.time_start > 1:  # whole videos: skip to the keyframe before the clip
            try:
                container.seek(int(start / stream.time_base), stream=stream, backward=True)
            except av.FFmpegError as e:  # files without an index still play from the start
                notes.append(f"cannot seek ({_message(e)}); decoded from the start")
        size = _output_size(width, height, options.short_side)
        encoder, last_src, out, rotation = None, None, None, 0
        with _stage("encode", name):  # decode trouble is handled inside the generators; the rest is ours
            for frame in _constant_rate(_frames_in_order(container, stream, notes), rate, start, end, notes):
                if encoder is None:  # rotation is side data of the frames, so the first frame decides the shape
                    rotation = round((frame.rotation or 0) / 90) % 4
                    notes += [f"odd size {width}x{height} -> even {size[0]}x{size[1]}"] * bool(width % 2 or height % 2)
                    notes += [f"rotated {rotation * 90}"] * bool(rotation)
                    encoder = _Encoder(options, rate, *(size[::-1] if rotation % 2 else size), name)
                if frame is not last_src:  # repeated slots reuse the scaled frame
                    last_src, out = frame, _normalise(frame, size, rotation)
                encoder.write(out)
        if encoder is None:
            length = f"; the video lasts {container.duration / av.time_base:.1f} s" if container.duration else ""
            where = f" in [{record.time_start:g}, {record.time_end or math.inf:g}] s{length}" if start is not None else ""
            raise VideoError("decode", f"{name}: no decodable frames{where}; the file is corrupt or the annotated "
                                       f"range lies past its end; download it again or fix the row")
        with _stage("encode", name):
            data = encoder.finish()
    _check_length(encoder.count, record, rate, options, name, notes)
    return Clip(data, encoder.ext, encoder.count, float(rate), encoder.stream.width, encoder.stream.height,
                options.codec, options.gop, notes)


def _check_length(count: int, record: VideoRecord, rate: Fraction, options: TranscodeOptions, name: str, notes):
    """Too few frames fail; a clip that merely ends before its annotated range is kept and noted."""
    annotated = record.time_start is not None and record.time_end is not None
    expected = (record.time_end - record.time_start) * float(rate) if annotated else None
    if count < options.min_frames:
        of = f" of the {expected:.0f} annotated" if expected else ""
        raise VideoError("decode", f"{name}: only {count} frames{of} (min_frames={options.min_frames}); the video "
                                   f"is too short or mostly corrupt; download it again or drop it")
    if expected and count < expected - 1:
        notes.append(f"short: {count} of {expected:.0f} annotated frames")


def _normalise(frame, size: tuple[int, int], rotation: int):
    """Scale to `size` in yuv420p; rotated sources go through RGB once to turn the pixels upright."""
    if not rotation:
        return frame.reformat(width=size[0], height=size[1], format="yuv420p")
    rgb = frame.reformat(width=size[0], height=size[1], format="rgb24").to_ndarray()
    upright = np.ascontiguousarray(np.rot90(rgb, rotation))  # rotation counts quarter turns counter-clockwise
    return av.VideoFrame.from_ndarray(upright, format="rgb24").reformat(format="yuv420p")


# ---------------------------------------------------------------- images

def _transcode_image(data: io.BytesIO, options: TranscodeOptions, name: str) -> Clip:
    try:
        image = Image.open(data)
    except (UnidentifiedImageError, OSError) as e:
        raise VideoError("probe", f"{name}: not an image PIL can read ({e}); replace or remove it") from e
    notes = []
    with _stage("decode", name, ": the image is truncated or corrupt; copy it again"):
        orientation = image.getexif().get(0x0112, 1)
        image = ImageOps.exif_transpose(image).convert("RGB")
    if orientation not in (1, None):
        notes.append(f"exif orientation {orientation} applied")
    w, h = _output_size(*image.size, options.short_side)
    if image.size != (w, h):
        image = image.resize((w, h), Image.BILINEAR)
    buffer = io.BytesIO()
    with _stage("encode", name):
        image.save(buffer, "JPEG", quality=options.jpeg_quality)
    return Clip(buffer.getvalue(), "jpg", 1, 0.0, w, h, "jpeg", 1, notes)
