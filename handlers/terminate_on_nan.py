"""terminate_on_nan: stop at the first non-finite loss, before anything saves the diverged state."""

from __future__ import annotations

import math

from ignite.engine import Engine, Events

from ignite_fixmatch.fixmatch import NonFiniteLossError
from ignite_fixmatch.plugins import Context
from ignite_fixmatch.resume import newest_checkpoint


class StopOnNonFinite:
    """Like Ignite's TerminateOnNan, but checks only the loss (pseudo-label accuracy is NaN by design
    when no sample passes the threshold) and raises, so no later handler of this iteration (checkpoint)
    can write the diverged weights over the last good checkpoint."""

    def __init__(self, key: str = "loss") -> None:
        self.key = key

    def attach(self, ctx: Context) -> None:
        self.output_dir = ctx.output_dir

        def check(engine: Engine) -> None:
            value = float(engine.state.output[self.key])
            if not math.isfinite(value):
                last = newest_checkpoint(self.output_dir) or "none saved yet"
                raise NonFiniteLossError(
                    f"{self.key} is {value} at iteration {engine.state.iteration}: training diverged and was stopped. "
                    f"Last good checkpoint: {last}. Lower optim.lr, switch amp off, or resume=auto to retry from it."
                )

        ctx.trainer.add_event_handler(Events.ITERATION_COMPLETED, check)
