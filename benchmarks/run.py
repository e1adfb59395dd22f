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
import json
import sys
from pathlib import Path

import torch

# The sections live in benchmarks/sections/ (one module each), what they share in benchmarks/common.py,
# benchmarks/synthetic.py (the inputs) and benchmarks/workload.py (the step under test). Every name this
# module defined before that split is re-exported (__all__): tests and the commands recorded in
# benchmarks/results import them from here; new code should import from the defining module.
from benchmarks.common import (
    COMPILE_MODE,
    GFLOP_PER_IMAGE,
    MATMUL,
    MEAN,
    PAD,
    SIZE,
    STD,
    Table,
    alternate,
    bf16_supported,
    cpu_has_bf16,
    fmt_rate,
    matmul_gflops,
    of_matmul,
    sync,
    threads,
)
from benchmarks.sections.augmentation import KernelCount, augmentation_kernels, bench_augmentation, bench_augmentation_cuda
from benchmarks.sections.convolutions import ConvShape, bench_convolutions, model_convolutions
from benchmarks.sections.full_step import bench_full_step, bench_step_parts, engine_images_per_s, host_and_wall_ms
from benchmarks.sections.machine import bench_machine, cpu_name, load_average
from benchmarks.sections.model_step import bench_model_step
from benchmarks.sections.overhead import TinyNet, attach_default_handlers, bench_overhead, close_loggers, engine_floor_us, handler_settings
from benchmarks.synthetic import (
    Views,
    batched_stream,
    batched_unlabeled_params,
    device_stream,
    fixmatch_batch,
    image_pool,
    pil_stream,
    pil_unlabeled_batch,
)
from benchmarks.workload import StepConfig, make_model, make_trainer, step_fn

__all__ = [
    "COMPILE_MODE", "GFLOP_PER_IMAGE", "MATMUL", "MEAN", "PAD", "SIZE", "STD",
    "ConvShape", "KernelCount", "StepConfig", "Table", "TinyNet", "Views",
    "alternate", "attach_default_handlers", "augmentation_kernels", "batched_stream", "batched_unlabeled_params",
    "bench_augmentation", "bench_augmentation_cuda", "bench_convolutions", "bench_full_step", "bench_machine",
    "bench_model_step", "bench_overhead", "bench_step_parts", "bf16_supported", "close_loggers", "cpu_has_bf16",
    "cpu_name", "device_stream", "engine_floor_us", "engine_images_per_s", "fixmatch_batch", "fmt_rate",
    "handler_settings", "host_and_wall_ms", "image_pool", "load_average", "main", "make_model", "make_trainer",
    "matmul_gflops", "model_convolutions", "of_matmul", "pil_stream", "pil_unlabeled_batch", "step_fn", "sync", "threads",
]


def main(argv: list[str] | None = None) -> dict:
    """Parse the flags, run the sections not skipped, print the table (and write it as JSON if asked)."""
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
    n = 4096 if gpu else (1024 if quick else 2048)
    bench_machine(table, device, n, rounds * 2)
    steps = 20 if gpu else (1 if quick else 2)  # timed steps per round of sections 3 and 4

    def matmul_round() -> float:
        """One round's matmul rate, measured among the contenders of sections 3 and 4."""
        return matmul_gflops(device, n, 1)[0]

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
    table.add("6. end", "load average at end", load_average())

    print(f"# python -m benchmarks.run {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(table.render())
    if args.json:
        args.json.write_text(json.dumps([dict(zip(("section", "item", "value", "note"), r)) for r in table.rows], indent=1))
    return {"rows": table.rows}


if __name__ == "__main__":
    main()
