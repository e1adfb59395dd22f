"""A small algorithm of a user's own, loaded by dotted path (``algorithm.name=tests.toy_algorithm:ClassTableMatch``):
FixMatch with a fixed per-class threshold table, plus state (per-class counts of confident pseudo-labels
and each unlabeled image's last confident class) that exercises u_idx, gathering over processes and
the checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ignite_fixmatch.algorithms import Algorithm, StepOutput
from ignite_fixmatch.algorithms.losses import masked_consistency, pseudo_labels, supervised_loss
from ignite_fixmatch.config import require


@dataclass
class ClassTableParams:
    thresholds: list[float] = field(default_factory=list)  # per class; empty: `default` for every class
    default: float = 0.5

    def check(self) -> None:
        require(all(0.0 <= t <= 1.0 for t in self.thresholds), "algorithm.thresholds", self.thresholds, "numbers in [0, 1]")


class ClassTableMatch(Algorithm):
    Params = ClassTableParams
    metric_names = ("loss_x", "loss_u", "confident_seen")

    def __init__(self, params: ClassTableParams, *, num_classes: int, num_unlabeled: int) -> None:
        super().__init__(params, num_classes=num_classes, num_unlabeled=num_unlabeled)
        table = params.thresholds or [params.default] * num_classes
        if len(table) != num_classes:
            raise ValueError(f"thresholds has {len(table)} entries for {num_classes} classes")
        self.register_buffer("thresholds", torch.tensor(table, dtype=torch.float32))
        self.register_buffer("class_counts", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("last_label", torch.full((num_unlabeled,), -1, dtype=torch.long))

    def forward(self, logits_x: Tensor, y: Tensor, logits_w: Tensor, logits_s: Tensor, u_idx: Tensor, step: Tensor) -> StepOutput:
        probs, labels, _ = pseudo_labels(logits_w, 0.0)
        mask = (probs.max(dim=1).values >= self.thresholds[labels]).float()
        loss_x = supervised_loss(logits_x, y)
        loss_u = masked_consistency(logits_s, logits_w, labels, mask)
        seen = (self.last_label >= 0).sum().to(torch.float32)  # state read inside the (compiled) step
        stats = {"u_idx": u_idx, "labels": labels, "confident": mask}
        return StepOutput(loss_x + loss_u, {"loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "confident_seen": seen}, mask, labels, stats)

    @torch.no_grad()
    def update_state(self, u_idx: Tensor, labels: Tensor, confident: Tensor) -> None:
        keep = confident > 0
        self.last_label[u_idx[keep]] = labels[keep]
        self.class_counts += torch.bincount(labels[keep], minlength=self.num_classes).to(self.class_counts.dtype)


class DumpAlgorithmState:
    """Test handler: at the end of the run, every process writes its algorithm's state to
    ``<prefix>.rank<r>.pt``, so a test can compare the processes' states."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def attach(self, ctx) -> None:
        from ignite.engine import Events

        algorithm, rank = ctx.to_save["algorithm"], ctx.rank
        ctx.trainer.add_event_handler(Events.COMPLETED, lambda _: torch.save(algorithm.state_dict(), f"{self.prefix}.rank{rank}.pt"))
