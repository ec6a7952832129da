"""`python -m train predict` end to end: an H.264 .mp4 and a VP9 .webm the test encodes, a small TSM whose
checkpoint the test writes, and a text file posing as a video; its logits checked against the evaluation
path (VideoLoader on a shard the shard job writes of the same video, then the model)."""
from __future__ import annotations

import contextlib
import io
import json

import fsspec
import numpy as np
import pytest
import torch

import models
from contract import checkpoints
from models.saved import entries
from pipelines.loader import VideoLoader
from shards.execute import write_shard
from shards.finalize import write_outputs
from shards.plan import Plan, ShardSpec
from shards.records import VideoRecord
from shards.sample_dataset import CLASSES, encode_video, motion_clip
from shards.transcode import TranscodeOptions
from train import cli

NAMES = CLASSES[:6]
VIEWS = ["eval.clips=2", "eval.crops=3", "eval.batch_size=4", "data.options.protocol=ibm",
         "data.options.num_pipelines=1"]


def predict(*argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `python -m train predict ...`, run in this process."""
    out, err = io.StringIO(), io.StringIO()
    status = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(["predict", *argv])
        except SystemExit as e:
            status = e.code
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """The files, the checkpoint, and predict's JSON and table runs over them."""
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    h264 = encode_video(root / "left.mp4", motion_clip("moving left", rng, (80, 60), 16), fps=15, codec="h264")
    vp9 = encode_video(root / "up clip.webm", motion_clip("moving up", rng, (60, 80), 12), fps=12, codec="vp9")
    text = root / "notes.mp4"
    text.write_text("404 Not Found\n")
    torch.manual_seed(0)
    model = models.build("tsm_r18", num_classes=len(NAMES), num_frames=4, img_size=32, width_mult=0.25).eval()
    checkpoint = root / "tiny.pt"
    checkpoints.save({**entries(model), "classes": NAMES}, str(checkpoint))
    renamed = root / "classes.txt"
    renamed.write_text("".join(f"class {c}\n" for c in range(len(NAMES))))
    videos = [str(h264), str(vp9), str(text)]
    as_json = predict(*videos, "--checkpoint", str(checkpoint), "--json", *VIEWS)
    as_table = predict(str(h264), str(vp9), "--checkpoint", str(checkpoint), "--classes", str(renamed), *VIEWS)
    return {"root": root, "model": model, "videos": videos, "checkpoint": checkpoint, "json": as_json,
            "table": as_table}


def eval_path_logits(model, video: str, folder) -> np.ndarray:
    """The video's mean view logits by the evaluation path: the shard job's shard, VideoLoader, the model."""
    record = VideoRecord(key="clip", split="val", label=-1, label_name="", source=video)
    spec = ShardSpec("val", 0, (record,))
    write_shard(spec, TranscodeOptions(), str(folder))
    write_outputs(Plan((spec,), (), (), ("val",)), str(folder), "test", {})
    c = model.contract
    loader = VideoLoader(str(folder), batch_size=4, num_frames=c.num_frames, mode="eval", split="val", num_clips=2,
                         num_crops=3, crop_size=c.crop_size, layout=c.layout, mean=c.mean, std=c.std, protocol="ibm",
                         num_pipelines=1)
    with torch.no_grad():
        logits = [model(b["video"])[b["valid"]] for b in loader]
    views = torch.cat(logits)
    assert len(views) == 6
    return views.mean(0).numpy()


def test_predict_prints_each_videos_top5_named_by_the_checkpoints_classes(made):
    status, out, _ = made["json"]
    results = json.loads(out)
    assert [r["video"] for r in results] == made["videos"]
    for result in results[:2]:
        assert result["views"] == 6
        expected = np.argsort(-np.array(result["logits"]), kind="stable")[:5]   # five of the six classes
        assert [t["class"] for t in result["top"]] == [NAMES[c] for c in expected]


def test_predict_logits_are_the_evaluation_paths_on_a_shard_of_the_same_video(made, tmp_path):
    results = json.loads(made["json"][1])
    for i, result in enumerate(results[:2]):
        expected = eval_path_logits(made["model"], result["video"], tmp_path / f"shards{i}")
        np.testing.assert_allclose(result["logits"], expected, rtol=1e-5, atol=1e-5)


def test_a_file_that_is_not_a_video_is_refused_in_one_line_after_the_others_results(made):
    status, out, err = made["json"]
    assert status == 1
    refused = json.loads(out)[2]
    assert sorted(refused) == ["reason", "stage", "video"]
    assert (refused["video"], refused["stage"]) == (made["videos"][2], "probe")
    assert err.strip().splitlines() == [f"error: cannot predict {made['videos'][2]} (probe): not a video but text "
                                        f"(ASCII, 14 bytes), probably an error page saved as the video; "
                                        f"download it again"]


def test_the_table_names_classes_from_the_classes_file(made):
    status, out, err = made["table"]
    assert (status, err) == (0, "")
    header, *rows = out.splitlines()
    assert header.split() == ["video", "rank", "class", "probability"]
    assert len(rows) == 2 * 5
    name_at, probability_at = header.index("class"), header.index("probability")
    for i, result in enumerate(json.loads(made["json"][1])[:2]):
        block = rows[5 * i: 5 * (i + 1)]
        assert block[0].startswith(result["video"] + " ")
        top = result["top"]
        assert [line[name_at:probability_at].strip() for line in block] == [f"class {t['label']}" for t in top]
        assert [float(line[probability_at:]) for line in block] == pytest.approx([t["probability"] for t in top],
                                                                                 abs=1e-3)


def test_the_in_memory_shard_is_gone_after_predict(made):
    assert not [path for path in fsspec.filesystem("memory").store if path.startswith("/vidscale-predict-")]


@pytest.mark.parametrize("argv, message", [
    (["--classes", "{root}/three.txt"], "--classes names 3 classes but the model has 6 outputs"),
    (["model.num_frames=8"], "predict runs the checkpoint's own model"),
    (["--short-side", "321"], "--short-side: 321 must be a positive even number"),
])
def test_a_user_error_is_one_line_and_exit_status_2(made, argv, message):
    (made["root"] / "three.txt").write_text("a\nb\nc\n")
    argv = [a.format(root=made["root"]) for a in argv]
    status, out, err = predict(made["videos"][0], "--checkpoint", str(made["checkpoint"]), *argv)
    assert (status, out) == (2, "")
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
