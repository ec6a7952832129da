"""Dataset adapters: each turns one dataset's own annotation format into the shared `VideoRecord` schema.

`load(dataset, annotations, videos, **options)` is the only entry point the shard job needs;
annotations and videos are fsspec URLs (local paths, s3://, gs://). Rows that cannot be planned come
back as `Failure`s, never dropped, so the job can write them to failures.parquet with the rest.
"""
from __future__ import annotations

import inspect

from shards.adapters import generic_csv, hmdb51, images, kinetics, ssv2, ucf101
from shards.adapters.common import AdapterResult

ADAPTERS = {"kinetics": kinetics.load, "ssv2": ssv2.load, "ucf101": ucf101.load, "hmdb51": hmdb51.load,
            "csv": generic_csv.load, "images": images.load}


def load(dataset: str, annotations: str | None, videos: str | None, **options) -> AdapterResult:
    if dataset not in ADAPTERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(ADAPTERS)}")
    adapter = ADAPTERS[dataset]
    accepted = list(inspect.signature(adapter).parameters)[2:]
    if unknown := sorted(set(options) - set(accepted)):
        raise TypeError(f"{dataset} adapter has no option {unknown}; it accepts {accepted}")
    return adapter(annotations, videos, **options)


__all__ = ["ADAPTERS", "AdapterResult", "load"]
