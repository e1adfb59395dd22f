"""The evaluator: top-1, top-5 and loss of a model on the test loader (and its confusion matrix), reduced over
all processes; the per-class rows of a confusion matrix; the trainer event fired after each evaluation."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Engine, EventEnum
from ignite.metrics import Accuracy, ConfusionMatrix, Loss, TopKCategoricalAccuracy
from torch import nn

from ignite_fixmatch.augment.ops import normalize
from ignite_fixmatch.trainer import autocast_context


def create_evaluator(
    model: nn.Module,
    device: torch.device,
    *,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    amp: bool | None = False,
    amp_dtype: str = "auto",
    channels_last: bool = False,
    per_class: bool = False,
) -> Engine:
    """An Engine over (uint8 images, labels) batches with metrics top1, top5, loss (and the confusion matrix).

    Images are normalised with ``mean``/``std`` on the device, a batch at a time, in the model's memory format.

    Ignite's metrics all-reduce at ``compute()``, so each process evaluates only its shard.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    @torch.no_grad()
    def step(engine: Engine, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        model.eval()
        x, y = batch
        x = normalize(x.to(device, non_blocking=True), mean, std, memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        with autocast_context(device, amp, amp_dtype):
            logits = model(x)
        return logits.float(), y

    evaluator = Engine(step)
    evaluator.logger.setLevel(logging.CRITICAL)  # an error ends the run and is printed once by the command line
    Accuracy(device=device).attach(evaluator, "top1")
    TopKCategoricalAccuracy(k=min(5, num_classes), device=device).attach(evaluator, "top5")
    Loss(nn.CrossEntropyLoss(), device=device).attach(evaluator, "loss")
    if per_class:
        ConfusionMatrix(num_classes, device=device).attach(evaluator, "confusion")
    return evaluator


def per_class_rows(confusion: torch.Tensor | Sequence[Sequence[int]], classes: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of the confusion matrix are true classes: accuracy = diagonal / row sum (None: no images)."""
    matrix = confusion.tolist() if isinstance(confusion, torch.Tensor) else confusion
    rows = []
    for i, name in enumerate(classes):
        images, correct = int(sum(matrix[i])), int(matrix[i][i])
        rows.append({"class": name, "images": images, "correct": correct, "top1": 100.0 * correct / images if images else None})
    return rows


class EvaluationEvents(EventEnum):
    """Events the evaluation handler registers on the trainer. ``EVALUATED``: fired at the end of every
    evaluation on every process, with ``trainer.state.evaluation`` holding its record (handlers/evaluation.py
    documents the record's keys)."""

    EVALUATED = "evaluated"


def on_evaluated(trainer: Engine, handler: Callable[[Engine], None]) -> bool:
    """Call ``handler(trainer)`` after every evaluation; False (nothing attached) when no evaluation handler
    registered the event on this trainer (a run without one has no per-class results to report)."""
    try:
        trainer.add_event_handler(EvaluationEvents.EVALUATED, handler)
    except ValueError:  # Ignite's answer for an event not registered on this engine
        return False
    return True
