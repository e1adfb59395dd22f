"""Raw image sources for FixMatch: CIFAR-10/100, SVHN, STL-10, scikit-learn digits and image folders.

This module only *reads* data: no augmentation, no labeled/unlabeled
splitting (other modules do that).  :func:`build_sources` returns a
:class:`DataSources` with three :class:`ImageSource` objects (``train``: the
labeled pool, ``unlabeled``: extra unlabeled images or ``None``, ``test``) and
the facts the rest of the pipeline needs (number of classes, channels, image
size, normalisation).

Every bad-data problem raises :class:`DataError` (a ``ValueError``) whose
message names the file or folder, the problem and the fix.

Data sets (``name`` argument of :func:`build_sources`):

``cifar10``, ``cifar100``
    torchvision's ``CIFAR10``/``CIFAR100`` (``ROOT/cifar-10-batches-py`` /
    ``ROOT/cifar-100-python``).  Images stay in memory (uint8, N x 32 x 32 x 3).
``svhn``
    torchvision's ``SVHN`` splits ``train`` and ``test`` (``ROOT/train_32x32.mat``,
    ``ROOT/test_32x32.mat``); SVHN's label 10 is digit 0.  ``extra`` is not used.
``stl10``
    torchvision's ``STL10`` splits ``train`` (5,000 labeled) and ``test``
    (8,000), in memory; ``unlabeled`` (100,000 images, 2.7 GB) is read lazily
    through a memory map of ``ROOT/stl10_binary/unlabeled_X.bin`` (same layout
    torchvision reads) and becomes :attr:`DataSources.unlabeled`.
``digits``
    scikit-learn's ``load_digits`` (1,797 grayscale 8 x 8 images, values
    0..16 scaled to uint8 as ``round(v * 255 / 16)``); bundled with
    scikit-learn, ``root`` is ignored.  Train/test split: a fixed stratified
    split that does not depend on the run seed: for each class (in order 0..9)
    the indices of that class are permuted by one ``numpy.random.RandomState(0)``
    (legacy generator: its stream is frozen across numpy versions) and the first
    36 go to the test set, giving 1,437 train / 360 test images; both sets keep
    the original order of ``load_digits``.  Normalisation is computed from the
    training images.
``folder``
    ``ROOT/train/<class>/...`` (the labeled pool) and ``ROOT/test/<class>/...``
    with the same classes (sorted names), image files ``.png .jpg .jpeg .bmp
    .webp`` (any case), searched recursively inside each class folder; hidden
    files and folders (name starting with ".") are ignored.  File names are kept
    in a compact :class:`PathList` (one byte buffer plus offsets), so millions
    of files cost a few tens of bytes each, and images are opened lazily.

Torchvision integrity checks
    torchvision verifies md5 sums of the files it reads; this module replaces
    that check by "the files exist" (md5 sums of 100-170 MB files are slow and
    the test suite writes small files in the real formats).  torchvision's own
    download code is kept: with ``download=True`` and files missing it downloads
    and extracts the archives as usual.  Unreadable files raise
    :class:`DataError` suggesting to delete them and download again.

Options common to all data sets
    ``channels`` (3 -> PIL mode "RGB", 1 -> "L") converts images on load
    (default: the data set's own: 1 for digits, 3 otherwise, 3 for folders);
    ``image_size`` resizes (bilinear) to ``image_size`` x ``image_size`` on load
    where an image has another size (default: the data set's own size; for
    ``folder`` the size of the first readable training image, see
    :func:`build_sources`); ``unlabeled_dir`` adds a folder of unlabeled images
    (any data set; for STL-10 it replaces the built-in unlabeled split).

Image conversion (folders)
    RGBA/LA/PA images lose their alpha channel through PIL's ``convert`` (no
    compositing: transparent pixels keep their stored colour); palette images
    are expanded (through RGBA when they carry transparency); 16-bit grayscale
    ("I;16*", and "I" as Pillow reports some 16-bit PNGs) is scaled to 8 bits
    by ``round(v / 257)`` instead of PIL's clipping; float images ("F") are
    taken as 0..1 when their maximum is at most 1, else 0..255.  EXIF
    orientation is not applied (as torchvision's ImageFolder).
"""

