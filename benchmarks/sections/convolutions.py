"""Section 3b (CPU): the model step's convolutions alone, forward, input gradient and weight gradient
timed apart. What the convolution library reaches on this machine, and so the most a whole step can.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.common import MATMUL, SIZE, Table, alternate, fmt_rate, of_matmul, sync
from ignite_fixmatch.models import build_model


@dataclass(frozen=True)
class ConvShape:
    """One convolution of the model as it runs in a step: its input shape and its parameters."""
    x: tuple[int, ...]
    w: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    first: bool  # the stem: its input (the images) needs no gradient

    def gflop(self) -> float:
        """One pass (forward, input gradient or weight gradient): 2 * multiply-adds."""
        n, _, h, w = self.x
        co, ci, kh, kw = self.w
        ho, wo = (h + 2 * self.padding[0] - kh) // self.stride[0] + 1, (w + 2 * self.padding[1] - kw) // self.stride[1] + 1
        return 2 * n * co * ci * kh * kw * ho * wo / 1e9


def model_convolutions(model: torch.nn.Module, x: torch.Tensor) -> list[ConvShape]:
    """Every Conv2d call of one forward (hooks on the real model), in order."""
    shapes: list[ConvShape] = []

    def hook(module: torch.nn.Conv2d, args: tuple) -> None:
        shapes.append(ConvShape(tuple(args[0].shape), tuple(module.weight.shape), module.stride, module.padding, not shapes))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return shapes


def bench_convolutions(table: Table, device: torch.device, b: int, mu: int, rounds: int, matmul: Callable[[], float]) -> None:
    """The convolutions of one WRN-28-2 step alone, channels_last fp32 (the CPU default), each pass timed
    apart: what the convolution library reaches, and so the most a whole step could reach."""
    images = b * (1 + 2 * mu)
    section = f"3b. the model step's convolutions alone ({images} images, channels_last, fp32, {torch.get_num_threads()} threads)"
    torch.manual_seed(0)
    cl = torch.channels_last
    model = build_model("wrn", 10).to(device).to(memory_format=cl)
    convs = model_convolutions(model, torch.randn(images, 3, SIZE, SIZE, device=device).contiguous(memory_format=cl))
    tensors = []
    for c in convs:
        x = torch.randn(c.x, device=device).contiguous(memory_format=cl)
        w = torch.randn(c.w, device=device).contiguous(memory_format=cl)
        y = torch.ops.aten.convolution(x, w, None, c.stride, c.padding, [1, 1], False, [0, 0], 1)
        tensors.append((x, w, torch.randn_like(y)))

    def one_pass(kind: str) -> Callable[[], float]:
        def run() -> float:
            work, t0 = 0.0, time.perf_counter()
            for c, (x, w, gy) in zip(convs, tensors):
                if kind == "forward":
                    torch.ops.aten.convolution(x, w, None, c.stride, c.padding, [1, 1], False, [0, 0], 1)
                elif kind == "input gradient" and c.first:
                    continue  # the images need no gradient: the step skips this pass too
                else:
                    mask = [kind == "input gradient", kind == "weight gradient", False]
                    torch.ops.aten.convolution_backward(gy, x, w, None, c.stride, c.padding, [1, 1], False, [0, 0], 1, mask)
                work += c.gflop()
            sync(device)
            return work / (time.perf_counter() - t0)
        return run

    kinds = ("forward", "input gradient", "weight gradient")
    for kind in kinds:
        one_pass(kind)()  # warm-up: the library picks and caches its kernels
    results = alternate({**{k: one_pass(k) for k in kinds}, MATMUL: matmul}, rounds)
    mm = results.pop(MATMUL)
    table.add(section, MATMUL, fmt_rate(mm, "GFLOP/s"), "measured between the passes")
    for kind, rates in results.items():
        share = statistics.median(r / m for r, m in zip(rates, mm))
        table.add(section, f"{kind} ({len(convs)} convolutions)", fmt_rate(rates, "GFLOP/s"), f"{share:.0%} of matmul")
    work = {k: sum(c.gflop() for c in convs if not (k == "input gradient" and c.first)) for k in kinds}
    seconds = [sum(work[k] / results[k][r] for k in kinds) for r in range(rounds)]
    ceiling = [images / t for t in seconds]
    table.add(
        section, "all three passes: a step with nothing but its convolutions", fmt_rate(ceiling),
        f"{of_matmul(ceiling, mm)}: the ceiling of a whole step on this library ({sum(work.values()) / images:.3f} GFLOP per image in convolutions)",
    )
