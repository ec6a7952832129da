"""VideoLoader on shards written by the real shard job: coverage, determinism, S3, broken samples; on the
CPU backend and, where a CUDA GPU is visible, on the GPU one (the `device` fixture of conftest.py)."""
from __future__ import annotations

import glob
import os
import re
import shutil
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from fsspec.implementations.local import LocalFileSystem
from test_video_pipeline import loopback_ray, psnr, pyav_frames, run_shard_job

from benchmarks import host_ceiling
from pipelines import fetch, gops
from pipelines import preview
from pipelines.augment import Augment, ClipParams
from pipelines.loader import LoaderError, VideoLoader
from pipelines.sampling import uniform_indices
from pipelines.source import SampleError, ShardIndex, ShardReader
from shards.job import transcode_options
from shards.sample_dataset import make_sample_dataset

RAW = {"mean": (0, 0, 0), "std": (1 / 255,) * 3}      # output = pixel values, for comparing with decodes
SMALL = {"crop_size": 64, "short_side": (72, 96), "num_frames": 4, "readers": 2}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """24 train + 8 val motion clips (176x128: NVDEC decodes VP9 from 128x128; 2 s at 15 fps) sharded to VP9 in several shards per split,
    the val clips again to H.264 by another run, and 6 JPEG images sharded by the images adapter, all by
    the real shard job."""
    root = tmp_path_factory.mktemp("loader")
    source = make_sample_dataset(root / "source", num_classes=4, train_per_class=6, val_per_class=2,
                                 size=(176, 128), fps=15, seconds=2, broken=False)
    images = root / "images"
    for i in range(6):
        folder = images / "train" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.from_numpy(np.random.default_rng(i).integers(0, 256, (3, 90, 120), dtype=np.uint8))
        torchvision.io.write_jpeg(pixels, str(folder / f"img{i}.jpg"), quality=90)
    with loopback_ray():
        run_shard_job(source, root / "shards", transcode=transcode_options(short_side=128, codec="vp9", gop=8),
                      shard_size=150_000)
        run_shard_job(source, root / "h264_shards", transcode=transcode_options(short_side=128, codec="h264", gop=8),
                      shard_size=150_000, splits=("val",))
        run_shard_job({"annotations": str(images), "videos": str(images)}, root / "image_shards", dataset="images")
    return str(root)


def load(shards, split="train", device="cpu", **options) -> VideoLoader:
    return VideoLoader(f"{shards}/shards", split=split, device=device, **{"batch_size": 4, **SMALL, **options})


def batches(loader) -> list[dict]:
    return list(loader)


def index(shards, split) -> list[dict]:
    return pq.read_table(f"{shards}/shards/{split}/index.parquet").to_pylist()


def stored(shards, row: dict) -> bytes:
    """A video's bytes as the shard holds them, read where the index row points."""
    with open(f"{shards}/shards/{row['shard']}", "rb") as tar:
        tar.seek(row["offset"])
        return tar.read(row["size"])


# ---------------------------------------------------------------- shape of an epoch

def test_train_batches_have_the_layout_and_fields_and_len_is_exact(shards, device):
    loader = load(shards, device=device, layout="BTCHW")
    got = batches(loader)
    assert len(loader) == len(got) == 24 // 4
    for batch in got:
        assert batch["video"].shape == (4, 4, 3, 64, 64) and batch["video"].dtype == torch.float32
        assert batch["label"].shape == batch["video_index"].shape == batch["valid"].shape == (4,)
        assert len(batch["key"]) == 4 and batch["valid"].all()
    assert sorted(torch.cat([b["video_index"] for b in got]).tolist()) == list(range(24))


def test_super_and_channels_first_layouts(shards, device):
    def first(**options):
        return next(iter(load(shards, device=device, **options)))["video"]
    assert first(layout="super", grid="2x2").shape == (4, 3, 128, 128)
    assert first(layout="super", num_frames=8).shape == (4, 3, 3 * 64, 3 * 64)
    assert first(layout="BCTHW").shape == (4, 3, 4, 64, 64)


