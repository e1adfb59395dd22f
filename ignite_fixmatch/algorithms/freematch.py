"""FreeMatch (Wang et al., ICLR 2023): self-adaptive thresholds and the self-adaptive fairness loss.

State (buffers, all starting at 1/C): ``tau_g`` the EMA of the unlabeled batches' mean confidence,
``p_tilde`` (C,) the EMA of their mean probabilities, ``label_hist`` (C,) the EMA of their normalised
pseudo-label histogram; momentum lambda (``algorithm.momentum``, 0.999). Threshold of class c:
tau(c) = p_tilde(c) / max p_tilde * tau_g; mask = [max_p >= tau(q_hat)].

One difference from the official code (USB's ``FreeMatchThresholingHook``): it updates the EMAs with the
step's batch first and then thresholds that same batch; here the step reads the state as it was at its
start and ``update_state`` applies the batch after the backward pass (the forward is a pure function of
the state, so it compiles and every process applies one gathered update). With lambda 0.999 the lag of
one step moves the thresholds by about 0.1 % of the step's change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ignite_fixmatch.algorithms.alignment import DistributionAlignment, update_alignment, weak_view
from ignite_fixmatch.algorithms.base import Algorithm, StepOutput
from ignite_fixmatch.algorithms.losses import masked_consistency, supervised_loss
from ignite_fixmatch.algorithms.params import FreeMatchParams

_EPS = 1e-12  # keeps the divisions of an empty mask finite; the loss is then multiplied by 0


def self_adaptive_thresholds(tau_g: Tensor, p_tilde: Tensor) -> Tensor:
    """tau(c) = p_tilde(c) / max_c p_tilde * tau_g, (C,)."""
    return p_tilde / p_tilde.max() * tau_g


def histogram(labels: Tensor, weights: Tensor, num_classes: int) -> Tensor:
    """(C,) sum of ``weights`` per label: a fixed-size scatter_add (compiles; no bincount)."""
    return weights.new_zeros(num_classes).scatter_add(0, labels, weights)


def inverse_or_zero(x: Tensor) -> Tensor:
    """1 / x, and 0 where x is 0 (USB's ``replace_inf_to_zero(1 / x)``), with no inf on the way."""
    return torch.where(x > 0, 1.0 / x.clamp_min(_EPS), torch.zeros_like(x))


def fairness_loss(probs_s: Tensor, mask: Tensor, p_tilde: Tensor, label_hist: Tensor) -> Tensor:
    """The self-adaptive fairness loss, -H(SumNorm(p_tilde / label_hist), SumNorm(p_bar / h_bar)) (USB's
    ``entropy_loss``): p_bar the mean strong-view probabilities of the masked samples, h_bar the histogram
    of their strong-view predictions. Written with weights instead of boolean indexing (it compiles):
    masked mean = sum(mask * p) / sum(mask); 0 (and no NaN in any gradient) when no sample is masked.
    The gradient flows through ``probs_s`` only."""
    weights = mask.detach().float()
    count = weights.sum()
    num_classes = probs_s.shape[1]
    h_bar = histogram(probs_s.detach().argmax(dim=1), weights, num_classes) / count.clamp_min(_EPS)
    p_bar = (probs_s * weights[:, None]).sum(dim=0) / count.clamp_min(_EPS)
    target = p_tilde * inverse_or_zero(label_hist)
    target = target / target.sum().clamp_min(_EPS)
    modulated = p_bar * inverse_or_zero(h_bar)
    modulated = modulated / modulated.sum().clamp_min(_EPS)
    loss = (target * torch.log(modulated + _EPS)).sum()
    return loss * (count > 0).float()


class FreeMatch(Algorithm):
    """loss = CE(labeled) + lambda_u * mean(CE(strong, pseudo) * [max p_weak >= tau(pseudo)]) + fairness_weight * L_f."""

    Params = FreeMatchParams
    metric_names = ("loss_x", "loss_u", "loss_fair", "tau_global")
    uses_labeled_counts = True  # for distribution alignment's target

    def __init__(self, params: Any, *, num_classes: int, num_unlabeled: int, labeled_counts: Sequence[int] | None = None) -> None:
        super().__init__(params, num_classes=num_classes, num_unlabeled=num_unlabeled)
        self.register_buffer("tau_g", torch.full((), 1.0 / num_classes))
        self.register_buffer("p_tilde", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("label_hist", torch.full((num_classes,), 1.0 / num_classes))
        self.alignment = DistributionAlignment.from_params(params, num_classes, labeled_counts)

    def forward(self, logits_x: Tensor, y: Tensor, logits_w: Tensor, logits_s: Tensor, u_idx: Tensor, step: Tensor) -> StepOutput:
        p: FreeMatchParams = self.params
        loss_x = supervised_loss(logits_x, y)
        view = weak_view(logits_w, self.alignment)
        confidence, pseudo = view.probs.max(dim=1)
        mask = (confidence >= self_adaptive_thresholds(self.tau_g, self.p_tilde)[pseudo]).float()
        zero = torch.zeros((), device=logits_x.device)
        loss_u = masked_consistency(logits_s, view.target_logits, pseudo, mask, p.hard_label, p.T) if p.lambda_u > 0 else zero
        loss_f = fairness_loss(torch.softmax(logits_s.float(), dim=1), mask, self.p_tilde, self.label_hist) if p.fairness_weight > 0 else zero
        loss = loss_x + p.lambda_u * loss_u + p.fairness_weight * loss_f
        metrics = {"loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "loss_fair": loss_f.detach(), "tau_global": self.tau_g.clone()}
        return StepOutput(loss, metrics, mask, pseudo, {"probs": view.probs, **view.stats})

    @torch.no_grad()
    def update_state(self, **stats: Tensor) -> None:
        probs, m = stats["probs"].float(), self.params.momentum
        confidence, labels = probs.max(dim=1)
        hist = histogram(labels, torch.ones_like(confidence), self.num_classes)
        self.tau_g.mul_(m).add_((1 - m) * confidence.mean())
        self.p_tilde.mul_(m).add_((1 - m) * probs.mean(dim=0))
        self.label_hist.mul_(m).add_((1 - m) * hist / hist.sum())
        update_alignment(self.alignment, stats)
