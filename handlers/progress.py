"""progress: a progress bar on a terminal, a plain periodic log line otherwise (CI logs, cluster jobs)."""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import TYPE_CHECKING

from ignite_fixmatch.plugins import REPORT, Context

if TYPE_CHECKING:
    import torch
    from ignite.engine import Engine

# torch and Ignite are imported where used: handlers are imported and checked before torch loads, so a bad config is refused in about a second.

AVERAGED = ("loss", "loss_x", "loss_u", "mask_rate")


class WindowAverage:
    """Mean of the step metrics over the iterations since the last read. Summed on the device every
    iteration by one fused ``torch._foreach_add_`` (no host sync), turned into floats only when shown."""

    def __init__(self) -> None:
        self.sums: list[torch.Tensor] | None = None
        self.count = 0

    def update(self, engine: Engine) -> None:
        import torch

        out = engine.state.output
        values = [out[key].detach() for key in AVERAGED]
        if self.sums is None:
            self.sums = [v.clone() for v in values]
        else:
            torch._foreach_add_(self.sums, values)
        self.count += 1

    def read(self) -> dict[str, float]:
        import torch

        if self.sums is None:
            return {}
        means = (torch.stack(self.sums) / self.count).tolist()  # one host sync
        self.sums, self.count = None, 0
        return dict(zip(AVERAGED, means))


class Progress:
    """Iteration, loss, loss_x, loss_u and mask rate averaged over the last ``every`` iterations, and the
    speed over them (the ETA assumes it holds: compiling at the start does not skew it).
    ``mode``: auto (a bar if stdout is a terminal), bar, log."""

    rank_zero_only = True
    priority = REPORT

    def __init__(self, every: int = 50, mode: str = "auto") -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1 iterations, got {every!r}")
        if mode not in ("auto", "bar", "log"):
            raise ValueError(f"mode must be 'auto', 'bar' or 'log', got {mode!r}")
        self.every, self.mode = every, mode

    def attach(self, ctx: Context) -> None:
        from ignite.engine import Events
        from ignite.handlers import ProgressBar

        trainer = ctx.trainer
        window = WindowAverage()
        use_bar = self.mode == "bar" or (self.mode == "auto" and sys.stdout.isatty())
        if use_bar:
            trainer.add_event_handler(Events.ITERATION_COMPLETED, window.update)
            ProgressBar(persist=False).attach(
                trainer, output_transform=lambda _: window.read(), event_name=Events.ITERATION_COMPLETED(every=self.every)
            )
            return
        logger, total = ctx.logger, ctx.config.train.num_iters
        last: dict[str, float] = {}  # time and iteration of the last line: speed and ETA from the latest window

        @trainer.on(Events.STARTED)
        def _started(engine: Engine) -> None:
            last["time"], last["iteration"] = time.perf_counter(), engine.state.iteration

        def _log(engine: Engine) -> None:
            now = time.perf_counter()
            rate = (engine.state.iteration - last["iteration"]) / max(now - last["time"], 1e-9)
            last["time"], last["iteration"] = now, engine.state.iteration
            eta = (total - engine.state.iteration) / max(rate, 1e-9)
            m = window.read()
            logger.info(
                "iteration %d/%d  loss %.4f  loss_x %.4f  loss_u %.4f  mask_rate %.3f  lr %.5f  %.1f it/s  ETA %s",
                engine.state.iteration, total, m["loss"], m["loss_x"], m["loss_u"], m["mask_rate"],
                engine.state.output["lr"], rate, timedelta(seconds=int(eta)),
            )

        @trainer.on(Events.ITERATION_COMPLETED)
        def _update_and_log(engine: Engine) -> None:  # one handler: each one Ignite dispatches costs about 1 us
            window.update(engine)
            if engine.state.iteration % self.every == 0:
                _log(engine)