def test_eval_views_cover_every_clip_and_crop_of_every_video_once(shards, device):
    loader = load(shards, "val", device=device, mode="eval", num_clips=2, num_crops=3, batch_size=8)
    got = batches(loader)
    assert len(loader) == len(got) == 8 * 6 // 8
    views = [(v, c, k) for b in got for v, c, k, ok in
             zip(b["video_index"].tolist(), b["clip"].tolist(), b["crop"].tolist(), b["valid"].tolist()) if ok]
    assert sorted(views) == [(v, c, k) for v in range(8) for c in range(2) for k in range(3)]


def test_eval_frames_equal_pyav_decode_at_segment_centres(shards, device):
    # Three crops of a 176x128 clip with the short side kept: crop 0 is the untouched left 128x128 square.
    loader = load(shards, "val", device=device, mode="eval", num_crops=3, crop_size=128, num_frames=8, **RAW)
    batch = next(iter(loader))
    rows = index(shards, "val")
    for video, row, crop in zip(batch["video"], batch["video_index"].tolist(), batch["crop"].tolist()):
        if crop != 0:
            continue
        want = pyav_frames(stored(shards, rows[row]), uniform_indices(rows[row]["num_frames"], 8))[:, :, :128]
        assert psnr(video.permute(0, 2, 3, 1).cpu().numpy(), want) >= 40


def test_protocol_ibm_delivers_its_test_clips_and_its_crops_first_last_centre(shards, device):
    # 30 frames of 176x128, short side kept (its disable_scaleup): clip c of 3 reads int(1.875 + shift + 3.75 i)
    # with shifts -1, 0, +1; the 128 px crops sit at x = 0, 48, 24 (steps of (176 - 128) // 4 = 12)
    loader = load(shards, "val", device=device, mode="eval", protocol="ibm", num_clips=3, num_crops=3,
                  crop_size=128, num_frames=8, batch_size=9, **RAW)
    batch = next(iter(loader))
    row = index(shards, "val")[0]
    frames = {0: [0, 4, 8, 12, 15, 19, 23, 27], 1: [1, 5, 9, 13, 16, 20, 24, 28], 2: [2, 6, 10, 14, 17, 21, 25, 29]}
    x0 = {0: 0, 1: 48, 2: 24}
    assert row["num_frames"] == 30 and batch["video_index"].tolist() == [0] * 9
    for video, clip, crop in zip(batch["video"], batch["clip"].tolist(), batch["crop"].tolist()):
        want = pyav_frames(stored(shards, row), frames[clip])[:, :, x0[crop]:x0[crop] + 128]
        assert psnr(video.permute(0, 2, 3, 1).cpu().numpy(), want) >= 40


def test_protocol_ivvit_reads_a_video_shorter_than_its_clip_whole_and_crops_the_centre(shards, device):
    # 2 s at 15 fps is shorter than its 80/30 s clip: all 30 frames, 8 of them at int(linspace(0, 29, 8));
    # short side kept at 128: the middle 128 px of 176
    loader = load(shards, "val", device=device, mode="eval", protocol="ivvit", crop_size=128, test_short_side=128,
                  num_frames=8, **RAW)
    batch = next(iter(loader))
    rows = index(shards, "val")
    for video, row in zip(batch["video"], batch["video_index"].tolist()):
        assert rows[row]["num_frames"] == 30
        want = pyav_frames(stored(shards, rows[row]), [0, 4, 8, 12, 16, 20, 24, 29])[:, :, 24:152]
        assert psnr(video.permute(0, 2, 3, 1).cpu().numpy(), want) >= 40


# ---------------------------------------------------------------- determinism and distribution

def test_a_seed_fixes_the_epoch(shards, device):
    first, again = batches(load(shards, device=device, seed=3)), batches(load(shards, device=device, seed=3))
    for a, b in zip(first, again):
        assert a["key"] == b["key"]
        torch.testing.assert_close(a["video"], b["video"], rtol=0, atol=0)
    other = batches(load(shards, device=device, seed=4))
    assert [a["key"] for a in first] != [b["key"] for b in other]


def test_set_epoch_reshuffles_and_redraws_augmentation(shards, device):
    loader = load(shards, device=device)
    loader.set_epoch(0)
    epoch0 = batches(loader)
    loader.set_epoch(1)
    epoch1 = batches(loader)
    assert [b["key"] for b in epoch0] != [b["key"] for b in epoch1]
    assert sorted(k for b in epoch0 for k in b["key"]) == sorted(k for b in epoch1 for k in b["key"])


