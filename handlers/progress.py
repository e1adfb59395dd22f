"""progress: a progress bar on a terminal, a plain periodic log line otherwise (CI logs, cluster jobs)."""

from __future__ import annotations

import sys
import time

from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar

from ignite_fixmatch.plugins import Context, step_scalars


class Progress:
    """Iteration, ETA, running loss and mask rate. ``mode``: auto (bar if stdout is a terminal), bar, log."""

    rank_zero_only = True

    def __init__(self, every: int = 50, mode: str = "auto") -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1 iterations, got {every!r}")
        if mode not in ("auto", "bar", "log"):
            raise ValueError(f"mode must be 'auto', 'bar' or 'log', got {mode!r}")
        self.every, self.mode = every, mode

    def attach(self, ctx: Context) -> None:
        use_bar = self.mode == "bar" or (self.mode == "auto" and sys.stdout.isatty())
        if use_bar:
            bar = ProgressBar(persist=False)
            bar.attach(ctx.trainer, output_transform=lambda out: {k: float(out[k]) for k in ("loss", "mask_rate")}, event_name=Events.ITERATION_COMPLETED(every=self.every))
            return
        logger, total = ctx.logger, ctx.config.train.num_iters
        start: dict[str, float] = {}

        @ctx.trainer.on(Events.STARTED)
        def _started(engine: Engine) -> None:
            start["time"], start["iteration"] = time.perf_counter(), engine.state.iteration

        @ctx.trainer.on(Events.ITERATION_COMPLETED(every=self.every))
        def _log(engine: Engine) -> None:
            done = engine.state.iteration - start["iteration"]
            elapsed = time.perf_counter() - start["time"]
            eta = elapsed / max(done, 1) * (total - engine.state.iteration)
            s = step_scalars(engine)
            logger.info(
                "iteration %d/%d  loss %.4f  loss_x %.4f  loss_u %.4f  mask_rate %.3f  lr %.5f  %.1f it/s  ETA %s",
                engine.state.iteration, total, s["loss"], s["loss_x"], s["loss_u"], s["mask_rate"], s["lr"],
                done / max(elapsed, 1e-9), time.strftime("%H:%M:%S", time.gmtime(eta)),
            )
