"""Distribution alignment (ReMixMatch, Berthelot et al. 2020), a switch of every built-in algorithm.

The weak view's probabilities are scaled by p_labeled / p_running and renormalised, so the pseudo-labels
follow the labeled set's class distribution instead of the model's current bias. p_running is the mean
of the last ``window`` unlabeled batches' mean probabilities (a ring buffer, ReMixMatch's 128), uniform
until the first batch is seen. The aligned probabilities replace p everywhere in the algorithm
(pseudo-label, confidence, its own statistics); the ring is fed the raw probabilities, gathered over
processes (``DA_PROBS`` in the step's stats), so every process keeps the same ring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

DA_PROBS = "da_probs"  # the stats key of DA's input: the raw (pre-alignment) probabilities of the weak view


def labeled_distribution(labeled_counts: Sequence[int] | None, num_classes: int) -> Tensor:
    """(C,) float32: the labeled set's class frequencies; uniform when unknown (None or no labels)."""
    if labeled_counts is None or sum(labeled_counts) == 0:
        return torch.full((num_classes,), 1.0 / num_classes)
    if len(labeled_counts) != num_classes:
        raise ValueError(f"labeled_counts has {len(labeled_counts)} entries for {num_classes} classes")
    counts = torch.tensor(list(labeled_counts), dtype=torch.float64)
    return (counts / counts.sum()).float()


def running_mean(history: Tensor, filled: Tensor) -> Tensor:
    """(C,) mean of the first ``filled`` rows of the ring ``history`` (window, C); uniform while none is.

    Pure tensor code (no Python branch on ``filled``): it runs inside the compiled step."""
    window, num_classes = history.shape
    used = (torch.arange(window, device=history.device) < filled).to(history.dtype)
    mean = (history * used[:, None]).sum(dim=0) / filled.clamp_min(1).to(history.dtype)
    return torch.where(filled > 0, mean, torch.full_like(mean, 1.0 / num_classes))


def align(probs: Tensor, p_labeled: Tensor, p_running: Tensor) -> Tensor:
    """normalise(probs * p_labeled / p_running) per row; the clamps only keep an underflowed class finite."""
    scaled = probs * (p_labeled / p_running.clamp_min(1e-12))
    return scaled / scaled.sum(dim=1, keepdim=True).clamp_min(1e-12)


class DistributionAlignment(nn.Module):
    """DA's state as buffers (they join the algorithm's state dict, so its checkpoint): ``p_labeled`` (C,),
    the ring ``history`` (window, C) of batch means, ``filled`` (rows in use) and ``next`` (the row to write)."""

    def __init__(self, num_classes: int, window: int = 128, labeled_counts: Sequence[int] | None = None) -> None:
        super().__init__()
        self.register_buffer("p_labeled", labeled_distribution(labeled_counts, num_classes))
        self.register_buffer("history", torch.zeros(window, num_classes))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("next", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_params(cls, params: Any, num_classes: int, labeled_counts: Sequence[int] | None) -> DistributionAlignment | None:
        """DA as ``params`` (an ``AlignmentParams``) ask: None when ``distribution_alignment`` is off."""
        if not params.distribution_alignment:
            return None
        return cls(num_classes, params.da_window, labeled_counts)

    def forward(self, probs: Tensor) -> Tensor:
        """(n, C) probabilities -> aligned (n, C) probabilities, from the state as it is (no update)."""
        return align(probs, self.p_labeled, running_mean(self.history, self.filled))

    @torch.no_grad()
    def update(self, batch_probs: Tensor) -> None:
        """Push the mean of ``batch_probs`` (the step's raw probabilities, gathered over processes) as one
        row of the ring. In place: CUDA graphs and compiled steps keep reading the same storage."""
        window = self.history.shape[0]
        self.history[self.next] = batch_probs.to(self.history.dtype).mean(dim=0)
        self.next.copy_((self.next + 1) % window)
        self.filled.copy_((self.filled + 1).clamp_max(window))


class WeakView(NamedTuple):
    """The weak view as an algorithm uses it: ``probs`` (aligned when DA is on), the logits whose
    softmax(./T) gives soft targets that follow ``probs``, and DA's entry of the step's stats."""

    probs: Tensor
    target_logits: Tensor
    stats: dict[str, Tensor]


def weak_view(logits_w: Tensor, alignment: DistributionAlignment | None) -> WeakView:
    """The weak view's probabilities (no gradient), aligned by ``alignment`` when there is one.

    With DA the soft targets are softmax(log(p_aligned) / T): the aligned probabilities sharpened by T."""
    probs = torch.softmax(logits_w.detach().float(), dim=1)
    if alignment is None:
        return WeakView(probs, logits_w, {})
    aligned = alignment(probs)
    return WeakView(aligned, aligned.log(), {DA_PROBS: probs})


def update_alignment(alignment: DistributionAlignment | None, stats: dict[str, Tensor]) -> None:
    """Feed DA its gathered raw probabilities (eager, after the backward pass), if it is on."""
    if alignment is not None:
        alignment.update(stats[DA_PROBS])
