"""Raw image sources for FixMatch: CIFAR-10/100, SVHN, STL-10, scikit-learn digits and image folders.

This package only *reads* data: no augmentation, no labeled/unlabeled splitting (other modules
do that).  :func:`build_sources` returns a :class:`DataSources` with three :class:`ImageSource`
objects (``train``: the labeled pool, ``unlabeled``: extra unlabeled images or ``None``,
``test``) and the facts the rest of the pipeline needs (number of classes, channels, image size,
normalisation).  Every bad-data problem raises :class:`DataError` (a ``ValueError``) whose
message names the file or folder, the problem and the fix.

Modules:

``registry``
    one :class:`DatasetSpec` per ``data.name`` (builder, channels, size, mean/std, flip,
    download, classes) and :func:`build_sources`, which applies the options common to all
    data sets: ``channels`` (3 -> PIL "RGB", 1 -> "L", converted on load), ``image_size``
    (bilinear resize on load) and ``unlabeled_dir`` (a folder of extra unlabeled images).
``source``
    the data model (:class:`ImageSource`, :class:`DataSources`, :class:`PathList`) and image decoding.
``torchvision_sets``, ``folder``, ``digits``
    the builders: how each data set is stored and read.
"""

from ignite_fixmatch.datasets.digits import digits_split
from ignite_fixmatch.datasets.folder import IMAGE_EXTENSIONS, scan_image_files
from ignite_fixmatch.datasets.registry import (
    DATASET_NAMES,
    DatasetSpec,
    build_sources,
    dataset_names,
    dataset_spec,
    known_num_classes,
)
from ignite_fixmatch.datasets.source import DataError, DataSources, ImageSource, PathList

__all__ = [
    "DataError",
    "DataSources",
    "ImageSource",
    "PathList",
    "IMAGE_EXTENSIONS",
    "DATASET_NAMES",
    "DatasetSpec",
    "build_sources",
    "dataset_names",
    "dataset_spec",
    "digits_split",
    "known_num_classes",
    "scan_image_files",
]
