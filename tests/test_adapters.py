"""Adapters: each dataset's own layout in, VideoRecords and Failures out, nothing dropped silently."""
import http.server
import json
import shutil
import threading

import fsspec
import numpy as np
import pytest
from moto.server import ThreadedMotoServer
from PIL import Image

from bad_inputs import write_bad_inputs
from shards import adapters
from shards.sample_dataset import encode_video, make_sample_dataset, motion_clip
from shards.transcode import transcode


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """One real encoded clip that layout tests copy under many names (adapters only list files)."""
    path = tmp_path_factory.mktemp("v") / "clip.mp4"
    return encode_video(path, motion_clip("moving left", np.random.default_rng(0), (64, 48), 10), 10)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    return root, make_sample_dataset(root, num_classes=3, train_per_class=2, val_per_class=1, size=(64, 48))


def _put(video, *paths):
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(video, p)


def test_kinetics_sample_gives_every_clip_once_with_sorted_classes(sample):
    root, summary = sample
    result = adapters.load("kinetics", str(root / "annotations"), str(root / "videos"))
    assert result.classes == sorted(summary["classes"])
    assert len(result.records) == 3 * 2 + 3 * 1 + 3  # the zero-byte, truncated and text files are listed too
    assert {(f.stage, f.key) for f in result.failures} == {
        ("fetch", k) for k, v in summary["expected_failures"].items() if v["case"] == "missing"}
    for r in result.records:
        assert r.label == result.classes.index(r.label_name) and r.time_start is None
        assert r.source.endswith(f"/videos/{r.split}/{r.key}.mp4")


def test_kinetics_finds_clips_flat_or_under_label_folders_and_trims_full_videos(tmp_path, video):
    (tmp_path / "k.csv").write_text("label,youtube_id,time_start,time_end,split,is_cc\n"
                                    "abseiling,-dashfirst1,4,14,train,0\n"
                                    "air drumming,flatclip001,30,40,train,0\n"
                                    "air drumming,wholevideo1,7,17,val,0\n")
    _put(video, tmp_path / "v" / "abseiling" / "-dashfirst1_000004_000014.mp4",
         tmp_path / "v" / "flatclip001_000030_000040.webm", tmp_path / "v" / "wholevideo1.mkv")
    result = adapters.load("kinetics", str(tmp_path / "k.csv"), str(tmp_path / "v"))
    by_key = {r.key: r for r in result.records}
    assert result.failures == [] and result.classes == ["abseiling", "air drumming"]
    assert by_key["-dashfirst1_000004_000014"].source.endswith("abseiling/-dashfirst1_000004_000014.mp4")
    assert by_key["flatclip001_000030_000040"].label == 1
    whole = by_key["wholevideo1_000007_000017"]
    assert (whole.split, whole.time_start, whole.time_end) == ("val", 7.0, 17.0)
    assert whole.source.endswith("wholevideo1.mkv")


def test_kinetics_bad_rows_become_failures_that_name_the_row(tmp_path):
    expected = write_bad_inputs(tmp_path)
    result = adapters.load("kinetics", str(tmp_path / "annotations"), str(tmp_path / "videos"))
    failures = {f.source.rsplit("/", 1)[-1]: f for f in result.failures}
    row_cases = {c: e for c, e in expected.items() if e["stage"] in ("annotations", "fetch") and ".csv:" in e["source"]}
    assert len(row_cases) == 6
    for case, want in row_cases.items():
        failure = failures[want["source"]]
        assert (failure.stage, failure.key, failure.split) == (want["stage"], want["key"], want["split"]), case
        assert want["source"] in failure.reason
    assert len(result.failures) == len(row_cases)
    planned = {r.key for r in result.records}
    assert all(e["key"] in planned for e in expected.values() if ".csv:" not in e["source"])


