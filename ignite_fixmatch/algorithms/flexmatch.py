"""FlexMatch (Zhang et al., NeurIPS 2021): curriculum pseudo-labelling, a threshold per class that
rises with how many unlabeled images that class has already won confidently.

State: ``selected_label`` (N_u,) long, the class each unlabeled image was last predicted as with
confidence above tau, -1 for none (USB's ``selected_label``). From it, in the step:
sigma(c) = #images whose selected class is c; beta(c) = sigma(c) / max(max_c sigma, #unselected) with
the warm-up (``algorithm.warmup``, the paper's), sigma(c) / max(max_c sigma, 1) without it (USB's
``thresh_warmup=False``; beta is 0 while nothing is selected); T(c) = beta / (2 - beta) * tau (the convex
mapping); mask = [max_p > T(q_hat)]; an image is selected when max_p > tau. As in USB the mask of a step
reads the selection as it was before the step, which then updates it. Differences from USB: it compares
with >= (mask and selection), here the paper's strict > is kept (they differ only on exact ties); and it
skips its update of beta while one value (a class, or -1) holds every image, here the formula holds always.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ignite_fixmatch.algorithms.alignment import DistributionAlignment, update_alignment, weak_view
from ignite_fixmatch.algorithms.base import Algorithm, StepOutput
from ignite_fixmatch.algorithms.losses import masked_consistency, supervised_loss
from ignite_fixmatch.algorithms.params import FlexMatchParams


def class_counts(selected_label: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(sigma (C,), number unselected) as long tensors: a fixed-size scatter_add over selected_label + 1
    (bin 0 holds the -1s), no bincount, no boolean indexing, so it compiles with the step."""
    bins = torch.zeros(num_classes + 1, dtype=torch.long, device=selected_label.device)
    bins.scatter_add_(0, selected_label + 1, torch.ones_like(selected_label))
    return bins[1:], bins[0]


def learning_effect(sigma: Tensor, unselected: Tensor, warmup: bool) -> Tensor:
    """beta (C,) float32: sigma normalised by its max, or by the unselected count while that is larger (warm-up)."""
    top = sigma.max()
    denominator = torch.maximum(top, unselected) if warmup else top  # at least 1 with warm-up (N_u >= 1)
    return sigma.float() / denominator.clamp_min(1).float()


def class_thresholds(beta: Tensor, tau: float) -> Tensor:
    """T(c) = M(beta(c)) * tau with the convex mapping M(x) = x / (2 - x)."""
    return beta / (2.0 - beta) * tau


def last_confident(selected_label: Tensor, u_idx: Tensor, labels: Tensor, confident: Tensor) -> Tensor:
    """``selected_label`` after a step: each index with a confident row takes that row's label; for an index
    repeated in the (gathered, rank-ordered) batch the last confident row wins, deterministically on any
    device (an index_put with repeated indices picks any)."""
    rows = torch.arange(len(u_idx), device=u_idx.device)
    row_or_none = torch.where(confident > 0, rows, torch.full_like(rows, -1))
    last_row = torch.full_like(selected_label, -1).scatter_reduce(0, u_idx, row_or_none, reduce="amax")
    return torch.where(last_row >= 0, labels[last_row.clamp_min(0)], selected_label)


class FlexMatch(Algorithm):
    """loss = CE(labeled) + lambda_u * mean(CE(strong, pseudo) * [max p_weak > T(pseudo)]), T per class from
    the curriculum; ``threshold`` is tau, the highest a class's threshold gets."""

    Params = FlexMatchParams
    metric_names = ("loss_x", "loss_u", "threshold_mean")
    uses_labeled_counts = True  # for distribution alignment's target

    def __init__(self, params: Any, *, num_classes: int, num_unlabeled: int, labeled_counts: Sequence[int] | None = None) -> None:
        super().__init__(params, num_classes=num_classes, num_unlabeled=num_unlabeled)
        self.register_buffer("selected_label", torch.full((num_unlabeled,), -1, dtype=torch.long))
        self.alignment = DistributionAlignment.from_params(params, num_classes, labeled_counts)

    def thresholds(self) -> Tensor:
        """(C,) the per-class thresholds T(c) of the current state."""
        sigma, unselected = class_counts(self.selected_label, self.num_classes)
        return class_thresholds(learning_effect(sigma, unselected, self.params.warmup), self.params.threshold)

    def forward(self, logits_x: Tensor, y: Tensor, logits_w: Tensor, logits_s: Tensor, u_idx: Tensor, step: Tensor) -> StepOutput:
        p: FlexMatchParams = self.params
        loss_x = supervised_loss(logits_x, y)
        view = weak_view(logits_w, self.alignment)
        confidence, pseudo = view.probs.max(dim=1)
        thresholds = self.thresholds()
        mask = (confidence > thresholds[pseudo]).float()
        if p.lambda_u > 0:
            loss_u = masked_consistency(logits_s, view.target_logits, pseudo, mask, p.hard_label, p.T)
        else:  # labels only: the mask is still reported and the curriculum still moves
            loss_u = torch.zeros((), device=logits_x.device)
        loss = loss_x + p.lambda_u * loss_u
        metrics = {"loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "threshold_mean": thresholds.mean()}
        stats = {"u_idx": u_idx, "labels": pseudo, "confident": (confidence > p.threshold).float(), **view.stats}
        return StepOutput(loss, metrics, mask, pseudo, stats)

    @torch.no_grad()
    def update_state(self, **stats: Tensor) -> None:
        self.selected_label.copy_(last_confident(self.selected_label, stats["u_idx"], stats["labels"], stats["confident"]))
        update_alignment(self.alignment, stats)
