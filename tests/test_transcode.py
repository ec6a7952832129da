"""transcode(): real videos in, normalised clips out, and every bad input a VideoError with a reason."""
import io
from fractions import Fraction

import av
import fsspec
import fsspec.implementations.memory
import numpy as np
import pytest
from PIL import Image

from bad_inputs import write_bad_inputs
from shards import adapters
from shards.records import VideoError, VideoRecord
from shards.sample_dataset import encode_video, motion_clip
from shards.transcode import TranscodeOptions, snap_rate, transcode


def _record(path, start=None, end=None, media="video"):
    return VideoRecord("k", "train", 0, "x", str(path), start, end, media)


def _decode(clip):
    with av.open(io.BytesIO(clip.data)) as c:
        assert [s.type for s in c.streams] == ["video"]  # no audio, nothing else
        stream = c.streams.video[0]
        frames = list(c.decode(stream))
        return stream.codec_context.name, frames


def _counting_video(path, num_frames, fps=15, size=(64, 48)):
    """Frame i is a flat grey of level 4*i, so a decoded frame tells which source frame it came from."""
    frames = np.repeat((np.arange(num_frames) * 4).astype(np.uint8)[:, None, None, None], 3, -1)
    return encode_video(path, np.broadcast_to(frames, (num_frames, size[1], size[0], 3)).copy(), fps)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    frames = motion_clip("moving right", np.random.default_rng(0), (320, 240), 30)
    return encode_video(tmp_path_factory.mktemp("src") / "a.mp4", frames, 15)


@pytest.mark.parametrize("codec, decoder, ext", [("vp9", "vp9", "webm"), ("h264", "h264", "mp4")])
def test_keyframes_fall_exactly_every_gop_frames_and_frames_are_counted(source, codec, decoder, ext):
    clip = transcode(_record(source), TranscodeOptions(codec=codec, gop=8))
    name, frames = _decode(clip)
    assert (name, clip.ext, clip.codec) == (decoder, ext, codec)
    assert [i for i, f in enumerate(frames) if f.key_frame] == [0, 8, 16, 24]
    assert clip.num_frames == len(frames) == 30
    assert {f.format.name for f in frames} == {"yuv420p"}
    steps = np.diff([f.time for f in frames])  # constant rate, presentation order = decode order
    np.testing.assert_allclose(steps, 1 / 15, atol=1e-3)  # webm keeps milliseconds


def test_downscales_to_the_short_side_with_even_sides_and_never_upscales(source):
    clip = transcode(_record(source), TranscodeOptions(short_side=100))
    assert (clip.width, clip.height) == (132, 100)  # 320x240 -> 133.3x100, floored to even
    assert (_decode(clip)[1][0].width, _decode(clip)[1][0].height) == (132, 100)
    same = transcode(_record(source), TranscodeOptions(short_side=480))
    assert (same.width, same.height) == (320, 240)


@pytest.mark.parametrize("fps, frames", [(30, 60), (5, 10), (None, 30)])
def test_resamples_to_a_constant_rate(source, fps, frames):
    clip = transcode(_record(source), TranscodeOptions(fps=fps))
    assert clip.fps == (fps or 15) and clip.num_frames == frames == len(_decode(clip)[1])


def test_trims_a_whole_video_to_the_annotated_range(tmp_path):
    path = _counting_video(tmp_path / "whole.mp4", 60)  # 4 s at 15 fps
    clip = transcode(_record(path, 2.0, 3.0), TranscodeOptions(codec="h264"))
    levels = [f.to_ndarray(format="gray").mean() / 4 for f in _decode(clip)[1]]
    assert clip.num_frames == 15 and clip.notes == []
    assert abs(levels[0] - 30) < 1.5 and abs(levels[-1] - 44) < 1.5


def test_a_range_running_past_the_end_is_kept_and_noted_as_short(tmp_path):
    path = _counting_video(tmp_path / "whole.mp4", 30)
    clip = transcode(_record(path, 1.0, 5.0))
    assert clip.num_frames == 15 and any(n.startswith("short") for n in clip.notes)


def test_too_few_frames_is_a_decode_failure(tmp_path):
    path = _counting_video(tmp_path / "tiny.mp4", 5)
    with pytest.raises(VideoError) as e:
        transcode(_record(path))
    assert e.value.stage == "decode" and "only 5 frames" in e.value.reason and "tiny.mp4" in e.value.reason