SIFA_K400 = {"color_jitter": (0.4, 0.4, 0.4, 0.1), "color_jitter_prob": 0.8, "grayscale_prob": 0.2,
             "gaussian_blur_prob": 0.5}


def test_a_seed_fixes_the_augmented_batch_and_augmenting_leaves_frames_window_and_flip(shards, device):
    augmented, again = (load(shards, device=device, seed=3, num_pipelines=1, **SIFA_K400) for _ in range(2))
    first, second = next(iter(augmented)), next(iter(again))
    assert first["key"] == second["key"]
    torch.testing.assert_close(first["video"], second["video"], rtol=0, atol=0)
    # The augmentations are drawn apart from the view's frames, window and flip: those stay what they were.
    plain = load(shards, seed=3)
    rows = np.arange(len(plain.index))
    before, after = plain.plan(0).views_of(rows), augmented.plan(0).views_of(rows)
    np.testing.assert_array_equal(before.frames, after.frames)
    np.testing.assert_array_equal(before.roi, after.roi)
    np.testing.assert_array_equal(before.mirror, after.mirror)
    assert before.augment is None
    draws = [draw for draw in after.augment if draw != ClipParams()]
    assert len(rows) / 2 < len(draws) == len(set(draws))                                   # a draw of its own per clip
    assert load(shards, "val", mode="eval", **SIFA_K400).pipeline_config.augment == Augment()   # evaluation: none


def test_start_batch_resumes_the_epoch_exactly(shards, device):
    loader = load(shards, device=device)
    loader.set_epoch(2)
    full = batches(loader)
    loader.set_epoch(2, start_batch=4)
    resumed = batches(loader)
    assert len(resumed) == len(full) - 4
    for a, b in zip(full[4:], resumed):
        assert a["key"] == b["key"]
        torch.testing.assert_close(a["video"], b["video"], rtol=0, atol=0)


def test_training_ranks_get_equal_batches_of_disjoint_videos(shards, device):
    ranks = [load(shards, device=device, batch_size=2, rank=r, world_size=3, seed=1) for r in range(3)]
    seen = [set(torch.cat([b["video_index"] for b in batches(loader)]).tolist()) for loader in ranks]
    assert [len(loader) for loader in ranks] == [4, 4, 4]
    assert [len(s) for s in seen] == [8, 8, 8] and len(set.union(*seen)) == 24


def test_eval_ranks_see_every_video_exactly_once_with_padding_flagged(shards, device):
    # 8 videos over 3 ranks: 3, 3 and 2 videos; batches of 2 -> 2 batches each, the last rank's second
    # batch is all padding.
    ranks = [load(shards, "val", device=device, mode="eval", batch_size=2, rank=r, world_size=3) for r in range(3)]
    valid, flagged = [], 0
    for loader in ranks:
        got = batches(loader)
        assert len(got) == len(loader) == 2
        valid += [v for b in got for v, ok in zip(b["video_index"].tolist(), b["valid"].tolist()) if ok]
        flagged += sum((~b["valid"]).sum().item() for b in got)
    assert sorted(valid) == list(range(8)) and flagged == 4


# ---------------------------------------------------------------- storage

def test_streams_from_an_s3_bucket_like_from_disk(shards, device):
    from moto.server import ThreadedMotoServer
    import s3fs

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"key": "test", "secret": "test",
                   "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}}
        bucket = s3fs.S3FileSystem(**options)
        bucket.call_s3("create_bucket", Bucket="videos")
        bucket.put(f"{shards}/shards/train", "videos/k4/train", recursive=True)
        remote = batches(VideoLoader("s3://videos/k4", split="train", batch_size=4, storage_options=options,
                                     device=device, **SMALL))
    finally:
        server.stop()
    local = batches(load(shards, device=device))
    assert [b["key"] for b in remote] == [b["key"] for b in local]
    for a, b in zip(remote, local):
        torch.testing.assert_close(a["video"], b["video"], rtol=0, atol=0)


class FlakyFileSystem(LocalFileSystem):
    """Local disk whose first opens fail like a dropped object-store connection."""

    def __init__(self, failures: int):
        super().__init__()
        self.failures = failures

    def _open(self, path, *args, **kwargs):
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionResetError("connection reset by peer")
        return super()._open(path, *args, **kwargs)


def test_transient_storage_errors_are_retried(shards, device):
    loader = load(shards, device=device, readers=1)
    loader.index.fs = FlakyFileSystem(failures=3)
    loader.reader.backoff_s = 0.01
    assert len(batches(loader)) == len(loader) and loader.failures == []


