"""The embedded default dataset: small, real, encoded videos in the Kinetics layout.

Classes differ by motion only (direction, order, speed). Appearance (colours, textures, size, start
position) is drawn per clip from a seed, so it says nothing about the label. Most classes come in
reversal pairs: playing a "moving left" clip backwards gives exactly a "moving right" clip, so a model
that averages frames (TSN) cannot separate a pair and a temporal model is hurt by reversing time.
That makes the set a quick, honest check that a pipeline keeps frame order and that a model uses time.
"""
from __future__ import annotations

import argparse
import csv
import math
import string
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from shards.adapters.kinetics import clip_name

# Forward members of reversal pairs come first; the default 8 classes are four complete pairs.
CLASSES = [
    "moving left", "moving right", "moving up", "moving down",
    "approaching", "receding", "flashing left then right", "flashing right then left",
    "rotating clockwise", "rotating counterclockwise", "moving slowly", "moving quickly",
]
CODECS = {  # codec -> (encoder, container extension, pixel format)
    "h264": ("libx264", "mp4", "yuv420p"),
    "vp9": ("libvpx-vp9", "webm", "yuv420p"),
    "vp8": ("libvpx", "webm", "yuv420p"),
    "mjpeg": ("mjpeg", "avi", "yuvj420p"),
}
_ID_CHARS = string.ascii_letters + string.digits + "-_"


# ---------------------------------------------------------------- rendering

def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resize: crisp object edges and no dependency beyond numpy."""
    ys = np.arange(h) * img.shape[0] // max(h, 1)
    xs = np.arange(w) * img.shape[1] // max(w, 1)
    return img[ys][:, xs]


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int]) -> np.ndarray:
    """Low-frequency colour field (bilinear upsampling of a coarse random grid)."""
    coarse = rng.uniform(0, 255, (cells[0] + 1, cells[1] + 1, 3))
    ys, xs = np.linspace(0, cells[0], h), np.linspace(0, cells[1], w)
    y0, x0 = np.minimum(ys.astype(int), cells[0] - 1), np.minimum(xs.astype(int), cells[1] - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    field = _smooth_noise(rng, h, w, (int(rng.integers(2, 6)), int(rng.integers(2, 6))))
    return np.clip(field * 0.7 + rng.normal(0, 8, (h, w, 3)), 0, 255)


def _object(rng: np.random.Generator, n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A textured object (blocky colours + noise) and its mask (square or disc)."""
    cells = int(rng.integers(2, 5))
    palette = rng.uniform(0, 255, (cells, cells, 3))
    tex = np.clip(_resize(palette, n, n) + rng.normal(0, 18, (n, n, 3)), 0, 255)
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    mask = (yy ** 2 + xx ** 2 <= (n / 2) ** 2) if rng.random() < 0.5 else np.ones((n, n), bool)
    return tex, mask


def _paste(frame: np.ndarray, tex: np.ndarray, mask: np.ndarray, x: float, y: float, size: float) -> None:
    """Paste the object scaled to `size` with its top-left corner at (x, y), clipped to the frame."""
    s = max(int(round(size)), 1)
    tex, mask = _resize(tex, s, s), _resize(mask, s, s)
    x, y = int(round(x)), int(round(y))
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + s, w), min(y + s, h)
    if x0 >= x1 or y0 >= y1:
        return
    m = mask[y0 - y:y1 - y, x0 - x:x1 - x]
    frame[y0:y1, x0:x1][m] = tex[y0 - y:y1 - y, x0 - x:x1 - x][m]


def _linear(rng, bg, num_frames, travel, angle):
    """One object moving in a straight line, the whole path inside the frame."""
    h, w = bg.shape[:2]
    tex, mask = _object(rng)
    size = rng.uniform(0.2, 0.3) * h
    dx, dy = travel * math.cos(angle), travel * math.sin(angle)
    x0 = rng.uniform(max(0, -dx), max(max(0, -dx), w - size - max(0, dx)))
    y0 = rng.uniform(max(0, -dy), max(max(0, -dy), h - size - max(0, dy)))
    frames = np.repeat(bg[None], num_frames, axis=0)
    for i, t in enumerate(np.linspace(0, 1, num_frames)):
        _paste(frames[i], tex, mask, x0 + dx * t, y0 + dy * t, size)
    return frames


