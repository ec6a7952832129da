"""Parameters and GFLOPs per view, in the papers' convention (multiply-accumulates, one view).

`python -m models.describe NAME [--frames T] [--img-size S]`, or `--all` for the table beside the
papers' figures. Counting runs on the meta device, so even Swin-L at 16x384 costs no memory or time.
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.registry import build, get_spec, list_models


def example_input(layout: str, num_frames: int, img_size: int, batch: int = 1, device="cpu") -> torch.Tensor:
    """A zero clip in the layout a model consumes; super images are tiled by the model itself."""
    if layout == "BCTHW":
        return torch.zeros(batch, 3, num_frames, img_size, img_size, device=device)
    return torch.zeros(batch, num_frames, 3, img_size, img_size, device=device)


def count(name: str, num_frames: int, img_size: int, **options) -> tuple[float, float]:
    """(parameters in millions, GFLOPs as multiply-accumulates) of one view."""
    spec = get_spec(name)
    with torch.device("meta"):
        model = build(name, num_classes=options.pop("num_classes", 400), num_frames=num_frames,
                      img_size=img_size, **options).eval()
        x = example_input(spec.layout, num_frames, img_size, device="meta")
        params = sum(p.numel() for p in model.parameters()) / 1e6
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    return params, counter.get_total_flops() / 2 / 1e9


def paper_table(names: list[str] | None = None) -> str:
    """Markdown table of our counts beside the paper's, for every model that records a paper figure."""
    rows = ["| model | frames x size | params (M) | paper | GFLOPs | paper | diff |",
            "|---|---|---|---|---|---|---|"]
    for name in names or list_models():
        spec = get_spec(name)
        if "gflops" not in spec.paper:
            continue
        t, s = spec.paper.get("frames", 8), spec.paper.get("img_size", 224)
        params, gflops = count(name, t, s)
        p_params = spec.paper.get("params_m")
        diff = 100 * (gflops - spec.paper["gflops"]) / spec.paper["gflops"]
        rows.append(f"| {name} | {t}x{s} | {params:.1f} | {p_params if p_params else '-'} | {gflops:.1f} "
                    f"| {spec.paper['gflops']} | {diff:+.1f} % |")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m models.describe", description=__doc__)
    ap.add_argument("name", nargs="?", help="registered model name (see --list)")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--img-size", type=int, default=None)
    ap.add_argument("--list", action="store_true", help="list registered models")
    ap.add_argument("--all", action="store_true", help="table of every model that has a paper figure")
    args = ap.parse_args(argv)
    if args.list:
        for n in list_models():
            s = get_spec(n)
            print(f"{n:40s} {s.family:10s} {s.layout}")
        return
    if args.all:
        print(paper_table())
        return
    if not args.name:
        ap.error("give a model NAME, --list or --all")
    spec = get_spec(args.name)
    t = args.frames or spec.paper.get("frames", 8)
    s = args.img_size or spec.paper.get("img_size", 224)
    params, gflops = count(args.name, t, s)
    print(f"{args.name}: {t} frames x {s}px, layout {spec.layout}: {params:.2f} M parameters, "
          f"{gflops:.2f} GFLOPs (MACs) per view")
    if spec.paper:
        print(f"paper: {spec.paper}")


if __name__ == "__main__":
    main()