# ---------------------------------------------------------------- broken samples

def damage(shards, tmp_path, *keys: str, split: str = "train") -> str:
    """A copy of the shards with the bytes of each `keys` video of `split` overwritten by noise."""
    copy = tmp_path / "damaged"
    shutil.copytree(f"{shards}/shards", copy)
    for row in index(shards, split):
        if row["key"] in keys:
            with open(copy / row["shard"], "r+b") as tar:
                tar.seek(row["offset"])
                tar.write(np.random.default_rng(0).integers(0, 256, row["size"], dtype=np.uint8).tobytes())
    return str(copy)


def read_errors(shards: str, split: str) -> dict[str, SampleError]:
    """What the shard reader says about each sample of `split` it cannot deliver, by key."""
    split_index = ShardIndex(shards, split)
    return {str(split_index.keys[row]): got for row, got in ShardReader(split_index, readers=2)(range(len(split_index)))
            if isinstance(got, SampleError)}


@pytest.mark.parametrize("verify, stage", [(True, "verify"), (False, "decode")])
def test_a_damaged_sample_is_recorded_and_replaced_without_ending_the_epoch(shards, tmp_path, verify, stage, device):
    """verify=True: the sha256 check in the reader catches it; verify=False: DALI fails to decode the batch,
    which is then run sample by sample to find the culprit."""
    key = index(shards, "train")[5]["key"]
    loader = VideoLoader(damage(shards, tmp_path, key), split="train", batch_size=4, verify=verify, device=device,
                         **SMALL)
    got = batches(loader)
    assert len(got) == len(loader)
    assert [(f["key"], f["stage"]) for f in loader.failures] == [(key, stage)]
    keys = [k for b in got for k, ok in zip(b["key"], b["valid"].tolist()) if ok]
    assert key not in keys and len(keys) == 23                  # one stand-in, flagged invalid
    assert sum((~b["valid"]).sum().item() for b in got) == 1


def test_an_index_naming_a_shard_outside_the_shard_root_is_refused(shards, tmp_path):
    """A crafted index.parquet must not make the loader open any file the process can read."""
    copy = tmp_path / "crafted"
    shutil.copytree(f"{shards}/shards", copy)
    table = pq.read_table(copy / "train" / "index.parquet")
    column = table.column("shard").to_pylist()
    column[3] = "../../../etc/passwd"
    pq.write_table(table.set_column(table.schema.get_field_index("shard"), "shard", pa.array(column)),
                   copy / "train" / "index.parquet")
    with pytest.raises(ValueError, match=r"row 3 names shard '\.\./\.\./\.\./etc/passwd', outside the shard root"):
        VideoLoader(str(copy), split="train", batch_size=4, **SMALL)


def test_more_failures_than_allowed_end_the_epoch_with_the_reasons(shards, tmp_path, device):
    key = index(shards, "train")[0]["key"]
    loader = VideoLoader(damage(shards, tmp_path, key), split="train", batch_size=4, max_failures=0,
                         device=device, **SMALL)
    with pytest.raises(LoaderError, match=f"max_failures=0.*{key}"):
        batches(loader)


def test_max_failures_may_be_a_fraction_of_the_samples_a_rank_reads(shards, tmp_path):
    """One broken sample of 24: 5 % allows 1.2 of them, 1 % allows 0.24 and the error says which limit."""
    key = index(shards, "train")[3]["key"]
    damaged = damage(shards, tmp_path, key)
    loader = VideoLoader(damaged, split="train", batch_size=4, max_failures=0.05, **SMALL)
    assert len(batches(loader)) == len(loader) and [f["key"] for f in loader.failures] == [key]
    loader = VideoLoader(damaged, split="train", batch_size=4, max_failures=0.01, **SMALL)
    with pytest.raises(LoaderError, match=rf"1 of the 24 samples this rank reads .*max_failures=0.01, a fraction: "
                                          rf"0.24 of them.*{key}"):
        batches(loader)


