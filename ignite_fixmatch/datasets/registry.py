"""The data sets by name: one :class:`DatasetSpec` each, and :func:`build_sources`, which reads one.

Everything that depends on which data set is used (the config's allowed ``data.name`` values and
class counts, the default flip, normalisation, the docs table) is read from :data:`DATASETS`, so
adding a data set means adding one entry here and its builder.  Importing this module is cheap
(numpy and PIL; torchvision and scikit-learn are imported inside the builders), because config.py
imports it to check ``data.name`` before anything starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ignite_fixmatch.datasets.digits import build_digits
from ignite_fixmatch.datasets.folder import build_folder, infer_image_size, unlabeled_folder
from ignite_fixmatch.datasets.source import BuildRequest, DataError, DataSources, SourceBuilder
from ignite_fixmatch.datasets.torchvision_sets import build_cifar, build_stl10, build_svhn

__all__ = ["DATASETS", "DATASET_NAMES", "DatasetSpec", "build_sources", "dataset_names", "dataset_spec",
           "known_num_classes", "markdown_table"]

logger = logging.getLogger(__name__)

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, what PIL's convert("L") uses


@dataclass(frozen=True)
class DatasetSpec:
    """What the rest of the code needs to know about one data set before (or without) reading it."""

    name: str                    # the value of data.name
    title: str                   # the name for people (error messages, docs)
    origin: str                  # where the images come from (messages, docs)
    build: SourceBuilder         # reads the files: BuildRequest -> RawSplits
    channels: int                # the images' own channels (folder: the default); data.channels converts
    image_size: int | None       # the images' own side in pixels; None: the first training image's (folder)
    mean: tuple[float, ...] | None  # normalisation in `channels` channels; None: the builder computes it (digits)
    std: tuple[float, ...] | None
    flip: bool                   # default of data.flip: off where a mirror image changes the class (digits)
    downloads: bool              # missing files are downloaded (data.download)
    num_classes: int | None      # known before reading any file; None: one per class folder
    needs_root: bool = True      # False: bundled with a library, data.root is not used
    builtin_unlabeled: bool = False  # ships unlabeled images, replaced by data.unlabeled_dir when given


_SPECS = (
    DatasetSpec("cifar10", "CIFAR-10", "torchvision `CIFAR10`", build_cifar, 3, 32,
                tuple(v / 255 for v in (125.3, 123.0, 113.9)), tuple(v / 255 for v in (63.0, 62.1, 66.7)),
                flip=True, downloads=True, num_classes=10),
    DatasetSpec("cifar100", "CIFAR-100", "torchvision `CIFAR100`", build_cifar, 3, 32,
                tuple(v / 255 for v in (129.3, 124.1, 112.4)), tuple(v / 255 for v in (68.2, 65.4, 70.4)),
                flip=True, downloads=True, num_classes=100),
    DatasetSpec("svhn", "SVHN", "torchvision `SVHN` (train, test)", build_svhn, 3, 32,
                (0.4377, 0.4438, 0.4728), (0.198, 0.201, 0.197),
                flip=False, downloads=True, num_classes=10),
    DatasetSpec("stl10", "STL-10", "torchvision `STL10` (train, test, 100,000 unlabeled)", build_stl10, 3, 96,
                (0.441, 0.428, 0.387), (0.268, 0.261, 0.269),
                flip=True, downloads=True, num_classes=10, builtin_unlabeled=True),
    DatasetSpec("folder", "image folders", "`ROOT/train/<class>/`, `ROOT/test/<class>/`", build_folder, 3, None,
                (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                flip=True, downloads=False, num_classes=None),
    DatasetSpec("digits", "digits", "bundled with scikit-learn", build_digits, 1, 8, None, None,
                flip=False, downloads=False, num_classes=10, needs_root=False),
)

DATASETS: Mapping[str, DatasetSpec] = MappingProxyType({s.name: s for s in _SPECS})
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)


def dataset_names() -> tuple[str, ...]:
    """The valid values of ``data.name``, in the order the docs and messages list them."""
    return DATASET_NAMES


def known_num_classes() -> dict[str, int]:
    """Classes of the data sets whose class count is known before any file is read (config checks)."""
    return {name: s.num_classes for name, s in DATASETS.items() if s.num_classes is not None}


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of ``name`` (case and surrounding spaces ignored); :class:`DataError` listing the valid names."""
    spec = DATASETS.get(str(name).strip().lower())
    if spec is None:
        raise DataError(f"unknown data set {name!r}; valid names: {', '.join(DATASET_NAMES)} "
                        "(set data.name to one of them)")
    return spec


def _luma(values: tuple[float, ...]) -> float:
    # a grey (equal channels) is its own luminance: taken as is, free of float rounding
    if len(set(values)) == 1:
        return float(values[0])
    return float(sum(w * v for w, v in zip(LUMA, values)))


