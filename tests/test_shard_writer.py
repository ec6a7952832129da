"""The shard writer's contract: tars any WebDataset reader (the library, DALI) can read, and index rows
whose byte ranges return exactly the stored videos."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds

from shards.records import VideoRecord
from shards.sample_dataset import CLASSES, encode_video, motion_clip
from shards.transcode import TranscodeOptions, transcode
from shards.writer import ShardWriter


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> dict:
    """Four real clips (2 s, 128x96 H.264 sources) transcoded to VP9 and packed into one shard."""
    root = tmp_path_factory.mktemp("writer")
    rng = np.random.default_rng(0)
    records, clips = [], []
    for i, name in enumerate(CLASSES[:4]):
        source = encode_video(root / f"src{i}.mp4", motion_clip(name, rng, (128, 96), 30), fps=15)
        record = VideoRecord(key=f"-clip{i}_000010_000012", split="train", label=i, label_name=name, source=str(source))
        records.append(record)
        clips.append(transcode(record, TranscodeOptions(short_side=64, codec="vp9", gop=4)))
    tar = root / "shard-000000.tar"
    with open(tar, "wb") as sink:
        writer = ShardWriter(sink, "train/shard-000000.tar")
        for record, clip in zip(records, clips):
            writer.add(record, clip)
        writer.close()
    idx = root / "shard-000000.idx"
    idx.write_text(writer.dali_index())
    return {"tar": tar, "idx": idx, "writer": writer, "records": records, "clips": clips}


def test_webdataset_library_reads_every_sample(shard):
    samples = list(wds.WebDataset(str(shard["tar"]), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [r.key for r in shard["records"]]
    for sample, record, clip in zip(samples, shard["records"], shard["clips"]):
        assert sample["webm"] == clip.data
        assert int(sample["cls"]) == record.label
        meta = json.loads(sample["json"])
        assert (meta["label_name"], meta["num_frames"], meta["codec"], meta["gop"]) == \
            (record.label_name, clip.num_frames, "vp9", 4)


def test_dali_reads_the_shard_with_our_index_on_cpu(shard):
    from nvidia.dali import fn, pipeline_def

    n = len(shard["records"])

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def read():
        video, label = fn.readers.webdataset(paths=[str(shard["tar"])], index_paths=[str(shard["idx"])],
                                             ext=["webm", "cls"], missing_component_behavior="error")
        return fn.decoders.video(video, device="cpu"), label

    pipe = read()
    pipe.build()
    frames, labels = pipe.run()
    for i, (record, clip) in enumerate(zip(shard["records"], shard["clips"])):
        assert bytes(np.asarray(labels[i])).decode() == str(record.label)
        assert np.asarray(frames[i]).shape == (clip.num_frames, clip.height, clip.width, 3)


def test_our_index_equals_dali_wds2idx(shard, tmp_path):
    """DALI's own tool, run on our tar, must write the index we wrote while streaming."""
    theirs = tmp_path / "theirs.idx"
    wds2idx = Path(sys.executable).with_name("wds2idx")
    subprocess.run([str(wds2idx), str(shard["tar"]), str(theirs)], check=True, capture_output=True)
    assert shard["idx"].read_text() == theirs.read_text()


def test_index_byte_ranges_return_exactly_the_stored_video(shard):
    data = shard["tar"].read_bytes()
    for row, clip in zip(shard["writer"].rows, shard["clips"]):
        member = data[row["offset"]: row["offset"] + row["size"]]
        assert member == clip.data
        assert hashlib.sha256(member).hexdigest() == row["sha256"]
    assert shard["writer"].size == len(data) and shard["writer"].sha256 == hashlib.sha256(data).hexdigest()


def test_frame_counts_match_a_pyav_decode_of_the_stored_video(shard):
    data = shard["tar"].read_bytes()
    for row in shard["writer"].rows:
        with av.open(io.BytesIO(data[row["offset"]: row["offset"] + row["size"]])) as container:
            decoded = sum(1 for _ in container.decode(video=0))
        assert decoded == row["num_frames"] > 0
        assert (row["width"], row["height"]) == (64 * 128 // 96 // 2 * 2, 64)


def test_a_key_with_a_dot_is_refused_before_it_corrupts_the_shard(shard):
    writer = ShardWriter(io.BytesIO(), "x.tar")
    bad = VideoRecord(key="clip.v2", split="train", label=0, label_name="a", source="x")
    with pytest.raises(ValueError, match="first dot"):
        writer.add(bad, shard["clips"][0])