@pytest.mark.parametrize("verify", [True, False])
def test_eval_records_every_video_it_cannot_deliver(shards, tmp_path, verify):
    """Three crops in batches of 3: a broken video fills a whole batch, which nothing of the batch can stand
    in for (the first one has no earlier batch either): it comes out as zeros, flagged, and recorded."""
    rows = index(shards, "val")
    broken = {rows[0]["key"], rows[5]["key"]}
    loader = VideoLoader(damage(shards, tmp_path, *broken, split="val"), split="val", mode="eval", num_crops=3,
                         batch_size=3, verify=verify, **SMALL)
    got = batches(loader)
    assert len(got) == len(loader) == 8 and all(b["video"].shape == (3, 4, 3, 64, 64) for b in got)
    assert sorted((f["key"], f["video_index"]) for f in loader.failures) == sorted((rows[i]["key"], i) for i in (0, 5))
    delivered = [(v, c) for b in got for v, c, ok in zip(b["video_index"].tolist(), b["crop"].tolist(),
                                                         b["valid"].tolist()) if ok]
    assert sorted(delivered) == [(v, c) for v in range(8) if v not in (0, 5) for c in range(3)]


def test_a_gop_cut_the_decoder_rejects_is_decoded_whole_and_cutting_stops(shards, device, monkeypatch):
    """The GOP cut (pipelines/gops.py) is an optimisation: were a decoder to refuse its streams (NVDEC has
    not been tried on them yet), the epoch must be the one a loader without the cut delivers."""
    whole = batches(load(shards, device=device, cut_gops=False))
    monkeypatch.setattr(gops, "cut_ranges", lambda table, starts, pieces, frames: (bytes(512), frames))
    loader = load(shards, device=device)
    with pytest.warns(UserWarning, match="rejected a GOP-cut stream"):
        got = batches(loader)
    assert loader.failures == [] and loader.cut_gops is False
    assert [a["key"] for a in whole] == [b["key"] for b in got]
    for a, b in zip(whole, got):
        torch.testing.assert_close(a["video"], b["video"], rtol=0, atol=0)


def test_reader_processes_deliver_what_threads_deliver_and_record_the_same_failures(shards, tmp_path):
    """Resumed at batch 1 of epoch 1, one of the videos it reads damaged: the same batches, the same failure."""
    plan = load(shards).plan(1)
    key = index(shards, "train")[int(plan.batch(3).rows[0])]["key"]
    damaged = damage(shards, tmp_path, key)
    threads = VideoLoader(damaged, split="train", batch_size=4, reader_processes=False, **SMALL)
    processes = VideoLoader(damaged, split="train", batch_size=4, reader_processes=True, **SMALL)
    got = []
    for loader in (threads, processes):
        loader.set_epoch(1, start_batch=1)
        got.append(batches(loader))
    processes.close()
    assert [f["key"] for f in threads.failures] == [f["key"] for f in processes.failures] == [key]
    assert [b["key"] for b in got[0]] == [b["key"] for b in got[1]] and len(got[0]) == len(threads) - 1
    for a, b in zip(*got):
        assert a["valid"].tolist() == b["valid"].tolist()
        torch.testing.assert_close(a["video"], b["video"], rtol=0, atol=0)


def test_reader_processes_leave_no_shared_memory_behind_when_an_epoch_is_left_early(shards, monkeypatch):
    monkeypatch.setattr(fetch, "CHUNK_ROWS", 1)       # a chunk per row: those read ahead are never taken
    loader = load(shards, reader_processes=True, readers=2)
    first = next(iter(loader.host_batches(0)))
    assert first.views.valid.all()
    loader.close()
    assert glob.glob(f"{fetch.SHARED}/vidscale-{os.getpid()}-*") == []


def test_a_reader_process_without_shared_memory_sends_the_bytes_with_the_rows(monkeypatch, tmp_path):
    rows = [fetch.Fetched(3, (b"abc", b"de"), (None, None), (False, False)), fetch.Fetched(4, failure=("fetch", "x"))]
    monkeypatch.setattr(fetch, "SHARED", str(tmp_path / "missing"))
    sent = fetch._shipped(rows, "chunk")
    assert sent.name is None and fetch._received(sent) == rows
    monkeypatch.setattr(fetch, "SHARED", str(tmp_path))
    sent = fetch._shipped(rows, "chunk")
    assert sent.name == "chunk" and all(row.encoded == () for row in sent.rows)
    got = fetch._received(sent)
    assert [bytes(one) for one in got[0].encoded] == [b"abc", b"de"] and got[1] == rows[1]
    assert list(tmp_path.iterdir()) == []                  # unlinked once mapped


