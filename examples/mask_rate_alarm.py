"""An example of a handler of your own, loaded by dotted path from a config:

    handlers:
      - name: examples.mask_rate_alarm:MaskRateAlarm
        params: {min_rate: 0.05, patience: 500}

It warns when FixMatch stops learning from unlabeled data: the fraction of unlabeled samples whose
pseudo-label passes the threshold (mask_rate) stays below ``min_rate`` for ``patience`` iterations.
It keeps a counter, so it implements state_dict/load_state_dict and puts itself in ``ctx.to_save``:
the counter survives a resume. It reads only the step's metrics, so it declares no ``needs``/``uses``
and provides nothing: with the DEFAULT priority it fires after the updates, guards and evaluation of an
iteration and before the reports and the checkpoint (which saves its counter of that iteration).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ignite_fixmatch.plugins import DEFAULT, Context

if TYPE_CHECKING:
    from ignite.engine import Engine

# Ignite is imported in attach: handlers are imported and checked before torch loads, so a bad config is refused in about a second.


class MaskRateAlarm:
    rank_zero_only = False  # every process sees its own mask rate; only rank 0 logs (ctx.logger)
    priority = DEFAULT  # reads the step's metrics only: no needs, uses or provides

    def __init__(self, min_rate: float = 0.05, patience: int = 500, every: int = 1) -> None:
        if not 0.0 <= min_rate <= 1.0:
            raise ValueError(f"min_rate must be in [0, 1], got {min_rate!r}")
        if patience < 1 or every < 1:
            raise ValueError(f"patience and every must be >= 1, got patience={patience!r}, every={every!r}")
        self.min_rate, self.patience, self.every = min_rate, patience, every
        self.low_for = 0  # iterations in a row below min_rate
        self.alarms = 0

    def attach(self, ctx: Context) -> None:
        from ignite.engine import Events

        self.logger = ctx.logger
        ctx.trainer.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self.check)
        ctx.to_save["mask_rate_alarm"] = self

    def check(self, engine: Engine) -> None:
        rate = float(engine.state.output["mask_rate"])  # reading it syncs with the GPU: hence `every`
        self.low_for = self.low_for + self.every if rate < self.min_rate else 0
        if self.low_for >= self.patience:
            self.alarms += 1
            self.logger.warning(
                "MaskRateAlarm: mask_rate below %.3f for %d iterations (now %.3f at iteration %d): "
                "pseudo-labels are rarely confident; consider a lower algorithm.threshold.",
                self.min_rate, self.low_for, rate, engine.state.iteration,
            )
            self.low_for = 0

    def state_dict(self) -> dict[str, Any]:
        return {"low_for": self.low_for, "alarms": self.alarms}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.low_for, self.alarms = int(state["low_for"]), int(state["alarms"])
