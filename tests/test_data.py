"""Labeled split, stateless samplers and the data stream: deterministic, sharded, resumable."""

import numpy as np
import pytest
import torch

from ignite_fixmatch.config import ConfigError, load_config
from ignite_fixmatch.data import (
    InfiniteShardedBatchSampler,
    ShardedEvalSampler,
    FixMatchStream,
    build_data,
    split_labeled,
)
from ignite_fixmatch.datasets import build_sources


def test_split_is_balanced_deterministic_and_independent_of_global_rng():
    targets = np.repeat(np.arange(10), 50)
    a = split_labeled(targets, 40, 10, seed=0)
    np.random.seed(123)
    torch.manual_seed(5)
    b = split_labeled(targets, 40, 10, seed=0)
    assert np.array_equal(a, b)
    assert np.bincount(targets[a], minlength=10).tolist() == [4] * 10
    assert len(set(a.tolist())) == 40
    assert not np.array_equal(a, split_labeled(targets, 40, 10, seed=1))
    assert np.array_equal(split_labeled(targets, -1, 10, seed=0), np.arange(500))


def test_split_errors():
    targets = np.array([0] * 5 + [1] * 2)
    with pytest.raises(ConfigError, match="multiple of the 2 classes"):
        split_labeled(targets, 3, 2, seed=0)
    with pytest.raises(ConfigError, match="class 1 but the training set has 2"):
        split_labeled(targets, 6, 2, seed=0)


def _positions(sampler, n_batches):
    it = iter(sampler)
    return [next(it) for _ in range(n_batches)]


def test_sampler_covers_each_pass_once_and_is_stateless():
    s = InfiniteShardedBatchSampler(10, 4, seed=0, stream=1)
    batches = _positions(s, 5)  # 20 draws = 2 passes
    idx = [i for b in batches for i, _ in b]
    assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:]) == list(range(10))
    assert idx[:10] != idx[10:]  # a new order each pass
    resumed = InfiniteShardedBatchSampler(10, 4, seed=0, stream=1, start_batch=3)
    assert _positions(resumed, 2) == batches[3:5]
    other_stream = InfiniteShardedBatchSampler(10, 4, seed=0, stream=2)
    assert _positions(other_stream, 3) != batches[:3]


def test_sampler_shards_the_same_global_batch_over_ranks():
    single = _positions(InfiniteShardedBatchSampler(13, 6, seed=3, stream=0), 4)
    ranks = [_positions(InfiniteShardedBatchSampler(13, 6, seed=3, stream=0, rank=r, world_size=3), 4) for r in range(3)]
    for b in range(4):
        merged = sorted(p for r in range(3) for p in ranks[r][b])
        assert merged == sorted(single[b])
        assert all(len(ranks[r][b]) == 2 for r in range(3))


def test_eval_sampler_takes_each_index_once():
    parts = [list(ShardedEvalSampler(10, r, 3)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(10))


def _digits_stream(start, overrides=()):
    cfg = load_config(None, ["data.name=digits", "data.num_labels=50", "data.batch_size=10", "data.mu=2", "data.num_workers=0", *overrides])
    sources = build_sources("digits", "unused", image_size=8)
    data = build_data(cfg, sources)
    return data, iter(FixMatchStream(data, cfg, 0, 1, start_iteration=lambda: start))


def test_stream_batches_have_the_fixmatch_shapes_and_resume_exactly():
    data, it = _digits_stream(0)
    batches = [next(it) for _ in range(3)]
    b = batches[0]
    assert b["x"].shape == (10, 1, 8, 8) and b["u_w"].shape == (20, 1, 8, 8) and b["u_s"].shape == (20, 1, 8, 8)
    assert b["y"].dtype == torch.long and set(b["y"].tolist()) <= set(range(10))
    assert not torch.equal(b["u_w"], b["u_s"])  # strong view differs from weak
    assert (b["u_y"] >= 0).all()  # digits' unlabeled images keep their true labels (pseudo-label accuracy)
    _, resumed = _digits_stream(2)
    again = next(resumed)
    for k in again:
        assert torch.equal(again[k], batches[2][k]), k


def test_stream_does_not_depend_on_worker_count():
    _, it0 = _digits_stream(0)
    _, it2 = _digits_stream(0, ["data.num_workers=2"])
    a, b = next(it0), next(it2)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_labeled_images_can_be_left_out_of_the_unlabeled_stream():
    cfg = load_config(None, ["data.name=digits", "data.num_labels=50", "data.batch_size=10", "data.unlabeled_includes_labeled=false"])
    sources = build_sources("digits", "unused")
    data = build_data(cfg, sources)
    assert len(data.unlabeled) == len(sources.train) - 50


def test_augment_auto_is_batched_on_gpu_and_pil_on_cpu():
    from ignite_fixmatch.data import use_batched_augment

    assert use_batched_augment("auto", torch.device("cuda", 0)) is True
    assert use_batched_augment("auto", torch.device("cpu")) is False
    assert use_batched_augment("batched", torch.device("cpu")) is True
    assert use_batched_augment("pil", torch.device("cuda", 0)) is False
    assert load_config(None).data.augment == "auto"