def convert_stats(mean: tuple[float, ...], std: tuple[float, ...], native: int,
                  channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """mean/std of ``native``-channel images for the images converted to ``channels`` channels."""
    if native == channels:
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if native == 1:  # grey -> RGB: the three channels are equal
        return (float(mean[0]),) * 3, (float(std[0]),) * 3
    # RGB -> grey: luminance of the mean; std assuming fully correlated channels (an upper bound)
    return (_luma(mean),), (_luma(std),)


def build_sources(name: str, root: str, *, download: bool = True, image_size: int | None = None,
                  channels: int | None = None, unlabeled_dir: str | None = None,
                  skip_corrupt: bool = False) -> DataSources:
    """Build the raw image sources of data set ``name`` stored under ``root``.

    Args:
        name: one of :data:`DATASET_NAMES` (case-insensitive).
        root: data folder (torchvision data sets: where their files are or will be
            downloaded; folder: the folder holding ``train/`` and ``test/``; digits: ignored).
        download: torchvision data sets: download missing files (torchvision's code).
        image_size: resize images (bilinear) to this square size on load where they
            differ.  Default: the data set's size (32 CIFAR/SVHN, 96 STL-10, 8 digits);
            folder: the smaller side of the first readable training image, and all
            images of another size are resized to it (so batches stack).
        channels: 3 (PIL "RGB") or 1 ("L"); default the data set's own (folder: 3).
            mean/std follow: repeated for grey -> RGB, luminance-weighted for RGB -> grey.
        unlabeled_dir: a folder of extra unlabeled images (no class folders, scanned
            recursively); relative paths resolve against ``root``.  Works for every
            data set; for STL-10 it replaces the built-in unlabeled split.
        skip_corrupt: folder sources: replace unreadable files by the next readable
            image of the same class instead of raising (see :class:`ImageSource`).

    Raises:
        DataError: unknown name, missing or unreadable files, bad folder layout.
    """
    spec = dataset_spec(name)
    unlabeled_dir = os.fspath(unlabeled_dir) if unlabeled_dir else None
    if channels is not None and channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}; fix data.channels")
    if image_size is not None and (int(image_size) != image_size or image_size < 1):
        raise DataError(f"image_size must be a positive integer, got {image_size!r}; fix data.image_size")
    image_size = None if image_size is None else int(image_size)
    root = os.path.normpath(os.path.expanduser(os.fspath(root))) if root is not None else ""
    ch = spec.channels if channels is None else channels
    mode = "RGB" if ch == 3 else "L"

    raw = spec.build(BuildRequest(spec.name, spec.title, root, download, mode, skip_corrupt,
                                  with_unlabeled=unlabeled_dir is None))
    unlabeled = raw.unlabeled
    if unlabeled_dir is not None:
        if spec.builtin_unlabeled:
            logger.info("%s: using %s as unlabeled images instead of its built-in unlabeled split",
                        spec.name, unlabeled_dir)
        if not root and not os.path.isabs(unlabeled_dir):
            raise DataError(f"unlabeled_dir {unlabeled_dir!r} is relative but no data root is set; "
                            "give an absolute path or set data.root")
        unlabeled = unlabeled_folder(unlabeled_dir, root, raw.train.classes, mode, skip_corrupt)
    size = image_size if image_size is not None else spec.image_size
    if size is None:
        size = infer_image_size(raw.train)
    for src in (raw.train, unlabeled, raw.test):
        if src is None:
            continue
        src.mode = mode
        src.skip_corrupt = skip_corrupt
        # files are brought to one size so that batches stack; in-memory arrays already share the
        # data set's size and are resized only on request (so they can be gathered as stored)
        if image_size is not None or src.paths is not None:
            src.image_size = size
    mean, std = (raw.mean, raw.std) if raw.mean is not None else (spec.mean, spec.std)
    assert mean is not None and std is not None, f"{spec.name}: no normalisation in the spec or from the builder"
    mean, std = convert_stats(mean, std, spec.channels, ch)
    return DataSources(raw.train, unlabeled, raw.test, len(raw.train.classes), ch, size, mean, std, spec.name)


def markdown_table() -> str:
    """The README's table of data sets, rendered from :data:`DATASETS` (a test keeps the README in step)."""
    rows = ["| `data.name` | data set | images from | classes | channels | size (px) | flip | download |",
            "|---|---|---|---|---|---|---|---|"]
    for s in DATASETS.values():
        classes = s.num_classes if s.num_classes is not None else "one per class folder"
        size = s.image_size if s.image_size is not None else "the first training image's"
        rows.append(f"| `{s.name}` | {s.title} | {s.origin} | {classes} | {s.channels} | {size} | "
                    f"{'on' if s.flip else 'off'} | {'yes' if s.downloads else 'no'} |")
    return "\n".join(rows) + "\n"
