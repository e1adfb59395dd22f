"""Where one training step's time goes: ``python -m benchmarks.profile_step [--device cuda] [--compile-mode M]``.

Runs the trainer's real update (``create_trainer``: WRN-28-2, channels_last, bf16 where the hardware has
it, the compile mode asked for) on one augmented batch of 64 + 448 + 448 images already on the device,
then prints:

- host ms per step (the time Python takes to issue the step), wall ms per step (until the device is
  done), and device ms per step (the sum of the kernels' times, from the profiler). Host close to wall
  and device well under it: the step is launch-bound, and fewer, fused launches are what helps;
  device close to wall: the GPU itself is the limit;
- the profiler's table of the operators that cost the most host time, and of the kernels that cost the
  most device time.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import bf16_supported, sync
from benchmarks.synthetic import fixmatch_batch
from benchmarks.workload import StepConfig, make_trainer


def trainer_step(device: torch.device, b: int, mu: int, compile_mode: str | None) -> Callable[[], Any]:
    """One call = one FixMatch update through the trainer's own process function."""
    cfg = StepConfig(channels_last=True, compiled=compile_mode is not None, bf16=bf16_supported(device))
    trainer = make_trainer(cfg, device, compile_mode=compile_mode or "default")
    batch = fixmatch_batch(b, mu, device, True)
    return lambda: trainer._process_function(trainer, batch)


def device_ms(prof: profile) -> float:
    """Total time of the device's kernels, copies and sets recorded by the profiler, in ms (each once:
    the operator rows of the tables also count the kernels they launched)."""
    return sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    modes = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    parser.add_argument("--compile-mode", default="reduce-overhead", choices=modes)
    parser.add_argument("--labeled", type=int, default=64, help="labeled images per step (x 15 in all)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (the profiler records 5 of them)")
    parser.add_argument("--rows", type=int, default=15, help="rows of each profiler table")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    mode = None if args.compile_mode == "off" else args.compile_mode
    step = trainer_step(device, args.labeled, 7, mode)

    t0 = time.perf_counter()
    for _ in range(3):  # compile, record the graphs, warm up
        step()
    sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    host = (time.perf_counter() - t0) / args.steps * 1e3
    sync(device)
    wall = (time.perf_counter() - t0) / args.steps * 1e3

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    recorded = 5
    with profile(activities=activities) as prof:
        for _ in range(recorded):
            step()
        sync(device)
    images = args.labeled * 15
    print(f"# python -m benchmarks.profile_step {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"compile {args.compile_mode}, {images} images per step, first 3 steps {warm:.1f} s")
    print(f"host {host:.2f} ms/step, wall {wall:.2f} ms/step ({1e3 / wall:.1f} steps/s), "
          + (f"device kernels {device_ms(prof) / recorded:.2f} ms/step" if device.type == "cuda" else ""))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if device.type == "cuda":
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
