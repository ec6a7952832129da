"""The DALI graph on VP9 videos read out of shards that the shard job wrote: on the CPU backend, and on the
GPU (`mixed`) backend where a CUDA GPU is visible (the `device` fixture of conftest.py)."""
from __future__ import annotations

import contextlib
import io
import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
import torch.nn.functional as F
import torchvision
from einops import rearrange
from nvidia.dali import fn, pipeline_def, types

from pipelines.augment import Augment
from pipelines.gops import cut, webm_packets
from pipelines.video_pipeline import PipelineConfig, build, decode, feed, video_pipeline
from shards.job import JobConfig, run_job, transcode_options
from shards.sample_dataset import make_sample_dataset


@contextlib.contextmanager
def loopback_ray():
    """A private Ray instance on 127.0.0.1 for the shard job (never a cluster this machine may know of)."""
    if ray.is_initialized():
        yield
        return
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2,
             logging_level="ERROR")
    try:
        yield
    finally:
        ray.shutdown()


def run_shard_job(source: dict, output, **options) -> None:
    """The real shard job (`run_job`, what pipelines/shard_kinetics.py runs); call inside `loopback_ray()`."""
    run_job(JobConfig(annotations=source["annotations"], videos=source["videos"], output=str(output), workers=2,
                      **options), log=lambda line: None)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[dict]:
    """Three 2 s motion clips (176x128, 15 fps: NVDEC decodes VP9 from 128x128), sharded to VP9 by the real job; rows carry their bytes."""
    root = tmp_path_factory.mktemp("video_pipeline")
    source = make_sample_dataset(root / "source", num_classes=3, train_per_class=1, val_per_class=0,
                                 size=(176, 128), fps=15, seconds=2, broken=False)
    with loopback_ray():
        run_shard_job(source, root / "shards", transcode=transcode_options(short_side=128, codec="vp9", gop=8),
                      splits=("train",))
    rows = pq.read_table(root / "shards" / "train" / "index.parquet").to_pylist()
    for row in rows:
        with open(root / "shards" / row["shard"], "rb") as tar:
            tar.seek(row["offset"])
            row["data"] = tar.read(row["size"])
    return rows


def pyav_frames(data: bytes, indices) -> np.ndarray:
    """Independent reference: libavcodec through PyAV, YUV 4:2:0 -> RGB by BT.601 limited range with
    bilinear chroma upsampling (the convention DALI's decoders follow; swscale's default would upsample
    chroma by repetition and differ by ~2 dB on sharp colour edges)."""
    with av.open(io.BytesIO(data)) as container:
        planes = [frame.to_ndarray(format="yuv420p") for frame in container.decode(video=0)]
    out = []
    for i in indices:
        yuv = torch.from_numpy(planes[i]).double()
        h = yuv.shape[0] * 2 // 3
        w = yuv.shape[1]
        y = yuv[:h]
        u, v = (F.interpolate(p.reshape(1, 1, h // 2, w // 2), scale_factor=2, mode="bilinear")[0, 0]
                for p in yuv[h:].reshape(2, -1))
        y, u, v = (y - 16) * 255 / 219, (u - 128) * 255 / 224, (v - 128) * 255 / 224
        r, b = y + 1.402 * v, y + 1.772 * u
        g = (y - 0.299 * r - 0.114 * b) / 0.587
        out.append(torch.stack([r, g, b], -1).round().clamp(0, 255).numpy())
    return np.stack(out)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255 ** 2 / max(mse, 1e-10)))


def decoded(rows: list[dict], frames: list[list[int]], device: str = "cpu") -> list[np.ndarray]:
    """The pipeline's decode stage alone (no augmentation)."""
    @pipeline_def(batch_size=len(rows), num_threads=2, device_id=0 if device == "gpu" else None)
    def decode_only():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        indices = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        return decode(encoded, indices, device, "video")

    pipe = decode_only()
    pipe.build()
    pipe.feed_input("encoded", [np.frombuffer(r["data"], np.uint8) for r in rows])
    pipe.feed_input("frames", [np.array(f, np.int32) for f in frames])
    (out,) = pipe.run()
    out = out.as_cpu()
    return [np.array(out[i]) for i in range(len(rows))]


def run(config: PipelineConfig, rows: list[dict], frames, roi, mirror, device: str = "cpu") -> np.ndarray:
    pipe = build(config, device, batch_size=len(rows), num_threads=2)
    feed(pipe, config, [np.frombuffer(r["data"], np.uint8) for r in rows], frames, roi, mirror)
    (out,) = pipe.run()
    return np.array(out.as_cpu().as_tensor())


