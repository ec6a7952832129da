"""One real example of every kind of bad input, in the Kinetics layout, with the outcome each must have.

Used by the transcode and adapter tests and by the job-level test that every bad input lands in
failures.parquet. Every file is encoded here, by PyAV, in about a second.

`write_bad_inputs(folder)` returns {case: expectation}; an expectation is a dict with
  key     the sample key ("" when the row cannot form one),
  split,
  source  a suffix of the Failure's source (a file name, or "<csv>:<line>" for annotation rows),
  stage   the Failure stage, or None when the input must come out as a clip,
  note    for clips: a substring of one of `clip.notes` (None: no note required).
Match a failure by key when the key is not empty and the case is not a duplicate row; otherwise by source.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from shards.adapters.kinetics import clip_name
from shards.sample_dataset import encode_video, motion_clip, write_kinetics_csvs

FPS = 15
SIZE = (128, 96)


def _frames(seed: int, num_frames: int = 30, size=SIZE, name: str = "moving left") -> np.ndarray:
    return motion_clip(name, np.random.default_rng(seed), size, num_frames)


def _vfr(path: Path) -> None:
    """Frames 40 ms and 100 ms apart, alternating, as phones write them."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = *SIZE, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        t = 0
        for i, array in enumerate(_frames(7, 30)):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            t += 40 if i % 2 else 100
            c.mux(s.encode(frame))
        c.mux(s.encode())


def _rotated(path: Path) -> None:
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = *SIZE, "yuv420p"
        s.set_display_rotation(90)
        for array in _frames(8):
            c.mux(s.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        c.mux(s.encode())


def _audio_only(path: Path) -> None:
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=44100)
        tone = np.sin(np.arange(44100 * 2) * 2 * np.pi * 440 / 44100).astype(np.float32)
        for i in range(0, len(tone), 1024):
            frame = av.AudioFrame.from_ndarray(tone[None, i:i + 1024], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 44100, i
            c.mux(s.encode(frame))
        c.mux(s.encode())


def _corrupt_middle(path: Path) -> None:
    """Overwrite one whole P-frame in the middle of the media data with random bytes."""
    encode_video(path, _frames(9, 45), FPS)
    with av.open(str(path)) as c:
        packets = [(p.pos, p.size) for p in c.demux(video=0) if p.size]
    pos, size = packets[len(packets) // 2]
    data = bytearray(path.read_bytes())
    data[pos:pos + size] = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def write_bad_inputs(folder: str | Path) -> dict[str, dict]:
    folder = Path(folder)
    videos = folder / "videos" / "train"
    videos.mkdir(parents=True, exist_ok=True)
    rows = {"train": [], "val": []}
    expected: dict[str, dict] = {}

    def row(case, split, label, yid, start, end, stage=None, note=None, file=None, keyable=True):
        rows[split].append([label, yid, start, end, split])
        key = clip_name(yid, int(start), int(end)) if keyable else ""
        line = f"{split}.csv:{len(rows[split]) + 1}"  # +1: the header is line 1
        source = file.name if file is not None and stage not in ("annotations",) else line
        expected[case] = {"key": key, "split": split, "source": source, "stage": stage, "note": note}
        return key

    def clip(yid, start=10, end=12) -> Path:
        return videos / f"{clip_name(yid, start, end)}.mp4"

    # good rows: they define the classes and give duplicates something to duplicate
    encode_video(f := clip("good-left01"), _frames(1), FPS)
    row("good_left", "train", "moving left", "good-left01", 10, 12, file=f)
    encode_video(f := clip("-goodright1"), _frames(2, name="moving right"), FPS)
    row("good_right", "train", "moving right", "-goodright1", 10, 12, file=f)
    encode_video(f := folder / "videos" / "val" / f"{clip_name('good-val001', 10, 12)}.mp4", _frames(3), FPS)
    row("good_val", "val", "moving left", "good-val001", 10, 12, file=f)

    # broken files
    row("missing", "train", "moving left", "missingvid1", 10, 12, stage="fetch")
    clip("zerobytes01").write_bytes(b"")
    row("zero_bytes", "train", "moving left", "zerobytes01", 10, 12, stage="fetch", file=clip("zerobytes01"))
    data = encode_video(clip("truncated01"), _frames(4), FPS).read_bytes()
    clip("truncated01").write_bytes(data[: len(data) // 3])
    row("truncated", "train", "moving left", "truncated01", 10, 12, stage="probe", file=clip("truncated01"))
    _corrupt_middle(f := clip("corrupt-mid"))
    row("corrupt_middle", "train", "moving left", "corrupt-mid", 10, 12, note="skipped", file=f)
    clip("notavideo01").write_text("<!DOCTYPE html><html><body>Video unavailable</body></html>\n")
    row("not_a_video", "train", "moving left", "notavideo01", 10, 12, stage="probe", file=clip("notavideo01"))
    _audio_only(f := clip("audioonly01"))
    row("audio_only", "train", "moving left", "audioonly01", 10, 12, stage="probe", file=f)

    # files that must be repaired, with a note saying how
    _vfr(f := clip("variablefps"))
    row("vfr", "train", "moving right", "variablefps", 10, 12, note="vfr->cfr", file=f)
    _rotated(f := clip("rotated90-1"))
    row("rotated", "train", "moving right", "rotated90-1", 10, 12, note="rotated 90", file=f)
    encode_video(f := clip("odd97x65res"), _frames(5, size=(97, 65)), FPS, pix_fmt="yuv444p")
    row("odd_resolution", "train", "moving right", "odd97x65res", 10, 12, note="odd size", file=f)
    encode_video(f := clip("absurdshape"), np.zeros((10, 16, 2048, 3), np.uint8), FPS)
    row("absurd_resolution", "train", "moving right", "absurdshape", 10, 12, stage="probe", file=f)

    # whole videos (<id>.mp4, 2 s) whose annotated range reaches past their end
    encode_video(f := videos / "shortvideo1.mp4", _frames(6), FPS)
    row("short", "train", "moving right", "shortvideo1", 1, 10, note="short", file=f)
    encode_video(f := videos / "pastend0001.mp4", _frames(6), FPS)
    row("past_end", "train", "moving right", "pastend0001", 5, 15, stage="decode", file=f)

    # rows that are wrong in themselves
    row("malformed_number", "train", "moving left", "badnumber01", "abc", 12, stage="annotations", keyable=False)
    row("end_before_start", "train", "moving left", "endbefore01", 12, 10, stage="annotations")
    row("missing_field", "train", "moving left", "", 10, 12, stage="annotations", keyable=False)
    row("duplicate_row", "train", "moving left", "good-left01", 10, 12, stage="annotations")
    encode_video(folder / "videos" / "val" / f"{clip_name('unknownlab1', 10, 12)}.mp4", _frames(10), FPS)
    row("unknown_label", "val", "juggling fire", "unknownlab1", 10, 12, stage="annotations")

    write_kinetics_csvs(folder / "annotations", rows)
    return expected
