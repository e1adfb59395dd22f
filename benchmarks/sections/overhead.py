"""Section 5: framework overhead. A tiny model through a bare loop, our Engine, and our Engine with the
default handlers, in microseconds per iteration: what Ignite and the handlers' plumbing add to a step.
"""
from __future__ import annotations

import copy
import functools
import gc
import itertools
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks.common import MEAN, STD, Table, error_note, sync, threads
from benchmarks.workload import fixmatch
from ignite_fixmatch.trainer import PSEUDO_KEYS, create_trainer, parameter_groups


class TinyNet(torch.nn.Module):
    """Small enough that per-iteration overhead shows: one conv, pool, linear on 8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def attach_default_handlers(
    trainer: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, out_dir: Path, iters: int,
) -> list[Any]:
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
         "u_y": torch.randint(0, 10, (b * mu,), generator=g), "u_idx": torch.arange(b * mu)}
        for _ in range(4)
    ]
    Stamps = list[tuple[float, float]]  # (wall, main-thread CPU) after each iteration of a chunk
    settings: dict[str, Any] = {}

    def make(handlers: bool, tmp: Path, cached: bool) -> tuple[Any, torch.nn.Module, torch.optim.Optimizer, list[Any]]:
        torch.manual_seed(0)
        model = TinyNet().to(device)
        optimizer = torch.optim.SGD(parameter_groups(model, 5e-4, "reference"), lr=0.03, momentum=0.9, nesterov=True)
        trainer = create_trainer(model, optimizer, device, fixmatch(device))
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
        pseudo_window = [torch.zeros(10, dtype=torch.float64, device=device) for _ in PSEUDO_KEYS]  # the evaluation handler's per-class counts
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
            torch._foreach_add_(pseudo_window, [out[k] for k in PSEUDO_KEYS])
            values = [out[k].detach() for k in AVERAGED]
            if sums[0]:
                torch._foreach_add_(sums[0], values)
            else:
                sums[0] = [v.clone() for v in values]
            if it % settings["tb_every"] == 0:
                for key, value in out.items():
                    if key not in PSEUDO_KEYS:  # per-class vectors: reported at evaluations, not as train scalars
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
                    deltas[name] += [((b[0] - a[0]) * 1e6, (b[1] - a[1]) * 1e6) for a, b in itertools.pairwise(stamps)]
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

        def fresh(prefix: str) -> Path:
            """A new run folder each time."""
            return tmp / f"{prefix}{time.monotonic_ns()}"

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
            table.add(section, handlers_name, "failed", error_note(e))
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
