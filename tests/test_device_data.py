"""data.augment=device: the data set on the training device, batches gathered and augmented there.

Runs on the CPU here (the same code as on a GPU); the CUDA variants run where a GPU is present.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import cli, final_state_matches, kill_after_checkpoint, tiny_overrides
from ignite_fixmatch.config import load_config
from ignite_fixmatch.data import LABELED, UNLABELED, InfiniteShardedBatchSampler, build_data, build_eval_loader
from ignite_fixmatch.datasets import build_sources
from ignite_fixmatch.device_data import DeviceEvalBatches, DeviceResidentStream

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KEYS = ("x", "x_weak", "y", "u", "u_weak", "u_strong", "u_y", "u_idx")


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal, NaN equal to NaN (parameter rows hold NaN for ops without a magnitude)."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def digits_data(**overrides: str):
    args = ["data.name=digits", "data.num_labels=50", "data.batch_size=8", "data.mu=3", "data.augment=device", "data.flip=false"]
    cfg = load_config(None, args + [f"{k}={v}" for k, v in overrides.items()])
    return cfg, build_data(cfg, build_sources("digits", "unused", image_size=16))


def stream(cfg, data, device: str, rank: int = 0, world: int = 1, start: int = 0) -> DeviceResidentStream:
    d = cfg.data
    return DeviceResidentStream(data, d.batch_size, d.mu, cfg.seed, rank, world, torch.device(device), lambda: start)


@pytest.mark.parametrize("device", DEVICES)
def test_batches_follow_the_loaders_order_with_the_right_labels(device):
    """Same images, in the same order, as the loader path's sampler; labels are the images' own."""
    cfg, data = digits_data()
    s = stream(cfg, data, device)
    train = data.sources.train
    labeled = InfiniteShardedBatchSampler(len(data.labeled_indices), 8, seed=cfg.seed, stream=LABELED)
    unlabeled = InfiniteShardedBatchSampler(len(data.unlabeled), 24, seed=cfg.seed, stream=UNLABELED)
    for b in (0, 1, 7, 40):  # 40: past the first pass over the 50 labeled images
        batch = s.batch(b)
        assert all(batch[k].device.type == device for k in KEYS)
        idx = [int(data.labeled_indices[i]) for i, _ in labeled.batch(b)]
        expected = torch.from_numpy(train.uint8_batch(idx)).permute(0, 3, 1, 2)
        assert torch.equal(batch["x"].cpu(), expected)
        assert batch["y"].cpu().tolist() == [int(train.targets[i]) for i in idx]
        u_idx = [i for i, _ in unlabeled.batch(b)]  # unlabeled pool = the training images here
        assert torch.equal(batch["u"].cpu(), torch.from_numpy(train.uint8_batch(u_idx)).permute(0, 3, 1, 2))
        assert batch["u_y"].cpu().tolist() == [int(train.targets[i]) for i in u_idx]
        assert batch["u_idx"].cpu().tolist() == u_idx  # the same indices into the unlabeled set as the loader path


@pytest.mark.parametrize("device", DEVICES)
def test_global_batch_is_the_same_for_any_number_of_processes(device):
    """Rank r of 2 holds items r, r+2, ... of the one-process batch: images, labels and draws."""
    cfg, data = digits_data()
    whole = stream(cfg, data, device).batch(3)
    shares = [stream(cfg, data, device, rank=r, world=2).batch(3) for r in range(2)]
    for key in KEYS:
        for r in range(2):
            assert same(shares[r][key], whole[key][r::2]), key


@pytest.mark.parametrize("device", DEVICES)
def test_a_resumed_stream_continues_exactly_and_draws_differ_per_batch(device):
    cfg, data = digits_data()
    first = iter(stream(cfg, data, device))
    batches = [next(first) for _ in range(5)]
    resumed = next(iter(stream(cfg, data, device, start=3)))
    for key in KEYS:
        assert same(resumed[key], batches[3][key]), key
    assert not same(batches[3]["u_strong"], batches[4]["u_strong"])
    # the views' draws: weak rows differ from strong rows, and images are augmented differently
    views = data.batched(batches[0])
    assert views["u_w"].shape == views["u_s"].shape == (24, 1, 16, 16)
    assert not torch.equal(views["u_w"], views["u_s"])


def test_extra_unlabeled_images_and_excluded_labeled_ones_are_gathered_from_their_own_pool(tmp_path):
    """unlabeled_includes_labeled=false: the pool is the other training images, copied once."""
    cfg, data = digits_data(**{"data.unlabeled_includes_labeled": "false"})
    s = stream(cfg, data, "cpu")
    assert len(s.unlabeled) == len(data.sources.train) - 50
    batch = s.batch(0)
    sampler = InfiniteShardedBatchSampler(len(data.unlabeled), 24, seed=cfg.seed, stream=UNLABELED)
    expected = [data.unlabeled.load(i) for i, _ in sampler.batch(0)]
    assert torch.equal(batch["u"], torch.stack([torch.from_numpy(np.array(img)).unsqueeze(0) for img in expected]))
    assert batch["u_idx"].tolist() == [i for i, _ in sampler.batch(0)]  # indices into the pool, not into the training set


@pytest.mark.parametrize("device", DEVICES)
def test_device_eval_batches_hold_the_loaders_images(device):
    """The test split on the device, sharded without padding: the same (images, labels) as the eval loader."""
    _, data = digits_data()
    for world in (1, 2):
        for rank in range(world):
            on_device = list(DeviceEvalBatches(data.sources.test, 100, rank, world, torch.device(device)))
            loaded = list(build_eval_loader(data.sources, 100, 0, rank, world))
            assert len(on_device) == len(loaded)
            for (xd, yd), (xl, yl) in zip(on_device, loaded):
                assert xd.dtype == xl.dtype == torch.uint8
                assert torch.equal(xd.cpu(), xl) and torch.equal(yd.cpu(), yl)


@pytest.mark.slow
def test_device_data_trains_and_resumes_bit_identically_after_sigkill(tmp_path, folder):
    """A real CLI run with data.augment=device, straight to 20 iterations; another killed after its
    checkpoint at 10 and resumed with resume=auto ends bit-identical."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = cli(["configs/quickstart.yaml", *tiny_overrides(folder, straight, "data.augment=device")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "augmentation batched on the device (data set held there)" in result.stderr
    args = ["configs/quickstart.yaml", *tiny_overrides(folder, killed, "data.augment=device")]
    kill_after_checkpoint(args, killed)
    assert not (killed / "checkpoints" / "checkpoint_20.pt").exists()
    resumed = cli([*args, "resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final_state_matches(straight, killed)
    assert json.loads((straight / "results.json").read_text())["history"] == json.loads((killed / "results.json").read_text())["history"]
