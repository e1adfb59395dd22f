"""checkpoint: periodic resumable checkpoints (last n, and the best by evaluation top-1), written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ignite_fixmatch.checkpoint_names import CHECKPOINT_DIR, best_score, checkpoint_iteration, is_best, list_checkpoints, newest_checkpoint
from ignite_fixmatch.errors import CheckpointWriteError
from ignite_fixmatch.plugins import PERSIST, Context

if TYPE_CHECKING:
    from ignite.engine import Engine
    from ignite.handlers import Checkpoint

# Ignite is imported in attach: handlers are imported and checked before torch loads, so a bad config is refused in about a second.


class Checkpointing:
    """Every ``every`` iterations and at the end, save the run's ``to_save`` dict (trainer, model, EMA,
    optimizer, scheduler, scaler, RNG states, handler states, config) with Ignite's Checkpoint.

    - Atomic: DiskSaver writes a temporary file and renames it, so a crash mid-write never breaks
      a checkpoint. Old checkpoints are deleted only after the new one is complete (Ignite's own
      rotation deletes first, which with ``keep: 1`` could leave none after a crash).
    - Saved after every other handler of the iteration (PERSIST priority: attached last), so the
      state on disk is the complete state after that iteration.
    - The data position needs no saving: the streams restart at the trainer's iteration.
    - Before every write (periodic, final, best, and ``ctx.save_checkpoint`` on preemption) the
      ``ctx.guards`` run; one that raises (a diverged loss) stops the run unsaved.
    - ``keep_best >= 1`` needs the evaluator of ``best_model`` (the evaluation handler), for its top-1.
    """

    provides = ("checkpoints",)
    uses = ("guards",)
    priority = PERSIST

    def __init__(self, every: int = 1000, keep: int = 2, keep_best: int = 1, best_model: str = "ema") -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1 iterations, got {every!r}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (checkpoints kept), got {keep!r}")
        if keep_best < 0:
            raise ValueError(f"keep_best must be >= 0 (0: no best checkpoint), got {keep_best!r}")
        if best_model not in ("ema", "raw"):
            raise ValueError(f"best_model must be 'ema' or 'raw', got {best_model!r}")
        self.every, self.keep, self.keep_best, self.best_model = every, keep, keep_best, best_model
        self.needs = (f"evaluator:{best_model}",) if keep_best else ()
        self.alternatives = {
            f"evaluator:{best_model}": "set checkpoint's best_model to a model that evaluation evaluates, or keep_best to 0 (no best checkpoint)"
        }
        self._best_checked_at = -1

    def attach(self, ctx: Context) -> None:
        from ignite.engine import Events
        from ignite.handlers import Checkpoint, DiskSaver

        self.run_dir = Path(ctx.output_dir)
        self.folder = self.run_dir / CHECKPOINT_DIR
        self.is_writer = ctx.rank == 0
        if self.is_writer:
            for stale in self.folder.glob("tmp*"):  # left by a crash inside an atomic write
                stale.unlink()
        saver = DiskSaver(str(self.folder), atomic=True, require_empty=False, create_dir=True)
        step = lambda engine, _: ctx.trainer.state.iteration  # noqa: E731  name files by iteration
        self.last = Checkpoint(ctx.to_save, saver, n_saved=None, global_step_transform=step)
        self.best = Checkpoint(
            ctx.to_save, saver, filename_prefix="best", n_saved=None, global_step_transform=step,
            score_function=self._score, score_name="top1",
        )
        self.evaluators = ctx.evaluators
        if self.keep_best and self.best_model not in self.evaluators:  # plan_handlers refuses such a list: attached by hand
            raise ValueError(f"checkpoint: best_model={self.best_model!r} but the evaluation handler evaluating it is not attached before it")
        self.guards = ctx.guards
        ctx.save_checkpoint = self.save_last
        # One handler per event (each one Ignite dispatches costs about 1 us per iteration).
        ctx.trainer.add_event_handler(Events.ITERATION_COMPLETED, self._after_iteration)
        ctx.trainer.add_event_handler(Events.COMPLETED, self._at_end)

    def _files(self, best: bool) -> list[Path]:
        return [p for p in list_checkpoints(self.run_dir) if is_best(p) == best]

    def _score(self, engine: Engine) -> float:
        return float(self.evaluators[self.best_model].state.metrics["top1"])

    def _after_iteration(self, trainer: Engine) -> None:
        if trainer.state.iteration % self.every == 0:
            self.save_last(trainer)
        if self.keep_best:
            self.save_best(trainer)

    def _at_end(self, trainer: Engine) -> None:
        self.save_final(trainer)
        if self.keep_best:
            self.save_best(trainer)

    def save_last(self, trainer: Engine) -> None:
        self._guard(trainer)
        self._write(self.last, trainer)
        self._prune(self._files(best=False), keep=self.keep, key=checkpoint_iteration)

    def save_final(self, trainer: Engine) -> None:
        if trainer.state.iteration % self.every:  # not already saved at this iteration
            self.save_last(trainer)

    def save_best(self, trainer: Engine) -> None:
        """After an evaluation at this iteration: keep the checkpoint if its top-1 is among the best."""
        iteration = trainer.state.iteration
        if getattr(trainer.state, "evaluated_iteration", None) != iteration or iteration == self._best_checked_at:
            return
        self._best_checked_at = iteration  # ITERATION_COMPLETED and COMPLETED of the last iteration
        self._guard(trainer)  # here, not only before a write: every process runs it at the same iteration
        existing = self._files(best=True)
        score = self._score(trainer)
        if len(existing) >= self.keep_best and score <= min(best_score(p) for p in existing):
            return
        self._write(self.best, trainer)
        self._prune(self._files(best=True), keep=self.keep_best, key=lambda p: (best_score(p), checkpoint_iteration(p)))

    def _guard(self, trainer: Engine) -> None:
        for guard in self.guards:
            guard(trainer)

    def _prune(self, files: list[Path], keep: int, key) -> None:
        if self.is_writer:
            for old in sorted(files, key=key)[:-keep]:
                old.unlink(missing_ok=True)

    def _write(self, checkpoint: Checkpoint, trainer: Engine) -> None:
        """A failed write (disk full, folder gone) stops the run with the previous checkpoints intact:
        the atomic saver removed its temporary file and nothing older was deleted yet."""
        try:
            checkpoint(trainer)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
            last = newest_checkpoint(self.run_dir) or "none"
            raise CheckpointWriteError(
                f"could not write the checkpoint of iteration {trainer.state.iteration} to {self.folder}: {e}. "
                f"The last complete checkpoint is {last}. Free disk space (or fix the folder's permissions), then resume=auto."
            ) from e
