"""`python -m train predict`: a checkpoint's top-5 classes for raw video files, by the evaluation path.

Nothing here decodes, samples or averages views itself. Every file goes through the shard job's own
transcode with the shard job's defaults (`shards.transcode`: short side at most 320, the source's frame
rate made constant, a keyframe every 8 frames, VP9), so the model sees what the shards it was trained on
hold, and DALI's CPU decoder, which reads VP8, VP9 and MJPEG only, can read any input PyAV reads. The
clips are packed by the shard writer into a one-split shard in memory (fsspec's `memory://`) and
evaluated as `train eval` evaluates a split: `train.data.build_loader` (the recipe's views, protocol and
loader options, the model's input contract) and `train.evaluate.evaluate_views`; a video's scores are the
mean of its view logits.

A file that cannot be read (not a video, too short, a decode failure in any view) is reported in one
line with its reason, after the other files' results, and the command exits with 1.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import PurePosixPath

import fsspec
import numpy as np

from train.config import DEFAULTS, ConfigError, apply_overrides, datasets_of, load_config

SPLIT = "predict"      # the split folder of the in-memory shard
TOP = 5
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")   # key=value, as opposed to a video's path or URL


def split_arguments(arguments: list[str]) -> tuple[list[str], list[str]]:
    """(videos, overrides): an argument is an override when it reads key=value and names no existing file."""
    videos, overrides = [], []
    for text in arguments:
        is_override = _OVERRIDE.match(text) and not os.path.exists(text)
        (overrides if is_override else videos).append(text)
    return videos, overrides


def read_classes(path: str) -> list[str]:
    """A classes.txt as the shard job writes it: line i names label i (blank lines skipped)."""
    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise ConfigError(f"--classes {path}: no such file; give a text file with one class name per line "
                          f"(line i names label i), such as the shard job's classes.txt") from None


def output_names(given: list[str] | None, stored, dataset: str, datasets: list[str], num_classes: int,
                 checkpoint: str) -> list[str] | None:
    """The names of the model's outputs: --classes, else the checkpoint's, else None (labels are shown)."""
    from train.data import classes_by_dataset
    names, source = given, "--classes"
    if names is None:
        names, source = classes_by_dataset(stored, datasets).get(dataset), f"checkpoint {checkpoint}"
    if names is not None and len(names) != num_classes:
        raise ConfigError(f"{source} names {len(names)} classes but the model has {num_classes} outputs; give "
                          f"--classes with one name per output, in label order")
    return list(names) if names is not None else None


def output_count(build: dict, dataset: str, several: bool) -> int:
    """Outputs of the head predict reads: a run over several datasets has one head per dataset."""
    heads = build["options"].get("heads") or {}
    return heads[dataset] if several and dataset in heads else build["num_classes"]


# ---------------------------------------------------------------- the in-memory shard

@contextlib.contextmanager
def packed(videos: list[str], options) -> Iterator[tuple[str | None, dict[str, dict]]]:
    """(url of a shard output holding split SPLIT, or None when no file could be read; {key: failure}).

    Video i is sample `video<i>`; the shard lives in fsspec's memory filesystem and is deleted on exit.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shards.finalize import INDEX_SCHEMA
    from shards.records import VideoError, VideoRecord
    from shards.transcode import transcode
    from shards.writer import ShardWriter

    fs = fsspec.filesystem("memory")
    root = f"/vidscale-predict-{uuid.uuid4().hex}"
    failures: dict[str, dict] = {}
    try:
        with fs.open(f"{root}/{SPLIT}/shard-000000.tar", "wb") as sink:
            writer = ShardWriter(sink, f"{SPLIT}/shard-000000.tar")
            for i, video in enumerate(videos):
                record = VideoRecord(key=video_key(i), split=SPLIT, label=-1, label_name="", source=video)
                try:
                    writer.add(record, transcode(record, options))
                except VideoError as e:
                    failures[record.key] = {"stage": e.stage, "reason": e.reason}
                except OSError as e:   # storage trouble the shard job would retry: here, one failed input
                    failures[record.key] = {"stage": "fetch", "reason": f"{type(e).__name__}: {e}"}
            writer.close()
        if not writer.rows:
            yield None, failures
            return
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(writer.rows, schema=INDEX_SCHEMA), buffer)
        fs.pipe_file(f"{root}/{SPLIT}/index.parquet", buffer.getvalue())
        yield f"memory://{root}", failures
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)


def video_key(i: int) -> str:
    return f"video{i:06d}"


# ---------------------------------------------------------------- prediction

