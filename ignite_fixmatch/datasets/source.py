"""The data model every data set is read into: :class:`ImageSource`, :class:`DataSources`, :class:`DataError`.

A builder (one per data set, see :mod:`ignite_fixmatch.datasets.registry`) turns files into
:class:`ImageSource` objects; :func:`~ignite_fixmatch.datasets.registry.build_sources` gathers
them into a :class:`DataSources`.  Kept apart from the builders so that code that only handles
images (data.py, device_data.py) does not depend on how a data set is stored.

Image conversion (files)
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
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ignite_fixmatch.errors import DataError

logger = logging.getLogger(__name__)

SKIP_HINT = ("set the data.skip_corrupt option (skip_corrupt=True) to skip unreadable images "
             "(each is logged once and replaced by the next readable image of the same class), "
             "or delete or replace the file")





def normalise_index(i: int, n: int, what: str, unit: str) -> int:
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
    def from_paths(cls, paths: Sequence[str]) -> PathList:
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
        i = normalise_index(i, len(self), "PathList index", "paths")
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


class PathListBuilder:
    """Collects encoded paths one by one (folder scans) and builds a :class:`PathList` at the end."""

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


def to_mode(img: Image.Image, mode: str) -> Image.Image:
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
        i = normalise_index(i, n, "image index", "images")
        if self.images is not None:
            return self._finish(Image.fromarray(np.asarray(self.images[i])))
        if i not in self._corrupt:
            try:
                return self._open(i)
            except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"
                if not self.skip_corrupt:
                    raise DataError(f"cannot read image file {self.path(i)}: {type(e).__name__}: {e}. "
                                    f"The file is corrupt, truncated or not an image; {SKIP_HINT}.") from e
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
        img = to_mode(img, self.mode)
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


@dataclass(frozen=True)
class BuildRequest:
    """What :func:`build_sources` asks of a data set's builder (one object: every builder has one signature)."""

    name: str            # data.name, lower case
    title: str           # the data set's name for people, used in error messages
    root: str            # normalised data root ("" when none is given)
    download: bool       # fetch missing files (torchvision data sets)
    mode: str            # PIL mode of the images: "RGB" or "L"
    skip_corrupt: bool   # folder sources: skip unreadable files
    with_unlabeled: bool  # read a built-in unlabeled split (STL-10); false when data.unlabeled_dir replaces it


@dataclass
class RawSplits:
    """A builder's result; :func:`build_sources` adds the options common to all data sets."""

    train: ImageSource
    unlabeled: ImageSource | None
    test: ImageSource
    # set by builders that compute normalisation from the data (digits), in the data set's own channels
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


class SourceBuilder(Protocol):
    """Reads one data set's files: ``builder(request) -> RawSplits``; raises :class:`DataError`."""

    def __call__(self, request: BuildRequest) -> RawSplits: ...
