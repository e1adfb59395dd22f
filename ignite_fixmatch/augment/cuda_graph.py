"""Replay a fixed-shape GPU function as one CUDA graph: one launch instead of hundreds.

The batched augmentation issues a few hundred small kernels per step; on a fast GPU the host cannot
issue them as fast as the GPU runs them. A CUDA graph records them once and replays them with a
single call. The kernels are the same, so the results are the same bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

Batch = Mapping[str, Tensor]

logger = logging.getLogger(__name__)


class CudaGraphed:
    """``fn(batch) -> dict of tensors`` replayed from a CUDA graph once its input shapes are known.

    The first ``warmup`` calls run eagerly (they fill caches and pick kernels), the next one records
    the graph. A batch whose keys, shapes, dtypes or device differ from the recorded one runs eagerly.
    If recording fails (an operation that cannot be captured), every later call runs eagerly and the
    reason is logged once. The outputs live in the graph's memory and are overwritten by the next
    call: use them before calling again (the trainer does, within one step).
    """

    def __init__(self, fn: Callable[[Batch], dict[str, Tensor]], warmup: int = 3) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 eager call before recording, got {warmup!r}")
        self.fn, self.warmup = fn, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.signature: tuple | None = None
        self.static_in: dict[str, Tensor] = {}
        self.static_out: dict[str, Tensor] = {}

    @staticmethod
    def _signature(batch: Batch) -> tuple:
        return tuple((k, tuple(v.shape), v.dtype, v.device, v.stride()) for k, v in sorted(batch.items()))

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        cuda = all(v.is_cuda for v in batch.values())
        if self.failed or not cuda:
            return self.fn(batch)
        if self.graph is None:
            self.calls += 1
            if self.calls <= self.warmup:
                return self.fn(batch)
            self._record(batch)
            if self.graph is None:
                return self.fn(batch)
        if self._signature(batch) != self.signature:
            return self.fn(batch)
        for key, value in batch.items():
            self.static_in[key].copy_(value, non_blocking=True)
        self.graph.replay()
        return dict(self.static_out)

    def _record(self, batch: Batch) -> None:
        self.signature = self._signature(batch)
        self.static_in = {k: v.clone() for k, v in batch.items()}
        graph = torch.cuda.CUDAGraph()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up on a side stream, as torch's docs ask before capture
                self.fn(self.static_in)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                self.static_out = self.fn(self.static_in)
        except RuntimeError as e:
            self.failed, self.static_in, self.static_out = True, {}, {}
            logger.warning("CUDA graph of %s not recorded (%s); it runs eagerly.", getattr(self.fn, "__name__", self.fn), e)
            return
        self.graph = graph
