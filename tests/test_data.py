"""Labeled split, stateless samplers and the data stream: deterministic, sharded, resumable."""

import numpy as np
import pytest
import torch

from ignite_fixmatch.config import ConfigError, load_config
from ignite_fixmatch.data import (
    FixMatchStream,
    InfiniteShardedBatchSampler,
    ShardedEvalSampler,
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
    """The PIL loaders' stream (data.augment=pil: finished views); test_augment_batched tests the batched one against it."""
    cfg = load_config(None, ["data.name=digits", "data.num_labels=50", "data.batch_size=10", "data.mu=2", "data.num_workers=0", "data.augment=pil", *overrides])
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
    sampler = InfiniteShardedBatchSampler(len(data.unlabeled), 20, seed=0, stream=1)
    assert b["u_idx"].tolist() == [i for i, _ in sampler.batch(0)]  # each image's index into the unlabeled set
    assert b["u_y"].tolist() == [int(data.unlabeled.targets[i]) for i in b["u_idx"]]
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


def test_augment_auto_puts_data_on_a_gpu_that_fits_it_and_batches_elsewhere():
    from ignite_fixmatch.data import resolve_augment

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_augment("auto", gpu, lambda: True) == "device"
    assert resolve_augment("auto", gpu, lambda: False) == "batched"
    assert resolve_augment("auto", cpu, lambda: True) == "batched"  # a CPU keeps the loaders, batched
    for setting in ("pil", "batched", "device"):
        assert resolve_augment(setting, gpu, lambda: False) == setting
        assert resolve_augment(setting, cpu, lambda: True) == setting
    assert load_config(None).data.augment == "auto"


@pytest.mark.parametrize("kind", ["digits", "folder"])
def test_eval_batches_normalised_on_the_device_equal_the_per_image_transform(kind, tmp_path):
    """The test loader's uint8 batches (one gather for in-memory sets, a load per file for folders),
    normalised by the evaluator, are bit-identical to PIL -> to_tensor -> normalize per image."""
    from helpers import datagen
    from ignite_fixmatch.augment import to_normalized_tensor
    from ignite_fixmatch.augment.ops import normalize
    from ignite_fixmatch.data import build_eval_loader

    if kind == "digits":
        sources = build_sources("digits", "unused", image_size=8)
        assert sources.test.in_memory_uint8()
    else:
        root = datagen.make_image_folder(tmp_path / "img", n_train_per_class=2, n_test_per_class=5, size=(20, 20))
        sources = build_sources("folder", str(root), image_size=16)  # files, resized on load
        assert not sources.test.in_memory_uint8()
    seen = 0
    for images, labels in build_eval_loader(sources, 7, 0):
        assert images.dtype == torch.uint8
        expected = torch.stack([to_normalized_tensor(sources.test.load(seen + i), sources.mean, sources.std) for i in range(len(labels))])
        assert torch.equal(normalize(images, sources.mean, sources.std), expected)
        assert labels.tolist() == [int(t) for t in sources.test.targets[seen : seen + len(labels)]]
        seen += len(labels)
    assert seen == len(sources.test)
