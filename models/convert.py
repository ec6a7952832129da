"""Turn a checkpoint released by a paper's authors into our checkpoint file, every tensor accounted for.

    python -m models.convert SRC OUT --model NAME [--format FORMAT] [--num-classes N] [--num-frames T]
        [--img-size S] [--classes classes.txt] [--set KEY=VALUE ...] [--allow-missing] [--allow-unexpected]
        [--allow-mismatched] [--trust-pickle]

The format (`models.formats`) is detected from the keys unless given. The file written holds the weights, the
build record (registry name and options) and the input contract the weights were trained with, so that
`models.load(OUT)` rebuilds the model from it alone, and whatever evaluates it can read its inputs. Each source
tensor lands in the model, or is dropped for a stated reason (recorded in the file's `source` entry), or stops
the conversion: a tensor without a place, a model tensor without a source or a shape that differs is an error
naming the keys, unless the matching `--allow-*` flag keeps the model's own initialisation (and says so).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from contract import checkpoints
from models.formats import FORMATS, ConversionError, Mapper, Plan, Source, abbrev, detect
from models.registry import build, get_spec
from models.saved import entries
from models.weights import strip_prefixes, unwrap_state_dict

ALLOW = ("missing", "unexpected", "mismatched")
# Plain values that training scripts pickle beside the weights (argparse arguments, a scheduler's milestones, a
# best accuracy as a numpy number): rebuilding them runs no code, so they need no --trust-pickle. Numpy scalars
# pickle their constructor under numpy 1's module name or numpy 2's.
_NUMPY_SCALAR = np.float64(0).__reduce__()[0]
_SAFE_GLOBALS = [argparse.Namespace, collections.Counter, np.dtype,
                 *(type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32)),
                 *((_NUMPY_SCALAR, f"numpy.{core}.multiarray.scalar") for core in ("core", "_core"))]


def read_source(path: str, trust_pickle: bool = False) -> Source:
    """The weights of a checkpoint file, unwrapped from its training wrapper, and its other top-level entries."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path!r} not found; give the path of the authors' released file")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f" (a {found.group(1)})" if found else ""
        raise ConversionError(f"{path} holds pickled objects besides tensors and plain values{what}; if you "
                              f"trust the file, pass --trust-pickle") from None
    tensors = strip_prefixes(unwrap_state_dict(obj, source=path))
    records = {k: v for k, v in obj.items() if not isinstance(v, dict)} if isinstance(obj, dict) else {}
    return Source(path, tensors, records)


