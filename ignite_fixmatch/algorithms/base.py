"""The algorithm seam: what a semi-supervised algorithm is, for the trainer.

An algorithm turns the logits of one step into the loss to back-propagate. The trainer owns
everything else (data, forward pass, optimizer, AMP, compile, DDP, checkpoints), so an algorithm is
one small class in one file:

- ``Params``: a dataclass of its typed config keys (``algorithm.<key>`` in YAML), checked in ``check``;
- ``forward(logits_x, y, logits_w, logits_s, u_idx, step) -> StepOutput``: a pure function of its
  inputs and its buffers, so it compiles with ``torch.compile`` and replays in CUDA graphs;
- ``update_state(**stats)``: how the statistics of the step (``StepOutput.stats``) change its buffers,
  run eagerly after the backward pass on the statistics *gathered from every process*, so every process
  applies the same update and the state stays identical everywhere;
- its state lives in registered buffers (``self.register_buffer``): the trainer puts the algorithm in
  the checkpoint, so it is saved and restored without its author touching ``to_save``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from ignite_fixmatch.algorithms.params import NoParams


class StepOutput(NamedTuple):
    """What an algorithm returns for one step.

    ``loss``: the scalar to back-propagate. ``metrics``: named 0-d tensors logged every step (e.g.
    loss_x, loss_u), in the order of ``metric_names``. ``mask``: (n_u,) weight of each unlabeled sample
    in the unlabeled loss (its mean is the logged ``mask_rate``). ``pseudo_labels``: (n_u,) the class
    each unlabeled sample was trained toward (``pseudo_acc`` compares them with the true labels where
    known). ``stats``: tensors with the batch in dimension 0, gathered over processes (concatenated in
    rank order) and handed to ``update_state``; empty for a stateless algorithm.
    """

    loss: Tensor
    metrics: dict[str, Tensor]
    mask: Tensor
    pseudo_labels: Tensor
    stats: dict[str, Tensor] = {}


class Algorithm(nn.Module):
    """Base class of an algorithm: see the module docstring for the contract.

    ``num_classes`` and ``num_unlabeled`` (the size of the unlabeled set, the range of ``u_idx``) are
    known when the run's data is built, before the model; state sized by them is made in ``__init__``.
    A class that sets ``uses_labeled_counts`` also gets ``labeled_counts=`` there.
    """

    Params: ClassVar[type] = NoParams
    metric_names: ClassVar[tuple[str, ...]] = ()
    # True: ``__init__`` also takes ``labeled_counts`` (labeled images per class, a list of ints; None when
    # unknown), e.g. for distribution alignment. False keeps the two-size signature, which algorithms
    # written before it still have.
    uses_labeled_counts: ClassVar[bool] = False

    def __init__(self, params: Any, *, num_classes: int, num_unlabeled: int) -> None:
        super().__init__()
        self.params, self.num_classes, self.num_unlabeled = params, num_classes, num_unlabeled

    @classmethod
    def create(cls, *, num_classes: int, num_unlabeled: int = 0, **params: Any) -> Algorithm:
        """The algorithm with ``params`` (the rest at their defaults): for code and tests that build one by hand."""
        return cls(cls.Params(**params), num_classes=num_classes, num_unlabeled=num_unlabeled)

    def forward(self, logits_x: Tensor, y: Tensor, logits_w: Tensor, logits_s: Tensor, u_idx: Tensor, step: Tensor) -> StepOutput:
        raise NotImplementedError

    @torch.no_grad()
    def update_state(self, **stats: Tensor) -> None:
        """Change the buffers from the step's gathered ``stats``; stateless algorithms have nothing to do."""

    def has_state(self) -> bool:
        """Whether the checkpoint needs to hold this algorithm (it has buffers)."""
        return any(True for _ in self.buffers())

    def describe(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self.params, f.name)!r}" for f in dataclasses.fields(self.params))
        return f"{type(self).__name__}({fields})"
