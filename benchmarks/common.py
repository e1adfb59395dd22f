"""What every section of the benchmark shares: the constants of the workload, the table, and the timing
helpers (alternating rounds, medians, the fp32 matmul rate that each section's results are a share of).

A shared machine's speed drifts by tens of percent within seconds, so nothing here times a contender
on its own: ``alternate`` runs all of a comparison's contenders once per round, in turn, and the table
reports medians over rounds with their spread.
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ignite_fixmatch.config import ModelConfig

COMPILE_MODE = ModelConfig().compile_mode  # the trainer's default (reduce-overhead: CUDA graphs on a GPU)
GFLOP_PER_IMAGE = 1.285  # WRN-28-2, one 32x32 image, forward + backward
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
PAD, SIZE = 4, 32
MATMUL = "fp32 matmul in the same rounds"  # the contender name of the per-round matmul in sections 3, 3b and 4


# ---------------------------------------------------------------- table


@dataclass
class Table:
    """Rows of (section, item, value, note); each row is echoed to stderr as it is measured, the whole
    table is printed at the end."""

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


def fmt_rate(values: list[float], unit: str = "img/s", digits: int = 0) -> str:
    """Median and spread of per-round rates."""
    med = statistics.median(values)
    if len(values) > 1:
        return f"{med:,.{digits}f} {unit} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"
    return f"{med:,.{digits}f} {unit}"


def error_note(e: BaseException) -> str:
    """A failed row's note: the exception's type and the first line of its message, cut to 120 characters."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


# ---------------------------------------------------------------- timing


def alternate(contenders: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run every contender once per round, in turn; each returns its own rate for that round."""
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            results[name].append(fn())
    return results


def sync(device: torch.device) -> None:
    """Wait for the device (a no-op on the CPU, where every call has finished when it returns)."""
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


# ---------------------------------------------------------------- the machine and its 100 % mark


def cpu_has_bf16() -> bool:
    """bf16 arithmetic in hardware (AVX512-BF16 or AMX); without it CPU bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_supported(device: torch.device) -> bool:
    """Whether the bf16 contenders are worth running on this device."""
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


def of_matmul(rates: list[float], matmul_rates: list[float]) -> str:
    """Work rate as a share of the matmul rate measured in the same round (a shared machine's speed drifts)."""
    return f"{statistics.median(r * GFLOP_PER_IMAGE / m for r, m in zip(rates, matmul_rates)):.0%} of matmul"
