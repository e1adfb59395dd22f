"""Test-data generators: small data sets written in the real on-disk formats.

No data set can be downloaded in the test environment, so tests write tiny
versions of CIFAR-10/100, SVHN, STL-10 and image folders with exactly the
file names and layouts that torchvision (and ``ignite_fixmatch.datasets``)
read.  Every generator is deterministic in ``seed`` and fast.

Images are class dependent (a class colour, brightness and stripe pattern plus
noise), so a small model can learn them, and noisy, so that pixel round-trip
checks are meaningful.

The torchvision generators return a :class:`Generated` record holding what was
written, in the convention the loaders return: images ``(N, H, W, C)`` uint8
(HWC), labels int64 in ``0..K-1`` (SVHN files store 10 for digit 0; the record
holds 0), so tests can compare pixels and labels directly.
"""

from __future__ import annotations

import colorsys
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]

CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]

CIFAR100_COARSE = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
]

STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


@dataclass
class Generated:
    """What a generator wrote, in loader convention (HWC uint8 images, labels 0..K-1)."""

    root: Path
    classes: list[str]
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    unlabeled_x: np.ndarray | None = None
    files: list[Path] = field(default_factory=list)


# ----------------------------------------------------------------------------
# image content
# ----------------------------------------------------------------------------

