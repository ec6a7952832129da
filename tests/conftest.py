"""Every Ray these tests start stays on loopback: without this, Ray 2.60 registers a local node under the
host's interface address (and Ray Train hands that address to torch.distributed).

`device` runs a pipeline or loader test on DALI's CPU backend and, where a CUDA GPU is visible, again on
the GPU (the `mixed` NVDEC / nvJPEG decoders and every later operator on the device)."""
import os

import pytest
import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="the mixed (NVDEC) backend needs a CUDA GPU")


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=NEEDS_GPU)])
def device(request) -> str:
    return request.param
