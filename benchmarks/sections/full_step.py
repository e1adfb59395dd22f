"""Section 4: the full training step through our Engine, data included. A reference-style step (NCHW,
eager, fp32, per-image PIL augmentation) against ours (channels_last, batched augmentation, compile
when on; on a GPU the data set and its augmentation live there). Section 4b (GPU): the parts of one
step timed alone, host (issue) time against wall time, to show which of them are launch-bound.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from benchmarks.common import MATMUL, MEAN, PAD, STD, Table, alternate, bf16_supported, error_note, fmt_rate, of_matmul, sync
from benchmarks.synthetic import Views, batched_stream, device_stream, image_pool, pil_stream
from benchmarks.workload import StepConfig, make_model, make_trainer, step_fn
from ignite_fixmatch import augment as B
from ignite_fixmatch.augment.cuda_graph import CudaGraphed


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
    """A reference-style step (NCHW, eager, fp32, PIL per image) against ours, alternating with ``matmul``."""
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
        table.add(section, "augmentation compiled", "failed", error_note(e))
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
            table.add(section, name, "failed", error_note(e))
            continue
        table.add(section, name, f"{host:.2f} / {wall:.2f} ms", f"{1e3 / wall:,.0f} per second alone")
