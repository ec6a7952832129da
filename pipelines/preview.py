"""A picture of what the loader delivers: sampled clips frame by frame, and the same clips as super images.

    python -m pipelines.preview SPLIT_FOLDER [--mode train] --out preview.png
    python -m pipelines.preview OUTPUT_ROOT --split val [--mode train] --out preview.png

Two loaders with the same seed draw the same views (every random choice is made on the host, from the
seed), one in the BTCHW layout and one in the super layout, so each row shows a clip's frames beside
the super image tiled on device from them. Pixels are de-normalised with the loader's mean and std.
"""
from __future__ import annotations

import argparse
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipelines.loader import LoaderError, VideoLoader  # noqa: E402


def to_image(x: torch.Tensor, mean, std) -> np.ndarray:
    """(C, H, W) normalised -> (H, W, C) in [0, 1]."""
    x = x.float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def draw(shards: str, out: str, samples: int = 4, grid: str | None = None, **options) -> None:
    clips = VideoLoader(shards, batch_size=samples, layout="BTCHW", **options)
    tiled = VideoLoader(shards, batch_size=samples, layout="super", grid=grid, **options)
    batch, supers = next(iter(clips)), next(iter(tiled))["video"]
    c = clips.config
    mean, std = c.contract.mean, c.contract.std
    names = clips.index["label_name"]
    t = batch["video"].shape[1]
    cols = math.ceil(t / 2)                      # frames in two rows, the super image beside them
    fig = plt.figure(figsize=(1.5 * (cols + 2), 3.2 * samples))
    grid = fig.add_gridspec(2 * samples, cols + 2)
    for i in range(samples):
        for f in range(t):
            ax = fig.add_subplot(grid[2 * i + f // cols, f % cols])
            ax.imshow(to_image(batch["video"][i, f], mean, std))
            ax.set_title(f"frame {f}", fontsize=7)
            ax.axis("off")
        ax = fig.add_subplot(grid[2 * i:2 * i + 2, cols:])
        ax.imshow(to_image(supers[i], mean, std))
        ax.set_title(f"{batch['key'][i]} ({names[int(batch['video_index'][i])]})\nclip {int(batch['clip'][i])}, "
                     f"crop {int(batch['crop'][i])}: super image", fontsize=7)
        ax.axis("off")
    fig.suptitle(f"{shards} ({options.get('split') or 'split folder'}, {c.mode}, {c.sampling} sampling, "
                 f"{t} frames, {c.contract.crop_size}px)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.preview", description=__doc__.splitlines()[0])
    p.add_argument("shards", help="a split folder, or the shard job's output root with --split; local path or URL")
    p.add_argument("--out", default="preview.png")
    p.add_argument("--split", default=None, help="the split to draw when SHARDS is the output root")
    p.add_argument("--mode", choices=["train", "eval"], default="train")
    p.add_argument("--sampling", choices=["uniform", "dense"], default="uniform")
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--stride", type=int, default=2, help="dense sampling stride")
    p.add_argument("--crop-size", type=int, default=112)
    p.add_argument("--short-side", default=None, help="train jitter range LO,HI (default: 8/7 to 10/7 of the crop)")
    p.add_argument("--grid", default=None, help="super-image grid, e.g. 2x4 (default: the SIFAR rule)")
    p.add_argument("--flip", action="store_true", help="random horizontal flips (off: direction-sensitive data)")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    lo, hi = (int(v) for v in a.short_side.split(",")) if a.short_side else (a.crop_size * 8 // 7, a.crop_size * 10 // 7)
    try:
        draw(a.shards, a.out, a.samples, split=a.split, mode=a.mode, sampling=a.sampling, num_frames=a.num_frames,
             stride=a.stride, crop_size=a.crop_size, short_side=(lo, hi), grid=a.grid, flip=a.flip, seed=a.seed)
    except (FileNotFoundError, ValueError, LoaderError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