def predict_videos(cfg: dict, model, device, videos: list[str], options, dataset: str) -> list[dict]:
    """One entry per video, in order: {video, views, logits (mean over its views)} or {video, stage, reason}.

    `model` is on `device` (train.loop.setup); `cfg` gives the views (eval.clips x eval.crops), the batch
    size and the loader options of `dataset`'s val split, as in `train eval`.
    """
    from train import checkpoint as ckpt
    from train.data import build_loader
    from train.evaluate import evaluate_views
    from train.loop import pick_amp, wants_channels_last

    module = ckpt.unwrap(model)
    contract, ev = module.contract, cfg["eval"]
    logits: dict[str, np.ndarray] = {}
    with packed(videos, options) as (url, failures):
        if url is not None:
            cfg = with_val_split(cfg, dataset, url)
            loader = build_loader(cfg, dataset, "val", contract=contract, device=device,
                                  views=(ev["clips"], ev["crops"]), batch_size=ev["batch_size"])
            views = evaluate_views(model, loader, device=device, layout=contract.layout,
                                   num_frames=contract.num_frames, grid=contract.grid,
                                   amp_dtype=pick_amp(cfg["train"]["amp"], device),
                                   dataset=dataset if cfg["data"]["datasets"] else None, seed=cfg["seed"],
                                   channels_last=wants_channels_last(cfg["train"]["channels_last"], module, device))
            scores, cover = views["normal"]
            keys, _, means = scores.per_video()
            logits = dict(zip(keys, means))
            failures |= {m["key"]: {"stage": m["stage"], "reason": m["reason"]} for m in cover["missing"]}
    results = []
    for i, video in enumerate(videos):
        key = video_key(i)
        if key in logits:
            results.append({"video": video, "views": ev["clips"] * ev["crops"], "logits": logits[key]})
        else:
            results.append({"video": video, **failures[key]})
    return results


def with_val_split(cfg: dict, dataset: str, url: str) -> dict:
    """`cfg` whose `dataset` evaluates the in-memory shard: its val options kept (protocol, loader
    settings), its split folder SPLIT, and no storage options (those are the recipe's bucket's)."""
    cfg = copy.deepcopy(cfg)
    spec = cfg["data"]["datasets"][dataset] if cfg["data"]["datasets"] else cfg["data"]
    val = spec.get("val") or {}
    spec["val"] = {**val, "shards": url,
                   "options": {**(val.get("options") or {}), "split": SPLIT, "storage_options": None}}
    return cfg


def ranked(logits: np.ndarray, names: list[str] | None) -> list[dict]:
    """The top classes of a video: label, name (None without names), probability (softmax of the mean
    logits) and mean logit, best first."""
    shifted = np.exp(logits - logits.max())
    probabilities = shifted / shifted.sum()
    order = np.argsort(-logits, kind="stable")[:TOP]
    return [{"label": int(c), "class": names[c] if names else None, "probability": float(probabilities[c]),
             "logit": float(logits[c])} for c in order]


def table(results: list[dict]) -> str:
    """The predicted videos' top classes as an aligned text table (failed videos are reported apart)."""
    rows = [("video", "rank", "class", "probability")]
    for result in results:
        if "top" not in result:
            continue
        for rank, top in enumerate(result["top"], 1):
            name = top["class"] if top["class"] is not None else str(top["label"])
            rows.append((result["video"] if rank == 1 else "", str(rank), name, f"{top['probability']:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row[:3], widths)), row[3]]).rstrip()
                     for row in rows)


def failure_line(result: dict) -> str:
    """One line per unreadable file; the transcoder's reasons start with the file's name, said once here."""
    reason = result["reason"].removeprefix(f"{PurePosixPath(result['video']).name}: ")
    return f"error: cannot predict {result['video']} ({result['stage']}): {reason}"


# ---------------------------------------------------------------- the command

def run(args) -> list[dict]:
    """`python -m train predict`: resolve the checkpoint and config as `train eval` does, predict, print."""
    import models
    from contract import checkpoints
    from shards.job import ConfigError as ShardOptionError
    from shards.job import transcode_options
    from train.cli import checkpoint_config
    from train.loop import setup
    from train.metrics import say

    videos, overrides = split_arguments(args.inputs)
    if not videos:
        raise ConfigError("predict needs at least one video file (any container or codec PyAV reads)")
    if any(text.startswith(("model.", "init_from=")) for text in overrides):
        raise ConfigError("predict runs the checkpoint's own model and weights (its build record and input "
                          "contract); drop the model.* and init_from overrides")
    try:
        options = transcode_options(short_side=args.short_side or None, fps=args.fps)
    except ShardOptionError as e:
        raise ConfigError(str(e)) from None
    given = load_config(args.config, overrides) if args.config else apply_overrides(DEFAULTS, overrides)
    checkpoint = checkpoints.resolve(args.checkpoint, given["run"]["storage_options"])
    state = checkpoints.load(checkpoint, given["run"]["storage_options"])
    if "build" not in state:
        raise ConfigError(f"checkpoint {checkpoint} names no model to build (it has no build record); convert it "
                          f"with python -m models.convert, or evaluate it with python -m train eval --config <recipe>")
    cfg = given if args.config else checkpoint_config(state, checkpoint, overrides)
    datasets = list(datasets_of(cfg))
    dataset = args.dataset or datasets[0]
    if dataset not in datasets:
        raise ConfigError(f"--dataset {dataset} is not a dataset of the config; its datasets are {', '.join(datasets)}")
    names = output_names(read_classes(args.classes) if args.classes else None, state.get("classes"), dataset,
                         datasets, output_count(state["build"], dataset, bool(cfg["data"]["datasets"])), checkpoint)
    built = models.load(state)
    model, device = setup({**cfg, "init_from": None}, model=built)
    results = predict_videos(cfg, model, device, videos, options, dataset)
    for result in results:
        if "logits" in result:
            result["top"] = ranked(result["logits"], names)
    if args.json:
        print(json.dumps([{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in r.items()} for r in results],
                         indent=1))
    elif any("top" in r for r in results):
        print(table(results))
    failed = [r for r in results if "reason" in r]
    for result in failed:
        say(failure_line(result))
    if failed:
        raise SystemExit(1)
    return results
