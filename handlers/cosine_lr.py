"""cosine_lr: FixMatch's learning-rate schedule, lr_k = lr * cos(7 pi k / (16 K)), stepped per iteration."""

from __future__ import annotations

import math

from ignite.engine import Events
from ignite.handlers import LRScheduler
from torch.optim.lr_scheduler import LambdaLR

from ignite_fixmatch.plugins import Context


def cosine_factor(k: int, total: int, warmup: int = 0, cycles: float = 7 / 16) -> float:
    """Multiplier of the base lr at step k (0-based) of `total`: linear warm-up, then cos(pi * cycles * progress)."""
    if k < warmup:
        return k / warmup
    progress = (k - warmup) / max(1, total - warmup)
    return max(0.0, math.cos(math.pi * cycles * progress))


class CosineLR:
    """Not Ignite's CosineAnnealingScheduler (a half cosine between two values): the cosine argument stops
    at 7/16 pi, so the lr ends at about 0.2 of its start. Built on torch's LambdaLR inside Ignite's
    LRScheduler, checkpointed with the run."""

    def __init__(self, warmup_iters: int = 0, cycles: float = 7 / 16) -> None:
        if warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {warmup_iters!r}")
        if not 0.0 < cycles <= 0.5:
            raise ValueError(f"cycles must be in (0, 0.5] (7/16 in FixMatch), got {cycles!r}")
        self.warmup_iters, self.cycles = warmup_iters, cycles

    def attach(self, ctx: Context) -> None:
        total = ctx.config.train.num_iters
        if self.warmup_iters >= total:
            raise ValueError(f"cosine_lr: warmup_iters={self.warmup_iters} must be below train.num_iters={total}")
        lambda_lr = LambdaLR(ctx.optimizer, lambda k: cosine_factor(k, total, self.warmup_iters, self.cycles))
        self.scheduler = LRScheduler(lambda_lr)
        # ITERATION_STARTED: iteration k (1-based) trains with the lr of step k - 1.
        ctx.trainer.add_event_handler(Events.ITERATION_STARTED, self.scheduler)
        ctx.to_save["lr_scheduler"] = self.scheduler