def _grow(rng, bg, num_frames):
    h, w = bg.shape[:2]
    tex, mask = _object(rng)
    small, big = rng.uniform(0.12, 0.2) * h, rng.uniform(0.5, 0.65) * h
    cx, cy = rng.uniform(big / 2, w - big / 2), rng.uniform(0.4 * h, 0.6 * h)
    frames = np.repeat(bg[None], num_frames, axis=0)
    for i, t in enumerate(np.linspace(0, 1, num_frames)):
        s = small * (big / small) ** t  # geometric growth: constant apparent approach speed
        _paste(frames[i], tex, mask, cx - s / 2, cy - s / 2, s)
    return frames


def _flash(rng, bg, num_frames):
    """Object A shows in the left half, then object B in the right half."""
    h, w = bg.shape[:2]
    size = rng.uniform(0.25, 0.35) * h
    spots = [(rng.uniform(0, w / 2 - size), rng.uniform(0, h - size)),
             (rng.uniform(w / 2, w - size), rng.uniform(0, h - size))]
    objects = [_object(rng), _object(rng)]
    frames = np.repeat(bg[None], num_frames, axis=0)
    for i, t in enumerate(np.linspace(0, 1, num_frames)):
        which = 0 if 0.1 <= t < 0.45 else 1 if 0.55 < t <= 0.9 else None
        if which is not None:
            _paste(frames[i], *objects[which], *spots[which], size)
    return frames


def _rotate(rng, bg, num_frames):
    h, w = bg.shape[:2]
    tex, _ = _object(rng)
    tex[:, : tex.shape[1] // 4] = rng.uniform(0, 255, 3)  # a bar off-centre makes the turning obvious
    r = rng.uniform(0.3, 0.4) * h
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    turn, start = rng.uniform(0.6, 1.0) * math.pi, rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[-int(r):int(r) + 1, -int(r):int(r) + 1].astype(float)
    inside = xx ** 2 + yy ** 2 <= r ** 2
    n = tex.shape[0]
    frames = np.repeat(bg[None], num_frames, axis=0)
    for i, t in enumerate(np.linspace(0, 1, num_frames)):
        a = start + turn * t  # clockwise on screen: y points down
        u = (math.cos(a) * xx + math.sin(a) * yy) / (2 * r) + 0.5
        v = (-math.sin(a) * xx + math.cos(a) * yy) / (2 * r) + 0.5
        patch = tex[np.clip((v * n).astype(int), 0, n - 1), np.clip((u * n).astype(int), 0, n - 1)]
        y0, x0 = int(round(cy - r)), int(round(cx - r))
        sub = frames[i, y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]]
        m = inside[: sub.shape[0], : sub.shape[1]]
        sub[m] = patch[: sub.shape[0], : sub.shape[1]][m]
    return frames


def motion_clip(class_name: str, rng: np.random.Generator, size: tuple[int, int] = (128, 96),
                num_frames: int = 30) -> np.ndarray:
    """Frames [T, H, W, 3] uint8 of one clip of `class_name`; appearance drawn from `rng`.

    The second member of a reversal pair is rendered as the first one played backwards, so the pair
    is exactly time-symmetric and only frame order separates it.
    """
    if class_name not in CLASSES:
        raise ValueError(f"unknown class {class_name!r}; choose one of {CLASSES}")
    w, h = size
    bg = _background(rng, h, w)
    index = CLASSES.index(class_name)
    forward = CLASSES[index - index % 2]
    if forward == "moving slowly":  # speed classes are not a pair: direction is random in both
        travel = (0.1, 0.18) if class_name == "moving slowly" else (0.45, 0.6)
        frames = _linear(rng, bg, num_frames, rng.uniform(*travel) * h, rng.uniform(0, 2 * math.pi))
        return frames.astype(np.uint8)
    if forward == "moving left":
        frames = _linear(rng, bg, num_frames, rng.uniform(0.35, 0.55) * w, math.pi)
    elif forward == "moving up":
        frames = _linear(rng, bg, num_frames, rng.uniform(0.3, 0.45) * h, -math.pi / 2)
    elif forward == "approaching":
        frames = _grow(rng, bg, num_frames)
    elif forward == "flashing left then right":
        frames = _flash(rng, bg, num_frames)
    else:
        frames = _rotate(rng, bg, num_frames)
    if class_name != forward:
        frames = frames[::-1]
    return np.ascontiguousarray(frames.astype(np.uint8))


