"""checkpoint: periodic resumable checkpoints (last n, and the best by evaluation top-1), written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver

from ignite_fixmatch.plugins import Context
from ignite_fixmatch.resume import CHECKPOINT_DIR, checkpoint_iteration, list_checkpoints


class Checkpointing:
    """Every ``every`` iterations and at the end, save the run's ``to_save`` dict (trainer, model, EMA,
    optimizer, scheduler, scaler, RNG states, handler states, config) with Ignite's Checkpoint.

    - Atomic: DiskSaver writes a temporary file and renames it, so a crash mid-write never breaks
      the latest checkpoint.
    - Saved after every other handler of the iteration (registered when the run starts), so the
      state on disk is the complete state after that iteration.
    - The data position needs no saving: the streams restart at the trainer's iteration.
    """

    def __init__(self, every: int = 1000, keep: int = 2, keep_best: int = 1, best_model: str = "ema") -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1 iterations, got {every!r}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (checkpoints kept), got {keep!r}")
        if keep_best < 0:
            raise ValueError(f"keep_best must be >= 0 (0: no best checkpoint), got {keep_best!r}")
        self.every, self.keep, self.keep_best, self.best_model = every, keep, keep_best, best_model
        self._registered = False
        self._best_checked_at = -1

    def attach(self, ctx: Context) -> None:
        self.folder = Path(ctx.output_dir) / CHECKPOINT_DIR
        if ctx.rank == 0:
            for stale in self.folder.glob("tmp*"):  # left by a crash inside an atomic write
                stale.unlink()
        saver = DiskSaver(str(self.folder), atomic=True, require_empty=False, create_dir=True)
        step = lambda engine, _: ctx.trainer.state.iteration  # noqa: E731  name files by iteration
        self.last = Checkpoint(ctx.to_save, saver, n_saved=self.keep, global_step_transform=step)
        self.last.load_state_dict({"_saved": [(checkpoint_iteration(p), p.name) for p in self._existing(best=False)]})
        self.best: Checkpoint | None = None
        if self.keep_best:
            self.best = Checkpoint(
                ctx.to_save, saver, filename_prefix="best", n_saved=self.keep_best, global_step_transform=step,
                score_function=self._score, score_name="top1",
            )
            self.best.load_state_dict({"_saved": [(self._file_score(p), p.name) for p in self._existing(best=True)]})
        self.evaluators = ctx.evaluators
        ctx.trainer.add_event_handler(Events.STARTED, self._register)

    def _existing(self, best: bool) -> list[Path]:
        return [p for p in list_checkpoints(self.folder.parent) if p.name.startswith("best") == best]

    @staticmethod
    def _file_score(path: Path) -> float:
        return float(path.stem.rsplit("=", 1)[-1])

    def _score(self, engine: Engine) -> float:
        evaluator = self.evaluators.get(self.best_model)
        if evaluator is None or not evaluator.state.metrics:
            return float("-inf")
        return float(evaluator.state.metrics["top1"])

    def _register(self, trainer: Engine) -> None:
        if self._registered:
            return
        self._registered = True
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self.last)
        trainer.add_event_handler(Events.COMPLETED, self.save_final)
        trainer.add_event_handler(Events.ITERATION_COMPLETED | Events.COMPLETED, self.save_best)

    def save_final(self, trainer: Engine) -> None:
        if trainer.state.iteration % self.every:  # not already saved at this iteration
            self.last(trainer)

    def save_best(self, trainer: Engine) -> None:
        """After an evaluation at this iteration: keep the checkpoint if its top-1 is among the best."""
        iteration = trainer.state.iteration
        if self.best is None or getattr(trainer.state, "evaluated_iteration", None) != iteration:
            return
        if iteration != self._best_checked_at:  # ITERATION_COMPLETED and COMPLETED of the last iteration
            self._best_checked_at = iteration
            self.best(trainer)