def class_image(label: int, num_classes: int, height: int, width: int, rng: np.random.Generator,
                noise: int = 24) -> np.ndarray:
    """One RGB uint8 image ``(height, width, 3)`` whose content depends on ``label``.

    Class ``k`` of ``K`` gets its own hue, brightness and stripe pattern
    (direction and period), plus uniform noise of +-``noise``; its grayscale
    version still differs between classes (brightness and stripes).
    """
    k, n = int(label), max(int(num_classes), 1)
    r, g, b = colorsys.hsv_to_rgb(k / n, 0.8, 1.0)
    level = 0.35 + 0.6 * (k / max(n - 1, 1))
    colour = np.array([r, g, b]) * 255.0 * level
    period = 1 + (k % 4)
    axis = (k // 4) % 2
    coords = np.arange(height if axis == 0 else width)
    stripes = ((coords // period) % 2).astype(np.float64)
    stripes = stripes[:, None] if axis == 0 else stripes[None, :]
    stripes = np.broadcast_to(stripes, (height, width))
    base = colour[None, None, :] * (0.65 + 0.35 * stripes[:, :, None])
    img = base + rng.integers(-noise, noise + 1, size=(height, width, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def class_images(labels: np.ndarray, num_classes: int, height: int, width: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Stack of :func:`class_image` for every label: ``(N, height, width, 3)`` uint8."""
    out = np.empty((len(labels), height, width, 3), dtype=np.uint8)
    for i, y in enumerate(labels):
        out[i] = class_image(int(y), num_classes, height, width, rng)
    return out


def balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` labels, every class present when ``n >= num_classes``, in random order."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


# ----------------------------------------------------------------------------
# CIFAR
# ----------------------------------------------------------------------------

def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_rows(x: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) HWC -> (N, 3072) rows, channel-major as in the real files."""
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(len(x), -1)


def make_cifar10(root, n_train: int = 100, n_test: int = 50, seed: int = 0) -> Generated:
    """Write ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``.

    The training images are spread over the five batches in order (torchvision
    concatenates them in that order), as pickled dicts with ``data`` (N, 3072)
    uint8 rows (R plane, G plane, B plane) and ``labels`` (list of int).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_y = balanced_labels(n_train, 10, rng)
    test_y = balanced_labels(n_test, 10, rng)
    train_x = class_images(train_y, 10, 32, 32, rng)
    test_x = class_images(test_y, 10, 32, 32, rng)
    files = []
    for b, idx in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        path = folder / f"data_batch_{b}"
        _dump(path, {
            "batch_label": f"training batch {b} of 5",
            "labels": [int(v) for v in train_y[idx]],
            "data": _cifar_rows(train_x[idx]),
            "filenames": [f"img_{i:06d}.png" for i in idx],
        })
        files.append(path)
    _dump(folder / "test_batch", {
        "batch_label": "testing batch 1 of 1",
        "labels": [int(v) for v in test_y],
        "data": _cifar_rows(test_x),
        "filenames": [f"test_{i:06d}.png" for i in range(n_test)],
    })
    _dump(folder / "batches.meta", {
        "num_cases_per_batch": max(1, -(-n_train // 5)),
        "label_names": list(CIFAR10_CLASSES),
        "num_vis": 3072,
    })
    files += [folder / "test_batch", folder / "batches.meta"]
    return Generated(root, list(CIFAR10_CLASSES), train_x, train_y, test_x, test_y, files=files)


def make_cifar100(root, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Generated:
    """Write ``root/cifar-100-python/{train, test, meta}`` (``fine_labels``, ``fine_label_names``)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    train_y = balanced_labels(n_train, 100, rng)
    test_y = balanced_labels(n_test, 100, rng)
    train_x = class_images(train_y, 100, 32, 32, rng)
    test_x = class_images(test_y, 100, 32, 32, rng)
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        _dump(folder / name, {
            "filenames": [f"{name}_{i:06d}.png" for i in range(len(y))],
            "batch_label": f"{name} batch",
            "fine_labels": [int(v) for v in y],
            "coarse_labels": [int(v) // 5 for v in y],
            "data": _cifar_rows(x),
        })
    _dump(folder / "meta", {"fine_label_names": list(CIFAR100_CLASSES),
                            "coarse_label_names": list(CIFAR100_COARSE)})
    files = [folder / "train", folder / "test", folder / "meta"]
    return Generated(root, list(CIFAR100_CLASSES), train_x, train_y, test_x, test_y, files=files)


# ----------------------------------------------------------------------------
# SVHN
# ----------------------------------------------------------------------------

def make_svhn(root, n_train: int = 100, n_test: int = 50, seed: int = 0) -> Generated:
    """Write ``root/train_32x32.mat`` and ``root/test_32x32.mat`` as the real SVHN files.

    ``X`` is (32, 32, 3, N) uint8 and ``y`` is (N, 1) uint8 with labels 1..10,
    10 meaning digit 0.  The returned record holds labels 0..9 (10 -> 0).
    """
    import scipy.io

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train_y = balanced_labels(n_train, 10, rng)
    test_y = balanced_labels(n_test, 10, rng)
    train_x = class_images(train_y, 10, 32, 32, rng)
    test_x = class_images(test_y, 10, 32, 32, rng)
    files = []
    for name, x, y in (("train_32x32.mat", train_x, train_y), ("test_32x32.mat", test_x, test_y)):
        y_file = np.where(y == 0, 10, y).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(root / name, {"X": np.ascontiguousarray(x.transpose(1, 2, 3, 0)), "y": y_file})
        files.append(root / name)
    return Generated(root, [str(d) for d in range(10)], train_x, train_y, test_x, test_y, files=files)


# ----------------------------------------------------------------------------
# STL-10
# ----------------------------------------------------------------------------

def _stl_bytes(x: np.ndarray) -> bytes:
    """(N, 96, 96, 3) HWC -> the binary layout: per image 3 planes, each column-major."""
    return np.ascontiguousarray(x.transpose(0, 3, 2, 1)).tobytes()


def make_stl10(root, n_train: int = 50, n_test: int = 30, n_unlabeled: int = 40, seed: int = 0,
               size: int = 96) -> Generated:
    """Write ``root/stl10_binary/{train,test}_{X,y}.bin, unlabeled_X.bin, class_names.txt, fold_indices.txt``.

    ``*_X.bin``: uint8, per image 3 colour planes of ``size`` x ``size`` stored
    column-major (as MATLAB wrote them); ``*_y.bin``: uint8 labels 1..10.
    ``size`` other than 96 makes files torchvision cannot read (for error tests).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    train_y = balanced_labels(n_train, 10, rng)
    test_y = balanced_labels(n_test, 10, rng)
    train_x = class_images(train_y, 10, size, size, rng)
    test_x = class_images(test_y, 10, size, size, rng)
    unl_y = rng.integers(0, 10, size=n_unlabeled)
    unlabeled_x = class_images(unl_y, 10, size, size, rng)
    (folder / "train_X.bin").write_bytes(_stl_bytes(train_x))
    (folder / "train_y.bin").write_bytes((train_y + 1).astype(np.uint8).tobytes())
    (folder / "test_X.bin").write_bytes(_stl_bytes(test_x))
    (folder / "test_y.bin").write_bytes((test_y + 1).astype(np.uint8).tobytes())
    (folder / "unlabeled_X.bin").write_bytes(_stl_bytes(unlabeled_x))
    (folder / "class_names.txt").write_text("\n".join(STL10_CLASSES) + "\n")
    folds = np.array_split(rng.permutation(n_train), 10)
    (folder / "fold_indices.txt").write_text("\n".join(" ".join(str(i) for i in f) for f in folds) + "\n")
    files = [folder / n for n in ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin",
                                  "unlabeled_X.bin", "class_names.txt", "fold_indices.txt")]
    return Generated(root, list(STL10_CLASSES), train_x, train_y, test_x, test_y, unlabeled_x, files)


# ----------------------------------------------------------------------------
# image folders
# ----------------------------------------------------------------------------

_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "bmp": "BMP", "webp": "WEBP",
            "gif": "GIF", "tif": "TIFF", "tiff": "TIFF"}


def save_image(arr: np.ndarray, path, mode: str = "RGB") -> Path:
    """Save an RGB uint8 array ``(H, W, 3)`` to ``path`` in PIL ``mode`` (format from the extension).

    ``mode``: "RGB", "L", "RGBA" (opaque alpha), "LA", "P" (adaptive palette)
    or "I;16" (grayscale scaled to 0..65535, for 16-bit PNGs).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr, "RGB")
    if mode == "I;16":
        grey = np.asarray(img.convert("L"), dtype=np.uint16) * 257
        img = Image.fromarray(grey)
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    elif mode != "RGB":
        img = img.convert(mode)
    fmt = _FORMATS[path.suffix.lower().lstrip(".")]
    kwargs = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    img.save(path, format=fmt, **kwargs)
    return path


def make_image_folder(root, classes=("cat", "dog", "frog"), n_train_per_class: int = 8,
                      n_test_per_class: int = 4, size=(16, 16), mode: str = "RGB", ext: str = "png",
                      unlabeled: int = 0, seed: int = 0) -> Path:
    """Write ``root/train/<class>/<i>.<ext>``, ``root/test/<class>/<i>.<ext>`` and, when
    ``unlabeled > 0``, ``root/unlabeled/u<i>.<ext>`` (no class folders).  Returns ``root``.

    ``size`` is (width, height); ``mode`` as in :func:`save_image`.  Images of
    class ``k`` follow :func:`class_image` (learnable; JPEG adds its own loss).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    width, height = int(size[0]), int(size[1])
    k = len(classes)
    for split, n in (("train", n_train_per_class), ("test", n_test_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                save_image(class_image(c, k, height, width, rng), folder / f"{i:04d}.{ext}", mode)
    if unlabeled:
        folder = root / "unlabeled"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(unlabeled):
            c = int(rng.integers(0, k))
            save_image(class_image(c, k, height, width, rng), folder / f"u{i:05d}.{ext}", mode)
    return root


def corrupt_file(path, how: str = "truncate") -> Path:
    """Damage an image file: ``"truncate"`` keeps the first 60 % of the bytes (header
    intact, data cut), ``"garbage"`` replaces the content with non-image bytes,
    ``"empty"`` leaves a zero-byte file."""
    path = Path(path)
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: max(1, int(len(data) * 0.6))])
    elif how == "garbage":
        path.write_bytes(b"this is not an image" * 8)
    elif how == "empty":
        path.write_bytes(b"")
    else:
        raise ValueError(f"unknown corruption {how!r}")
    return path


def count_files(folder) -> int:
    """Number of regular files below ``folder`` (recursive)."""
    return sum(len(files) for _, _, files in os.walk(folder))
