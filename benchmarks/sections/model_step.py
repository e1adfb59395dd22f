"""Section 3: the model step alone. WRN-28-2 forward + backward + SGD over labeled + weak + strong in one
forward (1:7:7), NCHW against channels_last, eager against torch.compile, fp32 against bf16 where the
hardware has it; as images/s and as a share of the fp32 matmul rate measured in the same rounds.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.common import MATMUL, Table, alternate, bf16_supported, error_note, fmt_rate, of_matmul, sync
from benchmarks.synthetic import fixmatch_batch
from benchmarks.workload import StepConfig, make_model, step_fn


def bench_model_step(
    table: Table, device: torch.device, b: int, mu: int, steps: int, rounds: int, compile_on: bool, matmul: Callable[[], float],
) -> dict[str, list[float]]:
    """Images/s of each config's update on the same batch, alternating with ``matmul`` (each round's 100 %)."""
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
            table.add(section, cfg.name, "failed", error_note(e))
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
