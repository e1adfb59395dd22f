"""Image folders: the ``folder`` data set (``ROOT/train/<class>/``, ``ROOT/test/<class>/``) and
``data.unlabeled_dir`` (a folder of unlabeled images, usable with every data set).

Layout: ``ROOT/train/<class>/...`` (the labeled pool) and ``ROOT/test/<class>/...`` with the
same classes (sorted names); image files ``.png .jpg .jpeg .bmp .webp`` (any case), searched
recursively inside each class folder; hidden files and folders (name starting with ".") are
ignored.  File names are kept in a compact :class:`~ignite_fixmatch.datasets.source.PathList`
(one byte buffer plus offsets), so millions of files cost a few tens of bytes each, and images
are opened lazily.  The image size, unless given, is the smaller side of the first readable
training image (:func:`infer_image_size`).
"""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image

from ignite_fixmatch.datasets.source import BuildRequest, DataError, ImageSource, PathList, PathListBuilder, RawSplits

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def is_image_name(name: str, exts: tuple[str, ...] = IMAGE_EXTENSIONS) -> bool:
    """Whether a file name has one of ``exts`` (any case) after a non-empty stem."""
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in exts


def scan_into(top: str, prefix: bytes, builder: PathListBuilder, exts: tuple[str, ...]) -> int:
    """Append image files below ``top`` (recursive, sorted, depth first) as ``prefix + relpath``."""
    count = 0
    sep = os.fsencode(os.sep)
    stack = [(top, prefix)]
    while stack:
        folder, pre = stack.pop()
        files: list[str] = []
        dirs: list[str] = []
        with os.scandir(folder) as it:
            for entry in it:
                name = entry.name
                if name.startswith("."):
                    continue
                try:
                    if entry.is_dir():
                        dirs.append(name)
                    elif is_image_name(name, exts) and entry.is_file():
                        files.append(name)
                except OSError:  # broken symlink or vanished entry
                    continue
        files.sort()
        for name in files:
            builder.add(pre + os.fsencode(name))
        count += len(files)
        dirs.sort(reverse=True)  # popped in sorted order
        stack.extend((os.path.join(folder, d), pre + os.fsencode(d) + sep) for d in dirs)
    return count


def scan_image_files(top: str, exts: tuple[str, ...] = IMAGE_EXTENSIONS) -> PathList:
    """All image files below ``top`` (recursive, hidden entries skipped) as a :class:`PathList`
    of paths relative to ``top``, in sorted depth-first order (deterministic)."""
    builder = PathListBuilder()
    scan_into(top, b"", builder, exts)
    return builder.build()


def _class_dirs(split_dir: str) -> tuple[list[str], int]:
    names, loose = [], 0
    with os.scandir(split_dir) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                names.append(e.name)
            elif is_image_name(e.name, IMAGE_EXTENSIONS):
                loose += 1
    return sorted(names), loose


def _scan_split(split_dir: str, classes: list[str], mode: str, skip_corrupt: bool) -> ImageSource:
    builder = PathListBuilder()
    counts = []
    sep = os.fsencode(os.sep)
    for c in classes:
        n = scan_into(os.path.join(split_dir, c), os.fsencode(c) + sep, builder, IMAGE_EXTENSIONS)
        if n == 0:
            raise DataError(
                f"class folder {os.path.join(split_dir, c)} holds no images (searched recursively for "
                f"{', '.join(IMAGE_EXTENSIONS)}, any case); add images to it or remove the folder")
        counts.append(n)
    targets = np.repeat(np.arange(len(classes), dtype=np.int64), counts)
    return ImageSource(targets, classes, mode, root=split_dir, paths=builder.build(), skip_corrupt=skip_corrupt)


def unlabeled_folder(unlabeled_dir: str, root: str, classes: list[str], mode: str,
                     skip_corrupt: bool) -> ImageSource:
    """``data.unlabeled_dir`` as a source (targets -1): every image below it, relative paths from ``root``."""
    path = unlabeled_dir if os.path.isabs(unlabeled_dir) else os.path.join(root, unlabeled_dir)
    path = os.path.normpath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise DataError(f"unlabeled image folder {path} does not exist (data.unlabeled_dir={unlabeled_dir!r}; "
                        f"a relative path is taken relative to the data root {root}); create it or fix "
                        "data.unlabeled_dir, or leave data.unlabeled_dir empty to use no extra unlabeled images")
    paths = scan_image_files(path)
    if len(paths) == 0:
        raise DataError(f"unlabeled image folder {path} holds no images (searched recursively for "
                        f"{', '.join(IMAGE_EXTENSIONS)}, any case); put images in it or unset data.unlabeled_dir")
    return ImageSource(np.full(len(paths), -1, dtype=np.int64), classes, mode, root=path, paths=paths,
                       skip_corrupt=skip_corrupt)


def build_folder(request: BuildRequest) -> RawSplits:
    """The ``folder`` data set: ``ROOT/train/<class>/`` and ``ROOT/test/<class>/`` (see the module doc)."""
    root, mode, skip_corrupt = request.root, request.mode, request.skip_corrupt
    if not os.path.isdir(root):
        raise DataError(f"image folder data root {root} does not exist (or is not a folder); create it with "
                        "train/<class>/ and test/<class>/ sub-folders of images, or fix data.root")
    train_dir, test_dir = os.path.join(root, "train"), os.path.join(root, "test")
    for d, what in ((train_dir, "labeled training"), (test_dir, "test")):
        if not os.path.isdir(d):
            raise DataError(f"folder {d} is missing: the folder data set needs {d}/<class>/<images> for the "
                            f"{what} images; create it, or fix data.root (now {root})")
    classes, loose = _class_dirs(train_dir)
    if not classes:
        raise DataError(f"no class folders in {train_dir}: put the training images of each class into "
                        f"{train_dir}/<class name>/ (class folders, not loose files)")
    if loose:
        logger.warning("ignoring %d image files directly in %s: only images inside class folders are used",
                       loose, train_dir)
    test_classes, loose_test = _class_dirs(test_dir)
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise DataError(
            f"class folders of {test_dir} differ from those of {train_dir}: missing in test: {only_train or 'none'}; "
            f"not in train: {only_test or 'none'}. Both must hold the same class folders; add or rename "
            "the folders so the names match")
    if loose_test:
        logger.warning("ignoring %d image files directly in %s: only images inside class folders are used",
                       loose_test, test_dir)
    train = _scan_split(train_dir, classes, mode, skip_corrupt)
    test = _scan_split(test_dir, classes, mode, skip_corrupt)
    return RawSplits(train, None, test)


def infer_image_size(src: ImageSource, tries: int = 50) -> int:
    """The smaller side of the first readable of ``src``'s first ``tries`` images: the folder's default size."""
    for i in range(min(tries, len(src))):
        try:
            with open(src.path(i), "rb") as f:
                w, h = Image.open(f).size
            return int(min(w, h))
        except Exception:  # noqa: BLE001
            continue
    raise DataError(f"none of the first {min(tries, len(src))} images under {src.root} could be read to find the "
                    "image size; fix the files or set data.image_size")