# ---------------------------------------------------------------- encoding

def encode_video(path: str | Path, frames: np.ndarray, fps: float, codec: str = "h264",
                 gop: int | None = None, pix_fmt: str | None = None, pixel_aspect: Fraction | None = None) -> Path:
    """Encode RGB frames to a video file; the container follows the path's extension.

    `gop=None` keeps the encoder's own keyframe placement (long GOPs and scene cuts, like real
    downloads); an int forces a keyframe every `gop` frames. `pixel_aspect` marks the pixels as
    non-square (e.g. 59/54 of PAL DVDs and broadcast), as anamorphic sources are.
    """
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} is not one of {sorted(CODECS)}")
    encoder, _, default_fmt = CODECS[codec]
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt or default_fmt
        stream.codec_context.thread_count = 1  # tiny frames: threads cost more than they save
        if pixel_aspect:
            stream.codec_context.sample_aspect_ratio = pixel_aspect
        if gop:
            stream.codec_context.gop_size = gop
        if codec == "h264":
            stream.options = {"preset": "veryfast"} | ({"x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"} if gop else {})
        elif codec in ("vp9", "vp8"):
            stream.options = {"deadline": "realtime", "cpu-used": "8"} | ({"keyint_min": str(gop)} if gop else {})
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    return path


# ---------------------------------------------------------------- the dataset

def youtube_id(rng: np.random.Generator) -> str:
    """11 characters of YouTube's alphabet; about one in eight starts with '-', which breaks naive CLIs."""
    chars = rng.choice(list(_ID_CHARS), 11)
    if rng.random() < 0.125:
        chars[0] = "-"
    return "".join(chars)