from __future__ import annotations

import logging
import os
import pickle
from array import array
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "DataError",
    "DataSources",
    "ImageSource",
    "PathList",
    "IMAGE_EXTENSIONS",
    "DATASET_NAMES",
    "build_sources",
    "scan_image_files",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DATASET_NAMES = ("cifar10", "cifar100", "svhn", "stl10", "digits", "folder")

_CIFAR10_MEAN = tuple(v / 255 for v in (125.3, 123.0, 113.9))
_CIFAR10_STD = tuple(v / 255 for v in (63.0, 62.1, 66.7))
_CIFAR100_MEAN = tuple(v / 255 for v in (129.3, 124.1, 112.4))
_CIFAR100_STD = tuple(v / 255 for v in (68.2, 65.4, 70.4))
_SVHN_MEAN, _SVHN_STD = (0.4377, 0.4438, 0.4728), (0.198, 0.201, 0.197)
_STL10_MEAN, _STL10_STD = (0.441, 0.428, 0.387), (0.268, 0.261, 0.269)
_STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, what PIL's convert("L") uses

_SKIP_HINT = ("set the data.skip_corrupt option (skip_corrupt=True) to skip unreadable images "
              "(each is logged once and replaced by the next readable image of the same class), "
              "or delete or replace the file")


class DataError(ValueError):
    """A problem with the data on disk or the data configuration.

    The message names the file or folder, the problem and how to fix it.
    """


# ----------------------------------------------------------------------------
# compact path storage
# ----------------------------------------------------------------------------

def _normalise_index(i: int, n: int, what: str, unit: str) -> int:
    """Python's indexing rules (negative from the end) for ``n`` items, IndexError outside them."""
    i = int(i)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"{what} {i} out of range for {n} {unit}")
    return i


class PathList(Sequence):
    """An immutable list of (relative) paths stored as one byte buffer plus offsets.

    About ``len(path) + 8`` bytes per entry, cheap to pickle (two numpy
    arrays), so a million file names fit in a few tens of MB and DataLoader
    workers can receive it quickly.  Paths are stored with ``os.fsencode`` and
    returned with ``os.fsdecode``, so undecodable file names survive.
    """

    __slots__ = ("_buf", "_off")

    def __init__(self, buffer: np.ndarray, offsets: np.ndarray):
        self._buf = np.asarray(buffer, dtype=np.uint8)
        self._off = np.asarray(offsets, dtype=np.int64)
        if self._off.ndim != 1 or len(self._off) < 1 or self._off[0] != 0 or self._off[-1] != len(self._buf):
            raise ValueError("PathList: offsets must start at 0 and end at len(buffer)")

    @classmethod
    def from_paths(cls, paths: Sequence[str]) -> "PathList":
        enc = [os.fsencode(p) for p in paths]
        offsets = np.zeros(len(enc) + 1, dtype=np.int64)
        if enc:
            offsets[1:] = np.cumsum([len(e) for e in enc])
        return cls(np.frombuffer(b"".join(enc), dtype=np.uint8).copy(), offsets)

    def __len__(self) -> int:
        return len(self._off) - 1

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = _normalise_index(i, len(self), "PathList index", "paths")
        return os.fsdecode(self._buf[self._off[i]:self._off[i + 1]].tobytes())

    @property
    def nbytes(self) -> int:
        return int(self._buf.nbytes + self._off.nbytes)

    def __getstate__(self):
        return (self._buf, self._off)

    def __setstate__(self, state):
        self._buf, self._off = state

    def __eq__(self, other) -> bool:
        if isinstance(other, PathList):
            return np.array_equal(self._off, other._off) and np.array_equal(self._buf, other._buf)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PathList({len(self)} paths, {self.nbytes} bytes)"


