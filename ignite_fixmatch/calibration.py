"""Calibration: how far a model's confidence is from its accuracy, a picture of it, and the fix.

- :func:`expected_calibration_error` and the Ignite metric :class:`CalibrationError` (the same bins, summed
  on the device and all-reduced over processes): ECE with equal-width confidence bins over (0, 1],
  ``sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` (Guo et al. 2017, "On Calibration of Modern Neural Networks").
- :func:`reliability_diagram`: accuracy per confidence bin against the diagonal, as a PNG (PIL only).
- :func:`fit_temperature`: the one number T that divides the logits so that softmax(logits / T) has the
  lowest NLL on held-out labeled images; it changes no prediction (the argmax stays), only the confidence.
- :func:`calibration_logits`: those images' logits, from the run's ``data.val_labels`` hold-out ("val") or
  a labeled folder ``DIR/<class>/``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from torch import Tensor
from torch.nn import functional as F

from ignite_fixmatch.charts import reliability_image
from ignite_fixmatch.datasets.source import ImageSource
from ignite_fixmatch.errors import ConfigError, DataError
from ignite_fixmatch.output_files import write_atomically

if TYPE_CHECKING:
    from ignite_fixmatch.inference import InferenceModel

BINS = 15  # the usual ECE bin count (Guo et al. 2017)
MIN_CALIBRATION_IMAGES = 10  # fewer labels cannot pin down a temperature
T_RANGE = (0.01, 100.0)  # the search interval of the temperature
LOGIT_BATCH = 256  # images per forward pass when computing calibration logits


# --------------------------------------------------------------------------- ECE


def bin_sums(probs: Tensor, labels: Tensor, bins: int = BINS) -> tuple[Tensor, Tensor, Tensor]:
    """Per confidence bin ``((b-1)/bins, b/bins]``: image count, sum of confidences, correct predictions
    (float64, on the inputs' device). The one binning rule, shared by the function and the metric."""
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"expected probabilities (N, classes) and labels (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}")
    confidence, predicted = probs.detach().max(dim=1)
    confidence = confidence.to(torch.float64)
    index = (torch.ceil(confidence * bins).long() - 1).clamp_(0, bins - 1)
    correct = (predicted == labels.to(predicted.device)).to(torch.float64)
    zeros = torch.zeros(bins, dtype=torch.float64, device=probs.device)
    return (
        zeros.index_add(0, index, torch.ones_like(confidence)),
        zeros.index_add(0, index, confidence),
        zeros.index_add(0, index, correct),
    )


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin image counts, mean confidence and accuracy (None where a bin is empty), and the ECE (a fraction)."""

    counts: list[int]
    confidence: list[float | None]
    accuracy: list[float | None]
    ece: float

    @property
    def bins(self) -> int:
        return len(self.counts)

    @classmethod
    def from_sums(cls, counts: Tensor, confidence_sums: Tensor, correct: Tensor) -> ReliabilityBins:
        n = float(counts.sum())
        if n == 0:
            raise ValueError("no images: the calibration error needs at least one")
        c, s, k = counts.double().cpu().tolist(), confidence_sums.double().cpu().tolist(), correct.double().cpu().tolist()
        ece = sum(abs(ki - si) for si, ki in zip(s, k)) / n  # sum_b |B_b|/N |acc_b - conf_b|, with acc_b = k_b/|B_b|
        return cls(
            counts=[int(round(x)) for x in c],
            confidence=[si / ci if ci else None for si, ci in zip(s, c)],
            accuracy=[ki / ci if ci else None for ki, ci in zip(k, c)],
            ece=ece,
        )

    @classmethod
    def from_predictions(cls, probs: Tensor, labels: Tensor, bins: int = BINS) -> ReliabilityBins:
        return cls.from_sums(*bin_sums(probs, labels, bins))

    def to_dict(self) -> dict[str, Any]:
        return {"bins": self.bins, "counts": self.counts, "confidence": self.confidence, "accuracy": self.accuracy}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], ece: float) -> ReliabilityBins:
        return cls(list(d["counts"]), list(d["confidence"]), list(d["accuracy"]), ece)


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = BINS) -> float:
    """ECE (a fraction in [0, 1]) of class probabilities ``probs`` (N, classes) against integer ``labels`` (N,)."""
    return ReliabilityBins.from_predictions(probs, labels, bins).ece


class CalibrationError(Metric):
    """ECE of a classifier's logits as an Ignite metric: ``update((logits, labels))``, ``compute()`` -> the
    ECE as a fraction; ``self.reliability`` then holds the bins for :func:`reliability_diagram`.

    The bins' counts, confidence sums and correct counts stay on the device and are all-reduced over
    processes at ``compute()``, so under DDP each process scores its shard and all get the whole set's ECE."""

    _state_dict_all_req_keys = ("_counts", "_confidence", "_correct")

    def __init__(self, bins: int = BINS, output_transform: Callable = lambda x: x, device: str | torch.device = "cpu") -> None:
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        self.bins = bins
        self.reliability: ReliabilityBins | None = None
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._counts = torch.zeros(self.bins, dtype=torch.float64, device=self._device)
        self._confidence = torch.zeros_like(self._counts)
        self._correct = torch.zeros_like(self._counts)

    @reinit__is_reduced
    def update(self, output: Sequence[Tensor]) -> None:
        logits, labels = output[0].detach(), output[1].detach()
        counts, confidence, correct = bin_sums(torch.softmax(logits.float(), dim=1), labels, self.bins)
        self._counts += counts.to(self._device)
        self._confidence += confidence.to(self._device)
        self._correct += correct.to(self._device)

    @sync_all_reduce("_counts", "_confidence", "_correct")
    def compute(self) -> float:
        if float(self._counts.sum()) == 0:
            raise NotComputableError("CalibrationError needs at least one image before it can be computed")
        self.reliability = ReliabilityBins.from_sums(self._counts, self._confidence, self._correct)
        return self.reliability.ece


