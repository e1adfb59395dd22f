"""terminate_on_nan: stop at the first non-finite loss, before anything saves or evaluates the diverged state."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ignite_fixmatch.checkpoint_names import newest_checkpoint
from ignite_fixmatch.errors import NonFiniteLossError
from ignite_fixmatch.plugins import GUARD, Context

if TYPE_CHECKING:
    import torch
    from ignite.engine import Engine

# torch and Ignite are imported where used: handlers are imported and checked before torch loads, so a bad config is refused in about a second.


class StopOnNonFinite:
    """Like Ignite's TerminateOnNan, but checks only the loss (pseudo-label accuracy is NaN by design
    when no sample passes the threshold) and raises, so nothing of the diverged state is kept.

    No host sync in the step: each iteration only copies the loss into a device buffer (one small
    kernel). The buffer is read on the host every ``check_every`` iterations, and as a guard in
    ``ctx.guards``: right before every evaluation (the evaluation handler) and every checkpoint write
    (the checkpoint handler: periodic, best and the preemption save alike); and at the end of the run.
    A late read still names the exact first bad iteration and its value. Between reads the run goes on
    for at most ``check_every - 1`` iterations of wasted compute, never evaluating or writing anything
    of them.
    """

    provides = ("guards",)
    priority = GUARD

    def __init__(self, key: str = "loss", check_every: int = 50) -> None:
        if not isinstance(check_every, int) or isinstance(check_every, bool) or check_every < 1:
            raise ValueError(f"check_every must be an integer >= 1 iterations, got {check_every!r}")
        self.key, self.every = key, check_every
        self.window: torch.Tensor | None = None  # the losses of the iterations since the last read
        self.slots: list[torch.Tensor] = []  # views of its elements, made once
        self.count = 0
        self.first_iteration = 0  # the trainer iteration of window[0]
        self.error: str | None = None  # once diverged, every later check raises again

    def attach(self, ctx: Context) -> None:
        from ignite.engine import Events

        self.output_dir = ctx.output_dir
        ctx.trainer.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        ctx.trainer.add_event_handler(Events.COMPLETED, self.check)
        ctx.guards.append(self.check)

    def record(self, engine: Engine) -> None:
        import torch

        loss = engine.state.output[self.key]
        loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss), dtype=torch.float64)
        if self.window is None:
            dtype = loss.dtype if loss.is_floating_point() else torch.float64
            self.window = torch.empty(self.every, dtype=dtype, device=loss.device)
            self.slots = list(self.window.unbind())
        if self.count == 0:
            self.first_iteration = engine.state.iteration
        self.slots[self.count].copy_(loss)  # a device copy, no sync
        self.count += 1
        if self.count == self.every:
            self.check(engine)

    def check(self, engine: Engine) -> None:
        """Read the window on the host (one sync); raise if a loss in it was NaN or inf."""
        if self.error is None:
            self.error = self._read(engine)
        if self.error is not None:
            raise NonFiniteLossError(self.error)

    def _read(self, engine: Engine) -> str | None:
        import ignite.distributed as idist
        import torch

        count, self.count = self.count, 0
        window = self.window[:count] if count else None
        bad_at = -1
        if window is not None:
            finite = torch.isfinite(window)
            if idist.get_world_size() > 1 or not bool(finite.all()):
                bad = torch.nonzero(~finite).flatten().tolist()
                bad_at = self.first_iteration + bad[0] if bad else -1
        if idist.get_world_size() > 1:  # every rank stops, at the first iteration any rank diverged
            never = torch.iinfo(torch.int64).max
            first = int(idist.all_reduce(torch.tensor(bad_at if bad_at >= 0 else never, device=idist.device()), op="MIN"))
            bad_at = first if first != never else -1
        if bad_at < 0:
            return None
        mine = window is not None and 0 <= bad_at - self.first_iteration < count
        what = f"is {float(window[bad_at - self.first_iteration])}" if mine else "is not finite on another process"
        last = newest_checkpoint(self.output_dir) or "none saved yet"
        return (
            f"{self.key} {what} at iteration {bad_at}: training diverged and was stopped "
            f"(detected at iteration {engine.state.iteration}, before any checkpoint of the diverged weights was written). "
            f"Last good checkpoint: {last}. Lower optim.lr, switch amp off, or resume=auto to retry from it."
        )
