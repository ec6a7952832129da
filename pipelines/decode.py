"""The decode stage: one DALI pipeline fed host batches, its output handed to torch without a copy.

DALI reports a decode error for the batch, not the sample, and a failed run can leave the pipeline
unusable; so a failed batch is run again one view at a time on a rebuilt pipeline, and the views that
still fail are recorded and replaced by flagged copies of a good one. A GOP cut that the decoder rejects
while the whole video decodes is not the sample's fault: that view is decoded whole (its bytes read
again) and the loader stops cutting (`LoaderState.stop_cutting`), so an optimisation never costs a sample.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pipelines import video_pipeline as vp
from pipelines.batches import HostBatch
from pipelines.plan import Views
from pipelines.source import SampleError
from pipelines.state import LoaderState


class Decoder:
    """One pipeline. `whole(row)` reads a video's bytes again (bytes, or raises SampleError)."""

    def __init__(self, config: vp.PipelineConfig, device: str, batch_size: int, num_threads: int, device_id: int,
                 seed: int, state: LoaderState, whole: Callable[[int], bytes]):
        self.config, self.device, self.batch_size, self.num_threads = config, device, batch_size, num_threads
        self.device_id, self.seed, self.state, self.whole = device_id, seed, state, whole
        self.pipe = self._build()

    def __call__(self, batch: HostBatch, stream) -> tuple[Views, torch.Tensor]:
        """The views actually delivered (failures stood in for) and their clips."""
        if batch.encoded is None:
            return batch.views, self.blank(len(batch))
        try:
            return batch.views, self._run(batch, stream)
        except RuntimeError:
            self.pipe = self._build()
            return self._one_by_one(batch, stream)

    def blank(self, n: int) -> torch.Tensor:
        """Zeros in the batch's shape: what stands in for a batch without one usable view (all flagged)."""
        device = f"cuda:{self.device_id}" if self.device == "gpu" else "cpu"
        return torch.zeros(vp.output_shape(self.config, n), device=device)

    def _build(self):
        return vp.build(self.config, self.device, self.batch_size, self.num_threads, self.device_id, self.seed)

    def _run(self, batch: HostBatch, stream) -> torch.Tensor:
        views = batch.views
        vp.feed(self.pipe, self.config, list(batch.encoded), batch.frames, views.roi, views.mirror, views.augment)
        (out,) = self.pipe.run(stream)
        # No copy: DALI's dynamic executor gives every run fresh buffers, alive while referenced; on the
        # GPU, DLPack makes the current (driver's) stream wait for DALI's work.
        return torch.from_dlpack(out.as_tensor())

    def _one_by_one(self, batch: HostBatch, stream) -> tuple[Views, torch.Tensor]:
        """Each view alone, to find the ones that cannot be decoded; those are replaced by flagged copies."""
        outputs = []
        for i in range(len(batch)):
            row = int(batch.views.rows[i])
            try:
                outputs.append(self._view(batch.one(i), stream))
            except RuntimeError as e:
                self.pipe = self._build()
                self.state.record(row, SampleError("decode", dali_reason(e)))
                outputs.append(None)
            except SampleError as e:     # the bytes of a rejected cut could not be read again
                self.state.record(row, e)
                outputs.append(None)
        good = [i for i, out in enumerate(outputs) if out is not None]
        if not good:
            return batch.views.take(np.arange(len(batch)), np.zeros(len(batch), bool)), self.blank(len(batch))
        source = [i if out is not None else good[-1] for i, out in enumerate(outputs)]
        valid = np.array([bool(batch.views.valid[i]) and out is not None for i, out in enumerate(outputs)])
        return batch.views.take(source, valid), torch.cat([outputs[i] for i in source])

    def _view(self, one: HostBatch, stream) -> torch.Tensor:
        """One view; if its GOP cut is rejected, the whole video, and no more cuts if that decodes."""
        try:
            return self._run(one, stream)
        except RuntimeError as e:
            if not one.cut[0]:
                raise
            self.pipe = self._build()
            data = self.whole(int(one.views.rows[0]))
            frames = None if one.views.frames is None else one.views.frames.astype(np.int32)
            out = self._run(HostBatch(one.views, (np.frombuffer(data, np.uint8),), frames, np.zeros(1, bool)), stream)
            self.state.stop_cutting(dali_reason(e))
            return out


def dali_reason(error: BaseException) -> str:
    """The line of a DALI error that says what went wrong (it follows "encountered:")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1:]
    return (lines[0] if lines else type(error).__name__)[:300]
