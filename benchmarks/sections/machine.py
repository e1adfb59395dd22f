"""Section 1: what the numbers were measured on, and the fp32 matmul rate that later sections are a share of."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from benchmarks.common import Table, bf16_supported, fmt_rate, matmul_gflops

SECTION = "1. machine"


def bench_machine(table: Table, device: torch.device, n: int, rounds: int) -> None:
    """CPU / GPU, threads, load average at start, and the n x n fp32 matmul rate over ``rounds`` rounds."""
    table.add(SECTION, "CPU", f"{cpu_name()}, {os.cpu_count()} cores", f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}")
    table.add(SECTION, "torch threads", str(torch.get_num_threads()), f"bf16 hardware: {'yes' if bf16_supported(device) else 'no'}")
    if device.type == "cuda":
        table.add(SECTION, "GPU", torch.cuda.get_device_name(device))
    table.add(SECTION, "load average at start", load_average(), "shared machine: medians over alternating rounds")
    mm = matmul_gflops(device, n, rounds)
    table.add(
        SECTION, f"fp32 matmul ({device.type}, {torch.get_num_threads()} threads)", fmt_rate(mm, "GFLOP/s"),
        "the 100 % mark (measured again within each section's rounds)",
    )


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: how busy the shared machine was."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
