"""The packet table in the shard index and the reads it allows: only the GOPs a view needs, from local disk
and from an S3 server, checked per GOP, giving exactly the streams and pixels of whole-member reads; and
old shards without the table, which load whole and which `python -m shards.upgrade` brings up to date."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_loader import FlakyFileSystem
from test_video_pipeline import loopback_ray, run, run_shard_job

from pipelines.gops import byte_ranges, cut, packet_table, webm_packets
from pipelines.loader import VideoLoader
from pipelines.sampling import frame_indices
from pipelines.source import (PACKET_COLUMNS, SampleError, ShardIndex, ShardReader, gop_reads_win,
                              packet_table_note)
from pipelines.video_pipeline import PipelineConfig
from shards import upgrade
from shards.job import JobConfig, run_job, transcode_options
from shards.sample_dataset import make_sample_dataset
from shards.writer import packet_columns

FRAMES, GOP = 300, 8


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    """Four 300-frame clips (10 s at 30 fps, 96x72) sharded to VP9 with a keyframe every 8 frames by the
    real shard job, about two clips per shard."""
    root = tmp_path_factory.mktemp("gop_reads")
    source = make_sample_dataset(root / "source", num_classes=4, train_per_class=1, val_per_class=0,
                                 size=(96, 72), fps=30, seconds=FRAMES / 30, broken=False)
    sizes = sorted(p.stat().st_size for p in Path(source["videos"]).rglob("*.mp4"))
    options = {"transcode": transcode_options(short_side=72, codec="vp9", gop=GOP), "splits": ("train",),
               "shard_size": sizes[-1] + sizes[-2]}
    with loopback_ray():
        run_shard_job(source, root / "shards", **options)
    return {"root": root, "source": source, "options": options, "output": str(root / "shards")}


@pytest.fixture(scope="module")
def bucket(job):
    """The job's output copied to a bucket of a local S3 server: (URL, storage_options)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    options = {"key": "test", "secret": "test",
               "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}}
    fs = s3fs.S3FileSystem(**options)
    fs.call_s3("create_bucket", Bucket="gop-reads")     # moto keeps buckets per process: a name of its own
    fs.put(f"{job['output']}/train", "gop-reads/k4/train", recursive=True)
    yield "s3://gop-reads/k4", options
    server.stop()


def split(job, storage: str, request) -> ShardIndex:
    if storage == "local":
        return ShardIndex(job["output"], "train")
    url, options = request.getfixturevalue("bucket")
    return ShardIndex(url, "train", options)


def member(index: ShardIndex, row: int) -> bytes:
    return index.fs.cat_file(index.shard_path(row), start=int(index["offset"][row]),
                             end=int(index["offset"][row] + index["size"][row]))


def views(index: ShardIndex, row: int) -> list[np.ndarray]:
    """What a loader asks of a video: a TSN-8 training view, and three dense 8x4 evaluation clips."""
    n = int(index["num_frames"][row])
    return [frame_indices("uniform", n, 8, rng=np.random.default_rng(row)),
            *(frame_indices("dense", n, 8, 4, clip, 3) for clip in range(3))]


def strip(output: str, to) -> str:
    """A copy of a shard job's output as the job wrote it before the packet table: index and markers without it."""
    shutil.copytree(output, to)
    for index in Path(to).glob("*/index.parquet"):
        pq.write_table(pq.read_table(index).drop_columns(list(PACKET_COLUMNS)), index)
    for path in Path(to, "_job", "done").rglob("*.json"):
        marker = json.loads(path.read_text())
        marker["rows"] = [{k: v for k, v in row.items() if k not in PACKET_COLUMNS} for row in marker["rows"]]
        path.write_text(json.dumps(marker, indent=1, sort_keys=True))
    return str(to)


def flip(output: str, row: dict, at: int) -> None:
    """Invert one byte of a video member, `at` bytes into it."""
    with open(Path(output, row["shard"]), "r+b") as tar:
        tar.seek(row["offset"] + at)
        byte = tar.read(1)
        tar.seek(row["offset"] + at)
        tar.write(bytes([byte[0] ^ 0xFF]))


# ---------------------------------------------------------------- the table

