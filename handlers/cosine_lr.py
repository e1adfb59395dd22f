"""cosine_lr: FixMatch's learning-rate schedule, lr_k = lr * cos(7 pi k / (16 K)), set per iteration."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ignite_fixmatch.plugins import UPDATE, Context

if TYPE_CHECKING:
    from ignite.engine import Engine

# Ignite is imported in attach: handlers are imported and checked before torch loads, so a bad config is refused in about a second.


def cosine_factor(k: int, total: int, warmup: int = 0, cycles: float = 7 / 16) -> float:
    """Multiplier of the base lr at step k (0-based) of `total`: linear warm-up, then cos(pi * cycles * progress)."""
    if k < warmup:
        return k / warmup
    progress = (k - warmup) / max(1, total - warmup)
    return max(0.0, math.cos(math.pi * cycles * progress))


class CosineLR:
    """Not Ignite's CosineAnnealingScheduler (a half cosine between two values): the cosine argument stops
    at 7/16 pi, so the lr ends at about 0.2 of its start.

    At the start of iteration k (1-based) every param group gets ``lr = base_lr * cosine_factor(k - 1)``:
    a function of the trainer's iteration alone, so a resumed run sets exactly the lr an uninterrupted
    one would (the same float expression as torch's LambdaLR, which this replaced: about 4 us per
    iteration instead of 40). The base lrs (the optimizer's lrs when attached) are checkpointed.
    """

    provides = ("lr_schedule",)
    priority = UPDATE  # it sets the training state (the lr)

    def __init__(self, warmup_iters: int = 0, cycles: float = 7 / 16) -> None:
        if warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {warmup_iters!r}")
        if not 0.0 < cycles <= 0.5:
            raise ValueError(f"cycles must be in (0, 0.5] (7/16 in FixMatch), got {cycles!r}")
        self.warmup_iters, self.cycles = warmup_iters, cycles

    def attach(self, ctx: Context) -> None:
        from ignite.engine import Events

        self.total = ctx.config.train.num_iters
        if self.warmup_iters >= self.total:
            raise ValueError(f"cosine_lr: warmup_iters={self.warmup_iters} must be below train.num_iters={self.total}")
        self.optimizer = ctx.optimizer  # not its param_groups list: loading an optimizer state replaces it
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        # ITERATION_STARTED: iteration k (1-based) trains with the lr of step k - 1.
        ctx.trainer.add_event_handler(Events.ITERATION_STARTED, self.set_lr)
        ctx.to_save["lr_scheduler"] = self

    def set_lr(self, engine: Engine) -> None:
        factor = cosine_factor(engine.state.iteration - 1, self.total, self.warmup_iters, self.cycles)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def state_dict(self) -> dict[str, Any]:
        return {"base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "lr_scheduler" in state:  # a checkpoint written with Ignite's LRScheduler around LambdaLR
            state = state["lr_scheduler"]
        if len(state["base_lrs"]) != len(self.base_lrs):
            raise ValueError(f"lr_scheduler: the checkpoint has {len(state['base_lrs'])} param groups, the optimizer {len(self.base_lrs)}")
        self.base_lrs = [float(lr) for lr in state["base_lrs"]]
