"""The benchmarks' data: 10 s clips at 30 fps (300 frames), VP9, GOP 8, short side 256, as Kinetics clips
are once sharded, written by the real shard job (Ray on 127.0.0.1) into a folder that later runs reuse.

The content is the embedded motion dataset's (`shards.sample_dataset.motion_clip`: a textured object moving
over smooth noise), rendered at 340x256 and 456x256 (the two common Kinetics shapes after the shard job's
resize). It is not real footage, but at GOP 8 (a keyframe every 8 frames) VP9 spends most of its bytes on
keyframes, so a clip holds about a megabyte, like a Kinetics clip sharded the same way (0.9 MB).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SIZES = ((340, 256), (456, 256))
FPS, SECONDS = 30, 10


def clip_shards(folder: str | Path, videos: int) -> str:
    """The shard job's output root (split "train") for `videos` clips under `folder`; made once."""
    folder = Path(folder)
    output = folder / "shards"
    if (output / "manifest.json").exists():
        return str(output)
    import ray

    from shards.job import JobConfig, run_job, transcode_options
    from shards.sample_dataset import CLASSES, encode_video, motion_clip, write_kinetics_csvs

    print(f"rendering {videos} clips of {FPS * SECONDS} frames in {folder} ...", flush=True)
    rng, rows = np.random.default_rng(0), []
    for i in range(videos):
        label = CLASSES[i % 8]
        frames = motion_clip(label, rng, SIZES[i % len(SIZES)], FPS * SECONDS)
        name = f"clip{i:05d}_{i:06d}_{i + SECONDS:06d}"         # the Kinetics clip naming: <id>_<start>_<end>
        encode_video(folder / "source" / "videos" / "train" / f"{name}.mp4", frames, FPS, "h264")
        rows.append([label, f"clip{i:05d}", i, i + SECONDS, "train"])
    write_kinetics_csvs(folder / "source" / "annotations", {"train": rows})
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="ERROR")
    try:
        run_job(JobConfig(annotations=str(folder / "source" / "annotations"), videos=str(folder / "source" / "videos"),
                          output=str(output), transcode=transcode_options(short_side=256, codec="vp9", gop=8),
                          splits=("train",), shard_size=64 << 20, workers=os.cpu_count() or 1))
    finally:
        ray.shutdown()
    return str(output)


def repeated(shards: str | Path, copies: int) -> str:
    """A shard root beside `shards` whose train index lists every clip `copies` times (keys `<key>~<copy>`),
    pointing at the same tar members through links: epochs long enough for large batches without rendering
    more clips. A window that ran over an epoch boundary would time the loader's epoch start, not its rate."""
    shards = Path(shards)
    if copies == 1:
        return str(shards)
    out = shards.with_name(f"{shards.name}-x{copies}")
    if (out / "train" / "index.parquet").exists():
        return str(out)
    (out / "train").mkdir(parents=True, exist_ok=True)
    index = pq.read_table(shards / "train" / "index.parquet")
    for shard in set(index.column("shard").to_pylist()):
        link = out / shard
        if not link.exists():
            link.symlink_to((shards / shard).resolve())
    keys = [f"{key}~{copy}" for copy in range(copies) for key in index.column("key").to_pylist()]
    table = pa.concat_tables([index] * copies)
    table = table.set_column(table.schema.get_field_index("key"), "key", pa.array(keys))
    pq.write_table(table, out / "train" / "index.parquet")
    shutil.copy(shards / "classes.txt", out / "classes.txt")
    return str(out)


def main(argv=None) -> None:
    import argparse
    p = argparse.ArgumentParser(prog="python -m benchmarks.clip_shards", description="Print the root of the "
                                "benchmarks' 300-frame clip shards, made if missing (the last line of the output).")
    p.add_argument("folder")
    p.add_argument("--videos", type=int, default=48)
    p.add_argument("--copies", type=int, default=1, help="times the train index lists each clip (see repeated)")
    a = p.parse_args(argv)
    print(repeated(clip_shards(a.folder, a.videos), a.copies))


if __name__ == "__main__":
    main()