def test_the_index_holds_each_members_packet_table_as_a_parse_of_the_member_gives(job):
    index = ShardIndex(job["output"], "train")
    assert len(index) == 4 and len(set(index["shard"])) >= 2
    for row in range(len(index)):
        stored, parsed = index.packet_table(row), packet_table(member(index, row))
        assert stored.num_frames == index["num_frames"][row] == FRAMES
        for name in ("offset", "size", "keyframes", "gop_crc32"):
            np.testing.assert_array_equal(getattr(stored, name), getattr(parsed, name))
        assert (stored.fourcc, stored.width, stored.height) == (parsed.fourcc, parsed.width, parsed.height)
        np.testing.assert_array_equal(stored.keyframes, np.arange(0, FRAMES, GOP))     # the job's GOP


def test_the_packet_table_costs_6_bytes_a_frame_and_8_a_gop_in_memory(job):
    """uint32 size and uint16 gap per frame, uint32 keyframe and crc32 per GOP, and where each row's begin
    (int64 per column, and a flag): 2.1 KB for a 300-frame video at GOP 8 (docs/shard_format.md)."""
    index = ShardIndex(job["output"], "train")
    frames, gops = int(index["num_frames"].sum()), len(index) * -(-FRAMES // GOP)    # 38 GOPs of 300 frames
    assert index.packets.nbytes == 6 * frames + 8 * gops + 4 * 8 * (len(index) + 1) + len(index)


def test_members_other_than_webm_get_no_packet_table(job):
    mp4 = next(Path(job["source"]["videos"]).rglob("*.mp4")).read_bytes()
    assert packet_columns("mp4", mp4) == packet_columns("webm", b"RIFF not a webm") == dict.fromkeys(PACKET_COLUMNS)


def test_gop_ranges_closer_than_the_gap_are_read_as_one(job):
    table = ShardIndex(job["output"], "train").packet_table(0)
    starts, ends = table.gop_spans
    frames = np.array([3, 9, 200])                                         # GOPs 0, 1 and 25
    assert byte_ranges(table, frames, gap=0) == ([starts[0], starts[1], starts[25]], [ends[0], ends[1], ends[25]])
    assert byte_ranges(table, frames, gap=starts[1] - ends[0]) == ([starts[0], starts[25]], [ends[1], ends[25]])
    assert byte_ranges(table, frames, gap=1 << 30) == ([starts[0]], [ends[25]])


# ---------------------------------------------------------------- reading GOPs

@pytest.mark.parametrize("storage", ["local", "s3"])
def test_gop_reads_give_the_streams_of_a_whole_read_cut_as_before(job, storage, request):
    index = split(job, storage, request)
    requests = [(row, np.concatenate(views(index, row))) for row in range(len(index))]
    got = list(ShardReader(index, readers=2).read_gops(requests))
    assert [row for row, _ in got] == list(range(len(index)))
    for row, parts in got:
        packets = webm_packets(member(index, row))
        for frames in views(index, row):
            data, positions = parts.cut(frames)
            want, want_positions = cut(packets, frames)
            assert data == want
            np.testing.assert_array_equal(positions, want_positions)


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_gop_reads_decode_to_the_pixels_of_whole_member_reads(job, storage, request):
    index = split(job, storage, request)
    rows = list(range(len(index)))
    frames = [views(index, row)[0] for row in rows]
    parts = dict(ShardReader(index, readers=2).read_gops(zip(rows, frames)))
    cuts = [parts[row].cut(f) for row, f in zip(rows, frames)]
    config = PipelineConfig(num_frames=8, crop_size=72, layout="BTCHW", mean=(0, 0, 0), std=(1 / 255,) * 3)
    window, mirror = [(0, 0, 72, 72)] * len(rows), [False] * len(rows)
    whole = run(config, [{"data": member(index, row)} for row in rows], frames, window, mirror)
    from_gops = run(config, [{"data": data} for data, _ in cuts], [p for _, p in cuts], window, mirror)
    np.testing.assert_array_equal(from_gops, whole)


def test_tsn8_reads_about_a_quarter_of_a_300_frame_member(job):
    """8 frames in 8 of the 38 GOPs: the bytes read are those GOPs' (from the table), not a timing."""
    index = ShardIndex(job["output"], "train")
    requests = [(row, frame_indices("uniform", FRAMES, 8, rng=np.random.default_rng(seed)))
                for seed in range(5) for row in range(len(index))]
    read = list(ShardReader(index, readers=2, gap=0).read_gops(requests))
    for (row, frames), (_, parts) in zip(requests, read):
        table = index.packet_table(row)
        starts, ends = table.gop_spans
        gops = np.unique(table.gops_of(frames)[1])                        # 8, or 7 where two share a GOP
        assert parts.nbytes == (ends - starts)[gops].sum() and len(parts.pieces) == len(gops) >= 7
        assert 0.15 < parts.nbytes / index["size"][row] < 0.3


def test_gop_reads_are_the_default_on_local_disks_only(job, bucket, tmp_path):
    """Through s3fs every range is a request, which costs more than the bytes it saves (docs/pipelines.md)."""
    url, options = bucket
    assert gop_reads_win(ShardIndex(job["output"], "train"))
    assert not gop_reads_win(ShardIndex(url, "train", options))
    assert not gop_reads_win(ShardIndex(strip(job["output"], tmp_path / "old"), "train"))


def test_transient_storage_errors_in_gop_reads_are_retried(job):
    index = ShardIndex(job["output"], "train")
    index.fs = FlakyFileSystem(failures=3)
    reader = ShardReader(index, readers=1, backoff_s=0.01)
    got = list(reader.read_gops((row, views(index, row)[0]) for row in range(len(index))))
    assert not [row for row, parts in got if isinstance(parts, SampleError)] and index.fs.failures == 0


LOADER = {"batch_size": 2, "num_frames": 8, "crop_size": 48, "short_side": (56, 64), "readers": 2}


def test_the_loader_reads_gops_on_a_local_disk_and_delivers_the_batches_of_whole_reads(job):
    by_gops = VideoLoader(job["output"], split="train", **LOADER)
    by_whole = VideoLoader(job["output"], split="train", gop_reads=False, **LOADER)
    assert by_gops.gop_reads and not by_whole.gop_reads
    read_gops = [b for b in by_gops.host_batches(0)]
    assert all(all(len(data) < 0.4 * size for data, size in zip(b.encoded, by_gops.index["size"][b.views.rows]))
               for b in read_gops)                                           # the cuts came from a few GOPs
    for got, want in zip(by_gops, by_whole, strict=True):
        assert torch.equal(got["video"], want["video"]) and got["key"] == want["key"] and got["valid"].all()


def test_the_loader_reads_whole_members_from_object_storage(job, bucket):
    url, options = bucket
    loader = VideoLoader(url, split="train", storage_options=options, **LOADER)
    assert not loader.gop_reads and len(list(loader)) == 2 and loader.failures == []


# ---------------------------------------------------------------- integrity

def test_a_flipped_byte_in_a_read_gop_fails_the_sample_at_verify(job, tmp_path):
    """The sample comes back as the failure the loader records; its bytes never reach the decoder."""
    damaged = shutil.copytree(job["output"], tmp_path / "damaged")
    index = ShardIndex(str(damaged), "train")
    frames = views(index, 1)[0]
    gop = int(index.packet_table(1).gops_of(frames)[1][3])
    start, end = (span[gop] for span in index.packet_table(1).gop_spans)
    flip(str(damaged), {"shard": index["shard"][1], "offset": int(index["offset"][1])}, (start + end) // 2)
    got = dict(ShardReader(index, readers=1).read_gops([(0, views(index, 0)[0]), (1, frames)]))
    assert not isinstance(got[0], SampleError)
    error = got[1]
    assert isinstance(error, SampleError) and error.stage == "verify"
    assert error.reason == (f"{index.keys[1]}.webm in {index.shard_path(1)} fails the crc32 of GOP {gop} (its bytes "
                            f"{start}-{end}): the tar is damaged; restore it from a good copy, or reshard it: delete "
                            f"{damaged}/_job/done/{index['shard'][1][:-4]}.json and rerun the shard job on this "
                            "output with its arguments")


def test_the_loader_records_a_video_whose_read_gop_fails_its_crc32_and_decodes_a_stand_in(job, tmp_path):
    damaged = str(shutil.copytree(job["output"], tmp_path / "damaged"))
    loader = VideoLoader(damaged, split="train", **LOADER)
    plan = loader.plan(0)
    row = int(plan.reads[0])
    table = loader.index.packet_table(row)
    gop = int(table.gops_of(next(plan.row_frames(plan.reads[:1])).ravel())[1][0])
    start, end = (span[gop] for span in table.gop_spans)
    flip(damaged, {"shard": loader.index["shard"][row], "offset": int(loader.index["offset"][row])}, (start + end) // 2)
    batches = list(loader)
    assert [(f["video_index"], f["stage"]) for f in loader.failures] == [(row, "verify")]
    assert f"fails the crc32 of GOP {gop}" in loader.failures[0]["reason"]
    assert sum(int((~b["valid"]).sum()) for b in batches) == 1


def test_a_flipped_byte_outside_the_read_gops_does_not_fail_the_read(job, tmp_path):
    """Nothing read, nothing decoded: the cut is the undamaged member's. A whole read still catches it."""
    damaged = shutil.copytree(job["output"], tmp_path / "damaged")
    index = ShardIndex(str(damaged), "train")
    frames = views(index, 1)[0]
    unread = sorted(set(range(FRAMES // GOP)) - set(index.packet_table(1).gops_of(frames)[1].tolist()))[2]
    start, _ = (span[unread] for span in index.packet_table(1).gop_spans)
    clean = webm_packets(member(index, 1))
    flip(str(damaged), {"shard": index["shard"][1], "offset": int(index["offset"][1])}, start + 5)
    (_, parts), = ShardReader(index, readers=1).read_gops([(1, frames)])
    assert parts.cut(frames)[0] == cut(clean, frames)[0]
    (_, whole), = ShardReader(index, readers=1)([1])
    assert isinstance(whole, SampleError) and whole.stage == "verify"


# ---------------------------------------------------------------- old shards and the upgrade

def test_old_shards_load_whole_and_the_note_names_the_upgrade(job, tmp_path):
    old = strip(job["output"], tmp_path / "old")
    index = ShardIndex(old, "train")
    assert index.packets is None and index.without_packet_table == 4
    assert packet_table_note(index) == (
        f"4 of 4 videos in {old} have no packet table in the index (shards written before it), so they are read "
        f"whole and parsed at load; `python -m shards.upgrade {tmp_path}/old` adds it without re-encoding (or "
        "reshard), and loading reads only the GOPs a view needs")
    assert packet_table_note(ShardIndex(job["output"], "train")) is None
    got = list(ShardReader(index, readers=2).read_gops((row, views(index, row)[0]) for row in range(4)))
    assert got == list(ShardReader(index, readers=2)(range(4)))            # whole members, sha256-checked
    assert all(isinstance(data, bytes) for _, data in got)
    with pytest.warns(UserWarning, match=r"^4 of 4 videos .* `python -m shards.upgrade"):
        loader = VideoLoader(old, split="train", batch_size=2, num_frames=4, crop_size=48, short_side=(56, 64),
                             readers=2)
    assert not loader.gop_reads
    batches = list(loader)
    assert len(batches) == 2 and loader.failures == [] and all(b["valid"].all() for b in batches)


def test_upgrade_gives_the_index_and_markers_a_fresh_shard_job_writes(job, tmp_path, capsys):
    old = strip(job["output"], tmp_path / "old")
    assert upgrade.main([old, "--split", "train"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "upgrade: 4 videos without a packet table in train"
    assert out[-2].startswith("videos 4/4 (100.0%)") and "videos/s  ETA" in out[-2]
    assert out[-1] == "upgrade: 4 videos now have a packet table (0 had one); none failed"
    fresh = pq.read_table(f"{job['output']}/train/index.parquet")
    assert pq.read_table(f"{old}/train/index.parquet").equals(fresh)
    for marker in Path(job["output"], "_job", "done").rglob("*.json"):
        assert json.loads(Path(old, marker.relative_to(job["output"])).read_text()) == json.loads(marker.read_text())
    # a rerun of the job (a resume: nothing to transcode) rebuilds the index from the markers: the same
    run_job(JobConfig(annotations=job["source"]["annotations"], videos=job["source"]["videos"], output=old,
                      workers=2, **job["options"]), log=lambda line: None)
    assert pq.read_table(f"{old}/train/index.parquet").equals(fresh)
    assert upgrade.main([old]) == 0 and "0 videos now have a packet table (4 had one)" in capsys.readouterr().out


def test_upgrade_names_a_damaged_member_in_one_line_and_upgrades_the_others(job, tmp_path, capsys):
    old = strip(job["output"], tmp_path / "old")
    rows = pq.read_table(f"{old}/train/index.parquet").to_pylist()
    flip(old, rows[2], 1000)
    assert upgrade.main([old]) == 1
    out = capsys.readouterr().out
    assert (f"upgrade: {rows[2]['shard']} {rows[2]['key']}.webm: its bytes fail the index's sha256 (a damaged tar, "
            "or a tar of another run); it keeps no packet table and loads whole\n") in out
    assert out.endswith("upgrade: 3 videos now have a packet table (0 had one); 1 could not be upgraded (above) and "
                        "load whole\n")
    index = ShardIndex(old, "train")
    assert [index.packet_table(row) is None for row in range(4)] == [False, False, True, False]
    assert upgrade.main([old, "--split", "val"]) == 2
    assert capsys.readouterr().err == f"upgrade: error: --split val: {old} has the splits train\n"
