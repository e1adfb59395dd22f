"""data.imbalance_ratio / data.imbalance_labeled: the long-tailed profile by hand, the splits on real data, the refusals
and a real run that records its class counts."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

import datagen
from helpers import cli, tiny_overrides
from ignite_fixmatch.config import ConfigError, load_config, to_dict
from ignite_fixmatch.data import build_data, class_counts, split_labeled
from ignite_fixmatch.datasets import build_sources
from ignite_fixmatch.long_tail import labeled_counts, largest_ratio, unlabeled_counts
from ignite_fixmatch.resume_policy import check_resume

DIGITS = ["data.name=digits", "data.num_labels=50", "data.image_size=16", "data.batch_size=16", "data.num_workers=0"]
# Digits training images per class (0..9): the quick start's data.
DIGITS_PER_CLASS = [142, 146, 141, 147, 145, 146, 145, 143, 138, 144]


@pytest.fixture(scope="module")
def digits():
    return build_sources("digits", "unused", image_size=16)


def _build(sources, *overrides, base=DIGITS):
    return build_data(load_config(None, [*base, *overrides]), sources)


def _pool(data) -> np.ndarray:
    """The training indices of the unlabeled stream."""
    (train, indices), *_ = data.unlabeled.parts
    assert train is data.sources.train
    return indices


# --------------------------------------------------------------------------- the profile, by hand


@pytest.mark.parametrize(
    "pools, expected",
    [
        ([10, 10, 10], [10, 5, 2]),  # n_max = 10 (the head's pool): 10, 10/2, floor(10/4)
        ([7, 3, 40], [6, 3, 1]),  # class 1 can give 3 = n_max/2, so n_max = 6: 6, 3, floor(6/4)
        ([20, 4, 9], [8, 4, 2]),  # class 1 bounds the head to 8: 8, 4, 2
        ([9, 9, 2], [8, 4, 2]),  # the tail's 2 images bound the head to 8
    ],
)
def test_unlabeled_counts_for_three_classes_and_ratio_4(pools, expected):
    assert unlabeled_counts(pools, 4) == expected


def test_the_largest_ratio_is_the_last_that_leaves_the_tail_an_image():
    assert largest_ratio([10, 10, 10]) == 10  # the head keeps at most 10, so 10 / r >= 1 needs r <= 10
    assert largest_ratio([100, 3, 100]) == 9  # class 1 gives 3 >= n_max / sqrt(r) and the tail n_max / r: r <= 9
    for pools in ([10, 10, 10], [100, 3, 100], [8, 8, 8], DIGITS_PER_CLASS):
        r = largest_ratio(pools)
        assert min(unlabeled_counts(pools, r)) == 1 and min(unlabeled_counts(pools, r + 0.5)) == 0
    assert largest_ratio([5, 0, 5]) == 0


@pytest.mark.parametrize(
    "num_labels, ratio, expected",
    [
        (7, 4, [4, 2, 1]),  # quotas 4, 2, 1 exactly
        (10, 4, [6, 3, 1]),  # quotas 5.71, 2.86, 1.43: floors 5, 2, 1, the 2 left to the largest remainders (.86, .71)
        (3, 100, [1, 1, 1]),  # quotas 2.70, .27, .03: 2, 1, 1 (the minimum) is one over, taken back from class 0
    ],
)
def test_labeled_counts_follow_the_profile_with_at_least_one_each(num_labels, ratio, expected):
    assert labeled_counts(num_labels, 3, ratio) == expected


def test_labeled_counts_of_the_quick_start_at_ratio_10():
    counts = labeled_counts(50, 10, 10)
    assert counts == [12, 10, 7, 6, 4, 3, 3, 2, 2, 1] and sum(counts) == 50
    for n in range(10, 200, 7):
        assert sum(labeled_counts(n, 10, 100)) == n and min(labeled_counts(n, 10, 100)) >= 1
    with pytest.raises(ValueError, match="cannot give each of 10 classes one"):
        labeled_counts(9, 10, 10)


# --------------------------------------------------------------------------- the splits on real data


def test_ratio_1_is_exactly_the_build_without_the_key(digits):
    for extra in ([], ["data.val_labels=3"], ["data.unlabeled_includes_labeled=false"]):
        plain, one = _build(digits, *extra), _build(digits, *extra, "data.imbalance_ratio=1")
        assert np.array_equal(plain.labeled_indices, one.labeled_indices)
        assert np.array_equal(plain.val_indices, one.val_indices)
        assert np.array_equal(_pool(plain), _pool(one)) and np.array_equal(plain.unlabeled.targets, one.unlabeled.targets)
    assert len(_pool(_build(digits))) == sum(DIGITS_PER_CLASS)


def test_ratio_10_cuts_only_the_unlabeled_stream_and_keeps_every_labeled_image(digits):
    balanced, tail = _build(digits, "data.val_labels=2"), _build(digits, "data.val_labels=2", "data.imbalance_ratio=10")
    assert np.array_equal(balanced.labeled_indices, tail.labeled_indices)  # the labeled and held-out splits do not move
    assert np.array_equal(balanced.val_indices, tail.val_indices)
    pool = _pool(tail)
    assert np.all(np.diff(pool) > 0) and set(pool) <= set(_pool(balanced))
    assert set(tail.labeled_indices) <= set(pool)  # still every labeled image in the unlabeled stream
    # n_max = 140 (class 0: 142 - 2 held out), n_c = floor(140 * 10 ** (-c / 9))
    assert class_counts(tail)["unlabeled"] == [140, 108, 83, 64, 50, 38, 30, 23, 18, 14]
    assert class_counts(_build(digits, "data.imbalance_ratio=10"))["unlabeled"] == [142, 109, 85, 65, 51, 39, 30, 23, 18, 14]


def test_labeled_images_over_a_class_share_are_all_kept_and_logged(digits, caplog):
    with caplog.at_level(logging.INFO, logger="ignite_fixmatch.data"):
        data = _build(digits, "data.imbalance_ratio=100")
    # profile 142, 85, 51, 30, 18, 10, 6, 3, 2, 1: classes 7, 8, 9 keep their 5 labeled images instead
    assert class_counts(data)["unlabeled"] == [142, 85, 51, 30, 18, 10, 6, 5, 5, 5]
    kept = [r.getMessage() for r in caplog.records if "keeps all its" in r.getMessage()]
    assert kept == [f"data.imbalance_ratio: class '{c}' keeps all its 5 labeled images in the unlabeled stream, over its long-tail share of {n}"
                    for c, n in ((7, 3), (8, 2), (9, 1))]
    without = _build(digits, "data.imbalance_ratio=100", "data.unlabeled_includes_labeled=false")
    assert class_counts(without)["unlabeled"] == unlabeled_counts([n - 5 for n in DIGITS_PER_CLASS], 100)
    assert not set(without.labeled_indices) & set(_pool(without))


def test_the_draw_is_seeded_by_the_split_seed_alone(digits):
    a, b = _build(digits, "data.imbalance_ratio=10"), _build(digits, "data.imbalance_ratio=10")
    assert np.array_equal(_pool(a), _pool(b))
    # another seed of the stream and augmentation but the same split seed: the same images
    assert np.array_equal(_pool(a), _pool(_build(digits, "data.imbalance_ratio=10", "seed=5", "data.split_seed=0")))
    other = _build(digits, "data.imbalance_ratio=10", "data.split_seed=1")
    assert class_counts(other)["unlabeled"] == class_counts(a)["unlabeled"]  # the same counts of other images
    assert len(set(_pool(a)) ^ set(_pool(other))) > 100


def test_a_long_tailed_labeled_split_has_the_profile_and_the_total(digits):
    data = _build(digits, "data.imbalance_ratio=10", "data.imbalance_labeled=true")
    counts = class_counts(data)
    assert counts["labeled"] == [12, 10, 7, 6, 4, 3, 3, 2, 2, 1] and len(data.labeled_indices) == 50
    assert len(set(data.labeled_indices.tolist())) == 50 and set(data.labeled_indices) <= set(_pool(data))
    assert counts["unlabeled"] == [142, 109, 85, 65, 51, 39, 30, 23, 18, 14]
    assert np.array_equal(data.labeled_indices, _build(digits, "data.imbalance_ratio=10", "data.imbalance_labeled=true").labeled_indices)
    assert not np.array_equal(data.labeled_indices, split_labeled(digits.train.targets, 50, 10, 0))


def test_extra_unlabeled_images_are_untouched(tmp_path):
    root = datagen.make_image_folder(tmp_path / "images", n_train_per_class=8, n_test_per_class=1, size=(16, 16), unlabeled=5)
    base = ["data.name=folder", f"data.root={root}", "data.unlabeled_dir=unlabeled", "data.num_labels=6", "data.batch_size=6",
            "data.num_workers=0", "data.image_size=16"]
    sources = build_sources("folder", str(root), image_size=16, unlabeled_dir="unlabeled")
    counts = class_counts(_build(sources, "data.imbalance_ratio=2", base=base))
    assert counts["unlabeled"] == [8, 5, 4] and counts["unlabeled_without_class"] == 5
    assert counts["classes"] == ["cat", "dog", "frog"] and counts["labeled"] == [2, 2, 2]


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["data.imbalance_ratio=0.5"], "'data.imbalance_ratio': got 0.5, expected a number in [1, 2^20] (1 for balanced; 10 or 100 for a long tail)"),
        (["data.imbalance_labeled=true"], "'data.imbalance_labeled': got True, expected false unless data.imbalance_ratio > 1"),
        (["data.imbalance_ratio=10", "data.imbalance_labeled=true", "data.labels_file=x.txt"], "false when data.labels_file is set"),
        (["data.imbalance_ratio=10", "data.imbalance_labeled=true", "data.num_labels=-1"], "false when data.num_labels is -1"),
        (["data.imbalance_ratio=10", "data.imbalance_labeled=true", "data.num_labels=9", "data.batch_size=9"], "at least one per class (10 for digits)"),
    ],
)
def test_bad_settings_are_refused_before_any_data(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [*DIGITS, *overrides])
    assert words in str(e.value)


def test_balanced_multiples_are_not_required_of_a_long_tailed_labeled_split():
    assert load_config(None, [*DIGITS, "data.num_labels=33", "data.imbalance_ratio=10", "data.imbalance_labeled=true"]).data.num_labels == 33
    with pytest.raises(ConfigError, match="multiple of the 10 classes"):
        load_config(None, [*DIGITS, "data.num_labels=33", "data.imbalance_ratio=10"])


def test_a_ratio_that_leaves_a_class_empty_names_it_and_the_largest_that_works(folder):
    base = ["data.name=folder", f"data.root={folder}", "data.num_labels=6", "data.batch_size=6", "data.num_workers=0", "data.image_size=16"]
    sources = build_sources("folder", str(folder), image_size=16)
    assert class_counts(_build(sources, "data.imbalance_ratio=8", base=base))["unlabeled"] == [8, 2, 2]  # 8, floor(8/sqrt(8)), 8/8 = 1 but its 2 labeled
    with pytest.raises(ConfigError) as e:
        _build(sources, "data.imbalance_ratio=9", base=base)
    assert str(e.value) == ("config key 'data.imbalance_ratio': got 9, which leaves class 'frog' no unlabeled image (its share of a head of "
                            "8 images is under 1); the largest ratio that works on this data is 8.")
    with pytest.raises(ConfigError, match="class 'cat' has no training image left for the unlabeled stream"):
        _build(sources, "data.imbalance_ratio=2", "data.num_labels=24", "data.unlabeled_includes_labeled=false", base=base)


def test_both_keys_are_fixed_on_resume():
    saved = to_dict(load_config(None, DIGITS))
    for override in ("data.imbalance_ratio=10", "data.imbalance_labeled=true"):
        current = to_dict(load_config(None, [*DIGITS, "data.imbalance_ratio=10", override]))
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            check_resume(saved, current, iteration=10)


# --------------------------------------------------------------------------- a real run


@pytest.mark.slow
def test_a_long_tailed_run_writes_its_class_counts(folder, tmp_path):
    out = tmp_path / "run"
    result = cli(["configs/quickstart.yaml", *tiny_overrides(folder, out, "data.imbalance_ratio=2", "train.num_iters=5")])
    assert result.returncode == 0, result.stderr[-3000:]
    # pools of 8: n_max = 8, then floor(8 / sqrt(2)) = 5 and 8 / 2 = 4
    counts = json.loads((out / "class_counts.json").read_text())
    assert counts == {"classes": ["cat", "dog", "frog"], "labeled": [2, 2, 2], "unlabeled": [8, 5, 4], "unlabeled_without_class": 0}
    labeled = [int(i) for i in (out / "labeled_indices.txt").read_text().split()]
    sources = build_sources("folder", str(folder), image_size=16)
    assert labeled == split_labeled(sources.train.targets, 6, 3, 0).tolist()  # the balanced split of a run without the key
    assert "Images per class, labeled/unlabeled: cat 2/8, dog 2/5, frog 2/4" in (out / "train.log").read_text()
