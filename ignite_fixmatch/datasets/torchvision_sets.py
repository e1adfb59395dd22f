"""The torchvision data sets: CIFAR-10/100, SVHN, STL-10 (download with torchvision's code, read into memory).

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
    torchvision reads) and becomes the unlabeled source.

Integrity checks
    torchvision verifies md5 sums of the files it reads; this module replaces
    that check by "the files exist" (md5 sums of 100-170 MB files are slow and
    the test suite writes small files in the real formats).  torchvision's own
    download code is kept: with ``download=True`` and files missing it downloads
    and extracts the archives as usual.  Unreadable files raise
    :class:`DataError` suggesting to delete them and download again.

torchvision is imported inside the functions, so that the registry (and the config
check) can import this module without it.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from ignite_fixmatch.datasets.source import BuildRequest, DataError, ImageSource, RawSplits

STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


class BinaryImages:
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


def _check_present(request: BuildRequest, with_unlabeled: bool = True) -> bool:
    """Raise DataError when files are missing and download is off; return whether all are present."""
    root, pretty = request.root, request.title
    folder, files, url = _expected_files(request.name, root, with_unlabeled)
    missing = [f for f in files if not os.path.isfile(f)]
    if not missing:
        return True
    if request.download:
        return False
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


def _construct(request: BuildRequest, download: bool, present: bool, factory):
    """``factory()`` (a torchvision data set), its failures turned into a :class:`DataError` that says what to do."""
    root, pretty = request.root, request.title
    folder, _, url = _expected_files(request.name, root)
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


def build_cifar(request: BuildRequest) -> RawSplits:
    """``cifar10`` and ``cifar100`` (``request.name`` says which)."""
    root, download = request.root, request.download
    CIFAR10, CIFAR100, _, _ = _torchvision_classes()
    cls = CIFAR10 if request.name == "cifar10" else CIFAR100
    present = _check_present(request)
    train = _construct(request, download, present, lambda: cls(root, train=True, download=download))
    test = _construct(request, False, True, lambda: cls(root, train=False, download=False))
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
    return RawSplits(out[0], None, out[1])


def build_svhn(request: BuildRequest) -> RawSplits:
    """``svhn``: the ``train`` and ``test`` splits."""
    root, download = request.root, request.download
    _, _, SVHN, _ = _torchvision_classes()
    present = _check_present(request)
    out = []
    for split in ("train", "test"):
        ds = _construct(request, download, present, lambda split=split: SVHN(root, split=split, download=download))
        path = os.path.join(root, ds.filename)
        data = np.asarray(ds.data)
        if data.dtype != np.uint8 or data.ndim != 4 or data.shape[1:] != (3, 32, 32):
            raise DataError(f"{path}: X has layout {data.shape} / {data.dtype} after loading, expected "
                            "32x32x3xN uint8; delete it and use download=True to fetch it again")
        targets = _check_labels(ds.labels, 10, path)
        out.append(ImageSource(targets, [str(d) for d in range(10)], "RGB",
                               images=np.ascontiguousarray(data.transpose(0, 2, 3, 1))))
    return RawSplits(out[0], None, out[1])


def build_stl10(request: BuildRequest) -> RawSplits:
    """``stl10``: ``train`` and ``test`` in memory, ``unlabeled`` memory-mapped unless ``request.with_unlabeled`` is off."""
    root, download, need_unlabeled = request.root, request.download, request.with_unlabeled
    _, _, _, STL10 = _torchvision_classes()
    STL10.required = tuple(f for s in (("train", "test", "unlabeled") if need_unlabeled else ("train", "test"))
                           for f in _STL10_SPLIT_FILES[s])
    present = _check_present(request, with_unlabeled=need_unlabeled)
    folder = os.path.join(root, STL10.base_folder)
    out = []
    classes = None
    for split in ("train", "test"):
        ds = _construct(request, download, present, lambda split=split: STL10(root, split=split, download=download))
        classes = list(getattr(ds, "classes", None) or STL10_CLASSES)
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
        images = BinaryImages(path, 96, 3)
        unlabeled = ImageSource(np.full(len(images), -1, dtype=np.int64), classes, "RGB", images=images)
    return RawSplits(out[0], unlabeled, out[1])

