"""Image folders: the ``folder`` data set (``ROOT/train/<class>/``, ``ROOT/test/<class>/``) and
``data.unlabeled_dir`` (a folder of unlabeled images, usable with every data set).

Layout: ``ROOT/train/<class>/...`` (the labeled pool) and ``ROOT/test/<class>/...`` with the
same classes (sorted names); image files ``.png .jpg .jpeg .bmp .webp`` (any case), searched
recursively inside each class folder (directory links are followed, but each real folder is scanned
once, so link loops end); hidden files and folders (name starting with ".") are
ignored.  File names are kept in a compact :class:`~ignite_fixmatch.datasets.source.PathList`
(one byte buffer plus offsets), so millions of files cost a few tens of bytes each, and images
are opened lazily.  The image size, unless given, is the smaller side of the first readable
training image (:func:`infer_image_size`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ignite_fixmatch.datasets.source import BuildRequest, DataError, ImageSource, PathList, PathListBuilder, RawSplits

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def is_image_name(name: str, exts: tuple[str, ...] = IMAGE_EXTENSIONS) -> bool:
    """Whether a file name has one of ``exts`` (any case) after a non-empty stem."""
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in exts


@dataclass
class ScanStats:
    """What a scan found, for the log line that says where the images came from."""

    images: int = 0
    folders: int = 0
    repeats: int = 0  # folders reached a second time (a directory link loop or two links to one folder): not rescanned

    def add(self, other: ScanStats) -> None:
        self.images += other.images
        self.folders += other.folders
        self.repeats += other.repeats

    def describe(self) -> str:
        text = f"{self.images} images in {self.folders} folders"
        if self.repeats:
            text += (f" ({self.repeats} directory links not followed: they lead to a folder already scanned, "
                     "e.g. a link loop)")
        return text


def _folder_id(path: str) -> tuple[int, int]:
    """A folder's identity whatever the path (links resolved): how a scan knows it was there already."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _list_folder(folder: str, exts: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Sorted image file names and sub-folder names (links to folders included) of one folder."""
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
    return sorted(files), sorted(dirs)


def scan_into(top: str, prefix: bytes, builder: PathListBuilder, exts: tuple[str, ...]) -> ScanStats:
    """Append image files below ``top`` (recursive, sorted, depth first) as ``prefix + relpath``.

    Directory links are followed, but every real folder is scanned once (by device and inode):
    a link loop would otherwise repeat images without end, and two loops never finish."""
    stats = ScanStats()
    seen = {_folder_id(top)}
    sep = os.fsencode(os.sep)
    stack = [(top, prefix)]
    while stack:
        folder, pre = stack.pop()
        files, dirs = _list_folder(folder, exts)
        stats.folders += 1
        for name in files:
            builder.add(pre + os.fsencode(name))
        stats.images += len(files)
        todo = []
        for d in dirs:  # sorted: the first name claims a folder reached twice
            path = os.path.join(folder, d)
            try:
                key = _folder_id(path)
            except OSError:  # vanished, or a link that stopped resolving
                continue
            if key in seen:
                stats.repeats += 1
                continue
            seen.add(key)
            todo.append((path, pre + os.fsencode(d) + sep))
        stack.extend(reversed(todo))  # popped in sorted order
    return stats


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
    total = ScanStats()
    sep = os.fsencode(os.sep)
    for c in classes:
        stats = scan_into(os.path.join(split_dir, c), os.fsencode(c) + sep, builder, IMAGE_EXTENSIONS)
        total.add(stats)
        n = stats.images
        if n == 0:
            raise DataError(
                f"class folder {os.path.join(split_dir, c)} holds no images (searched recursively for "
                f"{', '.join(IMAGE_EXTENSIONS)}, any case); add images to it or remove the folder")
        counts.append(n)
    logger.info("%s: %s", split_dir, total.describe())
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
    builder = PathListBuilder()
    stats = scan_into(path, b"", builder, IMAGE_EXTENSIONS)
    paths = builder.build()
    logger.info("unlabeled_dir %s: %s", path, stats.describe())
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


