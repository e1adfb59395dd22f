"""The two shapes of a training batch, defined once (typed dicts: Ignite, pinning, CUDA graphs and
``.to(device)`` loops see plain dicts).

``TrainBatch`` is what an update consumes. ``DrawnBatch`` is what the batched and device data paths
carry instead: uint8 images plus each sample's augmentation draws, made into a ``TrainBatch`` on the
training device by ``BatchedAugment``.
"""

from __future__ import annotations

from typing import NotRequired, TypedDict

from torch import Tensor


class TrainBatch(TypedDict):
    x: Tensor  # labeled images, weak view, normalised float (B, C, H, W)
    y: Tensor  # their labels (B,)
    u_w: Tensor  # unlabeled images, weak view (mu*B, C, H, W)
    u_s: Tensor  # the same images, strong view
    u_y: Tensor  # their true labels where known (benchmark data), else -1: only for the pseudo_acc metric
    u_idx: Tensor  # their indices into the unlabeled set, in [0, number of unlabeled images)
    # CTAugment only (augment/ctaugment.py): the labeled images' probe views and the ops and values they used
    probe: NotRequired[Tensor]
    probe_ids: NotRequired[Tensor]
    probe_args: NotRequired[Tensor]


class DrawnBatch(TypedDict):
    x: Tensor  # labeled images, uint8 (B, C, H, W)
    x_weak: Tensor  # their weak-view draws, one parameter row per image
    y: Tensor
    u: Tensor  # unlabeled images, uint8
    u_weak: Tensor  # their weak-view draws
    u_strong: Tensor  # their strong-view draws
    u_y: Tensor
    u_idx: Tensor
    x_probe: NotRequired[Tensor]  # CTAugment only: the labeled images' probe draws
