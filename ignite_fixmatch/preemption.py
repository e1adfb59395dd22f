"""Graceful stop on SIGTERM/SIGINT (SLURM and Kubernetes preemption, Ctrl-C).

The signal only sets a flag. At the end of the current iteration, after every other handler, the
run writes a resumable checkpoint and raises :class:`Preempted`; the command line turns that into
exit code 75 (EX_TEMPFAIL: "try again") and says how to resume. Under DDP the processes agree on
the flag with an all-reduce, so they all stop at the same iteration. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from ignite_fixmatch.errors import Preempted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader workers leave stopping to the training process (they get Ctrl-C's SIGINT too)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class PreemptionGuard:
    def __init__(self, logger: logging.Logger, check_every: int | None = None) -> None:
        self.logger = logger
        self.requested: int | None = None  # the signal received
        # One process checks its flag every iteration (free); several agree by an all-reduce, every 10.
        self.check_every = check_every or (1 if idist.get_world_size() == 1 else 10)

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.requested = signum
        self.logger.warning("Received %s: finishing this iteration, then saving a checkpoint", signal.Signals(signum).name)

    def attach(self, trainer: Engine, save: Callable[[Engine], None] | None, describe_checkpoint: Callable[[], str]) -> None:
        """Attach after every handler (training does): the check then runs after all of them at the end
        of an iteration, so the checkpoint it writes holds that whole iteration."""
        self.save, self.describe_checkpoint = save, describe_checkpoint
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=self.check_every), self._check)

    def _agreed(self) -> bool:
        flag = 1.0 if self.requested is not None else 0.0
        if idist.get_world_size() > 1:
            flag = float(idist.all_reduce(torch.tensor(flag, device=idist.device()), op="MAX"))
        return flag > 0

    def _check(self, engine: Engine) -> None:
        if not self._agreed():
            return
        if self.save is not None:
            self.save(engine)
        name = signal.Signals(self.requested).name if self.requested else "a signal on another process"
        raise Preempted(
            f"stopped by {name} at iteration {engine.state.iteration}; checkpoint: {self.describe_checkpoint()}. "
            "Continue with the same command and resume=auto."
        )