class _PathListBuilder:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.off = array("q", [0])

    def add(self, rel: bytes) -> None:
        self.buf += rel
        self.off.append(len(self.buf))

    def __len__(self) -> int:
        return len(self.off) - 1

    def build(self) -> PathList:
        return PathList(np.frombuffer(bytes(self.buf), dtype=np.uint8).copy(),
                        np.frombuffer(self.off, dtype=np.int64).copy())


def _is_image_name(name: str, exts: tuple[str, ...]) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in exts


def _scan_into(top: str, prefix: bytes, builder: _PathListBuilder, exts: tuple[str, ...]) -> int:
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
                    elif _is_image_name(name, exts) and entry.is_file():
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
    builder = _PathListBuilder()
    _scan_into(top, b"", builder, exts)
    return builder.build()


# ----------------------------------------------------------------------------
# image conversion
# ----------------------------------------------------------------------------

def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert ``img`` to "RGB" or "L" (see the module doc for the rules)."""
    if img.mode == mode:
        return img
    src = img.mode
    if src.startswith("I;16") or src == "I":
        a = np.asarray(img).astype(np.float64)
        a = np.rint(np.clip(a, 0, 65535) / 257.0).astype(np.uint8)
        img = Image.fromarray(a, "L")
    elif src == "F":
        a = np.asarray(img, dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        img = Image.fromarray(np.rint(np.clip(a, 0, 255)).astype(np.uint8), "L")
    elif src == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif src in ("PA", "La"):
        img = img.convert("RGBA")
    if img.mode == mode:
        return img
    try:
        return img.convert(mode)
    except ValueError:
        return img.convert("RGBA").convert(mode)


# ----------------------------------------------------------------------------
# lazily read STL-10 binary files
# ----------------------------------------------------------------------------

class _BinaryImages:
    """Images of an STL-10 style binary file (per image: 3 planes, column-major), memory mapped.

    Indexing returns an HWC uint8 array; pickling keeps only the path, so
    DataLoader workers map the file themselves instead of receiving a copy.
    """

    def __init__(self, path: str, size: int = 96, channels: int = 3):
        self.path = path
        self.size = size
        self.channels = channels
        per = channels * size * size
        nbytes = os.path.getsize(path)
        if nbytes % per:
            raise DataError(
                f"{path}: size {nbytes} bytes is not a multiple of one image ({per} bytes): the file is "
                "truncated or not an STL-10 binary file; delete it and use download=True to fetch it again")
        self.n = nbytes // per
        self._mm: np.ndarray | None = None

    def _array(self) -> np.ndarray:
        if self._mm is None:
            mm = np.memmap(self.path, dtype=np.uint8, mode="r",
                           shape=(self.n, self.channels, self.size, self.size))
            self._mm = mm.transpose(0, 3, 2, 1)  # (n, c, w, h) on disk -> (n, h, w, c)
        return self._mm

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n, self.size, self.size, self.channels)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return np.ascontiguousarray(self._array()[i])

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_mm"] = None
        return d


# ----------------------------------------------------------------------------
# ImageSource / DataSources
# ----------------------------------------------------------------------------

@dataclass(eq=False)
class ImageSource:
    """Raw images of one split: ``load(i)`` gives image ``i`` as a PIL image in ``mode``.

    Two variants, chosen by which field is set:

    * in memory: ``images`` is a uint8 array ``(N, H, W, C)`` or ``(N, H, W)``
      (or an array-like indexed the same way, e.g. the memory-mapped STL-10
      unlabeled split);
    * folder: ``root`` plus ``paths`` (a :class:`PathList` of paths relative
      to ``root``); files are opened on each ``load``.

    ``load`` converts to ``mode`` ("RGB" or "L") and, when ``image_size`` is
    set, resizes (bilinear) images of another size to ``image_size`` x
    ``image_size``.

    Unreadable files: ``load`` raises :class:`DataError` naming the file,
    unless ``skip_corrupt`` is true; then it logs a warning (once per file and
    process), counts the file (``num_corrupt``, per process: counts made in
    DataLoader worker processes stay there) and returns the next readable
    image ``j`` = i+1, i+2, ... (wrapping) *with the same target as i*, so
    ``targets[i]`` stays the right label for what ``load(i)`` returns.
    """

    targets: np.ndarray
    classes: list[str]
    mode: str
    images: Any = None
    root: str | None = None
    paths: PathList | None = None
    image_size: int | None = None
    skip_corrupt: bool = False
    _corrupt: set = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.targets = np.asarray(self.targets, dtype=np.int64)
        self.classes = list(self.classes)
        if self.mode not in ("RGB", "L"):
            raise DataError(f"ImageSource mode must be 'RGB' or 'L', got {self.mode!r}")
        if (self.images is None) == (self.paths is None):
            raise ValueError("ImageSource needs exactly one of `images` (in memory) or `root` + `paths` (folder)")
        if self.paths is not None:
            if self.root is None:
                raise ValueError("ImageSource with `paths` needs `root`")
            if not isinstance(self.paths, PathList):
                self.paths = PathList.from_paths(list(self.paths))
        n = len(self.images) if self.images is not None else len(self.paths)
        if len(self.targets) != n:
            raise ValueError(f"ImageSource: {len(self.targets)} targets for {n} images")

    # -- basic API -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.targets)

    @property
    def num_corrupt(self) -> int:
        """Number of distinct unreadable files met so far by ``load`` in this process."""
        return len(self._corrupt)

    @property
    def corrupt_indices(self) -> list[int]:
        return sorted(self._corrupt)

    def path(self, i: int) -> str:
        """Full path of image ``i`` (folder variant only)."""
        if self.paths is None:
            raise TypeError("path() is only defined for folder sources")
        return os.path.join(self.root, self.paths[i])

    def load(self, i: int) -> Image.Image:
        """Image ``i`` as a PIL image in ``self.mode`` (resized to ``image_size`` if set)."""
        n = len(self)
        i = _normalise_index(i, n, "image index", "images")
        if self.images is not None:
            return self._finish(Image.fromarray(np.asarray(self.images[i])))
        if i not in self._corrupt:
            try:
                return self._open(i)
            except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"
                if not self.skip_corrupt:
                    raise DataError(f"cannot read image file {self.path(i)}: {type(e).__name__}: {e}. "
                                    f"The file is corrupt, truncated or not an image; {_SKIP_HINT}.") from e
                self._mark_corrupt(i, e)
        target = self.targets[i]
        for step in range(1, n):
            j = (i + step) % n
            if j in self._corrupt or self.targets[j] != target:
                continue
            try:
                return self._open(j)
            except Exception as e:  # noqa: BLE001
                self._mark_corrupt(j, e)
        what = "unlabeled images" if target < 0 else f"images of class {self.classes[target]!r}"
        raise DataError(f"no readable image left among the {what} under {self.root} "
                        f"({self.num_corrupt} unreadable files, e.g. {self.path(i)}); "
                        "replace the corrupt files")

    def in_memory_uint8(self) -> bool:
        """True when the images can be gathered as stored: an in-memory uint8 array already in ``mode``
        and at ``image_size`` (then ``load`` would change no pixel)."""
        shape = getattr(self.images, "shape", None)
        if shape is None or np.dtype(getattr(self.images, "dtype", np.uint8)) != np.uint8:
            return False
        mode_ok = (len(shape) == 3 and self.mode == "L") or (len(shape) == 4 and shape[3] == 3 and self.mode == "RGB")
        return mode_ok and (self.image_size is None or shape[1] == shape[2] == self.image_size)

    def uint8_batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images ``indices`` as one uint8 array (k, H, W, C), the pixels ``load`` gives: one gather for
        in-memory data sets, a ``load`` per image otherwise (files, resizing, mode conversion)."""
        idx = np.asarray(indices, dtype=np.int64)
        if self.in_memory_uint8():
            batch = np.asarray(self.images[idx])
        else:
            batch = np.stack([np.asarray(self.load(int(i)), dtype=np.uint8) for i in idx])
        return batch[..., None] if batch.ndim == 3 else batch

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        """``(load(i), targets[i])``."""
        return self.load(i), int(self.targets[i])

    # -- internals ---------------------------------------------------------------
    def _mark_corrupt(self, i: int, e: Exception) -> None:
        if i not in self._corrupt:
            self._corrupt.add(i)
            logger.warning("skipping unreadable image file %s (%s: %s); data.skip_corrupt is on, "
                           "so the next readable image is used instead", self.path(i), type(e).__name__, e)

    def _open(self, i: int) -> Image.Image:
        with open(self.path(i), "rb") as f:
            img = Image.open(f)
            if self.image_size is not None and img.format == "JPEG":
                img.draft(self.mode, (self.image_size, self.image_size))
            img.load()
        return self._finish(img)

    def _finish(self, img: Image.Image) -> Image.Image:
        img = _to_mode(img, self.mode)
        s = self.image_size
        if s is not None and img.size != (s, s):
            img = img.resize((s, s), Image.Resampling.BILINEAR)
        return img


