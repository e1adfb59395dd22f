"""tensorboard: every step metric and every evaluation metric in TensorBoard event files (rank 0), with
per-class accuracy, the confusion matrix as an image and the per-class pseudo-label counts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ignite_fixmatch.plugins import REPORT, Context, every_iterations, step_scalars

if TYPE_CHECKING:
    from ignite.engine import Engine
    from ignite.handlers.tensorboard_logger import TensorboardLogger

# torch, Ignite and TensorBoard are imported in attach: handlers are imported and checked before torch loads, so a bad config is refused in about a second.


class TensorBoard:
    """Train scalars every ``every`` iterations under ``train/``, evaluation metrics under ``test_<model>/``,
    written to ``OUTPUT/tensorboard``. Uses Ignite's TensorboardLogger. Attached after the evaluation
    handler (``uses`` its evaluators), wherever it is listed.

    After each evaluation (the evaluation handler's EVALUATED event): ``test_<model>/top1_per_class/<class>``
    (a fraction, like ``top1``; classes without test images are left out), the image
    ``test_<model>/confusion_matrix``, and for the pseudo-labels since the previous evaluation
    ``pseudo_labels/count/<class>`` and ``pseudo_labels/top1/<class>`` (where true labels are known); for a
    CTAugment run, the learned policy as the image ``ctaugment/policy``."""

    rank_zero_only = True
    uses = ("evaluators",)
    priority = REPORT

    def __init__(self, every: int = 10, log_dir: str = "tensorboard", grad_norm: bool = False) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1 iterations, got {every!r}")
        self.every, self.log_dir, self.grad_norm = every, log_dir, grad_norm

    def attach(self, ctx: Context) -> None:
        import torch
        from ignite.engine import Events
        from ignite.handlers.tensorboard_logger import GradsScalarHandler, OutputHandler, TensorboardLogger

        from handlers.tracking import run_policy
        from ignite_fixmatch.evaluation import on_evaluated

        self.policy = run_policy(ctx.data)
        self.logger = TensorboardLogger(log_dir=str(Path(ctx.output_dir) / self.log_dir))
        trainer = ctx.trainer
        every_iterations(trainer, self.every, lambda engine: _log_train_scalars(engine, self.logger, Events.ITERATION_COMPLETED))
        if self.grad_norm:
            grads = GradsScalarHandler(ctx.model, reduction=torch.norm)
            self.logger.attach(trainer, log_handler=grads, event_name=Events.ITERATION_COMPLETED(every=self.every))
        for name, evaluator in ctx.evaluators.items():
            self.logger.attach(
                evaluator,
                log_handler=OutputHandler(tag=f"test_{name}", metric_names=["top1", "top5", "loss"], global_step_transform=lambda *_: trainer.state.iteration),
                event_name=Events.COMPLETED,
            )
        self.models = list(ctx.evaluators)
        on_evaluated(trainer, self._log_per_class)
        trainer.add_event_handler(Events.COMPLETED, lambda _: self.logger.close())

    def _log_per_class(self, trainer: Engine) -> None:
        import numpy as np

        from handlers.tracking import POLICY_TAG, per_class_scalars, policy_image
        from ignite_fixmatch.charts import confusion_matrix_image

        record, writer = trainer.state.evaluation, self.logger.writer
        step = record["iteration"]
        for tag, value in per_class_scalars(record, names=record["classes"]).items():  # TensorBoard takes any class name
            writer.add_scalar(tag, value, step)
        for model in (m for m in self.models if m in record):
            image = confusion_matrix_image(record[model]["confusion"], record["classes"])
            writer.add_image(f"test_{model}/confusion_matrix", image, step, dataformats="HWC")
        if self.policy is not None:  # CTAugment: its learned policy at this evaluation
            writer.add_image(POLICY_TAG, np.asarray(policy_image(self.policy, step)), step, dataformats="HWC")


def _log_train_scalars(engine: Engine, logger: TensorboardLogger, event_name: Any) -> None:
    for key, value in step_scalars(engine).items():
        logger.writer.add_scalar(f"train/{key}", value, engine.state.iteration)