# ---------------------------------------------------------------- what a bad shard's failure says

def test_a_damaged_tar_names_the_shard_and_the_fix(shards, tmp_path):
    row = index(shards, "train")[2]
    errors = read_errors(damage(shards, tmp_path, row["key"]), "train")
    assert list(errors) == [row["key"]] and errors[row["key"]].stage == "verify"
    assert errors[row["key"]].reason == (
        f"{row['key']}.webm in {tmp_path}/damaged/{row['shard']} fails its sha256 and no longer parses as the "
        f"indexed video: the tar is damaged; restore it from a good copy, or reshard it: delete "
        f"{tmp_path}/damaged/_job/done/{row['shard'][:-4]}.json and rerun the shard job on this output with its "
        f"arguments")


def test_a_tar_from_another_run_is_told_apart_from_damage(shards, tmp_path):
    """The H.264 run planned the same shards: its first tar in the VP9 run's place holds other members."""
    copy = tmp_path / "mixed"
    shutil.copytree(f"{shards}/shards", copy)
    shutil.copy(f"{shards}/h264_shards/val/shard-000000.tar", copy / "val" / "shard-000000.tar")
    errors = read_errors(str(copy), "val")
    in_shard = [r for r in index(shards, "val") if r["shard"] == "val/shard-000000.tar"]
    assert sorted(errors) == sorted(r["key"] for r in in_shard)
    first = errors[in_shard[0]["key"]].reason
    assert first.startswith(f"{copy}/val/shard-000000.tar holds {in_shard[0]['key']}.mp4 (")
    assert f"where the index expects {in_shard[0]['key']}.webm ({in_shard[0]['size']} bytes)" in first
    for error in errors.values():      # rows past the shorter tar's end too: not a truncated tar
        assert (": the tar and the index come from different runs; rerun the shard job on this output with its "
                "arguments" in error.reason)


def test_a_member_rewritten_by_another_run_is_told_apart_from_damage(shards, tmp_path):
    """Another run of the job can write the same clip to other bytes of the same length (another muxer
    version, say): the header matches and the video is complete, so it is not damage."""
    row = index(shards, "val")[1]
    copy = tmp_path / "rewritten"
    shutil.copytree(f"{shards}/shards", copy)
    with open(copy / row["shard"], "r+b") as tar:
        tar.seek(row["offset"])
        video = tar.read(row["size"])
        assert b"Lavf" in video                              # the muxing app, a header string
        tar.seek(row["offset"])
        tar.write(video.replace(b"Lavf", b"Lavx", 1))
    errors = read_errors(str(copy), "val")
    assert list(errors) == [row["key"]]
    assert errors[row["key"]].reason.startswith(f"{copy}/{row['shard']} holds a complete {row['key']}.webm with "
                                                f"other bytes than the index's: the tar and the index come from "
                                                f"different runs")


