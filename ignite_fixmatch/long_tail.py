"""Class-imbalanced (long-tailed) data: the counts of ``data.imbalance_ratio`` and ``data.imbalance_labeled``.

The exponential profile of the long-tailed CIFAR literature (Cui et al. 2019, DARP, CReST): of C classes in
class-index order (class 0 the head), class c keeps ``n_c = floor(n_max * r ** (-c / (C - 1)))`` images, where
``n_max`` is the largest head size every class can satisfy from its own pool, so the tail keeps ``n_max / r``.
Counts only, no draw and no torch: ``data.build_data`` draws the images, from a generator of their own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Added before a floor: 100 * 10 ** -1 is 10.000000000000002 but 9 / 3 ** 0.5 / 3 ** 0.5 may fall just short of 3.
# Counts are far below 1e6, where float64 errs by under 1e-9: a count is never one short from rounding.
EPS = 1e-9


def profile(num_classes: int, ratio: float) -> np.ndarray:
    """``r ** (-c / (C - 1))`` for c = 0..C-1: 1 for the head, 1/r for the tail (flat for a single class)."""
    if num_classes == 1:
        return np.ones(1)
    return float(ratio) ** (-np.arange(num_classes) / (num_classes - 1))


def head_size(pools: Sequence[int], ratio: float) -> int:
    """``n_max``: the largest head size that every class c can give its share ``n_max * w_c`` of from its own pool."""
    w = profile(len(pools), ratio)
    return min(math.floor(p / wc + EPS) for p, wc in zip(pools, w))


def unlabeled_counts(pools: Sequence[int], ratio: float) -> list[int]:
    """``n_c`` of every class, given ``pools[c]`` images of class c to keep them from (each ``n_c <= pools[c]``)."""
    n_max = head_size(pools, ratio)
    return [min(p, math.floor(n_max * wc + EPS)) for p, wc in zip(pools, profile(len(pools), ratio))]


def largest_ratio(pools: Sequence[int]) -> int:
    """The largest ratio for which every class keeps at least one image (0 when a pool is empty).

    The tail keeps ``floor(n_max / r) >= 1`` exactly when ``n_max >= r``; for an integer r that holds up to a
    bound and never again past it, and a real r in (k-1, k] works only if k does: the answer is an integer,
    found by bisection over [1, pools[0]] (the head cannot keep more than its pool)."""
    def works(r: int) -> bool:
        return min(unlabeled_counts(pools, r)) >= 1

    if not works(1):
        return 0
    lo, hi = 1, max(1, pools[0])
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if works(mid) else (lo, mid - 1)
    return lo


def labeled_counts(num_labels: int, num_classes: int, ratio: float) -> list[int]:
    """``num_labels`` over the classes proportionally to the profile, at least 1 each, summing to exactly ``num_labels``.

    Largest remainder (Hamilton): class c's quota is ``num_labels * w_c / sum(w)``; it gets the quota's floor, or 1
    if that is 0; labels still to give go one at a time to the class furthest below its quota, and labels given
    over (the minimum of 1 can give too many) are taken back one at a time from the class furthest above its
    quota among those with more than 1. Ties go to the lower class index."""
    if num_labels < num_classes:
        raise ValueError(f"{num_labels} labels cannot give each of {num_classes} classes one")
    w = profile(num_classes, ratio)
    quota = num_labels * w / w.sum()
    counts = np.maximum(1, np.floor(quota + EPS)).astype(np.int64)
    while counts.sum() < num_labels:
        counts[int(np.argmax(quota - counts))] += 1
    while counts.sum() > num_labels:
        over = np.where(counts > 1, quota - counts, np.inf)
        counts[int(np.argmin(over))] -= 1
    return counts.tolist()
