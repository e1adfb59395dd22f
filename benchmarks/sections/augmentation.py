"""Section 2: augmentation, per core. The per-image PIL path against the batched uint8 tensor path, with
the same draws, for weak and strong views and a whole unlabeled sample; and the number of kernels one
step's augmentation launches on the device path, which is what sets its time on a GPU (2b times it there).
"""
from __future__ import annotations

import collections
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import MEAN, PAD, SIZE, STD, Table, alternate, fmt_rate, sync, threads
from benchmarks.synthetic import Views, batched_unlabeled_params, image_pool, pil_unlabeled_batch
from ignite_fixmatch import augment as A
from ignite_fixmatch import augment as B
from ignite_fixmatch.data import UNLABELED, hash_seed


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

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # the dispatch protocol's signature
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
        "u_y": torch.zeros(b * mu, dtype=torch.long), "u_idx": torch.arange(b * mu),
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