@pytest.mark.parametrize("cut", ["truncated", "missing"])
def test_a_truncated_or_missing_tar_names_the_shard_and_the_fix(shards, tmp_path, cut):
    copy = tmp_path / cut
    shutil.copytree(f"{shards}/shards", copy)
    tar = copy / "val" / "shard-000000.tar"
    if cut == "missing":
        tar.unlink()
    else:
        tar.write_bytes(tar.read_bytes()[:tar.stat().st_size // 2])
    errors = read_errors(str(copy), "val")
    assert errors and all(e.stage == "fetch" for e in errors.values())
    fix = f"reshard it: delete {copy}/_job/done/val/shard-000000.json and rerun the shard job on this output"
    for error in errors.values():
        assert error.reason.startswith(f"{tar} ") and fix in error.reason
        assert ("the tar is truncated" if cut == "truncated" else "is missing; restore it") in error.reason


# ---------------------------------------------------------------- refused or warned when built

def test_h264_shards_on_the_cpu_are_refused_when_built_naming_the_fix(shards):
    with pytest.raises(ValueError, match=r"split 'val' holds 8 of 8 videos in h264, which DALI's CPU decoder cannot "
                                         r"read .*: reshard them with --codec vp9, or load them with device='gpu'"):
        VideoLoader(f"{shards}/h264_shards", split="val", batch_size=4, device="cpu", **SMALL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the mixed (NVDEC) decoder needs a CUDA GPU")
def test_h264_shards_load_on_the_gpu(shards):
    loader = VideoLoader(f"{shards}/h264_shards", split="val", mode="eval", batch_size=4, device="gpu", **SMALL)
    got = batches(loader)
    assert len(got) == 2 and loader.failures == [] and all(b["valid"].all() for b in got)


def test_a_rank_outside_the_world_fails_when_the_loader_is_built(shards):
    with pytest.raises(ValueError, match=r"rank=2 is not a rank of world_size=2: ranks count from 0 to 1"):
        load(shards, rank=2, world_size=2)


@pytest.mark.parametrize("options, message", [
    ({"device": "cuda"}, "device must be 'cpu' or 'gpu'"),
    ({"batch_size": 0}, "batch_size and world_size must be at least 1"),
    ({"max_failures": 1.5}, r"max_failures must be a count \(an int >= 0\) or a fraction"),
    ({"max_failures": -1}, "max_failures must be a count"),
])
def test_arguments_that_cannot_work_fail_when_the_loader_is_built(shards, options, message):
    with pytest.raises(ValueError, match=message):
        load(shards, **options)


def test_the_output_root_without_a_split_is_refused_naming_the_splits(shards):
    root = f"{shards}/shards"
    with pytest.raises(FileNotFoundError, match=re.escape(f"no index.parquet in {root!r}: it is a shard job's output "
                                                          f"with the splits train, val; pass split='train' (or the "
                                                          f"split folder {root}/train)")):
        VideoLoader(f"{shards}/shards", batch_size=4)


@pytest.mark.parametrize("sampling, num_frames, short", [("uniform", 30, 0), ("uniform", 31, 8), ("dense", 16, 8)])
def test_num_frames_beyond_a_videos_length_warns_once_with_the_count(shards, sampling, num_frames, short):
    """The val clips have 30 frames; dense clips of 16 frames at stride 2 span 31."""
    assert {r["num_frames"] for r in index(shards, "val")} == {30}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = load(shards, "val", mode="eval", sampling=sampling, num_frames=num_frames)
        next(iter(loader))
    said = [str(w.message) for w in caught if "repeat or wrap frames" in str(w.message)]
    assert loader.short_videos == short
    assert said == ([f"{short} of 8 videos in {shards}/shards split 'val' have fewer than the 31 frames a {sampling} "
                     f"clip of {num_frames} spans, so their clips repeat or wrap frames (loader.short_videos)"]
                    if short else [])


# ---------------------------------------------------------------- benchmarks

def test_the_host_ceiling_benchmark_runs_and_writes_its_table(shards, tmp_path):
    doc = tmp_path / "host_ceiling.md"
    host_ceiling.main(["--shards", f"{shards}/shards", "--epochs", "1", "--rounds", "1", "--cores", "1",
                       "--loaders", "threads", "--workloads", "TSN-8", "--no-stages", "--doc", str(doc)])
    text = doc.read_text()
    assert text.startswith(host_ceiling.TITLE) and "| TSN-8 | whole | ours | 8 threads | 1 |" in text


# ---------------------------------------------------------------- images and preview

def test_image_shards_load_as_one_frame_clips(shards, device):
    loader = VideoLoader(f"{shards}/image_shards", split="train", batch_size=3, num_frames=1, crop_size=48,
                         train_crop="random_resized_crop", device=device)
    got = batches(loader)
    assert len(got) == 2 and all(b["video"].shape == (3, 1, 3, 48, 48) for b in got)
    assert sorted(torch.cat([b["video_index"] for b in got]).tolist()) == list(range(6))


def test_preview_draws_clips_and_super_images_of_a_split_folder(shards, tmp_path):
    out = tmp_path / "preview.png"
    assert preview.main([f"{shards}/shards/val", "--out", str(out), "--num-frames", "8", "--crop-size", "64",
                         "--samples", "3"]) == 0
    image = torchvision.io.read_image(str(out))
    assert image.shape[0] in (3, 4) and image.shape[1] > 200 and image.shape[2] > 400
    assert image[:3].float().std() > 20                        # frames were drawn, not an empty canvas


def test_preview_of_an_output_root_without_a_split_says_which_splits_in_one_line(shards, tmp_path, capsys):
    assert preview.main([f"{shards}/shards", "--out", str(tmp_path / "preview.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "with the splits train, val; pass split='train'" in err