def test_kinetics_labels_outside_a_classes_file_fail_and_test_rows_without_labels_get_minus_one(tmp_path, video):
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "train.csv").write_text("label,youtube_id,time_start,time_end,split\n"
                                                "a,aaaaaaaaaaa,0,10,train\nb,bbbbbbbbbbb,0,10,train\n")
    (tmp_path / "ann" / "test.csv").write_text("youtube_id,time_start,time_end,split\nccccccccccc,0,10,test\n")
    (tmp_path / "classes.txt").write_text("a\nz\n")
    _put(video, *(tmp_path / "v" / f"{c * 11}_000000_000010.mp4" for c in "abc"))
    result = adapters.load("kinetics", str(tmp_path / "ann"), str(tmp_path / "v"), classes=str(tmp_path / "classes.txt"))
    assert result.classes == ["a", "z"]
    assert [(r.key[0], r.label) for r in result.records] == [("c", -1), ("a", 0)]
    [failure] = result.failures
    assert failure.stage == "annotations" and "'b'" in failure.reason and "classes file" in failure.reason


def test_kinetics_rejects_a_csv_that_is_not_kinetics(tmp_path, video):
    (tmp_path / "x.csv").write_text("path,label\na.mp4,x\n")
    with pytest.raises(ValueError, match="label,youtube_id,time_start,time_end"):
        adapters.load("kinetics", str(tmp_path / "x.csv"), str(video.parent))


def test_ssv2_uses_the_official_label_ids_and_templates(tmp_path, video):
    ann = tmp_path / "ann"
    ann.mkdir()
    labels = {"Pushing something from left to right": "1", "Pulling something from left to right": "0"}
    (ann / "something-something-v2-labels.json").write_text(json.dumps(labels))
    (ann / "something-something-v2-train.json").write_text(json.dumps([
        {"id": "11", "label": "pushing a cup from left to right", "template": "Pushing [something] from left to right",
         "placeholders": ["a cup"]},
        {"id": "12", "label": "x", "template": "Juggling [something]", "placeholders": ["x"]},
        {"id": "13", "label": "y", "template": "Pulling [something] from left to right", "placeholders": ["y"]}]))
    (ann / "something-something-v2-validation.json").write_text(json.dumps([
        {"id": "21", "label": "z", "template": "Pulling [something] from left to right", "placeholders": ["z"]}]))
    (ann / "something-something-v2-test.json").write_text(json.dumps([{"id": "31"}]))
    webm = encode_video(tmp_path / "v" / "11.webm", motion_clip("moving up", np.random.default_rng(0), (64, 48), 10),
                        10, codec="vp9")
    _put(webm, tmp_path / "v" / "21.webm", tmp_path / "v" / "31.webm")
    result = adapters.load("ssv2", str(ann), str(tmp_path / "v"))
    assert result.classes == ["Pulling something from left to right", "Pushing something from left to right"]
    assert [(r.key, r.split, r.label) for r in result.records] == [("11", "train", 1), ("21", "val", 0), ("31", "test", -1)]
    assert {(f.key, f.stage) for f in result.failures} == {("12", "annotations"), ("13", "fetch")}


