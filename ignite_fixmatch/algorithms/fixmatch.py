"""FixMatch (Sohn et al., NeurIPS 2020, Section 2.2): a fixed confidence threshold on the weak view's
prediction selects the pseudo-labels the strong view is trained toward. Stateless."""

from __future__ import annotations

import torch
from torch import Tensor

from ignite_fixmatch.algorithms.base import Algorithm, StepOutput
from ignite_fixmatch.algorithms.losses import consistency_loss, pseudo_labels, supervised_loss
from ignite_fixmatch.algorithms.params import FixMatchParams


class FixMatch(Algorithm):
    """loss = CE(labeled) + lambda_u * mean(CE(strong, pseudo) * [max p_weak >= threshold])."""

    Params = FixMatchParams
    metric_names = ("loss_x", "loss_u")

    def forward(self, logits_x: Tensor, y: Tensor, logits_w: Tensor, logits_s: Tensor, u_idx: Tensor, step: Tensor) -> StepOutput:
        p: FixMatchParams = self.params
        loss_x = supervised_loss(logits_x, y)
        if p.lambda_u > 0:
            loss_u, mask, pseudo = consistency_loss(logits_s, logits_w, p.threshold, p.hard_label, p.T)
        else:  # labels only: still report what the mask would be, but do not train on it
            _, pseudo, mask = pseudo_labels(logits_w, p.threshold)
            loss_u = torch.zeros((), device=logits_x.device)
        loss = loss_x + p.lambda_u * loss_u
        return StepOutput(loss, {"loss_x": loss_x.detach(), "loss_u": loss_u.detach()}, mask, pseudo)