@dataclass
class DataSources:
    """The raw images of one data set plus what the pipeline needs to know about them."""

    train: ImageSource            # the labeled pool (labels known)
    unlabeled: ImageSource | None  # extra unlabeled images; None if none
    test: ImageSource
    num_classes: int
    channels: int                 # 3 or 1
    default_image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""

    @property
    def classes(self) -> list[str]:
        return self.train.classes


# ----------------------------------------------------------------------------
# torchvision data sets
# ----------------------------------------------------------------------------

def _torchvision_classes():
    """Subclasses of torchvision's data sets whose integrity check is "files exist"."""
    from torchvision import datasets as tvd

    class CIFAR10(tvd.CIFAR10):
        def _check_integrity(self) -> bool:
            return all(os.path.isfile(p) for p in _cifar_files(self))

        def _load_meta(self) -> None:  # torchvision's checks the md5 of the meta file
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            if not os.path.isfile(path):
                raise RuntimeError(f"meta file {path} not found")
            with open(path, "rb") as f:
                data = pickle.load(f, encoding="latin1")
            self.classes = list(data[self.meta["key"]])
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    class CIFAR100(CIFAR10, tvd.CIFAR100):
        base_folder = tvd.CIFAR100.base_folder
        url = tvd.CIFAR100.url
        filename = tvd.CIFAR100.filename
        tgz_md5 = tvd.CIFAR100.tgz_md5
        train_list = tvd.CIFAR100.train_list
        test_list = tvd.CIFAR100.test_list
        meta = tvd.CIFAR100.meta

    class SVHN(tvd.SVHN):
        def _check_integrity(self) -> bool:
            return os.path.isfile(os.path.join(self.root, self.filename))

        def download(self) -> None:  # torchvision's re-downloads when the md5 differs
            if self._check_integrity():
                return
            super().download()

    class STL10(tvd.STL10):
        # files that must exist (set per build: the unlabeled file only when it is used),
        # so that download=True fetches the archive when any of them is missing
        required: tuple[str, ...] = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")

        def _check_integrity(self) -> bool:
            return all(os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f in self.required)

    return CIFAR10, CIFAR100, SVHN, STL10


