"""scikit-learn's digits: the offline data set of the quick start (bundled with scikit-learn, no download).

1,797 grayscale 8 x 8 images, values 0..16 scaled to uint8 as ``round(v * 255 / 16)``;
``root`` is ignored.  Train/test split: a fixed stratified split that does not depend on the
run seed: for each class (in order 0..9) the indices of that class are permuted by one
``numpy.random.RandomState(0)`` (legacy generator: its stream is frozen across numpy versions)
and the first 36 go to the test set, giving 1,437 train / 360 test images; both sets keep the
original order of ``load_digits``.  Normalisation is computed from the training images.
scikit-learn is imported inside :func:`build_digits` only.
"""

from __future__ import annotations

import numpy as np

from ignite_fixmatch.datasets.source import BuildRequest, ImageSource, RawSplits

DIGITS_TEST_PER_CLASS = 36


def digits_split(y: np.ndarray, test_per_class: int = DIGITS_TEST_PER_CLASS) -> tuple[np.ndarray, np.ndarray]:
    """The fixed digits train/test split (see the module doc): sorted index arrays (train, test)."""
    rs = np.random.RandomState(0)
    test = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test.append(idx[rs.permutation(len(idx))[:test_per_class]])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(y)), test_idx)
    return train_idx, test_idx


def build_digits(request: BuildRequest) -> RawSplits:
    """``digits``: the fixed split above, images in memory, mean/std of the training images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(np.asarray(d.images, dtype=np.float64) * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
    y = np.asarray(d.target, dtype=np.int64)
    train_idx, test_idx = digits_split(y)
    classes = [str(c) for c in range(10)]
    train = ImageSource(y[train_idx], classes, "L", images=np.ascontiguousarray(images[train_idx]))
    test = ImageSource(y[test_idx], classes, "L", images=np.ascontiguousarray(images[test_idx]))
    px = images[train_idx].astype(np.float64) / 255.0
    mean, std = (round(float(px.mean()), 4),), (round(float(px.std()), 4),)
    return RawSplits(train, None, test, mean, std)

