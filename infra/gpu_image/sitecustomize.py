"""Hides, in a rehearsal of infra/gpu_checks.sh, the modules that `make install` brings here but the lent GPU
machine's image lacks and that are not staged for it, so a new top-level import of one of them fails here,
before it costs a lease. Python runs this file at start-up when this folder is on PYTHONPATH:

    GPU_CHECKS_DEVICE=cpu PYTHONPATH=$PWD/infra/gpu_image bash infra/gpu_checks.sh

The list: the project's dependencies (pyproject.toml) and theirs, less what the image holds (the device
tool's KINDS.md) and what `bash infra/gpu_checks.sh --wheels` stages.
"""
import importlib.util
import sys

ABSENT = ("s3fs", "aiobotocore", "boto3", "botocore", "s3transfer", "moto", "gcsfs", "google.auth", "google.api_core",
          "pydantic", "pydantic_core", "tensorboardX", "opencensus", "opentelemetry", "aiohttp_cors", "colorful",
          "smart_open", "virtualenv", "platformdirs")


def absent(name: str) -> bool:
    return any(name == top or name.startswith(top + ".") for top in ABSENT)


class HideAbsent:
    """First on sys.meta_path: an import of a hidden module fails as it would where it is not installed."""

    def find_spec(self, name, path=None, target=None):
        if absent(name):
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU machine's image)", name=name)
        return None


_find_spec = importlib.util.find_spec


def find_spec(name, package=None):
    """Probes for optional modules (`find_spec(...) is None`) see them missing too, as on the GPU machine."""
    return None if absent(name) else _find_spec(name, package)


sys.meta_path.insert(0, HideAbsent())
importlib.util.find_spec = find_spec
