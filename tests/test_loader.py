"""VideoLoader on shards written by the real shard job: coverage, determinism, S3, broken samples; on the
CPU backend and, where a CUDA GPU is visible, on the GPU one (the `device` fixture of conftest.py)."""
from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from fsspec.implementations.local import LocalFileSystem
from test_video_pipeline import loopback_ray, psnr, pyav_frames, run_shard_job

from pipelines import loader as loader_module
from pipelines import preview
from pipelines.loader import LoaderError, VideoLoader
from pipelines.sampling import uniform_indices
from shards.job import transcode_options
from shards.sample_dataset import make_sample_dataset

RAW = {"mean": (0, 0, 0), "std": (1 / 255,) * 3}      # output = pixel values, for comparing with decodes
SMALL = {"crop_size": 64, "short_side": (72, 96), "num_frames": 4, "readers": 2}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """24 train + 8 val motion clips (160x120, 2 s at 15 fps) sharded to VP9 in several shards per split,
    and 6 JPEG images sharded by the images adapter, all by the real shard job."""
    root = tmp_path_factory.mktemp("loader")
    source = make_sample_dataset(root / "source", num_classes=4, train_per_class=6, val_per_class=2,
                                 size=(160, 120), fps=15, seconds=2, broken=False)
    images = root / "images"
    for i in range(6):
        folder = images / "train" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.from_numpy(np.random.default_rng(i).integers(0, 256, (3, 90, 120), dtype=np.uint8))
        torchvision.io.write_jpeg(pixels, str(folder / f"img{i}.jpg"), quality=90)
    with loopback_ray():
        run_shard_job(source, root / "shards", transcode=transcode_options(short_side=120, codec="vp9", gop=8),
                      shard_size=150_000)
        run_shard_job({"annotations": str(images), "videos": str(images)}, root / "image_shards", dataset="images")
    return str(root)


def load(shards, split="train", device="cpu", **options) -> VideoLoader:
    return VideoLoader(f"{shards}/shards", split=split, device=device, **{"batch_size": 4, **SMALL, **options})


def batches(loader) -> list[dict]:
    return list(loader)


def index(shards, split) -> list[dict]:
    return pq.read_table(f"{shards}/shards/{split}/index.parquet").to_pylist()


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
    # Three crops of a 160x120 clip with the short side kept: crop 0 is the untouched left 120x120 square.
    loader = load(shards, "val", device=device, mode="eval", num_crops=3, crop_size=120, num_frames=8, **RAW)
    batch = next(iter(loader))
    rows = index(shards, "val")
    for video, row, crop in zip(batch["video"], batch["video_index"].tolist(), batch["crop"].tolist()):
        if crop != 0:
            continue
        with open(f"{shards}/shards/{rows[row]['shard']}", "rb") as tar:
            tar.seek(rows[row]["offset"])
            data = tar.read(rows[row]["size"])
        want = pyav_frames(data, uniform_indices(rows[row]["num_frames"], 8))[:, :, :120]
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
    """Local disk whose first range reads fail like a dropped object-store connection."""

    def __init__(self, failures: int):
        super().__init__()
        self.failures = failures

    def cat_file(self, path, start=None, end=None, **kwargs):
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionResetError("connection reset by peer")
        return super().cat_file(path, start=start, end=end, **kwargs)


def test_transient_storage_errors_are_retried(shards, device):
    loader = load(shards, device=device, readers=1)
    loader.index.fs = FlakyFileSystem(failures=3)
    loader.reader.backoff_s = 0.01
    assert len(batches(loader)) == len(loader) and loader.failures == []


# ---------------------------------------------------------------- broken samples

def damage(shards, tmp_path, key: str) -> str:
    """A copy of the train shards with the bytes of `key`'s video overwritten by noise."""
    copy = tmp_path / "damaged"
    shutil.copytree(f"{shards}/shards", copy)
    row = next(r for r in index(shards, "train") if r["key"] == key)
    with open(copy / row["shard"], "r+b") as tar:
        tar.seek(row["offset"])
        tar.write(np.random.default_rng(0).integers(0, 256, row["size"], dtype=np.uint8).tobytes())
    return str(copy)


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


def test_a_gop_cut_the_decoder_rejects_is_decoded_whole_and_cutting_stops(shards, device, monkeypatch):
    """The GOP cut (pipelines/gops.py) is an optimisation: were a decoder to refuse its streams (NVDEC has
    not been tried on them yet), the epoch must be the one a loader without the cut delivers."""
    whole = batches(load(shards, device=device, cut_gops=False))
    monkeypatch.setattr(loader_module, "cut", lambda packets, frames: (bytes(512), frames))
    loader = load(shards, device=device)
    with pytest.warns(UserWarning, match="rejected a GOP-cut stream"):
        got = batches(loader)
    assert loader.failures == [] and loader.cut_gops is False
    assert [a["key"] for a in whole] == [b["key"] for b in got]
    for a, b in zip(whole, got):
        torch.testing.assert_close(a["video"], b["video"], rtol=0, atol=0)


# ---------------------------------------------------------------- images and preview

def test_image_shards_load_as_one_frame_clips(shards, device):
    loader = VideoLoader(f"{shards}/image_shards", split="train", batch_size=3, num_frames=1, crop_size=48,
                         train_crop="random_resized_crop", device=device)
    got = batches(loader)
    assert len(got) == 2 and all(b["video"].shape == (3, 1, 3, 48, 48) for b in got)
    assert sorted(torch.cat([b["video_index"] for b in got]).tolist()) == list(range(6))


def test_preview_draws_clips_and_super_images(shards, tmp_path):
    out = tmp_path / "preview.png"
    preview.main([f"{shards}/shards", "--split", "val", "--out", str(out), "--num-frames", "8", "--crop-size", "64",
                  "--samples", "3"])
    image = torchvision.io.read_image(str(out))
    assert image.shape[0] in (3, 4) and image.shape[1] > 200 and image.shape[2] > 400
    assert image[:3].float().std() > 20                        # frames were drawn, not an empty canvas