def _write_broken(root: Path, rng: np.random.Generator, frames: np.ndarray, fps: float, classes: list[str],
                  unique) -> tuple[list, dict]:
    """Deliberately broken train entries, so the demo's failures table has something in it."""
    videos = root / "videos" / "train"
    whole = encode_video(videos / "whole.mp4", frames, fps)  # an mp4 cut short loses its index: unreadable
    data = whole.read_bytes()
    whole.unlink()
    contents = {"zero bytes": (b"", "fetch"), "truncated": (data[: len(data) // 3], "probe"),
                "not a video": (b"<html><body>This video is unavailable.</body></html>\n", "probe"),
                "missing": (None, "fetch")}
    rows, expected = [], {}
    for what, (payload, stage) in contents.items():
        yid, start = unique(), int(rng.integers(0, 290))
        name = clip_name(yid, start, start + 10)
        if payload is not None:
            (videos / f"{name}.mp4").write_bytes(payload)
        rows.append([classes[len(rows) % len(classes)], yid, start, start + 10, "train"])
        expected[name] = {"case": what, "stage": stage}
    return rows, expected


def write_kinetics_csvs(folder: str | Path, rows: dict[str, list]) -> None:
    """`<split>.csv` per split, in the official column order."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    for split, split_rows in rows.items():
        with open(Path(folder) / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
            writer.writerows(split_rows)


def make_sample_dataset(root: str | Path, num_classes: int = 8, train_per_class: int = 24,
                        val_per_class: int = 8, size: tuple[int, int] = (128, 96), fps: float = 15,
                        seconds: float = 2.0, codec: str = "h264", seed: int = 0, broken: bool = True,
                        layout: str = "clips", progress: bool = False) -> dict:
    """Write the dataset under `root` and return a summary of what was written.

    layout="clips": trimmed clips `videos/<split>/<id>_<start>_<end>.<ext>` (how most people hold
    Kinetics); layout="full": whole videos `videos/<split>/<id>.<ext>` with still lead-in and tail around
    the action, so [time_start, time_end] in the CSV must be honoured by trimming.
    """
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must be in 1..{len(CLASSES)}, got {num_classes}")
    if layout not in ("clips", "full"):
        raise ValueError(f"layout must be 'clips' or 'full', got {layout!r}")
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} is not one of {sorted(CODECS)}")
    ext = CODECS[codec][1]
    root, rng, began = Path(root), np.random.default_rng(seed), time.monotonic()
    classes, num_frames = CLASSES[:num_classes], max(2, round(seconds * fps))
    span = math.ceil(seconds)  # names carry whole seconds, like Kinetics
    seen: set[str] = set()

    def unique() -> str:
        while (yid := youtube_id(rng)) in seen:
            pass
        seen.add(yid)
        return yid

    plan = [(split, c) for split, n in (("train", train_per_class), ("val", val_per_class))
            for _ in range(n) for c in classes]
    rows: dict[str, list] = {"train": [], "val": []}
    for done, (split, label) in enumerate(plan, 1):
        frames = motion_clip(label, rng, size, num_frames)
        yid = unique()
        if layout == "clips":
            start = int(rng.integers(0, 290))
            encode_video(root / "videos" / split / f"{clip_name(yid, start, start + span)}.{ext}", frames, fps, codec)
        else:
            start = int(rng.integers(1, 3))
            lead, tail = np.repeat(frames[:1], round(start * fps), 0), np.repeat(frames[-1:], round(fps), 0)
            encode_video(root / "videos" / split / f"{yid}.{ext}", np.concatenate([lead, frames, tail]), fps, codec)
        rows[split].append([label, yid, start, start + span, split])
        if progress and (done % max(1, len(plan) // 10) == 0 or done == len(plan)):
            rate = done / (time.monotonic() - began)
            print(f"{done}/{len(plan)} clips, {rate:.1f}/s, ETA {(len(plan) - done) / rate:.0f}s", file=sys.stderr)
    expected_failures = {}
    if broken and plan:
        extra, expected_failures = _write_broken(root, rng, frames, fps, classes, unique)
        rows["train"] += extra
    write_kinetics_csvs(root / "annotations", rows)
    return {"root": str(root), "annotations": str(root / "annotations"), "videos": str(root / "videos"),
            "classes": classes, "counts": {s: len(r) for s, r in rows.items()}, "frames_per_clip": num_frames,
            "fps": fps, "size": tuple(size), "codec": codec, "layout": layout,
            "expected_failures": expected_failures, "seconds_taken": round(time.monotonic() - began, 2)}


def contact_sheet(path: str | Path, classes: list[str] = CLASSES, size: tuple[int, int] = (128, 96),
                  num_frames: int = 30, columns: int = 6, seed: int = 0) -> Path:
    """One row per class, `columns` frames evenly spaced in time: what the classes look like at a glance."""
    from PIL import Image  # only the sheet needs it

    rng = np.random.default_rng(seed)
    picks = np.linspace(0, num_frames - 1, columns).round().astype(int)
    rows = [np.concatenate([np.pad(f, ((2, 2), (2, 2), (0, 0)), constant_values=255)
                            for f in motion_clip(c, rng, size, num_frames)[picks]], 1) for c in classes]
    Image.fromarray(np.concatenate(rows, 0)).save(path)
    return Path(path)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m shards.sample_dataset", description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder to write annotations/ and videos/ into")
    p.add_argument("--classes", type=int, default=8, help=f"number of classes (1..{len(CLASSES)})")
    p.add_argument("--train-per-class", type=int, default=24)
    p.add_argument("--val-per-class", type=int, default=8)
    p.add_argument("--size", default="128x96", help="WIDTHxHEIGHT")
    p.add_argument("--fps", type=float, default=15)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--codec", choices=sorted(CODECS), default="h264")
    p.add_argument("--layout", choices=["clips", "full"], default="clips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-broken", dest="broken", action="store_false", help="leave out the deliberately broken entries")
    p.add_argument("--sheet", help="also write a PNG with frames of every class (rows = classes, left to right = time)")
    a = p.parse_args(argv)
    w, h = (int(v) for v in a.size.lower().split("x"))
    if a.sheet:
        contact_sheet(a.sheet, CLASSES[:a.classes], (w, h), max(2, round(a.seconds * a.fps)), seed=a.seed)
    summary = make_sample_dataset(a.out, a.classes, a.train_per_class, a.val_per_class, (w, h), a.fps,
                                  a.seconds, a.codec, a.seed, a.broken, a.layout, progress=True)
    print(f"wrote {summary['counts']} clips of {summary['classes']} to {a.out} in {summary['seconds_taken']}s"
          f" ({len(summary['expected_failures'])} deliberately broken)")
    return summary


if __name__ == "__main__":
    main()
