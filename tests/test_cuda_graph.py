"""CudaGraphed: the batched augmentation replayed as one CUDA graph gives the eager images bit for bit."""

from __future__ import annotations

import logging

import pytest
import torch

from ignite_fixmatch.augment.cuda_graph import CudaGraphed
from ignite_fixmatch.augment.views import BatchedAugment

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def augment_batch(device: str, n: int = 24, seed: int = 0) -> tuple[BatchedAugment, dict[str, torch.Tensor]]:
    aug = BatchedAugment("reference", 4, "constant", True, MEAN, STD, channels_last=True)
    g = torch.Generator(device=device).manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)).to(device)
    batch = {
        "x": images[:8], "x_weak": aug.weak.sample_torch(8, (32, 32), g), "y": torch.arange(8, device=device),
        "u": images, "u_weak": aug.weak.sample_torch(n, (32, 32), g), "u_strong": aug.strong.sample_torch(n, (32, 32), g),
        "u_y": torch.arange(n, device=device), "u_idx": torch.arange(n, device=device),
    }
    return aug, batch


def assert_same_views(a: dict, b: dict) -> None:
    for key in ("x", "u_w", "u_s", "y", "u_y", "u_idx"):
        assert torch.equal(a[key], b[key]), key


def test_on_cpu_tensors_it_is_the_function_itself():
    aug, batch = augment_batch("cpu")
    graphed = CudaGraphed(aug, warmup=1)
    for _ in range(4):
        assert_same_views(graphed(batch), aug(batch))
    assert graphed.graph is None and not graphed.failed


def test_warmup_must_be_positive():
    with pytest.raises(ValueError, match="warmup"):
        CudaGraphed(lambda b: dict(b), warmup=0)


@needs_cuda
def test_replays_give_the_eager_views_for_new_batches():
    aug, _ = augment_batch("cuda")
    graphed = CudaGraphed(aug, warmup=2)
    for seed in range(6):  # eager, eager, record, then replays on new images and draws
        _, batch = augment_batch("cuda", seed=seed)
        assert_same_views(graphed(batch), aug(batch))
    assert graphed.graph is not None and not graphed.failed


@needs_cuda
def test_a_batch_of_another_shape_runs_eagerly():
    aug, batch = augment_batch("cuda")
    graphed = CudaGraphed(aug, warmup=1)
    graphed(batch), graphed(batch)
    _, smaller = augment_batch("cuda", n=16, seed=3)
    assert_same_views(graphed(smaller), aug(smaller))
    assert_same_views(graphed(batch), aug(batch))


@needs_cuda
def test_what_cannot_be_recorded_runs_eagerly_with_one_warning(caplog):
    def syncs(batch):  # .item() reads the device: not allowed while recording
        return {"x": batch["x"] * float(batch["x"].sum().item())}

    graphed = CudaGraphed(syncs, warmup=1)
    x = {"x": torch.ones(4, device="cuda")}
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert torch.equal(graphed(x)["x"], torch.full((4,), 4.0, device="cuda"))
    assert graphed.failed and sum("not recorded" in r.message for r in caplog.records) == 1