_STL10_SPLIT_FILES = {
    "train": ("train_X.bin", "train_y.bin"),
    "test": ("test_X.bin", "test_y.bin"),
    "unlabeled": ("unlabeled_X.bin",),
}


def _cifar_files(ds) -> list[str]:
    base = os.path.join(ds.root, ds.base_folder)
    return [os.path.join(base, f) for f, _ in ds.train_list + ds.test_list] + \
        [os.path.join(base, ds.meta["filename"])]


def _expected_files(name: str, root: str, with_unlabeled: bool = True) -> tuple[str, list[str], str]:
    """(folder, files, download url) of a torchvision data set."""
    from torchvision import datasets as tvd

    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        folder = os.path.join(root, cls.base_folder)
        files = [os.path.join(folder, f) for f, _ in cls.train_list + cls.test_list]
        files.append(os.path.join(folder, cls.meta["filename"]))
        return folder, files, cls.url
    if name == "svhn":
        files = [os.path.join(root, tvd.SVHN.split_list[s][1]) for s in ("train", "test")]
        return root, files, " and ".join(tvd.SVHN.split_list[s][0] for s in ("train", "test"))
    if name == "stl10":
        folder = os.path.join(root, tvd.STL10.base_folder)
        splits = ("train", "test", "unlabeled") if with_unlabeled else ("train", "test")
        files = [os.path.join(folder, f) for s in splits for f in _STL10_SPLIT_FILES[s]]
        return folder, files, tvd.STL10.url
    raise AssertionError(name)