def convert(src: str, out: str, model: str, format: str | None = None, num_classes: int | None = None,
            num_frames: int | None = None, img_size: int | None = None, classes: str | None = None,
            allow: tuple[str, ...] = (), trust_pickle: bool = False, **options) -> dict:
    """Convert `src` into a checkpoint of registry model `model` at `out`; returns the `source` record it wrote.

    `options` are build options of the model, on top of those the format derives; a value the file proves
    otherwise is an error. `allow` holds any of "missing", "unexpected", "mismatched".
    """
    try:
        spec = get_spec(model)
    except KeyError as e:
        raise ConversionError(e.args[0]) from None
    if format is not None and format not in FORMATS:
        raise ConversionError(f"unknown format {format!r}; the formats are {', '.join(FORMATS)}")
    source = read_source(src, trust_pickle)
    fmt = FORMATS[format or detect(source)]
    if spec.family not in fmt.families:
        raise ConversionError(f"format {fmt.name} converts into {'/'.join(fmt.families)} models, {model} is a "
                              f"{spec.family} model")
    plan = fmt.plan(source, spec)
    if plan.model and plan.model != model:
        raise ConversionError(f"{src} was trained as {plan.model} (its own records say so), not {model}; "
                              f"pass --model {plan.model}")
    given = {k: v for k, v in (("num_frames", num_frames), ("img_size", img_size)) if v is not None}
    settings = _settings(plan, {**given, **options}, src)
    replace = num_classes is not None and num_classes != plan.num_classes
    if replace and "heads" in settings:
        if len(settings["heads"]) > 1:
            raise ConversionError(f"{src} has one classifier per dataset ({', '.join(settings['heads'])}); "
                                  f"--num-classes replaces a single one, so leave it out to keep them")
        settings["heads"] = {name: num_classes for name in settings["heads"]}
    names = _class_names(classes, num_classes or plan.num_classes)
    frames, size = settings.pop("num_frames", None), settings.pop("img_size", None)
    try:
        net = build(model, num_classes=num_classes or plan.num_classes, num_frames=frames, img_size=size,
                    **settings)
    except TypeError as e:   # an option the model does not take
        raise ConversionError(f"{model} does not take one of the options given ({e})") from None
    mapper = fmt.map(source, net)
    head = set(fmt.head_keys(net)) if replace else set()
    state, kept = _account(net, mapper, head, set(allow), src)
    net.load_state_dict(state)
    net.contract = dataclasses.replace(net.contract, mean=plan.mean or net.contract.mean,
                                       std=plan.std or net.contract.std)
    dropped = dict(mapper.dropped)
    for key in head:
        if key in mapper.origin:
            dropped[mapper.origin[key]] = (f"classifier of {plan.num_classes} classes, replaced by a new one of "
                                           f"{num_classes} (--num-classes)")
    c = net.contract
    built = (f"{model}: {c.num_frames} frames x {c.crop_size} px, {c.layout}"
             f"{f', grid {c.grid_text}' if c.grid else ''}, mean {list(c.mean)}, std {list(c.std)}"
             f"{f', options {settings}' if settings else ''}")
    record = {"file": str(src), "format": fmt.name, "repo": fmt.repo, "loaded": len(state) - len(kept),
              "dropped": dropped, "kept": kept, "notes": [built, *plan.notes]}
    checkpoints.save({**entries(net), "classes": names, "source": record}, out)
    return record


def _settings(plan: Plan, given: dict, src: str) -> dict:
    """The authors' defaults, then what the user gave, then what the file proves; a contradiction is an error."""
    for key, value in given.items():
        if key in plan.facts and plan.facts[key] != value:
            raise ConversionError(f"{src} was built with {key}={plan.facts[key]!r}, not {value!r}; drop "
                                  f"{key}={value!r} to take it from the file")
    settings = {**plan.defaults, **given, **plan.facts}
    for key, hint in plan.required.items():
        if key not in settings:
            raise ConversionError(f"{src}: give --{key.replace('_', '-')} ({hint})")
    return settings


def _account(net: nn.Module, mapper: Mapper, head: set[str], allow: set[str], src: str) -> tuple[dict, dict]:
    """The state dict to load, and the model keys that keep their own initialisation (with why)."""
    targets = net.state_dict()
    name = net.model_name
    unexpected = sorted(mapper.origin[k] for k in mapper.out if k not in targets) + sorted(mapper.left)
    missing = [k for k in targets if k not in mapper.out and k not in head and not k.endswith("num_batches_tracked")]
    mismatched = [f"{k} {list(v.shape)} vs {list(targets[k].shape)}" for k, v in mapper.out.items()
                  if k in targets and k not in head and v.shape != targets[k].shape]
    problems = [
        ("unexpected", unexpected, f"{len(unexpected)} tensors of the file have no place in {name}: "
                                   f"{abbrev(unexpected)}; pick the model of the release, or pass "
                                   f"--allow-unexpected to drop them"),
        ("missing", missing, f"{name} has {len(missing)} tensors the file does not provide: {abbrev(missing)}; "
                             f"pick the model of the release, or pass --allow-missing to keep their "
                             f"initialisation"),
        ("mismatched", mismatched, f"{len(mismatched)} tensors differ in shape (file vs model): "
                                   f"{abbrev(mismatched, 2)}; pick the model of the release, or pass "
                                   f"--allow-mismatched to keep the model's own"),
    ]
    for kind, keys, message in problems:
        if keys and kind not in allow:
            raise ConversionError(f"{src}: {message}")
    for key in unexpected:
        mapper.dropped[key] = "no place in the model (--allow-unexpected)"
    state, kept = {}, {}
    for key, target in targets.items():
        value = mapper.out.get(key)
        if key in head:
            kept[key] = "new classifier (--num-classes)"
        elif value is None:
            kept[key] = ("not in the file (saved by an older PyTorch); counts BN updates, unused in evaluation"
                         if key.endswith("num_batches_tracked") else "not in the file (--allow-missing)")
        elif value.shape != target.shape:
            kept[key] = f"shape {list(value.shape)} in the file (--allow-mismatched)"
            mapper.dropped[mapper.origin[key]] = f"shape differs from {key}'s (--allow-mismatched)"
        else:
            state[key] = value.to(target.dtype)
            continue
        state[key] = target
    return state, kept


