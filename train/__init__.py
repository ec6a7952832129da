"""One training and evaluation loop for every model family, on one process or a Ray cluster.

    python -m train fit  --config configs/<recipe>.yaml [key=value ...] [--workers N --gpus-per-worker G]
    python -m train eval --checkpoint <file, folder or URL> [--config ...] [key=value ...]

API: `train.config.load_config` (recipes), `train.loop.fit` (a run), `train.cli.evaluate_checkpoint`,
`train.evaluate` (protocols and metrics), `train.checkpoint` (exact resume), `train.ray_train.fit_with_ray`.
See docs/train.md.
"""