# --------------------------------------------------------------------------- reliability diagram

def reliability_diagram(bins_stats: ReliabilityBins, path: str | Path, title: str = "reliability") -> Path:
    """The reliability diagram (``charts.reliability_image``) as a PNG at ``path``, written whole or not at all."""
    image = reliability_image(bins_stats.counts, bins_stats.confidence, bins_stats.accuracy, bins_stats.ece, title)
    write_atomically(Path(path), lambda tmp: image.save(tmp, format="PNG"))
    return Path(path)


# --------------------------------------------------------------------------- temperature scaling


def check_calibration_set(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """float64 logits (N, classes) and int64 labels (N,), refusing what cannot be fitted."""
    if logits.ndim != 2 or labels.ndim != 1 or len(labels) != len(logits):
        raise ValueError(f"expected logits (N, classes) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if len(labels) < MIN_CALIBRATION_IMAGES:
        raise DataError(
            f"calibration needs at least {MIN_CALIBRATION_IMAGES} labeled images, got {len(labels)}: hold out more "
            "(data.val_labels=K per class) or give a larger labeled folder."
        )
    z = logits.detach().to("cpu", torch.float64)
    if not torch.isfinite(z).all():
        raise DataError("calibration: the model gives non-finite logits on some of the images; the checkpoint is unusable.")
    y = labels.detach().to("cpu", torch.int64)
    if int(y.min()) < 0 or int(y.max()) >= z.shape[1]:
        raise ValueError(f"labels must be class indices in [0, {z.shape[1]}), got [{int(y.min())}, {int(y.max())}]")
    return z, y


def nll(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / temperature) (float64)."""
    return float(F.cross_entropy(logits.detach().double().cpu() / temperature, labels.detach().long().cpu()))


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """The temperature T > 0 that minimises the NLL of softmax(logits / T) on labeled images.

    Searched over log T in ``T_RANGE``: a grid, then golden-section search around its best point. The NLL
    is convex in 1/T, so it has one minimum in log T and the search finds it; deterministic (no random
    start, float64). A model that is already calibrated gets about 1; an overconfident one T > 1. A
    set the model separates perfectly pulls T to the lower end of the range (sharper is always better there)."""
    z, y = check_calibration_set(logits, labels)

    def loss(log_t: float) -> float:
        return float(F.cross_entropy(z / math.exp(log_t), y))

    grid = np.linspace(math.log(T_RANGE[0]), math.log(T_RANGE[1]), 41)
    values = [loss(g) for g in grid]
    best = int(np.argmin(values))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    while hi - lo > 1e-7:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return math.exp((lo + hi) / 2)


def calibration_summary(logits: Tensor, labels: Tensor, temperature: float, bins: int = BINS) -> dict[str, Any]:
    """What a temperature changes: NLL and ECE (percent, ``bins`` bins) before (T = 1) and after."""
    z, y = check_calibration_set(logits, labels)
    return {
        "images": len(y),
        "temperature": temperature,
        "nll_before": nll(z, y),
        "nll_after": nll(z, y, temperature),
        "ece_before": 100 * expected_calibration_error(torch.softmax(z, 1), y, bins),
        "ece_after": 100 * expected_calibration_error(torch.softmax(z / temperature, 1), y, bins),
    }


def format_summary(s: Mapping[str, Any]) -> str:
    return (
        f"temperature {s['temperature']:.4f} fitted on {s['images']} labeled images: NLL {s['nll_before']:.4f} -> {s['nll_after']:.4f}, "
        f"ECE ({BINS} bins) {s['ece_before']:.2f} % -> {s['ece_after']:.2f} %"
    )


# --------------------------------------------------------------------------- the images to calibrate on


def calibration_logits(model: InferenceModel, where: str, data_root: str | None = None) -> tuple[Tensor, Tensor]:
    """(logits (N, classes) float32 on the CPU, labels (N,) int64) of the calibration images.

    ``where``: "val", the run's ``data.val_labels`` hold-out (the images of its val_indices.txt, rebuilt from
    the run's config with training's own split; ``data_root`` if the data moved), or a folder ``DIR`` with
    ``<class>/`` sub-folders named as the model's classes (a subset is fine), read as evaluation reads files."""
    source, indices, labels = held_out_images(model, data_root) if where == "val" else folder_images(model, Path(where))
    chunks = [
        model.logits(torch.from_numpy(source.uint8_batch(indices[s : s + LOGIT_BATCH])).permute(0, 3, 1, 2)).cpu()
        for s in range(0, len(indices), LOGIT_BATCH)
    ]
    return torch.cat(chunks), labels


def held_out_images(model: InferenceModel, data_root: str | None) -> tuple[ImageSource, np.ndarray, Tensor]:
    """The run's training images, the indices it held out (through the same ``build_data`` as training) and their labels."""
    if model.config.data.val_labels == 0:
        raise ConfigError(
            f"checkpoint {str(model.path)!r}: its run held out no labeled images (data.val_labels is 0), so there is "
            "no 'val' set to calibrate on. Give a labeled folder instead (--calibrate-on DIR with <class>/ sub-folders), "
            "or train with data.val_labels=K."
        )
    from ignite_fixmatch.inference import run_data  # inference imports eval, which imports this module

    data = run_data(model, data_root)
    train, held_out = data.sources.train, data.val_indices
    return train, held_out, torch.from_numpy(train.targets[held_out]).long()


def folder_images(model: InferenceModel, root: Path) -> tuple[ImageSource, np.ndarray, Tensor]:
    """Every image below ``root/<class>/`` (class names among the model's) read with the model's preprocessing,
    their indices in that source, and their class indices."""
    from ignite_fixmatch.datasets import scan_image_files

    if not root.is_dir():
        raise DataError(f"calibration folder {str(root)!r} does not exist; give a folder of <class>/ sub-folders of labeled images, or 'val'.")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"calibration folder {str(root)!r} has no class sub-folders: put each labeled image into {str(root)}/<class>/.")
    unknown = [f for f in folders if f not in model.classes]
    if unknown:
        raise DataError(
            f"calibration folder {str(root)!r}: sub-folders {', '.join(map(repr, unknown))} are not classes of the model "
            f"({', '.join(model.classes)}); rename or remove them."
        )
    paths: list[str] = []
    targets: list[int] = []
    for name in folders:
        files = scan_image_files(str(root / name))
        paths += [str(root / name / p) for p in files]
        targets += [model.classes.index(name)] * len(files)
    if not paths:
        raise DataError(f"calibration folder {str(root)!r}: its class sub-folders hold no images (.png .jpg .jpeg .bmp .webp).")
    return model.preprocessing.files(paths), np.arange(len(paths), dtype=np.int64), torch.tensor(targets, dtype=torch.long)