_PRETTY = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN", "stl10": "STL-10"}


def _check_present(name: str, root: str, download: bool, with_unlabeled: bool = True) -> bool:
    """Raise DataError when files are missing and download is off; return whether all are present."""
    folder, files, url = _expected_files(name, root, with_unlabeled)
    missing = [f for f in files if not os.path.isfile(f)]
    if not missing:
        return True
    if download:
        return False
    pretty = _PRETTY[name]
    if not os.path.isdir(root):
        problem = f"the data root {root} does not exist"
    elif len(missing) == len(files):
        problem = f"no {pretty} files found in {folder}"
    else:
        problem = f"{pretty} files missing in {folder}: {', '.join(os.path.basename(m) for m in missing)}"
    raise DataError(
        f"{problem}. {pretty} is expected as {', '.join(files)}. Set the download option "
        f"(data.download=true / download=True) to fetch it from {url}, or point data.root at the "
        "folder that holds the files.")


def _construct(name: str, root: str, download: bool, present: bool, factory):
    pretty = _PRETTY[name]
    folder, _, url = _expected_files(name, root)
    try:
        return factory()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        if download and not present:
            raise DataError(
                f"downloading {pretty} into {root} failed ({type(e).__name__}: {e}). Check network access, "
                f"or download {url} yourself, extract it into {root} (giving {folder}) and run with "
                "download=False.") from e
        raise DataError(
            f"cannot read the {pretty} files in {folder} ({type(e).__name__}: {e}): they are corrupt, "
            "truncated or not in the expected format. Delete them and run with download=True "
            "(data.download=true) to fetch them again.") from e