@pytest.mark.parametrize("degrees, corner", [(90, "bottom-left"), (-90, "top-right"), (180, "bottom-right")])
def test_rotation_metadata_turns_the_pixels_upright(tmp_path, degrees, corner):
    frame = np.zeros((48, 64, 3), np.uint8)
    frame[:12, :16] = 255  # a white block in the top-left corner of the stored frame
    path = tmp_path / "rot.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=15)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.set_display_rotation(degrees)
        for _ in range(10):
            c.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        c.mux(s.encode())
    clip = transcode(_record(path))
    image = _decode(clip)[1][0].to_ndarray(format="gray").astype(float)
    h, w = image.shape
    quadrants = {"top-left": image[: h // 2, : w // 2], "top-right": image[: h // 2, w // 2:],
                 "bottom-left": image[h // 2:, : w // 2], "bottom-right": image[h // 2:, w // 2:]}
    assert max(quadrants, key=lambda q: quadrants[q].mean()) == corner
    assert (clip.width, clip.height) == ((48, 64) if degrees % 180 else (64, 48))
    assert f"rotated {degrees % 360}" in clip.notes


def test_a_resolution_beyond_max_side_is_a_probe_failure(source):
    with pytest.raises(VideoError) as e:
        transcode(_record(source), TranscodeOptions(max_side=200))
    assert e.value.stage == "probe" and "320x240" in e.value.reason and "max_side=200" in e.value.reason


def test_reads_sources_through_fsspec(source):
    fsspec.filesystem("memory").pipe("/videos/a.mp4", source.read_bytes())
    clip = transcode(_record("memory://videos/a.mp4"))
    assert clip.num_frames == 30


class _DroppingConnections(fsspec.implementations.memory.MemoryFileSystem):
    protocol = "dropping"

    def cat_file(self, path, start=None, end=None, **kwargs):
        raise ConnectionResetError("connection reset by peer")


def test_storage_trouble_while_fetching_escapes_for_the_job_to_retry():
    fsspec.register_implementation("dropping", _DroppingConnections, clobber=True)
    with pytest.raises(ConnectionResetError):
        transcode(_record("dropping://bucket/a.mp4"))


def test_library_errors_come_out_as_video_errors(tmp_path):
    for bad in ["nosuchprotocol://x/a.mp4", str(tmp_path)]:
        with pytest.raises(VideoError) as e:
            transcode(_record(bad))
        assert e.value.stage in ("fetch", "probe") and e.value.reason


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    expected = write_bad_inputs(folder)
    result = adapters.load("kinetics", str(folder / "annotations"), str(folder / "videos"))
    return expected, {(r.split, r.key): r for r in result.records}


BAD_FILES = ["zero_bytes", "truncated", "corrupt_middle", "not_a_video", "audio_only", "vfr", "rotated",
             "odd_resolution", "absurd_resolution", "short", "past_end"]


@pytest.mark.parametrize("case", BAD_FILES)
def test_each_bad_file_has_its_expected_outcome(bad, case):
    expected, records = bad
    want = expected[case]
    record = records[(want["split"], want["key"])]
    if want["stage"]:
        with pytest.raises(VideoError) as e:
            transcode(record)
        assert e.value.stage == want["stage"], e.value.reason
        assert want["source"].split(".")[0] in e.value.reason  # the reason names the file
    else:
        clip = transcode(record)
        assert any(want["note"] in n for n in clip.notes), clip.notes
        assert clip.num_frames == len(_decode(clip)[1]) and clip.width % 2 == 0 and clip.height % 2 == 0


def test_images_are_reencoded_as_jpeg_upright_and_scaled(tmp_path):
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers turn it 90 degrees clockwise
    Image.fromarray(np.full((480, 640, 3), 90, np.uint8)).save(path, exif=exif)
    clip = transcode(_record(path, media="image"))
    decoded = Image.open(io.BytesIO(clip.data))
    assert (clip.ext, clip.num_frames, decoded.format) == ("jpg", 1, "JPEG")
    assert decoded.size == (clip.width, clip.height) == (320, 426)
    assert any("orientation" in n for n in clip.notes)


def test_an_image_that_is_not_an_image_is_a_probe_failure(tmp_path):
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(VideoError) as e:
        transcode(_record(tmp_path / "x.png", media="image"))
    assert e.value.stage == "probe" and "x.png" in e.value.reason


def test_text_posing_as_a_video_is_named_by_its_kind_and_size_never_its_content(tmp_path):
    """The reason is stored and printed; a row may name any readable file, so no line of it is copied."""
    (tmp_path / "v.mp4").write_text("root:x:0:0:root:/root:/bin/bash\n" * 40)
    with pytest.raises(VideoError) as e:
        transcode(_record(tmp_path / "v.mp4"))
    assert e.value.stage == "probe" and "text (ASCII, 1,280 bytes)" in e.value.reason
    assert "root" not in e.value.reason.replace(str(tmp_path), "")


def test_measured_rates_snap_to_the_rate_they_came_from():
    assert snap_rate(29.97) == snap_rate(30000 / 1001) and float(snap_rate(29.97)) == pytest.approx(29.97, abs=1e-3)
    assert snap_rate(24.6) == 25 and snap_rate(15.0) == 15 and snap_rate(12.5) == 12.5


@pytest.mark.parametrize("codec", ["vp9", "h264"])
def test_the_same_input_and_options_give_byte_identical_clips(source, codec):
    """No random muxer field (WebM's TrackUID) and no library version string in the file."""
    first, second = (transcode(_record(source), TranscodeOptions(codec=codec, short_side=96)).data for _ in range(2))
    assert first == second
    assert b"Lavf6" not in first and b"Lavc6" not in first


@pytest.mark.parametrize("pixel_aspect, size, odd_note", [
    (Fraction(59, 54), (192, 144), None),                            # 192.3 square pixels wide: even
    (Fraction(61, 54), (198, 144), "odd size 199x144 -> even 198x144"),  # 198.8: odd once rounded
], ids=["59:54", "61:54"])
def test_non_square_pixels_are_stretched_and_parity_is_judged_on_the_rounded_width(tmp_path, pixel_aspect, size,
                                                                                   odd_note):
    frames = motion_clip("moving left", np.random.default_rng(0), (176, 144), 10)
    clip = transcode(_record(encode_video(tmp_path / "pal.mp4", frames, 10, pixel_aspect=pixel_aspect)))
    assert (clip.width, clip.height) == size
    assert clip.notes == [f"anamorphic {pixel_aspect} -> square pixels"] + ([odd_note] if odd_note else [])
