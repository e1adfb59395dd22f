"""Labeled split, stateless infinite samplers, augmented data sets and the loaders of a run.

Randomness that survives resume and any number of workers or processes:
- the labeled split has its own generator seeded from the split seed;
- the order of pass ``e`` of a stream is a permutation drawn from ``(seed, stream, e)``;
  global batch ``b`` holds stream positions ``[b*G, (b+1)*G)`` and rank ``r`` takes every
  ``world``-th of them, so the global batch is the same whatever the number of processes;
- each sample's augmentation draws from ``random.Random`` seeded by ``(seed, stream, position)``;
- the stream starts at the trainer's iteration, so a resumed run reads exactly what the
  uninterrupted one would have read, without storing any sampler state.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.util  # noqa: F401  (imported before atexit.register below, so our hook runs before its exit hook)
import random
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ignite_fixmatch.augment import StrongView, WeakView
from ignite_fixmatch.augment.ctaugment import CTAPolicy, CTAugmentViews
from ignite_fixmatch.augment.views import BatchedAugment, collate_columns
from ignite_fixmatch.batch import DrawnBatch, TrainBatch
from ignite_fixmatch.config import Config, ConfigError
from ignite_fixmatch.datasets import DataSources, ImageSource, build_sources, dataset_spec
from ignite_fixmatch.long_tail import labeled_counts, largest_ratio, unlabeled_counts
from ignite_fixmatch.preemption import ignore_stop_signals

LABELED, UNLABELED, EVAL = 0, 1, 2  # stream ids: part of every seed so the streams are independent
HELD_OUT = 3  # seed part of the data.val_labels split (after the labeled split, from its own generator)
LONG_TAIL = 4  # seed part of the data.imbalance_ratio draw (after the labeled and held-out splits, from its own generator)
PAD_FRACTION = 0.125  # 4 px of 32 (CIFAR), 12 px of 96 (STL-10)

logger = logging.getLogger(__name__)


def _class_name(c: int, classes: list[str] | None) -> str:
    return repr(classes[c] if classes is not None and c < len(classes) else c)


def split_labeled(
    targets: np.ndarray, num_labels: int, num_classes: int, seed: int, classes: list[str] | None = None
) -> np.ndarray:
    """Indices of ``num_labels`` images, ``num_labels / num_classes`` per class, drawn without
    replacement by a generator of their own (so no other random draw can change the split).
    ``num_labels == -1`` labels everything. ``classes`` (the names) let an error name a class as the user
    knows it (its folder), not by its index."""
    targets = np.asarray(targets)
    if num_labels == -1:
        return np.arange(len(targets), dtype=np.int64)
    if num_labels % num_classes:
        raise ConfigError(
            f"config key 'data.num_labels': got {num_labels}, expected a multiple of the {num_classes} classes "
            "(the split is balanced per class)."
        )
    per_class = num_labels // num_classes
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        pool = np.flatnonzero(targets == c)
        if len(pool) < per_class:
            raise ConfigError(
                f"config key 'data.num_labels': got {num_labels}, which needs {per_class} images of class "
                f"{classes[c] if classes is not None and c < len(classes) else c!r} "
                f"but the training set has {len(pool)}; lower data.num_labels or use -1 for all."
            )
        chosen.append(rng.choice(pool, per_class, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def split_held_out(
    targets: np.ndarray, labeled: np.ndarray, per_class: int, num_classes: int, seed: int, classes: list[str] | None = None
) -> np.ndarray:
    """``data.val_labels``: ``per_class`` images of each class outside ``labeled``, held out of training
    entirely (neither labeled nor unlabeled), to calibrate on. Drawn by a generator of their own (seeded
    by the split seed and HELD_OUT), so the labeled split and every other draw are those of a run without them."""
    if per_class == 0:
        return np.empty(0, dtype=np.int64)
    targets = np.asarray(targets)
    free = np.ones(len(targets), dtype=bool)
    free[labeled] = False
    rng = np.random.default_rng(hash_seed(seed, HELD_OUT))
    chosen = []
    for c in range(num_classes):
        pool = np.flatnonzero(free & (targets == c))
        if len(pool) < per_class:
            raise ConfigError(
                f"config key 'data.val_labels': got {per_class}, but class "
                f"{classes[c] if classes is not None and c < len(classes) else c!r} has only {len(pool)} training images "
                "left outside the labeled split; lower data.val_labels (or data.num_labels), or add images."
            )
        chosen.append(rng.choice(pool, per_class, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def split_labeled_long_tailed(
    targets: np.ndarray, num_labels: int, num_classes: int, ratio: float, seed: int, classes: list[str] | None = None
) -> np.ndarray:
    """``data.imbalance_labeled``: ``num_labels`` images over the classes by the long-tailed profile
    (``long_tail.labeled_counts``), drawn as :func:`split_labeled` draws (its generator, class by class)."""
    targets = np.asarray(targets)
    if num_labels < num_classes:
        raise ConfigError(
            f"config key 'data.num_labels': got {num_labels}, expected at least one per class ({num_classes}) with data.imbalance_labeled."
        )
    counts = labeled_counts(num_labels, num_classes, ratio)
    rng = np.random.default_rng(seed)
    chosen = []
    for c, k in enumerate(counts):
        pool = np.flatnonzero(targets == c)
        if len(pool) < k:
            raise ConfigError(
                f"config key 'data.num_labels': got {num_labels}, whose long-tailed split (data.imbalance_labeled) needs {k} images of class "
                f"{_class_name(c, classes)} but the training set has {len(pool)}; lower data.num_labels or data.imbalance_ratio."
            )
        chosen.append(rng.choice(pool, k, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def long_tailed_pool(
    targets: np.ndarray, pool: np.ndarray, labeled: np.ndarray, ratio: float, num_classes: int, seed: int, classes: list[str] | None = None
) -> np.ndarray:
    """``data.imbalance_ratio`` > 1: the training indices ``pool`` of the unlabeled stream cut to the long-tailed
    profile (``long_tail.unlabeled_counts`` of each class's share of ``pool``). Labeled images in ``pool`` are kept
    first and count toward their class's n_c (every one is kept, even past n_c: logged); the rest of n_c is drawn by a
    generator of its own (split seed, LONG_TAIL), so the labeled and held-out splits are those of a balanced run."""
    targets = np.asarray(targets)
    members = [pool[targets[pool] == c] for c in range(num_classes)]
    sizes = [len(m) for m in members]
    if 0 in sizes:
        raise ConfigError(
            f"config key 'data.imbalance_ratio': class {_class_name(sizes.index(0), classes)} has no training image left for the unlabeled "
            "stream (all labeled or held out), so no long tail can keep one; set data.unlabeled_includes_labeled=true, lower data.val_labels, or add images."
        )
    counts = unlabeled_counts(sizes, ratio)
    if 0 in counts:
        raise ConfigError(
            f"config key 'data.imbalance_ratio': got {ratio:g}, which leaves class {_class_name(counts.index(0), classes)} no unlabeled image "
            f"(its share of a head of {counts[0]} images is under 1); the largest ratio that works on this data is {largest_ratio(sizes)}."
        )
    rng = np.random.default_rng(hash_seed(seed, LONG_TAIL))
    kept = []
    for c, (m, n_c) in enumerate(zip(members, counts)):
        first = np.intersect1d(m, labeled)
        if len(first) > n_c:
            logger.info(
                "data.imbalance_ratio: class %s keeps all its %d labeled images in the unlabeled stream, over its long-tail share of %d",
                _class_name(c, classes), len(first), n_c,
            )
        kept.append(first)
        if n_c > len(first):
            kept.append(rng.choice(np.setdiff1d(m, first), n_c - len(first), replace=False))
    return np.sort(np.concatenate(kept)).astype(np.int64)


def pass_permutation(n: int, seed: int, stream: int, epoch: int) -> torch.Tensor:
    """The order of pass ``epoch`` of a stream: a function of (seed, stream, epoch) only, so resume needs no state."""
    g = torch.Generator().manual_seed(hash_seed(seed, stream, epoch))
    return torch.randperm(n, generator=g)


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers; equal on every process and Python run (no hash randomisation)."""
    return random.Random("/".join(str(int(p)) for p in parts)).getrandbits(63)


class InfiniteShardedBatchSampler(Sampler):
    """Yields, forever, this rank's share of global batch b, b+1, ... as (index, position) pairs.

    Stateless: batch b is a function of (seed, stream, b) only, so resuming needs just b.
    """

    def __init__(
        self, num_samples: int, global_batch: int, *, seed: int, stream: int, rank: int = 0, world_size: int = 1, start_batch: int = 0
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if global_batch % world_size:
            raise ValueError(f"global_batch {global_batch} does not split over {world_size} processes")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.seed, self.stream, self.rank, self.world_size = seed, stream, rank, world_size
        self.start_batch = start_batch
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, pass_permutation(self.num_samples, self.seed, self.stream, epoch)
        return int(self._perm[offset])

    def batch(self, b: int) -> list[tuple[int, int]]:
        first = b * self.global_batch
        return [(self.index_at(p), p) for p in range(first + self.rank, first + self.global_batch, self.world_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.start_batch
        while True:
            yield self.batch(b)
            b += 1


class ShardedEvalSampler(Sampler):
    """Every rank takes indices rank, rank+world, ...: each test image is evaluated exactly once
    (unlike DistributedSampler, which pads with repeats)."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = range(rank, num_samples, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class AugmentedDataset(Dataset):
    """Turns (index, position) into the sample's views, each seeded by (seed, stream, position)."""

    def __init__(self, source: ImageSource, indices: np.ndarray, views: Sequence[Callable], seed: int, stream: int) -> None:
        self.source, self.indices, self.views = source, indices, list(views)
        self.seed, self.stream = seed, stream

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, ...]:
        """(view, ..., label, i): ``i`` is the sample's index into this data set (for the unlabeled
        stream, its index into the unlabeled set: the batch's ``u_idx``)."""
        i, position = key
        idx = int(self.indices[i])
        img = self.source.load(idx)
        rng = random.Random(hash_seed(self.seed, self.stream, position))
        return (*(view(img, rng) for view in self.views), int(self.source.targets[idx]), i)


def uint8_images(source: ImageSource, indices: np.ndarray) -> torch.Tensor:
    """Images ``indices`` of ``source`` as uint8 NCHW: the gathered (k, H, W, C) array seen through
    channels_last strides (no copy; the model's layout when it runs channels_last)."""
    return torch.from_numpy(source.uint8_batch(indices)).permute(0, 3, 1, 2)


class EvalDataset(Dataset):
    """The test split as uint8 images (C, H, W) and labels, fetched a whole batch at a time
    (``__getitems__``): one array gather for in-memory data sets, no per-sample Python. The evaluator
    normalises on its device, in the model's memory format."""

    def __init__(self, source: ImageSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.__getitems__([i])
        return x[0], int(y[0])

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        return uint8_images(self.source, idx), torch.from_numpy(self.source.targets[idx])


def _batch_as_fetched(batch: Any) -> Any:
    """collate_fn for data sets whose ``__getitems__`` already returns the collated batch."""
    return batch


class ConcatSource:
    """The unlabeled pool: several ImageSources seen as one (targets kept where known)."""

    def __init__(self, parts: Sequence[tuple[ImageSource, np.ndarray]]) -> None:
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(idx) for _, idx in self.parts])
        self.targets = np.concatenate([src.targets[idx] for src, idx in self.parts]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def load(self, i: int):
        part = int(np.searchsorted(self.offsets, i, side="right") - 1)
        src, idx = self.parts[part]
        return src.load(int(idx[i - self.offsets[part]]))


@dataclass
class FixMatchData:
    """Everything data-related a run needs, built once per process."""

    sources: DataSources
    labeled_indices: np.ndarray
    unlabeled: Any  # ImageSource-like: len, load, targets
    weak: WeakView
    strong: StrongView | CTAugmentViews  # .augment(img, rng): one image's strong view
    augment: str = "pil"  # data.augment resolved: "pil", "batched" or "device"
    # batched and device (and CTAugment on every path): the trainer's batch_transform (the views made on the training device)
    batched: BatchedAugment | CTAugmentViews | None = None
    # data.val_labels: training images held out of both streams (to calibrate on); empty when 0
    val_indices: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


def view_settings(cfg: Config, sources: DataSources) -> dict[str, Any]:
    size = cfg.data.image_size or sources.default_image_size
    flip = cfg.data.flip if cfg.data.flip is not None else dataset_spec(cfg.data.name).flip
    return dict(pad=int(round(size * PAD_FRACTION)), pad_mode=cfg.data.pad_mode, flip=flip, mean=sources.mean, std=sources.std)


def resolve_augment(setting: str, device: torch.device, fits_on_device: Callable[[], bool]) -> str:
    """Where augmentation runs: "pil", "batched" or "device" (see ``data.augment`` in config.py).

    auto: on a GPU, the data set on the device when it fits, else loaders carrying uint8 images + draws;
    on a CPU, those loaders too ("batched"): the same images as PIL from the same per-sample draws, and
    6-12x less CPU time per image than the PIL workers, which take their time from the step's own cores
    (the quick start: 8.2-9.3 it/s against 5.4-5.8 with PIL workers, on 2 cores)."""
    if setting != "auto":
        return setting
    if device.type == "cuda" and fits_on_device():
        return "device"
    return "batched"


def resident_bytes(sources: DataSources, unlabeled: ConcatSource) -> int:
    """Bytes a device copy of the images takes (training, extra unlabeled, test)."""

    def image_bytes(source: ImageSource, n: int) -> int:
        shape = getattr(source.images, "shape", None)
        if source.image_size is not None or shape is None:
            side = source.image_size or 256  # not known before decoding: assume large images
            return n * side * side * (3 if source.mode == "RGB" else 1)
        return n * int(np.prod(shape[1:]))

    total = image_bytes(sources.train, len(sources.train)) + image_bytes(sources.test, len(sources.test))
    return total + sum(image_bytes(src, len(idx)) for src, idx in unlabeled.parts if src is not sources.train)


def fits_on_device(sources: DataSources, unlabeled: ConcatSource, device: torch.device, share: float = 0.25) -> bool:
    """In-memory images (not files to decode) that need at most ``share`` of the GPU's free memory."""
    in_memory = all(s.images is not None for s in (sources.train, sources.test, *(src for src, _ in unlabeled.parts)))
    if not in_memory or device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return resident_bytes(sources, unlabeled) <= share * free


def read_labels_file(path: str, num_train: int) -> np.ndarray:
    """``data.labels_file``: training-set indices, one per line (blank lines ignored), as sorted int64.

    Refuses (ConfigError naming the file and line) a missing file, a line that is not an integer, an index
    outside the training set and a repeated index: each would silently train on another labeled set."""
    key = f"config key 'data.labels_file' ({path!r})"
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: cannot be read ({getattr(e, 'strerror', None) or e}); give a text file of training-set indices, "
                          "one per line (e.g. a run's labeled_indices.txt), or unset it for a random split.") from None
    indices, first_line = [], {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        try:
            i = int(text)
        except ValueError:
            raise ConfigError(f"{key}: line {number} is {text[:40]!r}, not an integer; the file holds one training-set index per line.") from None
        if not 0 <= i < num_train:
            raise ConfigError(f"{key}: line {number}: index {i} is outside the training set (0..{num_train - 1}); "
                              "was the file written for another data set?")
        if i in first_line:
            raise ConfigError(f"{key}: index {i} is repeated (lines {first_line[i]} and {number}); each image is labeled once.")
        first_line[i] = number
        indices.append(i)
    if not indices:
        raise ConfigError(f"{key}: the file holds no index; give at least one training-set index per line.")
    return np.sort(np.asarray(indices, dtype=np.int64))


def build_data(cfg: Config, sources: DataSources) -> FixMatchData:
    split_seed = cfg.data.split_seed if cfg.data.split_seed is not None else cfg.seed
    if cfg.data.labels_file is not None:
        labeled = read_labels_file(cfg.data.labels_file, len(sources.train))
    elif cfg.data.imbalance_labeled:
        labeled = split_labeled_long_tailed(
            sources.train.targets, cfg.data.num_labels, sources.num_classes, cfg.data.imbalance_ratio, split_seed, sources.classes
        )
    else:
        labeled = split_labeled(sources.train.targets, cfg.data.num_labels, sources.num_classes, split_seed, sources.classes)
    if cfg.data.batch_size > len(labeled) and not cfg.data.allow_labeled_repeats:
        raise ConfigError(
            f"config key 'data.batch_size': got {cfg.data.batch_size}, expected at most the {len(labeled)} labeled images "
            "(or set data.allow_labeled_repeats=true)."
        )
    held_out = split_held_out(sources.train.targets, labeled, cfg.data.val_labels, sources.num_classes, split_seed, sources.classes)
    parts = []
    if cfg.data.unlabeled_includes_labeled:
        parts.append((sources.train, np.arange(len(sources.train), dtype=np.int64)))
    else:
        parts.append((sources.train, np.setdiff1d(np.arange(len(sources.train)), labeled)))
    if len(held_out):  # data.val_labels > 0 only: without it the pool is exactly as before
        parts[0] = (sources.train, np.setdiff1d(parts[0][1], held_out).astype(np.int64))
    if cfg.data.imbalance_ratio > 1:  # 1: the pool exactly as before, no draw
        kept = long_tailed_pool(sources.train.targets, parts[0][1], labeled, cfg.data.imbalance_ratio, sources.num_classes, split_seed, sources.classes)
        parts[0] = (sources.train, kept)
    if sources.unlabeled is not None:
        parts.append((sources.unlabeled, np.arange(len(sources.unlabeled), dtype=np.int64)))
    unlabeled = ConcatSource([p for p in parts if len(p[1])])
    if len(unlabeled) == 0:
        raise ConfigError("there are no unlabeled images: set data.unlabeled_includes_labeled=true or give data.unlabeled_dir.")
    settings = view_settings(cfg, sources)
    weak = WeakView(**settings)
    device = idist.device()
    augment = resolve_augment(cfg.data.augment, device, lambda: fits_on_device(sources, unlabeled, device))
    if cfg.data.randaugment == "ctaugment":  # magnitudes from this step's weights: the loaders carry draws on every path
        cta = CTAugmentViews(CTAPolicy(), channels_last=cfg.model.channels_last, with_pil=augment == "pil", **settings)
        return FixMatchData(sources, labeled, unlabeled, weak, cta, augment, cta, val_indices=held_out)
    strong = StrongView(cfg.data.randaugment, **settings)
    batched = None
    if augment != "pil":
        batched = BatchedAugment(cfg.data.randaugment, channels_last=cfg.model.channels_last, **settings)
    return FixMatchData(sources, labeled, unlabeled, weak, strong, augment, batched, val_indices=held_out)


def sources_from_config(cfg: Config, *, with_unlabeled: bool = True) -> DataSources:
    """The raw images a config names; ``with_unlabeled=False`` skips ``data.unlabeled_dir`` (evaluation)."""
    d = cfg.data
    return build_sources(
        d.name, d.root, download=d.download, image_size=d.image_size, channels=d.channels,
        unlabeled_dir=d.unlabeled_dir if with_unlabeled else None, skip_corrupt=d.skip_corrupt,
    )


def class_counts(data: FixMatchData) -> dict[str, Any]:
    """Images per class of the labeled and unlabeled sets (unlabeled_dir images, without a class, counted apart):
    logged by every run, and saved as class_counts.json by a long-tailed one."""
    n, u = data.sources.num_classes, data.unlabeled.targets
    return {
        "classes": list(data.sources.classes),
        "labeled": np.bincount(data.sources.train.targets[data.labeled_indices], minlength=n).tolist(),
        "unlabeled": np.bincount(u[u >= 0], minlength=n).tolist(),
        "unlabeled_without_class": int(np.sum(u < 0)),
    }


def save_split(path: Path, indices: np.ndarray) -> None:
    path.write_text("\n".join(str(int(i)) for i in indices) + "\n")


# Worker-process iterators alive in this process. Workers ignore SIGTERM (preemption), so the
# exit hook of multiprocessing, which terminates daemon children with SIGTERM and then joins them,
# would wait forever for any that were not shut down: an error ends the run with iterators still
# referenced (by the failed engine, a traceback, a reference cycle). They are shut down explicitly.
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


class WorkerLoader(DataLoader):
    """A DataLoader whose worker-process iterators :func:`shutdown_loader_workers` can find and stop."""

    def _get_iterator(self):
        it = super()._get_iterator()
        if self.num_workers > 0:
            _LIVE_ITERATORS.add(it)
        return it


def shutdown_iterator(it: Any) -> None:
    """Stop one iterator's workers (and pin-memory thread): ask them, then kill those still alive
    (they ignore SIGTERM, which is all that DataLoader's own shutdown sends)."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is None:
        return
    try:
        shutdown()
    finally:
        for w in getattr(it, "_workers", ()):
            if w.is_alive():
                w.kill()
                w.join(timeout=5)
        _LIVE_ITERATORS.discard(it)


def shutdown_loader_workers() -> None:
    """Stop the workers of every live loader iterator: at the end of a run (and, for an error,
    before Python's exit hooks, which would otherwise wait on them forever)."""
    for it in list(_LIVE_ITERATORS):
        shutdown_iterator(it)


atexit.register(shutdown_loader_workers)  # runs before multiprocessing's hook (registered earlier)


def _collate_labeled(items):
    xs, ys, _ = zip(*items)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def _collate_unlabeled(items):
    ws, ss, ys, idx = zip(*items)
    return torch.stack(ws), torch.stack(ss), torch.tensor(ys, dtype=torch.long), torch.tensor(idx, dtype=torch.long)


class FixMatchStream:
    """The trainer's data: an endless sequence of batches (``TrainBatch``, or ``DrawnBatch`` for the
    batched path, which the trainer's batch_transform augments).

    ``iter()`` starts both streams at ``start_iteration()`` (the trainer's iteration, read when
    Ignite starts the run, i.e. after a checkpoint was loaded): resume needs no sampler state.
    """

    def __init__(self, data: FixMatchData, cfg: Config, rank: int, world_size: int, start_iteration: Callable[[], int], pin_memory: bool = False) -> None:
        self.data, self.cfg, self.rank, self.world_size = data, cfg, rank, world_size
        self.start_iteration, self.pin_memory = start_iteration, pin_memory

    def _loader(self, dataset: Dataset, n: int, global_batch: int, stream: int, collate, start: int) -> DataLoader:
        sampler = InfiniteShardedBatchSampler(
            n, global_batch, seed=self.cfg.seed, stream=stream, rank=self.rank, world_size=self.world_size, start_batch=start
        )
        workers = self.cfg.data.num_workers
        return WorkerLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=ignore_stop_signals,
        )

    def __iter__(self) -> Iterator[TrainBatch | DrawnBatch]:
        d, cfg, start = self.data, self.cfg, self.start_iteration()
        if d.batched is not None:  # uint8 images + the same per-sample draws; the trainer augments
            views_l, views_u = d.batched.labeled_views(), d.batched.unlabeled_views()
            collate_l = collate_u = collate_columns
        else:
            views_l, views_u, collate_l, collate_u = [d.weak], [d.weak, d.strong], _collate_labeled, _collate_unlabeled
        labeled_ds = AugmentedDataset(d.sources.train, d.labeled_indices, views_l, cfg.seed, LABELED)
        unlabeled_ds = AugmentedDataset(d.unlabeled, np.arange(len(d.unlabeled)), views_u, cfg.seed, UNLABELED)
        b = cfg.data.batch_size
        lx = iter(self._loader(labeled_ds, len(labeled_ds), b, LABELED, collate_l, start))
        ux = iter(self._loader(unlabeled_ds, len(unlabeled_ds), b * cfg.data.mu, UNLABELED, collate_u, start))
        try:  # a worker's error (a bad image) ends this generator: stop both loaders' workers now
            while d.batched is not None:
                yield d.batched.batch(next(lx), next(ux))
            while True:
                x, y = next(lx)
                u_w, u_s, u_y, u_idx = next(ux)
                yield TrainBatch(x=x, y=y, u_w=u_w, u_s=u_s, u_y=u_y, u_idx=u_idx)
        finally:
            shutdown_iterator(lx)
            shutdown_iterator(ux)


def build_eval_loader(
    sources: DataSources, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False
) -> DataLoader:
    """The test split as (uint8 images, labels) batches, this rank's shard, ``batch_size`` over all ranks;
    used by training and by ``ignite_fixmatch.eval``, so a saved model is scored exactly as in training."""
    ds = EvalDataset(sources.test)
    return WorkerLoader(
        ds,
        batch_size=batch_size // world_size,
        sampler=ShardedEvalSampler(len(ds), rank, world_size),
        num_workers=num_workers,
        collate_fn=_batch_as_fetched,
        pin_memory=pin_memory,
        worker_init_fn=ignore_stop_signals,
    )