def _check_labels(targets: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
        bad = targets[(targets < 0) | (targets >= num_classes)]
        raise DataError(f"{where}: labels outside 0..{num_classes - 1} (e.g. {int(bad[0])}); the file is "
                        "corrupt or from another data set; delete it and use download=True to fetch it again")
    return targets


def _build_cifar(name: str, root: str, download: bool):
    CIFAR10, CIFAR100, _, _ = _torchvision_classes()
    cls = CIFAR10 if name == "cifar10" else CIFAR100
    present = _check_present(name, root, download)
    train = _construct(name, root, download, present, lambda: cls(root, train=True, download=download))
    test = _construct(name, root, False, True, lambda: cls(root, train=False, download=False))
    folder = os.path.join(root, cls.base_folder)
    classes = list(train.classes)
    out = []
    for ds in (train, test):
        data = np.asarray(ds.data)
        if data.dtype != np.uint8 or data.shape[1:] != (32, 32, 3):
            raise DataError(f"{folder}: images have shape {data.shape[1:]} / {data.dtype}, expected 32x32x3 uint8; "
                            "delete the files and use download=True to fetch them again")
        targets = _check_labels(ds.targets, len(classes), folder)
        out.append(ImageSource(targets, classes, "RGB", images=np.ascontiguousarray(data)))
    mean, std = (_CIFAR10_MEAN, _CIFAR10_STD) if name == "cifar10" else (_CIFAR100_MEAN, _CIFAR100_STD)
    return out[0], None, out[1], len(classes), 3, 32, mean, std


def _build_svhn(root: str, download: bool):
    _, _, SVHN, _ = _torchvision_classes()
    present = _check_present("svhn", root, download)
    out = []
    for split in ("train", "test"):
        ds = _construct("svhn", root, download, present, lambda: SVHN(root, split=split, download=download))
        path = os.path.join(root, ds.filename)
        data = np.asarray(ds.data)
        if data.dtype != np.uint8 or data.ndim != 4 or data.shape[1:] != (3, 32, 32):
            raise DataError(f"{path}: X has layout {data.shape} / {data.dtype} after loading, expected "
                            "32x32x3xN uint8; delete it and use download=True to fetch it again")
        targets = _check_labels(ds.labels, 10, path)
        out.append(ImageSource(targets, [str(d) for d in range(10)], "RGB",
                               images=np.ascontiguousarray(data.transpose(0, 2, 3, 1))))
    return out[0], None, out[1], 10, 3, 32, _SVHN_MEAN, _SVHN_STD


def _build_stl10(root: str, download: bool, need_unlabeled: bool):
    _, _, _, STL10 = _torchvision_classes()
    STL10.required = tuple(f for s in (("train", "test", "unlabeled") if need_unlabeled else ("train", "test"))
                           for f in _STL10_SPLIT_FILES[s])
    present = _check_present("stl10", root, download, with_unlabeled=need_unlabeled)
    folder = os.path.join(root, STL10.base_folder)
    out = []
    classes = None
    for split in ("train", "test"):
        ds = _construct("stl10", root, download, present, lambda: STL10(root, split=split, download=download))
        classes = list(getattr(ds, "classes", None) or _STL10_CLASSES)
        if len(classes) != 10:
            raise DataError(f"{os.path.join(folder, 'class_names.txt')}: {len(classes)} class names, expected 10; "
                            "fix or delete the file (the standard names are used when it is missing)")
        targets = _check_labels(ds.labels, 10, os.path.join(folder, f"{split}_y.bin"))
        data = np.asarray(ds.data)
        if len(targets) != len(data):
            raise DataError(f"{folder}: {split}_X.bin holds {len(data)} images but {split}_y.bin {len(targets)} "
                            "labels; the files are truncated or mismatched; delete them and use download=True")
        out.append(ImageSource(targets, classes, "RGB",
                               images=np.ascontiguousarray(data.transpose(0, 2, 3, 1))))
    unlabeled = None
    if need_unlabeled:
        path = os.path.join(folder, "unlabeled_X.bin")
        images = _BinaryImages(path, 96, 3)
        unlabeled = ImageSource(np.full(len(images), -1, dtype=np.int64), classes, "RGB", images=images)
    return out[0], unlabeled, out[1], 10, 3, 96, _STL10_MEAN, _STL10_STD


# ----------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------

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


def _build_digits():
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
    return train, None, test, 10, 1, 8, mean, std


# ----------------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------------

def _class_dirs(split_dir: str) -> tuple[list[str], int]:
    names, loose = [], 0
    with os.scandir(split_dir) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                names.append(e.name)
            elif _is_image_name(e.name, IMAGE_EXTENSIONS):
                loose += 1
    return sorted(names), loose


def _scan_split(split_dir: str, classes: list[str], mode: str, skip_corrupt: bool) -> ImageSource:
    builder = _PathListBuilder()
    counts = []
    sep = os.fsencode(os.sep)
    for c in classes:
        n = _scan_into(os.path.join(split_dir, c), os.fsencode(c) + sep, builder, IMAGE_EXTENSIONS)
        if n == 0:
            raise DataError(
                f"class folder {os.path.join(split_dir, c)} holds no images (searched recursively for "
                f"{', '.join(IMAGE_EXTENSIONS)}, any case); add images to it or remove the folder")
        counts.append(n)
    targets = np.repeat(np.arange(len(classes), dtype=np.int64), counts)
    return ImageSource(targets, classes, mode, root=split_dir, paths=builder.build(), skip_corrupt=skip_corrupt)


def _folder_unlabeled(unlabeled_dir: str, root: str, classes: list[str], mode: str,
                      skip_corrupt: bool) -> ImageSource:
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


def _build_folder(root: str, mode: str, skip_corrupt: bool):
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
    return train, test, classes


def _infer_size(src: ImageSource, tries: int = 50) -> int:
    for i in range(min(tries, len(src))):
        try:
            with open(src.path(i), "rb") as f:
                w, h = Image.open(f).size
            return int(min(w, h))
        except Exception:  # noqa: BLE001
            continue
    raise DataError(f"none of the first {min(tries, len(src))} images under {src.root} could be read to find the "
                    "image size; fix the files or set data.image_size")


# ----------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------

def _convert_stats(mean, std, native: int, channels: int):
    if native == channels:
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if native == 1:  # grey -> RGB: the three channels are equal
        return (float(mean[0]),) * 3, (float(std[0]),) * 3
    # RGB -> grey: luminance of the mean; std assuming fully correlated channels (an upper bound)
    return (float(sum(w * m for w, m in zip(_LUMA, mean))),), (float(sum(w * s for w, s in zip(_LUMA, std))),)


def build_sources(name: str, root: str, *, download: bool = True, image_size: int | None = None,
                  channels: int | None = None, unlabeled_dir: str | None = None,
                  skip_corrupt: bool = False) -> DataSources:
    """Build the raw image sources of data set ``name`` stored under ``root``.

    Args:
        name: one of ``cifar10, cifar100, svhn, stl10, digits, folder`` (case-insensitive).
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
    key = str(name).strip().lower()
    unlabeled_dir = os.fspath(unlabeled_dir) if unlabeled_dir else None
    if key not in DATASET_NAMES:
        raise DataError(f"unknown data set {name!r}; valid names: {', '.join(DATASET_NAMES)} "
                        "(set data.name to one of them)")
    if channels is not None and channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}; fix data.channels")
    if image_size is not None and (int(image_size) != image_size or image_size < 1):
        raise DataError(f"image_size must be a positive integer, got {image_size!r}; fix data.image_size")
    image_size = None if image_size is None else int(image_size)
    root = os.path.normpath(os.path.expanduser(os.fspath(root))) if root is not None else ""

    if key in ("cifar10", "cifar100"):
        parts = _build_cifar(key, root, download)
    elif key == "svhn":
        parts = _build_svhn(root, download)
    elif key == "stl10":
        parts = _build_stl10(root, download, need_unlabeled=unlabeled_dir is None)
        if unlabeled_dir is not None:
            logger.info("stl10: using %s as unlabeled images instead of unlabeled_X.bin", unlabeled_dir)
    elif key == "digits":
        parts = _build_digits()
    else:
        parts = None

    if parts is not None:
        train, unlabeled, test, num_classes, native, native_size, mean, std = parts
        ch = native if channels is None else channels
        mode = "RGB" if ch == 3 else "L"
        size = native_size if image_size is None else image_size
        if unlabeled_dir is not None:
            if not root and not os.path.isabs(unlabeled_dir):
                raise DataError(f"unlabeled_dir {unlabeled_dir!r} is relative but no data root is set; "
                                "give an absolute path or set data.root")
            unlabeled = _folder_unlabeled(unlabeled_dir, root, train.classes, mode, skip_corrupt)
            unlabeled.image_size = size  # folder images are brought to the data set's size
        for src in (train, unlabeled, test):
            if src is None:
                continue
            src.mode = mode
            src.skip_corrupt = skip_corrupt
            if image_size is not None:
                src.image_size = image_size
        mean, std = _convert_stats(mean, std, native, ch)
        return DataSources(train, unlabeled, test, num_classes, ch, size, mean, std, key)

    # folder
    ch = 3 if channels is None else channels
    mode = "RGB" if ch == 3 else "L"
    train, test, classes = _build_folder(root, mode, skip_corrupt)
    unlabeled = _folder_unlabeled(unlabeled_dir, root, classes, mode, skip_corrupt) if unlabeled_dir else None
    size = image_size if image_size is not None else _infer_size(train)
    for src in (train, unlabeled, test):
        if src is not None:
            src.image_size = size
    return DataSources(train, unlabeled, test, len(classes), ch, size, (0.5,) * ch, (0.5,) * ch, key)