def test_decoded_frames_equal_an_independent_pyav_decode(videos, device):
    frames = [[0, 5, 17, 29, 3], [29, 0, 7, 7, 16], [8, 9, 10, 11, 12]]   # any order, repeats, GOP edges
    for row, indices, clip in zip(videos, frames, decoded(videos, frames, device)):
        assert clip.shape == (5, row["height"], row["width"], 3)
        reference = pyav_frames(row["data"], indices)
        for got, want, i in zip(clip, reference, indices):
            assert psnr(got, want) >= 40, f"{row['key']} frame {i}: {psnr(got, want):.1f} dB"


def test_identity_window_gives_the_decoded_frames_normalised_and_flipped(videos, device):
    side = min(videos[0]["height"], videos[0]["width"])
    config = PipelineConfig(num_frames=4, crop_size=side, layout="BTCHW", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    frames = [[0, 10, 20, 29]] * 2
    out = run(config, videos[:2], frames, [(0, 0, side, side)] * 2, [False, True], device)
    raw = decoded(videos[:2], frames, device)
    mean, std = np.array(config.mean) * 255, np.array(config.std) * 255
    for k, mirror in enumerate([False, True]):
        want = (raw[k][:, :, :side].astype(np.float32) - mean) / std
        want = want[:, :, ::-1] if mirror else want
        np.testing.assert_allclose(out[k], want.transpose(0, 3, 1, 2), atol=1e-4)


def test_window_is_cut_out_and_resized_to_the_crop(videos, device):
    row, frames = videos[0], [[3, 4]]
    config = PipelineConfig(num_frames=2, crop_size=48, layout="BTCHW", mean=(0, 0, 0), std=(1 / 255,) * 3)
    out = run(config, [row], frames, [(10, 30, 106, 126)], [False], device)[0]          # a 96-pixel square, halved
    region = torch.from_numpy(decoded([row], frames, device)[0][:, 10:106, 30:126]).permute(0, 3, 1, 2).float()
    want = F.interpolate(region, size=(48, 48), mode="bilinear", antialias=True).numpy()
    assert psnr(out, want) >= 35


@pytest.mark.parametrize("grid", [None, "2x4", "1x8", "3x3"])
def test_super_layout_equals_einops_rearrange_of_the_frames(videos, grid, device):
    frames, roi = [[0, 4, 8, 12, 16, 20, 24, 28]] * 2, [(0, 0, 120, 120), (5, 30, 100, 125)]
    clips = run(PipelineConfig(num_frames=8, crop_size=32, layout="BTCHW"), videos[:2], frames, roi, [False, True],
                device)
    tiled = run(PipelineConfig(num_frames=8, crop_size=32, layout="super", grid=grid), videos[:2], frames, roi,
                [False, True], device)
    rows, cols = {None: (3, 3), "2x4": (2, 4), "1x8": (1, 8), "3x3": (3, 3)}[grid]
    padded = np.concatenate([clips, np.zeros((2, rows * cols - 8, 3, 32, 32), np.float32)], axis=1)
    np.testing.assert_array_equal(tiled, rearrange(padded, "b (r c) ch h w -> b ch (r h) (c w)", r=rows, c=cols))


def test_channels_first_layout_is_the_clip_transposed(videos, device):
    args = (videos[:2], [[1, 2, 3, 4]] * 2, [(0, 0, 100, 100)] * 2, [False, False])
    btchw = run(PipelineConfig(num_frames=4, crop_size=40, layout="BTCHW"), *args, device)
    bcthw = run(PipelineConfig(num_frames=4, crop_size=40, layout="BCTHW"), *args, device)
    np.testing.assert_array_equal(bcthw, btchw.transpose(0, 2, 1, 3, 4))


def test_images_decode_as_one_frame_clips(device):
    rng = np.random.default_rng(0)
    image = (np.linspace(0, 255, 96 * 128 * 3).reshape(96, 128, 3) + rng.normal(0, 5, (96, 128, 3))).clip(0, 255)
    jpeg = torchvision.io.encode_jpeg(torch.from_numpy(image.astype(np.uint8)).permute(2, 0, 1), quality=95)
    data = jpeg.numpy().tobytes()
    config = PipelineConfig(num_frames=1, crop_size=96, layout="BTCHW", media="image", mean=(0, 0, 0),
                            std=(1 / 255,) * 3)
    pipe = build(config, device, batch_size=1, num_threads=1)
    feed(pipe, config, [np.frombuffer(data, np.uint8)], None, [(0, 16, 96, 112)], [False])
    (out,) = pipe.run()
    got = np.array(out.as_cpu().as_tensor())[0]
    want = torchvision.io.decode_jpeg(jpeg)[:, :, 16:112].numpy()[None].astype(np.float32)
    assert got.shape == (1, 3, 96, 96) and psnr(got, want) >= 40


def test_cutting_to_gops_changes_no_decoded_pixel(videos, device):
    """On the GPU this is also the check that NVDEC takes the repacked (IVF) streams."""
    frames = [[29, 0, 7, 7, 16, 8], [3, 11, 19, 27, 28, 29], [14, 15, 16, 17, 18, 19]]   # repeats, any order
    cuts = [cut(webm_packets(row["data"]), np.array(f)) for row, f in zip(videos, frames)]
    whole = decoded(videos, frames, device)
    trimmed = decoded([{"data": data} for data, _ in cuts], [positions.tolist() for _, positions in cuts], device)
    for a, b in zip(whole, trimmed):
        np.testing.assert_array_equal(a, b)


def test_a_cut_keeps_only_the_gops_of_the_requested_frames(videos):
    packets = webm_packets(videos[0]["data"])
    assert len(packets.spans) == videos[0]["num_frames"] and packets.keyframe[::8].all()   # the job's GOP of 8
    data, positions = cut(packets, np.array([9, 26]))          # GOP 8..15 up to 9, GOP 24..31 up to 26
    assert positions.tolist() == [1, 4] and data[:4] == b"DKIF"
    assert int.from_bytes(data[24:28], "little") == 2 + 3      # frames 8, 9 and 24, 25, 26
    assert webm_packets(b"RIFF not a webm") is None


def test_a_grid_too_small_for_the_clip_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="at least 8 tiles"):
        PipelineConfig(num_frames=8, layout="super", grid="2x3")
    with pytest.raises(ValueError, match="num_frames=1"):
        PipelineConfig(num_frames=8, media="image")


