"""Synthetic inputs of the benchmark: images, the augmentation views, and the batch streams that the
sections feed (nothing is downloaded, so the table can be made on any machine).

The PIL and the batched paths draw from the same per-sample generators (``hash_seed``), as the data
set does, so the two paths of a comparison do the same work on the same images.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from benchmarks.common import MEAN, PAD, SIZE, STD
from ignite_fixmatch import augment as A
from ignite_fixmatch import augment as B
from ignite_fixmatch.data import UNLABELED, hash_seed


def image_pool(n: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, 32, 32, 3) images with smooth structure plus noise (not flat, not pure noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g) * 255
    img = torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    img = img + torch.randn(n, 3, SIZE, SIZE, generator=g) * 12
    return img.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


class Views:
    """The PIL views and their batched twins, reference RandAugment, constant padding (the defaults)."""

    def __init__(self, variant: str = "reference") -> None:
        self.weak_pil = A.WeakView(PAD, "constant", True, MEAN, STD)
        self.strong_pil = A.StrongView(variant, PAD, "constant", True, MEAN, STD)
        self.weak = B.BatchedView(None, PAD, "constant", True)
        self.strong = B.BatchedView(variant, PAD, "constant", True)


def fixmatch_batch(b: int, mu: int, device: torch.device, channels_last: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """An already augmented and normalised batch (random values): the model step's input, without the data."""
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def imgs(k: int) -> torch.Tensor:
        return torch.randn(k, 3, SIZE, SIZE, generator=g).to(device).contiguous(memory_format=fmt)

    return {"x": imgs(b), "y": torch.randint(0, 10, (b,), generator=g).to(device), "u_w": imgs(b * mu), "u_s": imgs(b * mu),
            "u_y": torch.zeros(b * mu, dtype=torch.long, device=device), "u_idx": torch.arange(b * mu, device=device)}


# ---------------------------------------------------------------- one unlabeled batch, two paths


def pil_unlabeled_batch(pool: np.ndarray, positions: range, views: Views, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """What AugmentedDataset + collate do today, per sample: PIL image, seeded generator, weak then strong."""
    ws, ss = [], []
    for p in positions:
        img = Image.fromarray(pool[p % len(pool)])
        rng = random.Random(hash_seed(seed, UNLABELED, p))
        ws.append(views.weak_pil(img, rng))
        ss.append(views.strong_pil(img, rng))
    return torch.stack(ws), torch.stack(ss)


def batched_unlabeled_params(pool_t: torch.Tensor, positions: range, views: Views, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batched path's host side: the same per-sample generators, drawing parameters only."""
    rows_w, rows_s = [], []
    for p in positions:
        rng = random.Random(hash_seed(seed, UNLABELED, p))
        rows_w.append(views.weak.sample(rng, (SIZE, SIZE)))
        rows_s.append(views.strong.sample(rng, (SIZE, SIZE)))
    idx = torch.tensor([p % len(pool_t) for p in positions])
    return pool_t.index_select(0, idx), torch.tensor(rows_w, dtype=torch.float64), torch.tensor(rows_s, dtype=torch.float64)


# ---------------------------------------------------------------- endless streams of training batches (section 4)


def pil_stream(pool: np.ndarray, b: int, mu: int, views: Views) -> Iterator[dict[str, torch.Tensor]]:
    """Reference-style data: every image through PIL, one at a time, in the training process."""
    for step in itertools.count():
        lab = range(step * b, (step + 1) * b)
        x = torch.stack([views.weak_pil(Image.fromarray(pool[p % len(pool)]), random.Random(hash_seed(0, 0, p))) for p in lab])
        u_w, u_s = pil_unlabeled_batch(pool, range(step * b * mu, (step + 1) * b * mu), views)
        no_labels = torch.zeros(b * mu, dtype=torch.long)
        yield {"x": x, "y": torch.zeros(b, dtype=torch.long), "u_w": u_w, "u_s": u_s, "u_y": no_labels, "u_idx": torch.arange(b * mu)}


def batched_stream(pool_t: torch.Tensor, b: int, mu: int, views: Views) -> Iterator[dict[str, torch.Tensor]]:
    """Our data (data.augment=batched): uint8 images and per-sample draws; BatchedAugment augments on the device."""
    for step in itertools.count():
        lab = range(step * b, (step + 1) * b)
        rows = [views.weak.sample(random.Random(hash_seed(0, 0, p)), (SIZE, SIZE)) for p in lab]
        u, pw, ps = batched_unlabeled_params(pool_t, range(step * b * mu, (step + 1) * b * mu), views)
        x = pool_t.index_select(0, torch.tensor([p % len(pool_t) for p in lab]))
        labeled = (x, torch.tensor(rows, dtype=torch.float64), torch.zeros(b, dtype=torch.long), torch.arange(b))
        yield B.BatchedAugment.batch(labeled, (u, pw, ps, torch.zeros(b * mu, dtype=torch.long), torch.arange(b * mu)))


def device_stream(pool: torch.Tensor, b: int, mu: int, views: Views, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Our default data on a GPU (data.augment=device): images held on the device, gathered by index,
    parameters drawn there by a seeded torch.Generator; nothing per image on the host."""
    g = torch.Generator(device=pool.device)
    size = (pool.shape[3], pool.shape[2])
    for step in itertools.count():
        g.manual_seed(seed * 1_000_003 + step)
        lab = torch.randint(0, len(pool), (b,), device=pool.device, generator=g)
        unl = torch.randint(0, len(pool), (b * mu,), device=pool.device, generator=g)
        yield {
            "x": pool[lab], "x_weak": views.weak.sample_torch(b, size, g), "y": torch.zeros(b, dtype=torch.long, device=pool.device),
            "u": pool[unl], "u_weak": views.weak.sample_torch(b * mu, size, g), "u_strong": views.strong.sample_torch(b * mu, size, g),
            "u_y": torch.zeros(b * mu, dtype=torch.long, device=pool.device), "u_idx": unl,
        }