def _class_names(path: str | None, num_classes: int) -> list[str] | None:
    if path is None:
        return None
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if len(names) != num_classes:
        raise ConversionError(f"{path} names {len(names)} classes, the model has {num_classes}; give one class "
                              f"name per line, line i naming label i")
    return names


def report(record: dict, out: str) -> str:
    """What a person reads after a conversion: where the tensors went, what was dropped and kept, and why."""
    lines = [f"converted {record['file']} (format {record['format']}, {record['repo']}): "
             f"{record['loaded']} tensors loaded, {len(record['dropped'])} dropped, {len(record['kept'])} kept "
             f"from the model"]
    lines += [f"  {note}" for note in record["notes"]]
    for title, reasons in (("dropped", record["dropped"]), ("kept", record["kept"])):
        by_reason = collections.defaultdict(list)
        for key, why in reasons.items():
            by_reason[why].append(key)
        lines += [f"  {title} {len(keys)}: {why}: {abbrev(keys, 2)}" for why, keys in by_reason.items()]
    lines.append(f"wrote {out}")
    return "\n".join(lines)


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (for example token_shift=false)")
    return key.strip(), yaml.safe_load(value)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m models.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="the authors' checkpoint file")
    ap.add_argument("out", help="where to write our checkpoint file")
    ap.add_argument("--model", required=True, help="registered model name (python -m models.describe --list)")
    ap.add_argument("--format", help=f"one of {', '.join(FORMATS)}; detected from the keys when left out")
    ap.add_argument("--num-classes", type=int, help="replace the classifier with a new one of N classes")
    ap.add_argument("--num-frames", type=int, help="frames per clip the weights were trained with")
    ap.add_argument("--img-size", type=int, help="crop size the weights were trained with")
    ap.add_argument("--classes", help="class names, one per line, line i naming label i")
    ap.add_argument("--set", type=_option, action="append", default=[], metavar="KEY=VALUE",
                    help="a build option of the model (YAML value), e.g. token_shift=false")
    for kind in ALLOW:
        ap.add_argument(f"--allow-{kind}", action="store_true", help=f"allow {kind} tensors, reported")
    ap.add_argument("--trust-pickle", action="store_true",
                    help="read a file that pickles arbitrary objects (runs code: only for files you trust)")
    args = ap.parse_args(argv)
    try:
        record = convert(args.src, args.out, args.model, format=args.format, num_classes=args.num_classes,
                         num_frames=args.num_frames, img_size=args.img_size, classes=args.classes,
                         allow=tuple(k for k in ALLOW if getattr(args, f"allow_{k}")),
                         trust_pickle=args.trust_pickle, **dict(args.set))
    except (ValueError, OSError) as e:   # ConversionError and the models' own one-line ValueErrors
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(report(record, args.out))


if __name__ == "__main__":
    main()