def graph(config: PipelineConfig, device: str) -> list:
    """The operator instances of the graph as DALI's Python front end places them, in topological order.

    That front end checks every argument against the operator's schema and every input against the
    devices the operator accepts; only instantiating the graph needs CUDA. So on a machine without a GPU
    this still checks the device="gpu" graph (DALI 2.4: `_build_graph` is the first half of `build`)."""
    pipe = video_pipeline(config, device, batch_size=2, num_threads=1, device_id=0 if device == "gpu" else None)
    pipe._build_graph()
    return pipe._ops


def placement(ops: list) -> list[tuple[str, str]]:
    """(operator, backend) of each node of a graph."""
    return [(op._op._operator_name().removeprefix("nvidia.dali.fn."), op._op.device) for op in ops]


def downstream_of_the_decoder(ops: list) -> list:
    """The operators that touch pixels: the decoder and everything fed, directly or not, by its output."""
    pixel = set()
    for op in ops:
        if "decoders." in op._op._operator_name() or any(i.source is not None and id(i.source) in pixel
                                                          for i in op.inputs):
            pixel.add(id(op))
    return [op for op in ops if id(op) in pixel]


AUGMENTED = {"sifa_k400": Augment.of((0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5),
             "sifa_ssv2": Augment.of(rand_augment=(2, 27))}


@pytest.mark.parametrize("media, layout, augment", [("video", "BTCHW", None), ("video", "BCTHW", None),
                                                    ("video", "super", None), ("image", "BTCHW", None),
                                                    ("video", "super", "sifa_k400"), ("video", "BTCHW", "sifa_ssv2")])
def test_the_gpu_graph_decodes_on_the_gpu_and_keeps_every_pixel_there(media, layout, augment):
    config = PipelineConfig(num_frames=8 if media == "video" else 1, layout=layout, media=media,
                            augment=AUGMENTED[augment] if augment else Augment())
    ops = graph(config, "gpu")
    gpu, cpu = placement(ops), placement(graph(config, "cpu"))
    assert [name for name, _ in gpu] == [name for name, _ in cpu]          # one definition, two devices
    assert ("decoders." + media, "mixed") in gpu                             # NVDEC, nvJPEG
    assert gpu[-1][1] == "gpu" and all(backend == "cpu" for _, backend in cpu)
    pixels = downstream_of_the_decoder(ops)
    assert len(pixels) >= 3 and all(op._op.device == "gpu" for op in pixels[1:])   # after the decoder: all on the GPU
    for op in ops:      # a GPU operator's data inputs sit where its schema wants them (arguments stay on the host)
        if op._op.device == "gpu":
            for i, node in enumerate(op.inputs[:op._spec.NumRegularInput()]):
                assert node.device == op._op._schema.GetInputDevice(i, None, "gpu"), op._op._operator_name()
    on_host = {name for name, backend in gpu if backend == "cpu"}
    if augment is None:      # only the fed inputs and their slices: per-sample numbers, never pixels
        assert on_host == {"external_source", "_tensor_subscript"}
