"""The online half: DALI pipelines that stream the shards into torch batches (`VideoLoader`).

Names are imported on first use, so `import pipelines.shard_kinetics` (the offline job's CLI, which
lives here too) does not pay for DALI and torch.
"""
from importlib import import_module

_EXPORTS = {
    "VideoLoader": "pipelines.loader", "LoaderError": "pipelines.loader",
    "PipelineConfig": "pipelines.video_pipeline", "video_pipeline": "pipelines.video_pipeline",
    "ShardIndex": "pipelines.source", "ShardReader": "pipelines.source",
    "uniform_indices": "pipelines.sampling", "dense_indices": "pipelines.sampling",
    "frame_indices": "pipelines.sampling", "eval_views": "pipelines.sampling",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
