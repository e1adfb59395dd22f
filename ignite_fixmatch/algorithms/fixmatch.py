"""FixMatch (Sohn et al., NeurIPS 2020, Section 2.2): a fixed confidence threshold on the weak view's
prediction selects the pseudo-labels the strong view is trained toward. Stateless, unless
``algorithm.distribution_alignment`` is on (``alignment.py``: its ring buffer is the state)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ignite_fixmatch.algorithms.alignment import DistributionAlignment, update_alignment, weak_view
from ignite_fixmatch.algorithms.base import Algorithm, StepOutput
from ignite_fixmatch.algorithms.losses import consistency_loss, masked_consistency, pseudo_labels, supervised_loss
from ignite_fixmatch.algorithms.params import FixMatchParams


class FixMatch(Algorithm):
    """loss = CE(labeled) + lambda_u * mean(CE(strong, pseudo) * [max p_weak >= threshold])."""

    Params = FixMatchParams
    metric_names = ("loss_x", "loss_u")
    uses_labeled_counts = True  # for distribution alignment's target

    def __init__(self, params: Any, *, num_classes: int, num_unlabeled: int, labeled_counts: Sequence[int] | None = None) -> None:
        super().__init__(params, num_classes=num_classes, num_unlabeled=num_unlabeled)
        self.alignment = DistributionAlignment.from_params(params, num_classes, labeled_counts)  # None when off: no state

    def forward(self, logits_x: Tensor, y: Tensor, logits_w: Tensor, logits_s: Tensor, u_idx: Tensor, step: Tensor) -> StepOutput:
        p: FixMatchParams = self.params
        if self.alignment is not None:
            return self._aligned(logits_x, y, logits_w, logits_s)
        # Without DA: the computation of the quick start's 94.72 %, unchanged (do not reorder its float ops).
        loss_x = supervised_loss(logits_x, y)
        if p.lambda_u > 0:
            loss_u, mask, pseudo = consistency_loss(logits_s, logits_w, p.threshold, p.hard_label, p.T)
        else:  # labels only: still report what the mask would be, but do not train on it
            _, pseudo, mask = pseudo_labels(logits_w, p.threshold)
            loss_u = torch.zeros((), device=logits_x.device)
        loss = loss_x + p.lambda_u * loss_u
        return StepOutput(loss, {"loss_x": loss_x.detach(), "loss_u": loss_u.detach()}, mask, pseudo)

    def _aligned(self, logits_x: Tensor, y: Tensor, logits_w: Tensor, logits_s: Tensor) -> StepOutput:
        """The same loss with the aligned probabilities in place of p (pseudo-label, confidence, soft targets)."""
        p: FixMatchParams = self.params
        loss_x = supervised_loss(logits_x, y)
        view = weak_view(logits_w, self.alignment)
        confidence, pseudo = view.probs.max(dim=1)
        mask = (confidence >= p.threshold).float()
        if p.lambda_u > 0:
            loss_u = masked_consistency(logits_s, view.target_logits, pseudo, mask, p.hard_label, p.T)
        else:
            loss_u = torch.zeros((), device=logits_x.device)
        loss = loss_x + p.lambda_u * loss_u
        return StepOutput(loss, {"loss_x": loss_x.detach(), "loss_u": loss_u.detach()}, mask, pseudo, view.stats)

    @torch.no_grad()
    def update_state(self, **stats: Tensor) -> None:
        update_alignment(self.alignment, stats)
