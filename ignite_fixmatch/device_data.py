"""``data.augment: device``: the data set lives on the training device, and a step costs the host nothing.

The images are copied once to the device as uint8 (CIFAR-10: 150 MB). Each step then gathers its images
by index and draws its augmentation parameters there, from a ``torch.Generator`` seeded by
``(seed, stream, batch)``: no loader workers, no per-image Python, no host synchronisation.

What stays the same as the loader paths: the order of the images (the same per-pass permutations as
:class:`data.InfiniteShardedBatchSampler`), the global batch whatever the number of processes (every
rank draws the whole batch's parameters and keeps its share), and exact resume (batch ``b`` is a
function of ``(seed, b)`` only). What differs: the draws come from torch's generator, not from each
sample's ``random.Random``, so the pictures differ from the PIL path's while their distribution is the
same (``tests/test_augment_batched.py`` tests that).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from ignite_fixmatch.augment.ctaugment import CTAugmentViews
from ignite_fixmatch.augment.views import BatchedAugment
from ignite_fixmatch.batch import DrawnBatch
from ignite_fixmatch.data import LABELED, UNLABELED, FixMatchData, ShardedEvalSampler, hash_seed, pass_permutation, uint8_images
from ignite_fixmatch.datasets import ImageSource

DRAWS = 1  # seed tag: the augmentation draws of a batch, independent of the permutation of a pass


def source_uint8(source: ImageSource, indices: np.ndarray | None = None, chunk: int = 4096) -> Tensor:
    """Images of ``source`` (all, or ``indices``) as one uint8 tensor (N, C, H, W) on the host."""
    idx = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
    return torch.cat([uint8_images(source, idx[i : i + chunk]) for i in range(0, len(idx), chunk)]).contiguous()


class DevicePool:
    """One stream's images on the device: ``images[index[i]]`` is stream item ``i`` with label ``targets[i]``."""

    def __init__(self, images: Tensor, index: Tensor, targets: Tensor) -> None:
        self.images, self.index, self.targets = images, index, targets
        self._perms: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.index)

    def positions(self, first: int, count: int, step: int, seed: int, stream: int) -> Tensor:
        """Stream items at positions first, first + step, ... (< first + count), as a device index tensor:
        pass ``e`` of the stream is the permutation drawn from (seed, stream, e), as in the loaders."""
        n = len(self)
        e0, e1 = first // n, (first + count - 1) // n
        for e in list(self._perms):
            if e < e0:
                del self._perms[e]
        perms = []
        for e in range(e0, e1 + 1):
            if e not in self._perms:
                self._perms[e] = pass_permutation(n, seed, stream, e).to(self.images.device, non_blocking=True)
            perms.append(self._perms[e])
        order = perms[0] if len(perms) == 1 else torch.cat(perms)
        offset = first - e0 * n
        return order[offset : offset + count : step]

    def gather(self, items: Tensor) -> tuple[Tensor, Tensor]:
        """(uint8 images, labels) of stream items ``items``."""
        flat = self.images.view(self.images.shape[0], -1)
        images = flat.index_select(0, self.index[items]).view(-1, *self.images.shape[1:])
        return images, self.targets[items]


class DeviceResidentStream:
    """The trainer's data for ``data.augment: device``: an endless sequence of batch dicts in the keys of
    :class:`BatchedAugment` (uint8 images and their parameter rows), all on ``device``.

    ``iter()`` starts at ``start_iteration()`` (the trainer's iteration once a checkpoint is loaded).
    """

    def __init__(
        self, data: FixMatchData, batch_size: int, mu: int, seed: int, rank: int, world_size: int,
        device: torch.device, start_iteration: Callable[[], int],
    ) -> None:
        if data.batched is None:
            raise ValueError("DeviceResidentStream needs data.batched (the views that augment on the device)")
        self.augment: BatchedAugment | CTAugmentViews = data.batched
        self.batch_size, self.mu, self.seed = batch_size, mu, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        self.start_iteration = start_iteration
        sources = data.sources
        train = source_uint8(sources.train).to(device)
        train_targets = torch.as_tensor(sources.train.targets, device=device)
        labeled_index = torch.as_tensor(data.labeled_indices, device=device)
        self.labeled = DevicePool(train, labeled_index, train_targets[labeled_index])
        parts = data.unlabeled.parts
        if len(parts) == 1 and parts[0][0] is sources.train:  # the training images again: no second copy
            index = torch.as_tensor(parts[0][1], device=device)
            self.unlabeled = DevicePool(train, index, train_targets[index])
        else:
            images = torch.cat([source_uint8(src, idx) for src, idx in parts]).to(device)
            targets = np.concatenate([src.targets[idx] for src, idx in parts])
            self.unlabeled = DevicePool(images, torch.arange(len(images), device=device), torch.as_tensor(targets, device=device))
        self.generator = torch.Generator(device=device)
        self.size = (train.shape[3], train.shape[2])  # (width, height), as the views' draws expect

    def _draws(self, view, global_batch: int) -> Tensor:
        """This rank's share of the parameter rows of global batch ``b`` (drawn whole: any world size agrees)."""
        rows = view.sample_torch(global_batch, self.size, self.generator)
        return rows[self.rank :: self.world_size]

    def batch(self, b: int) -> DrawnBatch:
        """Global batch ``b``, this rank's share."""
        b_l, b_u = self.batch_size, self.batch_size * self.mu
        weak, strong = self.augment.weak, self.augment.strong
        x, y = self.labeled.gather(self.labeled.positions(b * b_l + self.rank, b_l - self.rank, self.world_size, self.seed, LABELED))
        u_idx = self.unlabeled.positions(b * b_u + self.rank, b_u - self.rank, self.world_size, self.seed, UNLABELED)
        u, u_y = self.unlabeled.gather(u_idx)
        self.generator.manual_seed(hash_seed(self.seed, LABELED, b, DRAWS))
        x_weak = self._draws(weak, b_l)
        probe = self.augment.probe if isinstance(self.augment, CTAugmentViews) else None
        x_probe = None if probe is None else self._draws(probe, b_l)  # after the weak draws: those stay as without it
        self.generator.manual_seed(hash_seed(self.seed, UNLABELED, b, DRAWS))
        u_weak = self._draws(weak, b_u)
        u_strong = self._draws(strong, b_u)
        batch = DrawnBatch(x=x, x_weak=x_weak, y=y, u=u, u_weak=u_weak, u_strong=u_strong, u_y=u_y, u_idx=u_idx)
        if x_probe is not None:
            batch["x_probe"] = x_probe
        return batch

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        b = self.start_iteration()
        while True:
            yield self.batch(b)
            b += 1


class DeviceEvalBatches:
    """The test split on the device, as (uint8 images, labels) batches of this rank's shard (rank,
    rank + world, ...: every image once), for the evaluator; no loader, no host work."""

    def __init__(self, source: ImageSource, batch_size: int, rank: int, world_size: int, device: torch.device) -> None:
        shard = np.asarray(ShardedEvalSampler(len(source), rank, world_size).indices)
        self.images = source_uint8(source, shard).to(device)
        self.targets = torch.as_tensor(source.targets[shard], device=device)
        self.batch_size = batch_size // world_size

    def __len__(self) -> int:
        return -(-len(self.targets) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, len(self.targets), self.batch_size):
            yield self.images[i : i + self.batch_size], self.targets[i : i + self.batch_size]
