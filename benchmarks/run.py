"""One command, one table: ``python -m benchmarks.run [--quick] [--device auto|cpu|cuda] [--compile auto|on|off]``.

Sections (each a block of the table):

1. machine: CPU/GPU, threads, load average, and the fp32 matrix-multiply rate (the 100 % mark);
2. augmentation, per core (one thread, images per CPU-second of that thread): the per-image PIL path
   against the batched uint8 tensor path, same draws, weak and strong views, and a whole unlabeled
   sample (weak + strong from a uint8 array, as the data set produces it); and the number of kernels
   one step's augmentation launches on the device path (what its time is on a GPU);
3. model step: WRN-28-2 forward + backward + SGD over labeled + weak + strong in one forward
   (1:7:7), NCHW vs channels_last, eager vs torch.compile, fp32 vs bf16 where the hardware has it,
   as images/s and as a fraction of the matmul rate (1.285 GFLOP per 32x32 image);
3b. (CPU) the same step's convolutions alone, forward, input gradient and weight gradient timed apart:
   the convolution library's rate, and so the most a whole step can reach on this machine;
4. full training step through our Engine, data included: a reference-style step (NCHW, eager,
   fp32, per-image PIL augmentation) against ours (channels_last, batched augmentation, compile
   when on);
5. framework overhead: a tiny model through a bare loop, our Engine, and our Engine with the
   default handlers, in microseconds per iteration.

Timings on a shared machine are noisy: contenders alternate within each round and the table gives
medians over rounds (and the spread); the load average before and after is printed.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import functools
import gc
import itertools
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from ignite_fixmatch import augment as A
from ignite_fixmatch import augment_batched as B
from ignite_fixmatch.config import ModelConfig
from ignite_fixmatch.cuda_graph import CudaGraphed
from ignite_fixmatch.data import UNLABELED, hash_seed
from ignite_fixmatch.fixmatch import create_trainer, fixmatch_forward, parameter_groups
from ignite_fixmatch.models import build_model

COMPILE_MODE = ModelConfig().compile_mode  # the trainer's default (reduce-overhead: CUDA graphs on a GPU)
GFLOP_PER_IMAGE = 1.285  # WRN-28-2, one 32x32 image, forward + backward
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
PAD, SIZE = 4, 32


# ---------------------------------------------------------------- table


@dataclass
class Table:
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)

    def add(self, section: str, item: str, value: str, note: str = "") -> None:
        self.rows.append((section, item, value, note))
        print(f"  [{section}] {item}: {value} {note}", file=sys.stderr, flush=True)

    def render(self) -> str:
        widths = [max(len(r[i]) for r in self.rows) for i in range(3)]
        out, last = [], None
        for section, item, value, note in self.rows:
            if section != last:
                out.append(f"\n{section}")
                last = section
            out.append(f"  {item:<{widths[1]}}  {value:>{widths[2]}}  {note}".rstrip())
        return "\n".join(out)


def fmt_rate(values: list[float], unit: str = "img/s") -> str:
    """Median and spread of per-round rates."""
    med = statistics.median(values)
    if len(values) > 1:
        return f"{med:,.0f} {unit} ({min(values):,.0f}-{max(values):,.0f})"
    return f"{med:,.0f} {unit}"


def alternate(contenders: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run every contender once per round, in turn; each returns its own rate for that round."""
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            results[name].append(fn())
    return results


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Temporarily run torch on n threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- machine


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_bf16() -> bool:
    """bf16 arithmetic in hardware (AVX512-BF16 or AMX); without it CPU bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_supported(device: torch.device) -> bool:
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()


def matmul_gflops(device: torch.device, n: int, rounds: int) -> list[float]:
    """fp32 square matmul rate, GFLOP/s per round (TF32 off on CUDA: this is the fp32 mark)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    c = torch.empty(n, n, device=device)
    inner = max(1, int(2e11 // (2 * n**3))) if device.type == "cuda" else max(1, int(4e10 // (2 * n**3)))
    torch.mm(a, b, out=c)
    sync(device)
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=c)
        sync(device)
        rates.append(2 * n**3 * inner / (time.perf_counter() - t0) / 1e9)
    return rates


MATMUL = "fp32 matmul in the same rounds"


def of_matmul(rates: list[float], matmul_rates: list[float]) -> str:
    """Work rate as a share of the matmul rate measured in the same round (a shared machine's speed drifts)."""
    return f"{statistics.median(r * GFLOP_PER_IMAGE / m for r, m in zip(rates, matmul_rates)):.0%} of matmul"


# ---------------------------------------------------------------- synthetic data


def image_pool(n: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, 32, 32, 3) images with smooth structure plus noise (not flat, not pure noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g) * 255
    img = torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    img = img + torch.randn(n, 3, SIZE, SIZE, generator=g) * 12
    return img.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


class Views:
    """The PIL views and their batched twins, reference RandAugment, constant padding (the defaults)."""

    def __init__(self, variant: str = "reference") -> None:
        self.weak_pil = A.WeakView(PAD, "constant", True, MEAN, STD)
        self.strong_pil = A.StrongView(variant, PAD, "constant", True, MEAN, STD)
        self.weak = B.BatchedView(None, PAD, "constant", True)
        self.strong = B.BatchedView(variant, PAD, "constant", True)


def pil_unlabeled_batch(pool: np.ndarray, positions: range, views: Views, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """What AugmentedDataset + collate do today, per sample: PIL image, seeded generator, weak then strong."""
    ws, ss = [], []
    for p in positions:
        img = Image.fromarray(pool[p % len(pool)])
        rng = random.Random(hash_seed(seed, UNLABELED, p))
        ws.append(views.weak_pil(img, rng))
        ss.append(views.strong_pil(img, rng))
    return torch.stack(ws), torch.stack(ss)


def batched_unlabeled_params(pool_t: torch.Tensor, positions: range, views: Views, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batched path's host side: the same per-sample generators, drawing parameters only."""
    rows_w, rows_s = [], []
    for p in positions:
        rng = random.Random(hash_seed(seed, UNLABELED, p))
        rows_w.append(views.weak.sample(rng, (SIZE, SIZE)))
        rows_s.append(views.strong.sample(rng, (SIZE, SIZE)))
    idx = torch.tensor([p % len(pool_t) for p in positions])
    return pool_t.index_select(0, idx), torch.tensor(rows_w, dtype=torch.float64), torch.tensor(rows_s, dtype=torch.float64)


# ---------------------------------------------------------------- 2. augmentation


def bench_augmentation(table: Table, device: torch.device, n: int, rounds: int) -> None:
    section = f"2. augmentation, per core (1 thread, {n} images a batch; images per CPU-second)"
    pool = image_pool(max(n, 512))
    pool_t = torch.from_numpy(pool).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW, as the batched path keeps it
    imgs = [Image.fromarray(pool[i]) for i in range(n)]
    seeds = [hash_seed(0, UNLABELED, i) for i in range(n)]

    def cpu_rate(fn: Callable[[], Any]) -> Callable[[], float]:
        def run() -> float:
            t0 = time.thread_time()
            fn()
            return n / (time.thread_time() - t0)
        return run

    results: dict[str, list[float]] = {}
    pairs = []
    with threads(1):
        for variant in A.VARIANTS:
            v = Views(variant)

            def pil_strong(v=v) -> torch.Tensor:
                return torch.stack([v.strong_pil(img, random.Random(s)) for img, s in zip(imgs, seeds)])

            def batched_strong(v=v) -> torch.Tensor:
                params = torch.tensor([v.strong.sample(random.Random(s), (SIZE, SIZE)) for s in seeds], dtype=torch.float64)
                return B.normalize(v.strong(pool_t[:n], params), MEAN, STD)

            a, b = f"strong ({variant}), PIL per image", f"strong ({variant}), batched tensor"
            results.update(alternate({a: cpu_rate(pil_strong), b: cpu_rate(batched_strong)}, rounds))
            pairs.append((a, b))
        v = Views("reference")

        def pil_weak() -> torch.Tensor:
            return torch.stack([v.weak_pil(img, random.Random(s)) for img, s in zip(imgs, seeds)])

        def batched_weak() -> torch.Tensor:
            params = torch.tensor([v.weak.sample(random.Random(s), (SIZE, SIZE)) for s in seeds], dtype=torch.float64)
            return B.normalize(v.weak(pool_t[:n], params), MEAN, STD)

        def pil_sample() -> Any:
            return pil_unlabeled_batch(pool, range(n), v)

        def batched_sample() -> Any:
            x, pw, ps = batched_unlabeled_params(pool_t, range(n), v)
            return B.normalize(v.weak(x, pw), MEAN, STD), B.normalize(v.strong(x, ps), MEAN, STD)

        a, b = "weak, PIL per image", "weak, batched tensor"
        results.update(alternate({a: cpu_rate(pil_weak), b: cpu_rate(batched_weak)}, rounds))
        pairs.append((a, b))
        a, b = "unlabeled sample (uint8 array -> weak + strong), PIL path", "unlabeled sample, batched path"
        results.update(alternate({a: cpu_rate(pil_sample), b: cpu_rate(batched_sample)}, rounds))
        pairs.append((a, b))
    for a, b in pairs:
        table.add(section, a, fmt_rate(results[a]))
        speedup = statistics.median(x / y for x, y in zip(results[b], results[a]))
        table.add(section, b, fmt_rate(results[b]), f"{speedup:.1f}x the PIL path")
    table.add(
        section, "device path (data.augment=device): kernels of one step's augmentation", f"{augmentation_kernels():,}",
        "64 + 448 weak, 448 strong; operators counted on the meta device (953 before the one-pass slots)",
    )
    if device.type == "cuda":
        bench_augmentation_cuda(table, device, pool_t, n * 4, rounds)


class KernelCount(TorchDispatchMode):
    """Counts the operators that would each launch a device kernel: everything dispatched but views and
    allocations (on a GPU a CUDA graph replays exactly these, so their number bounds its time there)."""

    NO_KERNEL = frozenset({"empty", "empty_strided", "scalar_tensor", "lift_fresh", "detach", "alias", "_unsafe_view", "_local_scalar_dense"})

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - the dispatch protocol
        name = func.overloadpacket.__name__
        if not func.is_view and name not in self.NO_KERNEL:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def augmentation_kernels(b: int = 64, mu: int = 7, variant: str = "reference") -> int:
    """Kernels of one step's batched augmentation on the device path (data.augment=device): weak views of
    b + b*mu images and the strong view of b*mu, normalised. Run on the meta device: no pixels, and a host
    read of device data inside the path would raise there, so it also shows that the path never syncs."""
    aug = B.BatchedAugment(variant, PAD, "constant", True, MEAN, STD, channels_last=True)
    g = torch.Generator().manual_seed(0)
    batch = {
        "x": torch.empty(b, 3, SIZE, SIZE, dtype=torch.uint8), "y": torch.zeros(b, dtype=torch.long),
        "x_weak": aug.weak.sample_torch(b, (SIZE, SIZE), g), "u": torch.empty(b * mu, 3, SIZE, SIZE, dtype=torch.uint8),
        "u_weak": aug.weak.sample_torch(b * mu, (SIZE, SIZE), g), "u_strong": aug.strong.sample_torch(b * mu, (SIZE, SIZE), g),
        "u_y": torch.zeros(b * mu, dtype=torch.long),
    }
    batch = {k: v.to("meta") for k, v in batch.items()}
    with KernelCount() as count:
        aug(batch)
    return count.total


def bench_augmentation_cuda(table: Table, device: torch.device, pool_t: torch.Tensor, n: int, rounds: int) -> None:
    """Batched strong view on the GPU, parameters drawn there by a torch.Generator (nothing on the host)."""
    section = f"2b. augmentation on {torch.cuda.get_device_name(device)} ({n} images a batch, wall clock)"
    v = Views("reference")
    x = pool_t[torch.arange(n) % len(pool_t)].to(device)
    g = torch.Generator(device=device).manual_seed(0)

    def gpu_strong() -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            params = v.strong.sample_torch(n, (SIZE, SIZE), g)
            B.normalize(v.strong(x, params), MEAN, STD, memory_format=torch.channels_last)
        sync(device)
        return 10 * n / (time.perf_counter() - t0)

    gpu_strong()
    table.add(section, "strong (reference), batched on the GPU", fmt_rate(alternate({"g": gpu_strong}, rounds)["g"]))


# ---------------------------------------------------------------- 3. model step


@dataclass
class StepConfig:
    channels_last: bool
    compiled: bool
    bf16: bool

    @property
    def name(self) -> str:
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{layout}, {'compile' if self.compiled else 'eager'}, {'bf16' if self.bf16 else 'fp32'}"


def make_model(cfg: StepConfig, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    """(module to call, parameters' owner, optimizer) with the trainer's settings."""
    torch.manual_seed(0)
    model = build_model("wrn", 10).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(parameter_groups(model, 5e-4, "reference"), lr=0.03, momentum=0.9, nesterov=True)
    call = torch.compile(model, mode=COMPILE_MODE) if cfg.compiled else model
    return call, model, optimizer


def fixmatch_batch(b: int, mu: int, device: torch.device, channels_last: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def imgs(k: int) -> torch.Tensor:
        return torch.randn(k, 3, SIZE, SIZE, generator=g).to(device).contiguous(memory_format=fmt)

    return {"x": imgs(b), "y": torch.randint(0, 10, (b,), generator=g).to(device), "u_w": imgs(b * mu), "u_s": imgs(b * mu)}


def step_fn(call: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, device: torch.device, bf16: bool) -> Callable[[], None]:
    """One FixMatch update: one forward over labeled + weak + strong, losses, backward, SGD."""
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> None:
        torch.compiler.cudagraph_mark_step_begin()  # as the trainer does: a new step for reduce-overhead's graphs
        with amp:
            out = fixmatch_forward(
                call, batch["x"], batch["y"], batch["u_w"], batch["u_s"],
                threshold=0.95, lambda_u=1.0, hard_label=True, T=1.0, use_interleave=False,
            )
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()

    return step


def bench_model_step(table: Table, device: torch.device, b: int, mu: int, steps: int, rounds: int, compile_on: bool, matmul: Callable[[], float]) -> dict[str, list[float]]:
    images = b * (1 + 2 * mu)
    section = f"3. model step: WRN-28-2, batch {b}+{b * mu}+{b * mu} = {images} images, {torch.get_num_threads()} threads"
    configs = [StepConfig(cl, False, False) for cl in (False, True)]
    if compile_on:  # compiling takes minutes on a small CPU: only the layout that wins eagerly
        configs.append(StepConfig(True, True, False))
    if bf16_supported(device):
        configs += [StepConfig(True, c, True) for c in ((False, True) if compile_on else (False,))]
    else:
        table.add(section, "bf16", "skipped", "no bf16 hardware (AVX512-BF16/AMX); emulated bf16 is slower than fp32")
    contenders: dict[str, Callable[[], float]] = {}
    for cfg in configs:
        call, _, optimizer = make_model(cfg, device)
        step = step_fn(call, optimizer, fixmatch_batch(b, mu, device, cfg.channels_last), device, cfg.bf16)
        t0 = time.perf_counter()
        try:
            step()
            step()
            sync(device)
        except Exception as e:  # noqa: BLE001 - a config this machine cannot run (e.g. compile without a compiler) is a result
            table.add(section, cfg.name, "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        if cfg.compiled:
            table.add(section, f"{cfg.name}: compile + 2 warm-up steps", f"{time.perf_counter() - t0:.0f} s")

        def run(step: Callable[[], None] = step) -> float:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            return steps * images / (time.perf_counter() - t0)

        contenders[cfg.name] = run
    contenders[MATMUL] = matmul
    results = alternate(contenders, rounds)
    mm = results.pop(MATMUL)
    table.add(section, MATMUL, fmt_rate(mm, "GFLOP/s"), "measured between the steps: each round's own 100 % mark")
    base = results.get(StepConfig(False, False, False).name)
    for name, rates in results.items():
        note = of_matmul(rates, mm)
        if base and name != StepConfig(False, False, False).name:
            note += f", {statistics.median(r / s for r, s in zip(rates, base)):.2f}x NCHW eager fp32"
        table.add(section, name, fmt_rate(rates), note)
    return results


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


# ---------------------------------------------------------------- 4. full training step through the Engine


def pil_stream(pool: np.ndarray, b: int, mu: int, views: Views) -> Iterator[dict[str, torch.Tensor]]:
    """Reference-style data: every image through PIL, one at a time, in the training process."""
    for step in itertools.count():
        lab = range(step * b, (step + 1) * b)
        x = torch.stack([views.weak_pil(Image.fromarray(pool[p % len(pool)]), random.Random(hash_seed(0, 0, p))) for p in lab])
        u_w, u_s = pil_unlabeled_batch(pool, range(step * b * mu, (step + 1) * b * mu), views)
        yield {"x": x, "y": torch.zeros(b, dtype=torch.long), "u_w": u_w, "u_s": u_s, "u_y": torch.zeros(b * mu, dtype=torch.long)}


def batched_stream(pool_t: torch.Tensor, b: int, mu: int, views: Views) -> Iterator[dict[str, torch.Tensor]]:
    """Our data (data.augment=batched): uint8 images and per-sample draws; BatchedAugment augments on the device."""
    for step in itertools.count():
        lab = range(step * b, (step + 1) * b)
        rows = [views.weak.sample(random.Random(hash_seed(0, 0, p)), (SIZE, SIZE)) for p in lab]
        u, pw, ps = batched_unlabeled_params(pool_t, range(step * b * mu, (step + 1) * b * mu), views)
        labeled = (pool_t.index_select(0, torch.tensor([p % len(pool_t) for p in lab])), torch.tensor(rows, dtype=torch.float64), torch.zeros(b, dtype=torch.long))
        yield B.BatchedAugment.batch(labeled, (u, pw, ps, torch.zeros(b * mu, dtype=torch.long)))


def make_trainer(cfg: StepConfig, device: torch.device, batch_transform: Optional[Callable] = None, compile_mode: str = COMPILE_MODE) -> Any:
    """Our Engine over a fresh WRN-28-2 with ``cfg``'s settings, compiled the way the trainer compiles."""
    _, model, optimizer = make_model(StepConfig(cfg.channels_last, False, cfg.bf16), device)
    return create_trainer(
        model, optimizer, device, threshold=0.95, lambda_u=1.0, hard_label=True, T=1.0,
        amp=cfg.bf16, amp_dtype="bfloat16", channels_last=cfg.channels_last, batch_transform=batch_transform,
        compile_model=cfg.compiled, compile_mode=compile_mode,
    )


def engine_images_per_s(trainer: Any, data: Iterator, iters: int, images: int, device: torch.device) -> float:
    """Images/s over the iterations after the first, timed by Engine events. The device is waited for
    only after the first and the last iteration: in between, the host runs ahead as in training. The
    trainer runs again from iteration 0 each call (Ignite restarts a finished run), keeping what it compiled."""
    from ignite.engine import Events

    marks: list[float] = []

    def _mark(engine: Any) -> None:
        if engine.state.iteration in (1, iters + 1):
            sync(device)
            marks.append(time.perf_counter())

    trainer.add_event_handler(Events.ITERATION_COMPLETED, _mark)
    trainer.state.max_epochs = trainer.state.max_iters = None  # Ignite: a new run from iteration 0
    try:
        trainer.run(data, max_iters=iters + 1, epoch_length=iters + 1)
    finally:
        trainer.remove_event_handler(_mark, Events.ITERATION_COMPLETED)
    return iters * images / (marks[-1] - marks[0])


def bench_full_step(table: Table, device: torch.device, b: int, mu: int, steps: int, rounds: int, compile_on: bool, matmul: Callable[[], float]) -> None:
    images = b * (1 + 2 * mu)
    section = f"4. full training step through our Engine, data included ({images} images, {torch.get_num_threads()} threads)"
    pool = image_pool(4096)
    pool_t = torch.from_numpy(pool).permute(0, 3, 1, 2).contiguous()
    views = Views("reference")
    ours = StepConfig(True, compile_on, bf16_supported(device))
    augment = B.BatchedAugment("reference", PAD, "constant", True, MEAN, STD, channels_last=True)
    if device.type == "cuda":  # the GPU default, data.augment=device
        ours_data, where = device_stream(pool_t.to(device), b, mu, views), "data set and augmentation (a CUDA graph) on the GPU"
        augment = CudaGraphed(augment)
    else:
        ours_data, where = batched_stream(pool_t, b, mu, views), "batched augmentation"
    setups = {
        "reference style: NCHW, eager, fp32, PIL per image": (StepConfig(False, False, False), None, pil_stream(pool, b, mu, views)),
        f"ours: {ours.name}, {where}": (ours, augment, ours_data),
    }
    contenders = {}
    for name, (cfg, transform, data) in setups.items():
        trainer = make_trainer(cfg, device, transform)  # compiled once, kept across rounds
        engine_images_per_s(trainer, data, 1, images, device)  # warm-up (and compile)

        def run(trainer=trainer, data=data) -> float:
            return engine_images_per_s(trainer, data, steps, images, device)

        contenders[name] = run
    contenders[MATMUL] = matmul
    results = alternate(contenders, rounds)
    mm = results.pop(MATMUL)
    table.add(section, MATMUL, fmt_rate(mm, "GFLOP/s"), "measured between the steps: each round's own 100 % mark")
    ref_name = next(iter(setups))
    for name, rates in results.items():
        note = of_matmul(rates, mm)
        if name != ref_name:
            note += f", {statistics.median(r / s for r, s in zip(rates, results[ref_name])):.2f}x reference style"
        table.add(section, name, fmt_rate(rates), note)


def device_stream(pool: torch.Tensor, b: int, mu: int, views: Views, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Our default data on a GPU (data.augment=device): images held on the device, gathered by index,
    parameters drawn there by a seeded torch.Generator; nothing per image on the host."""
    g = torch.Generator(device=pool.device)
    size = (pool.shape[3], pool.shape[2])
    for step in itertools.count():
        g.manual_seed(seed * 1_000_003 + step)
        lab = torch.randint(0, len(pool), (b,), device=pool.device, generator=g)
        unl = torch.randint(0, len(pool), (b * mu,), device=pool.device, generator=g)
        yield {
            "x": pool[lab], "x_weak": views.weak.sample_torch(b, size, g), "y": torch.zeros(b, dtype=torch.long, device=pool.device),
            "u": pool[unl], "u_weak": views.weak.sample_torch(b * mu, size, g), "u_strong": views.strong.sample_torch(b * mu, size, g),
            "u_y": torch.zeros(b * mu, dtype=torch.long, device=pool.device),
        }


def host_and_wall_ms(fn: Callable[[], Any], device: torch.device, iters: int) -> tuple[float, float]:
    """(host ms, wall ms) per call: host is the time to issue the work (the Python and launch cost),
    wall the time until the device has finished it. host close to wall: the step is launch-bound."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host = time.perf_counter() - t0
    sync(device)
    return host / iters * 1e3, (time.perf_counter() - t0) / iters * 1e3


def bench_step_parts(table: Table, device: torch.device, b: int, mu: int, iters: int, compile_on: bool) -> None:
    """Where one step's time goes on a GPU: each part alone, host (issue) time against wall time."""
    images = b * (1 + 2 * mu)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    section = f"4b. parts of one step on {where} ({images} images; ms per step: host issue / wall)"
    views = Views("reference")
    aug = B.BatchedAugment("reference", PAD, "constant", True, MEAN, STD, channels_last=True)
    pool = torch.from_numpy(image_pool(4096)).permute(0, 3, 1, 2).contiguous().to(device)
    data = device_stream(pool, b, mu, views)
    batch = next(data)
    graphed = CudaGraphed(aug)
    for _ in range(graphed.warmup + 2):
        replayed = graphed(batch)
    eager = aug(batch)
    same = all(torch.equal(replayed[k], eager[k]) for k in ("x", "u_w", "u_s"))
    parts: dict[str, Callable[[], Any]] = {
        "draws + gather (device data)": lambda: next(data),
        "augmentation (weak + weak + strong, eager)": lambda: aug(batch),
        f"augmentation as a CUDA graph ({'recorded' if graphed.graph is not None else 'NOT recorded'}, "
        f"{'bit-identical' if same else 'DIFFERENT'} to eager)": lambda: graphed(batch),
    }
    compiled_aug = torch.compile(aug.__call__, dynamic=False)  # one kernel set per view's batch shape
    try:
        compiled = compiled_aug(batch)
        keys = ("x", "u_w", "u_s")
        off = max((compiled[k] - eager[k]).abs().max().item() for k in keys)
        differing = sum((compiled[k] != eager[k]).sum().item() for k in keys) / sum(eager[k].numel() for k in keys)
        graphed_compiled = CudaGraphed(compiled_aug)
        parts[f"augmentation compiled (max |diff| from eager {off:.3g}, {differing:.3%} of values differ)"] = lambda: compiled_aug(batch)
        parts["augmentation compiled, as a CUDA graph"] = lambda: graphed_compiled(batch)
    except Exception as e:  # noqa: BLE001 - report what this torch cannot compile, time the rest
        table.add(section, "augmentation compiled", "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
    views_batch = {**aug(batch), "y": batch["y"]}
    call, model, optimizer = make_model(StepConfig(True, False, True), device)
    parts["model step (channels_last, eager, bf16)"] = step_fn(call, optimizer, views_batch, device, True)
    for mode in ("default", "reduce-overhead") if compile_on else ():
        _, model, optimizer = make_model(StepConfig(True, False, True), device)
        call = torch.compile(model, mode=None if mode == "default" else mode)
        parts[f"model step (channels_last, compile {mode}, bf16)"] = step_fn(call, optimizer, views_batch, device, True)
    ema = [p.detach().clone() for p in model.parameters()]
    live = [p.detach() for p in model.parameters()]
    parts["EMA update (one fused lerp)"] = lambda: torch._foreach_lerp_(ema, live, 0.001)
    for name, fn in parts.items():
        try:
            host, wall = host_and_wall_ms(fn, device, iters)
        except Exception as e:  # noqa: BLE001 - report the part this torch cannot run, time the rest
            table.add(section, name, "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        table.add(section, name, f"{host:.2f} / {wall:.2f} ms", f"{1e3 / wall:,.0f} per second alone")


# ---------------------------------------------------------------- 5. framework overhead


class TinyNet(torch.nn.Module):
    """Small enough that per-iteration overhead shows: one conv, pool, linear on 8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def attach_default_handlers(trainer: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, out_dir: Path, iters: int) -> list[Any]:
    """The handlers of a default run (config.default_handlers), attached as training() does; returns them.

    The progress handler is put in log mode (a batch job's log line, not a terminal's bar) so the
    result does not depend on where the benchmark's stdout goes. The test loader is never read: the
    benchmark stops the run before COMPLETED, the only event at which evaluation fires here."""
    from ignite_fixmatch.config import Config
    from ignite_fixmatch.plugins import Context, attach_all, build_handlers

    cfg = Config()
    cfg.train.num_iters = iters
    cfg.output_dir = str(out_dir)
    for spec in cfg.handlers:
        if spec.name == "progress":
            spec.params = {**spec.params, "mode": "log"}
    logger = logging.getLogger("benchmarks.overhead")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    out_dir.mkdir(parents=True, exist_ok=True)
    logger.handlers = [logging.FileHandler(out_dir / "train.log")]
    test = torch.utils.data.TensorDataset(torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (16,)))
    ctx = Context(
        trainer=trainer, model=model, optimizer=optimizer, config=cfg, output_dir=out_dir, logger=logger,
        loaders={"test": torch.utils.data.DataLoader(test, batch_size=16)}, device=device,
        data=SimpleNamespace(sources=SimpleNamespace(num_classes=10, mean=MEAN, std=STD)),
    )
    handlers = build_handlers(cfg.handlers)
    attach_all(handlers, ctx)
    return handlers


def close_loggers(handlers: list[Any]) -> None:
    """What the handlers' COMPLETED would close (the benchmark stops the run before COMPLETED)."""
    for h in handlers:
        if hasattr(h, "logger") and hasattr(h.logger, "close"):
            h.logger.close()
    for log_handler in logging.getLogger("benchmarks.overhead").handlers:
        log_handler.close()


def handler_settings(handlers: list[Any]) -> dict[str, Any]:
    """The defaults the same-work bare loop copies, read from the handler objects themselves."""
    by_type = {type(h).__name__: h for h in handlers}
    return {
        "decay": by_type["EMA"].decay, "warmup": by_type["CosineLR"].warmup_iters, "cycles": by_type["CosineLR"].cycles,
        "nan_every": getattr(by_type["StopOnNonFinite"], "every", 1), "tb_every": by_type["TensorBoard"].every, "log_every": by_type["Progress"].every,
    }


def bench_overhead(table: Table, device: torch.device, iters: int, rounds: int) -> None:
    """Four contenders, each a fresh model trained from the same seed on the same batches:

    - bare loop, update only: the update function called in a Python loop;
    - bare loop, same work: the loop also does by hand, with the same calls, what the default handlers
      do every iteration: the cosine lr set on each param group, the EMA by one ``torch._foreach_lerp_``
      (buffers shared), the loss copied into the NaN window and read every ``check_every``, the step
      metrics summed on the device by ``torch._foreach_add_`` and averaged into a log line every
      ``progress.every``, the scalars written to TensorBoard every ``tensorboard.every``. Evaluation
      and checkpoints (every 10000 and 1000 iterations) fire in neither;
    - our Engine, no handlers; our Engine + default handlers (the Engine paused by ``interrupt()``).

    On a shared machine the speed drifts by tens of percent within seconds, so the contenders run
    interleaved, 25 iterations at a time in rotating order, and each iteration is timed on its own
    (end of the previous one to its end; the first of each chunk, which spans the switch, is dropped;
    no device sync inside a chunk). Per round: the mean and the median iteration of each contender;
    each Engine row is compared with its loop (no handlers: update only; default handlers: same work)
    by the median over rounds of the per-round differences, so what remains is the Engine and the
    handler plumbing. Everything runs twice: with the real update, and with the update replaced by its
    cached output, where the plumbing is not buried in the noise of the step; percentages are of the
    real same-work step. Not attached here: the step timer and preemption guard of training()."""
    from ignite.engine import Events
    from ignite.handlers.tensorboard_logger import TensorboardLogger

    from handlers.cosine_lr import cosine_factor
    from handlers.progress import AVERAGED

    b, mu, chunk = 4, 7, 25
    iters = max(chunk * 3, iters - iters % chunk)
    section = f"5. framework overhead: tiny model, batch {b}+{b * mu}+{b * mu} of 8x8, {iters} iterations, 1 thread"
    g = torch.Generator().manual_seed(0)
    batches = [
        {"x": torch.randn(b, 3, 8, 8, generator=g), "y": torch.randint(0, 10, (b,), generator=g),
         "u_w": torch.randn(b * mu, 3, 8, 8, generator=g), "u_s": torch.randn(b * mu, 3, 8, 8, generator=g),
         "u_y": torch.randint(0, 10, (b * mu,), generator=g)}
        for _ in range(4)
    ]
    Stamps = list[tuple[float, float]]  # (wall, main-thread CPU) after each iteration of a chunk
    settings: dict[str, Any] = {}

    def make(handlers: bool, tmp: Path, cached: bool) -> tuple[Any, torch.nn.Module, torch.optim.Optimizer, list[Any]]:
        torch.manual_seed(0)
        model = TinyNet().to(device)
        optimizer = torch.optim.SGD(parameter_groups(model, 5e-4, "reference"), lr=0.03, momentum=0.9, nesterov=True)
        trainer = create_trainer(model, optimizer, device, threshold=0.95, lambda_u=1.0, hard_label=True, T=1.0)
        if cached:  # the update replaced by its output: what is left is the handlers and the plumbing
            out = trainer._process_function(trainer, batches[0])
            trainer._process_function = lambda engine, batch: out
        attached = attach_default_handlers(trainer, model, optimizer, device, tmp, iters) if handlers else []
        return trainer, model, optimizer, attached

    def clock() -> tuple[float, float]:
        return time.perf_counter(), time.thread_time()

    def loop(step: Callable[[int], None]) -> Iterator[Stamps]:
        for first in range(1, iters + 1, chunk):
            stamps: Stamps = []
            for it in range(first, first + chunk):
                step(it)
                stamps.append(clock())
            sync(device)  # after the chunk's last stamp: the next contender starts on an idle device
            yield stamps

    def bare(tmp: Path, cached: bool) -> Iterator[Stamps]:
        trainer, _, _, _ = make(False, tmp, cached)
        update, data = trainer._process_function, itertools.cycle(batches)
        yield from loop(lambda it: update(trainer, next(data)))

    def bare_same_work(tmp: Path, cached: bool) -> Iterator[Stamps]:
        trainer, model, optimizer, _ = make(False, tmp, cached)
        update, data = trainer._process_function, itertools.cycle(batches)
        groups, base_lrs = optimizer.param_groups, [g["lr"] for g in optimizer.param_groups]
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        pairs = ([p.data for p in ema.parameters()], [p.data for p in model.parameters()])
        for e, m in zip(ema.buffers(), model.buffers()):
            e.data = m.data  # "copy" buffers: shared, as the EMA handler does at its first update
        momentum = 1.0 - settings["decay"]
        window = torch.empty(settings["nan_every"], device=device)
        slots, nan_count = list(window.unbind()), [0]
        sums: list[list[torch.Tensor]] = [[]]
        tmp.mkdir(parents=True, exist_ok=True)
        tb = TensorboardLogger(log_dir=str(tmp / "tensorboard"))
        logger = logging.getLogger(f"benchmarks.overhead.{tmp.name}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.handlers = [logging.FileHandler(tmp / "bare.log")]

        def step(it: int) -> None:
            factor = cosine_factor(it - 1, iters, settings["warmup"], settings["cycles"])
            for group, base in zip(groups, base_lrs):
                group["lr"] = base * factor
            out = update(trainer, next(data))
            torch._foreach_lerp_(pairs[0], pairs[1], momentum)
            slots[nan_count[0]].copy_(out["loss"].detach())
            nan_count[0] += 1
            if nan_count[0] == settings["nan_every"]:
                if not bool(torch.isfinite(window).all()):
                    raise FloatingPointError(f"non-finite loss before iteration {it}")
                nan_count[0] = 0
            values = [out[k].detach() for k in AVERAGED]
            if sums[0]:
                torch._foreach_add_(sums[0], values)
            else:
                sums[0] = [v.clone() for v in values]
            if it % settings["tb_every"] == 0:
                for key, value in out.items():
                    tb.writer.add_scalar(f"train/{key}", float(value), it)
            if it % settings["log_every"] == 0:
                means = (torch.stack(sums[0]) / settings["log_every"]).tolist()
                sums[0] = []
                logger.info("iteration %d/%d  loss %.4f  loss_x %.4f  loss_u %.4f  mask_rate %.3f  lr %.5f", it, iters, *means, out["lr"])

        try:
            yield from loop(step)
        finally:
            tb.close()
            for log_handler in logger.handlers:
                log_handler.close()

    def engine(handlers: bool, tmp: Path, cached: bool) -> Iterator[Stamps]:
        trainer, _, _, attached = make(handlers, tmp, cached)
        stamps: Stamps = []

        @trainer.on(Events.ITERATION_COMPLETED)  # the last handler; not (every=...): an event filter costs 2 us per iteration
        def _mark(engine: Any) -> None:
            stamps.append(clock())
            if engine.state.iteration == iters:  # no COMPLETED: its evaluation and final checkpoint are not timed
                engine.terminate(skip_completed=True)
            elif engine.state.iteration % chunk == 0:
                engine.interrupt()  # run() resumes at the next iteration

        data = itertools.cycle(batches)
        try:
            while len(stamps) < iters:
                done = len(stamps)
                trainer.run(data, max_iters=iters, epoch_length=iters)
                sync(device)
                yield stamps[done:]
        finally:
            close_loggers(attached)

    def one_round(contenders: dict[str, Callable[[], Iterator[Stamps]]], r: int) -> dict[str, tuple[float, float, float]]:
        """All contenders side by side, a chunk each in turn; per contender: mean wall, median wall, median CPU (us)."""
        gc.collect()
        names = list(contenders)
        names = names[r % len(names):] + names[: r % len(names)]
        running = {name: contenders[name]() for name in names}
        deltas: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        k = 0
        while running:
            for name in [n for n in names if n in running]:
                try:
                    stamps = next(running[name])
                except StopIteration:
                    del running[name]
                    continue
                if k >= 1:  # the first chunk is warm-up
                    deltas[name] += [((b[0] - a[0]) * 1e6, (b[1] - a[1]) * 1e6) for a, b in zip(stamps, stamps[1:])]
            k += 1
        return {
            name: (statistics.fmean(w for w, _ in d), statistics.median(w for w, _ in d), statistics.median(c for _, c in d))
            for name, d in deltas.items()
        }

    bare_name, same_name = "bare loop: update only", "bare loop: update + the default handlers' work by hand"
    engine_name, handlers_name = "our Engine, no handlers", "our Engine + default handlers"
    baselines = {engine_name: bare_name, same_name: bare_name, handlers_name: same_name}
    results: dict[bool, dict[str, list[tuple[float, float, float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        fresh = lambda prefix: tmp / f"{prefix}{time.monotonic_ns()}"  # noqa: E731  a new run folder each time
        contenders: dict[str, Callable[[bool], Iterator[Stamps]]] = {
            bare_name: lambda c: bare(tmp, c), engine_name: lambda c: engine(False, tmp, c),
        }
        try:
            _, _, _, attached = make(True, tmp / "probe", False)
            close_loggers(attached)
            settings.update(handler_settings(attached))
            contenders[same_name] = lambda c: bare_same_work(fresh("b"), c)
            contenders[handlers_name] = lambda c: engine(True, fresh("h"), c)
        except Exception as e:  # noqa: BLE001 - report which handler could not be built here, measure the rest
            table.add(section, handlers_name, "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
        with threads(1):  # per-iteration Python cost; one thread keeps a tiny model's kernels from thrashing
            for cached in (False, True):
                per_round = [one_round({n: functools.partial(fn, cached) for n, fn in contenders.items()}, r) for r in range(rounds)]
                results[cached] = {name: [pr[name] for pr in per_round] for name in contenders}
    step_name = same_name if same_name in results[False] else bare_name
    real_step = [statistics.median(t[i] for t in results[False][step_name]) for i in range(3)]
    for cached, by_name in results.items():
        for name, values in by_name.items():
            mean = [t[0] for t in values]
            note = ""
            against = baselines.get(name)
            if against in by_name:  # paired by round: interleaved, under the same load
                d = [statistics.median(v[i] - b[i] for v, b in zip(values, by_name[against])) for i in range(3)]
                what = "the handlers' work" if name == same_name else "framework overhead"
                note = (
                    f"{what} over '{against}': mean {d[0]:+.1f} us ({d[0] / real_step[0]:+.1%}); median iteration "
                    f"{d[1]:+.1f} us ({d[1] / real_step[1]:+.1%}) wall, {d[2]:+.1f} us ({d[2] / real_step[2]:+.1%}) CPU"
                )
            label = f"{name}, cached update" if cached else name
            table.add(section, label, f"{statistics.median(mean):,.1f} us/it ({min(mean):,.0f}-{max(mean):,.0f})", note)
    table.add(
        section, f"(us/it: mean of a run, median of {rounds} runs (range); % of the real step",
        f"mean {real_step[0]:,.0f}, median iteration {real_step[1]:,.0f} wall / {real_step[2]:,.0f} CPU us",
        f"'{step_name}'; differences: medians of paired rounds)",
    )
    table.add(section, "Engine event loop alone (empty update)", f"{engine_floor_us():.1f} us/it", "what Ignite itself adds per iteration")


def engine_floor_us(iters: int = 5000) -> float:
    """Per-iteration cost of the Engine with an update that does nothing."""
    from ignite.engine import Engine, Events

    trainer, marks = Engine(lambda engine, batch: batch), {}

    @trainer.on(Events.ITERATION_COMPLETED(once=10) | Events.ITERATION_COMPLETED(once=iters))
    def _mark(engine: Any) -> None:
        marks[engine.state.iteration] = time.perf_counter()

    trainer.run(itertools.cycle([0]), max_iters=iters, epoch_length=iters)
    return (marks[iters] - marks[10]) / (iters - 10) * 1e6


# ---------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller batches, fewer rounds, no compile: about a minute")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="auto: on, except with --quick")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the model (default: torch's, the core count)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds per comparison (default 3, quick 2)")
    parser.add_argument("--labeled", type=int, default=None, help="labeled images per step (x 15 in all; default 4 on CPU, 64 on GPU, quick 2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the table rows here")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: aug,model,conv,full,parts,overhead")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    quick, gpu = args.quick, device.type == "cuda"
    rounds = args.rounds or (2 if quick else 4)
    compile_on = args.compile == "on" or (args.compile == "auto" and not quick)
    b = args.labeled or (64 if gpu else (2 if quick else 4))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if gpu:
        torch.backends.cudnn.benchmark = True

    table = Table()
    machine = "1. machine"
    table.add(machine, "CPU", f"{cpu_name()}, {os.cpu_count()} cores", f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}")
    table.add(machine, "torch threads", str(torch.get_num_threads()), f"bf16 hardware: {'yes' if bf16_supported(device) else 'no'}")
    if gpu:
        table.add(machine, "GPU", torch.cuda.get_device_name(device))
    table.add(machine, "load average at start", " ".join(f"{x:.1f}" for x in os.getloadavg()), "shared machine: medians over alternating rounds")
    n = 4096 if gpu else (1024 if quick else 2048)
    mm = matmul_gflops(device, n, rounds * 2)
    steps = 20 if gpu else (1 if quick else 2)  # timed steps per round of sections 3 and 4

    def matmul_round() -> float:
        """One round's matmul rate, measured among the contenders of sections 3 and 4."""
        return matmul_gflops(device, n, 1)[0]
    table.add(machine, f"fp32 matmul ({device.type}, {torch.get_num_threads()} threads)", fmt_rate(mm, "GFLOP/s"), "the 100 % mark (measured again within each section's rounds)")

    if "aug" not in skip:
        bench_augmentation(table, device, 448, rounds + 2)  # the unlabeled batch of a real run (64 x 7)
    if "model" not in skip:
        bench_model_step(table, device, b, 7, steps, rounds, compile_on, matmul_round)
    if "conv" not in skip and not gpu:
        bench_convolutions(table, device, b, 7, rounds, matmul_round)
    if "full" not in skip:
        bench_full_step(table, device, b, 7, steps, rounds, compile_on, matmul_round)
    if "parts" not in skip and gpu:
        bench_step_parts(table, device, b, 7, 50, compile_on)
    if "overhead" not in skip:
        bench_overhead(table, device, 100 if quick else 200, 6 * rounds)
    table.add("6. end", "load average at end", " ".join(f"{x:.1f}" for x in os.getloadavg()))

    print(f"# python -m benchmarks.run {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(table.render())
    if args.json:
        args.json.write_text(json.dumps([dict(zip(("section", "item", "value", "note"), r)) for r in table.rows], indent=1))
    return {"rows": table.rows}


if __name__ == "__main__":
    main()