def test_ucf101_reads_the_chosen_split_and_matches_class_folders_without_case(tmp_path, video):
    ann = tmp_path / "ucfTrainTestlist"
    ann.mkdir()
    (ann / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 HandstandPushups\n")
    (ann / "trainlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n"
                                         "HandstandPushups/v_HandStandPushups_g08_c01.avi 2\n")
    (ann / "testlist01.txt").write_text("HandstandPushups/v_HandStandPushups_g01_c01.avi\n"
                                        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c09.avi\n")
    (ann / "trainlist02.txt").write_text("")
    (ann / "testlist02.txt").write_text("")
    _put(video, tmp_path / "UCF-101" / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g08_c01.avi",
         tmp_path / "UCF-101" / "HandstandPushups" / "v_HandStandPushups_g08_c01.avi",
         tmp_path / "UCF-101" / "HandstandPushups" / "v_HandStandPushups_g01_c01.avi")
    result = adapters.load("ucf101", str(ann), str(tmp_path / "UCF-101"), split=1)
    assert result.classes == ["ApplyEyeMakeup", "HandstandPushups"]
    assert [(r.key, r.split, r.label) for r in result.records] == [
        ("v_ApplyEyeMakeup_g08_c01", "train", 0), ("v_HandStandPushups_g08_c01", "train", 1),
        ("v_HandStandPushups_g01_c01", "test", 1)]
    assert [(f.stage, f.key) for f in result.failures] == [("fetch", "v_ApplyEyeMakeup_g01_c09")]
    assert adapters.load("ucf101", str(ann), str(tmp_path / "UCF-101"), split=2).records == []


def test_hmdb51_splits_by_tag_and_leaves_tag_zero_to_other_splits(tmp_path, video):
    ann = tmp_path / "splits"
    ann.mkdir()
    (ann / "wave_test_split1.txt").write_text("w1.avi 1 \nw2.avi 2 \nw3.avi 0 \n")
    (ann / "clap_test_split1.txt").write_text("c1.avi 1 \nc2.avi 7 \n")
    (ann / "clap_test_split2.txt").write_text("c1.avi 2 \n")
    _put(video, *(tmp_path / "hmdb" / d / f for d, f in [("wave", "w1.avi"), ("wave", "w2.avi"), ("clap", "c1.avi")]))
    result = adapters.load("hmdb51", str(ann), str(tmp_path / "hmdb"))
    assert result.classes == ["clap", "wave"]
    assert [(r.key, r.split, r.label) for r in result.records] == [("c1", "train", 0), ("w1", "train", 1), ("w2", "test", 1)]
    assert [f.stage for f in result.failures] == ["annotations"] and "c2.avi 7" in result.failures[0].reason
    assert [(r.key, r.split) for r in adapters.load("hmdb51", str(ann), str(tmp_path / "hmdb"), split=2).records] == [
        ("c1", "test")]


def test_generic_csv_takes_relative_and_absolute_paths_images_and_unlabelled_rows(tmp_path, video):
    _put(video, tmp_path / "data" / "run" / "a.mp4", tmp_path / "elsewhere" / "b.mp4")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "data" / "c.png")
    (tmp_path / "list.csv").write_text(f"path,label,split\nrun/a.mp4,run,train\n{tmp_path}/elsewhere/b.mp4,walk,val\n"
                                       f"c.png,walk,train\nmissing.mp4,run,train\nrun/a.mp4,run,train\nunlab.mp4,,test\n")
    _put(video, tmp_path / "data" / "unlab.mp4")
    result = adapters.load("csv", str(tmp_path / "list.csv"), str(tmp_path / "data"))
    assert result.classes == ["run", "walk"]
    assert [(r.key, r.split, r.label, r.media) for r in result.records] == [
        ("run_a", "train", 0, "video"), (f"{tmp_path}/elsewhere/b"[1:].replace("/", "_").replace(".", "_"), "val", 1, "video"),
        ("c", "train", 1, "image"), ("unlab", "test", -1, "video")]
    assert [(f.stage, f.source.rsplit(":", 1)[1]) for f in result.failures] == [("fetch", "5"), ("annotations", "6")]


def test_generic_csv_fetches_a_url_in_another_scheme_than_the_videos_only_when_allowed(tmp_path, video):
    """An annotation file must not make the job request whatever URL it names."""
    requested = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            requested.append(self.path)
            self.send_response(404)
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _put(video, tmp_path / "data" / "a.mp4")
    url = f"http://127.0.0.1:{server.server_port}/internal/v.mp4"
    (tmp_path / "list.csv").write_text(f"path,label\na.mp4,x\n{url},x\n")
    try:
        refused = adapters.load("csv", str(tmp_path / "list.csv"), str(tmp_path / "data"))
        assert [r.key for r in refused.records] == ["a"] and requested == []
        (failure,) = refused.failures
        assert failure.stage == "annotations" and "other_schemes=true" in failure.reason
        allowed = adapters.load("csv", str(tmp_path / "list.csv"), str(tmp_path / "data"), other_schemes=True)
        assert requested and [f.stage for f in allowed.failures] == ["fetch"]   # asked for, and not there
    finally:
        server.shutdown()


def test_image_folder_gives_image_records_and_reports_misplaced_images(tmp_path):
    for rel in ["train/cat/1.jpg", "train/dog/1.png", "val/cat/2.jpg", "stray.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / rel)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image, not a record")
    result = adapters.load("images", None, str(tmp_path))
    assert result.classes == ["cat", "dog"]
    assert [(r.key, r.split, r.label, r.media) for r in result.records] == [
        ("cat_1", "train", 0, "image"), ("dog_1", "train", 1, "image"), ("cat_2", "val", 0, "image")]
    assert [f.source.rsplit("/", 1)[1] for f in result.failures] == ["stray.jpg"]


def test_load_names_the_valid_datasets_and_options(tmp_path):
    with pytest.raises(ValueError, match="kinetics"):
        adapters.load("kinetics-9000", str(tmp_path), str(tmp_path))
    with pytest.raises(TypeError, match="split"):
        adapters.load("ucf101", str(tmp_path), str(tmp_path), fold=1)
    with pytest.raises(FileNotFoundError, match="annotations"):
        adapters.load("kinetics", str(tmp_path / "nope"), str(tmp_path))


@pytest.fixture
def s3(monkeypatch):
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://{host}:{port}", "skip_instance_cache": True})
    fs = fsspec.filesystem("s3")
    fs.mkdir("videos-bucket")
    yield fs
    server.stop()


def test_kinetics_from_an_s3_bucket_plans_and_transcodes(s3, sample):
    root, summary = sample
    s3.put(str(root / "annotations"), "videos-bucket/k/annotations", recursive=True)
    s3.put(str(root / "videos"), "videos-bucket/k/videos", recursive=True)
    result = adapters.load("kinetics", "s3://videos-bucket/k/annotations", "s3://videos-bucket/k/videos")
    assert len(result.records) == 12 and all(r.source.startswith("s3://videos-bucket/k/videos/") for r in result.records)
    good = next(r for r in result.records if r.key not in summary["expected_failures"])
    assert transcode(good).num_frames == summary["frames_per_clip"]


def test_kinetics_split_filter_keeps_the_class_indices(sample):
    root, _ = sample
    everything = adapters.load("kinetics", str(root / "annotations"), str(root / "videos"))
    val = adapters.load("kinetics", str(root / "annotations"), str(root / "videos"), splits=["val"])
    assert val.classes == everything.classes
    assert val.records == [r for r in everything.records if r.split == "val"] and val.failures == []


def _csv_records(tmp_path, video, text, **options):
    _put(video, tmp_path / "v" / "a.mp4", tmp_path / "v" / "b.mp4", tmp_path / "v" / "c.mp4")
    (tmp_path / "list.csv").write_text(text)
    return adapters.load("csv", str(tmp_path / "list.csv"), str(tmp_path / "v"), **options)


@pytest.mark.parametrize("text, says", [
    ("a.mp4,run\nb.mp4,car, phone\n", r"list.csv:2: 3 fields .* quote .*header path,label,split"),
    ("path,label,split\na.mp4,run,train\nb.mp4,car, phone,val\n", r"list.csv:3: 4 fields .* quote"),
    ("path,label,split\na.mp4,run,train\nb.mp4,car, phone\n", r"list.csv:3: split ' phone' .* quote"),
], ids=["no header", "split column", "split column left out"])
def test_csv_label_with_an_unquoted_comma_is_an_error_that_says_to_quote_it(tmp_path, video, text, says):
    with pytest.raises(ValueError, match=says):
        _csv_records(tmp_path, video, text)
    quoted = text.replace("car, phone", '"car, phone"')
    assert "car, phone" in [r.label_name for r in _csv_records(tmp_path, video, quoted).records]


def test_csv_header_with_other_column_names_is_an_error_naming_the_line(tmp_path, video):
    with pytest.raises(ValueError, match=r"list.csv:1: 'video,class' is neither the header path,label\[,split\]"):
        _csv_records(tmp_path, video, "video,class\na.mp4,run\n")
    assert len(_csv_records(tmp_path, video, "Path, Label\na.mp4,run\n").records) == 1


def test_csv_integer_labels_are_ordered_by_value(tmp_path, video):
    result = _csv_records(tmp_path, video, "a.mp4,2\nb.mp4,10\nc.mp4,1\n")
    assert result.classes == ["1", "2", "10"]
    assert {r.label_name: r.label for r in result.records} == {"1": 0, "2": 1, "10": 2}


def test_csv_classes_follow_a_class_list_when_one_is_given(tmp_path, video):
    (tmp_path / "classes.txt").write_text("10\n2\n1\n")
    result = _csv_records(tmp_path, video, "a.mp4,2\nb.mp4,10\nc.mp4,1\n", classes=str(tmp_path / "classes.txt"))
    assert result.classes == ["10", "2", "1"]
    assert {r.label_name: r.label for r in result.records} == {"10": 0, "2": 1, "1": 2}
