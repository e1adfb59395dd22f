"""ema: an exponential moving average of the weights, the model FixMatch evaluates."""

from __future__ import annotations

from ignite.engine import Events
from ignite.handlers import EMAHandler

from ignite_fixmatch.plugins import Context


class EMA:
    """ema = decay * ema + (1 - decay) * weights after every update; batch-norm buffers copied from the
    live model (reference behaviour). Wraps Ignite's EMAHandler (its momentum is 1 - decay)."""

    def __init__(self, decay: float = 0.999, buffers: str = "copy") -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay!r} (FixMatch uses 0.999)")
        if buffers not in ("copy", "update"):
            raise ValueError(f"buffers must be 'copy' (reference) or 'update' (average them too), got {buffers!r}")
        self.decay, self.buffers = decay, buffers

    def attach(self, ctx: Context) -> None:
        self.handler = EMAHandler(ctx.model, momentum=1.0 - self.decay, handle_buffers=self.buffers)
        self.handler.attach(ctx.trainer, name="ema_momentum", event=Events.ITERATION_COMPLETED)
        ctx.ema_model = self.handler.ema_model
        ctx.to_save["ema_model"] = self.handler.ema_model
