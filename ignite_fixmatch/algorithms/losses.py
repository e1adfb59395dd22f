"""FixMatch's maths as small pure functions (paper Section 2, Algorithm 1), shared by the algorithms.

All take logits in float32 and detach the weak view where it only supplies targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def supervised_loss(logits_x: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of the labeled part, mean over the labeled batch."""
    return F.cross_entropy(logits_x, targets, reduction="mean")


def pseudo_labels(logits_weak: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """(probabilities, hard pseudo-labels, mask) from the weak view; no gradient flows back.

    The mask is 1.0 where the top probability is at or above ``threshold``.
    """
    probs = torch.softmax(logits_weak.detach().float(), dim=1)
    confidence, labels = probs.max(dim=1)
    mask = (confidence >= threshold).float()
    return probs, labels, mask


def masked_consistency(logits_strong: Tensor, logits_weak: Tensor, labels: Tensor, mask: Tensor, hard_label: bool = True, T: float = 1.0) -> Tensor:
    """The unlabeled loss for a given mask: mean over *all* unlabeled samples (masked-out ones count as 0).

    Hard: CE(strong, labels) * mask. Soft: mask * sum_c -softmax(weak / T)_c * log_softmax(strong)_c.
    """
    if hard_label:
        per_sample = F.cross_entropy(logits_strong, labels, reduction="none")
    else:
        soft_targets = torch.softmax(logits_weak.detach().float() / T, dim=1)
        per_sample = -(soft_targets * F.log_softmax(logits_strong.float(), dim=1)).sum(dim=1)
    return (per_sample * mask).mean()


def consistency_loss(
    logits_strong: Tensor,
    logits_weak: Tensor,
    threshold: float,
    hard_label: bool = True,
    T: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """FixMatch's unlabeled loss with its fixed threshold: (loss_u, mask, pseudo-labels)."""
    _, labels, mask = pseudo_labels(logits_weak, threshold)
    return masked_consistency(logits_strong, logits_weak, labels, mask, hard_label, T), mask, labels


def masked_accuracy(pseudo: Tensor, true_labels: Tensor, mask: Tensor) -> Tensor:
    """Accuracy of the pseudo-labels that passed the threshold; NaN where none did or labels are unknown."""
    known = (true_labels >= 0).float() * mask
    correct = ((pseudo == true_labels).float() * known).sum()
    return correct / known.sum()  # 0/0 -> NaN on purpose: "no measurement", not "0 % right"
