"""ema: an exponential moving average of the weights, the model FixMatch evaluates."""

from __future__ import annotations

from ignite_fixmatch.plugins import UPDATE, Context

# torch and Ignite are imported in attach: handlers are imported and checked before torch loads, so a bad config is refused in about a second.


class EMA:
    """ema = decay * ema + (1 - decay) * weights after every update; batch-norm buffers copied from the
    live model (reference behaviour). Ignite's EMAHandler (its momentum is 1 - decay), fused update.

    UPDATE priority: it fires right after the step, so whatever evaluates or saves that iteration sees
    the averaged weights of it."""

    provides = ("ema_model",)
    priority = UPDATE

    def __init__(self, decay: float = 0.999, buffers: str = "copy") -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay!r} (FixMatch uses 0.999)")
        if buffers not in ("copy", "update"):
            raise ValueError(f"buffers must be 'copy' (reference) or 'update' (average them too), got {buffers!r}")
        self.decay, self.buffers = decay, buffers

    def attach(self, ctx: Context) -> None:
        from ignite.engine import Events

        from ignite_fixmatch.foreach_ema import ForeachEMAHandler

        self.handler = ForeachEMAHandler(ctx.model, momentum=1.0 - self.decay, handle_buffers=self.buffers)
        self.handler.attach(ctx.trainer, name="ema_momentum", event=Events.ITERATION_COMPLETED)
        ctx.ema_model = self.handler.ema_model
        ctx.to_save["ema_model"] = self.handler.ema_model
