"""The one typed schema of every option, its default and its check.

A run is described by a YAML file merged with ``a.b=value`` overrides from the command line.
Everything is checked here, before any data or model is touched: an unknown key, a wrong type
or an invalid value raises :class:`ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ignite_fixmatch.config_sources import apply_overrides, read_config_file, upgrade_legacy
from ignite_fixmatch.datasets import registry as dataset_registry
from ignite_fixmatch.errors import ConfigError, fail_key

DATASETS = dataset_registry.dataset_names()  # the valid data.name values, from the data-set registry
# Number of classes of the data sets whose classes are known before any file is read.
KNOWN_NUM_CLASSES = dataset_registry.known_num_classes()


@dataclass
class HandlerSpec:
    """One entry of ``handlers:``: a built-in name or ``package.module:Class``, and its params."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    name: Literal[DATASETS] = "cifar10"  # type: ignore[valid-type]  # the registry's names
    root: str = "data"
    download: bool = True
    # Labeled images drawn from the training pool, balanced over classes; -1 labels all of it.
    num_labels: int = 4000
    # Input side in pixels; null keeps the data set's own size (32 CIFAR/SVHN, 96 STL-10, 8 digits).
    image_size: int | None = None
    # Colour channels for `folder` (3 RGB, 1 grayscale); null: 3 for folder, the data set's own otherwise.
    channels: int | None = None
    # `folder` only: a folder of extra unlabeled images without class sub-folders (relative to root).
    unlabeled_dir: str | None = None
    # Keep the labeled images in the unlabeled stream too (reference behaviour).
    unlabeled_includes_labeled: bool = True
    batch_size: int = 64  # labeled images per step, over all processes
    # Let a labeled batch be larger than the labeled set (CIFAR-10 with 40 labels and batch 64, as in
    # the paper): a batch then spans several passes over the labeled images and repeats some.
    allow_labeled_repeats: bool = False
    mu: int = 7  # unlabeled images per labeled image
    eval_batch_size: int = 1024  # over all processes
    num_workers: int = 4  # data-loading processes per training process
    # The strong augmentation: RandAugment as in the reference PyTorch code or the official one, or the paper's
    # CTAugment (learned magnitudes; see augment/ctaugment.py), which forces the loaders to carry draws (any augment).
    randaugment: Literal["reference", "official", "ctaugment"] = "reference"
    # pil: per-image PIL augmentation in the loader workers. batched: the loaders carry uint8 images
    # and the same per-sample draws; the trainer augments the whole batch on its device (CPU or GPU).
    # device: the whole data set sits on the training device as uint8; each step gathers its images
    # and draws its augmentation there (no loader workers, no per-image host work).
    # auto: device on a GPU when the images are in memory and fit, else batched (a CPU included).
    augment: Literal["auto", "pil", "batched", "device"] = "auto"
    # Replay the batched augmentation (batched, device) as one recorded CUDA graph: the same kernels
    # with one launch instead of hundreds. auto: on a GPU.
    cuda_graph: Literal["auto", "on", "off"] = "auto"
    pad_mode: Literal["constant", "reflect"] = "constant"  # reference pads with zeros, official reflects
    # Random horizontal flip in both views; null: on, except for digits (svhn, digits).
    flip: bool | None = None
    # Skip unreadable images (with a warning and a count) instead of stopping.
    skip_corrupt: bool = False
    # Seed of the labeled split; null uses `seed`.
    split_seed: int | None = None
    # A text file of training-set indices, one per line (the format of a run's labeled_indices.txt, e.g. written by
    # `python -m ignite_fixmatch.suggest --labels-out`): these images are the labeled ones instead of a random split.
    # num_labels and split_seed are then ignored (the file decides how many, unbalanced if it is).
    labels_file: str | None = None
    # Labeled images per class held out of training entirely (neither labeled nor unlabeled), drawn from
    # the training pool outside the labeled split; saved as val_indices.txt, to calibrate on
    # (`export --calibrate-on val`). 0: none, and the split and streams are those of a run without the key.
    val_labels: int = 0
    # Long-tailed unlabeled set: class c (class-index order, class 0 the head) keeps floor(n_max * r ** (-c / (C - 1)))
    # of its training images in the unlabeled stream, the tail n_max / r (ignite_fixmatch/long_tail.py). Labeled images
    # in the pool are kept first and count toward their class's share. 1: balanced, the split and streams of a run
    # without the key (no draw); 10 or 100: the long-tailed CIFAR benchmarks. data.unlabeled_dir images are untouched.
    imbalance_ratio: float = 1.0
    # The labeled split follows the same profile (num_labels over the classes proportionally, at least 1 each)
    # instead of num_labels / C per class. Needs data.imbalance_ratio > 1; not with data.labels_file.
    imbalance_labeled: bool = False


@dataclass
class ModelConfig:
    # "wrn" (Wide ResNet 6n+4) or any torchvision classification model name, e.g. resnet18.
    name: str = "wrn"
    depth: int = 28
    widen_factor: int = 2
    dropout: float = 0.0
    leaky_slope: float = 0.1
    bn_momentum: float = 0.001
    shortcut_variant: Literal["reference", "official"] = "reference"
    # Convert batch-norm to SyncBatchNorm under DDP (statistics over all processes).
    sync_bn: bool = False
    # NHWC memory layout: faster convolutions on recent CPUs and GPUs.
    channels_last: bool = True
    # torch.compile the training forward and the FixMatch losses (one function). auto: on a GPU; on a CPU
    # for runs of 10,000 iterations or more (about a minute of compiling for about 1.3x after it).
    # The saved model is never compiled.
    compile: Literal["auto", "on", "off"] = "auto"
    # torch.compile's mode. reduce-overhead also replays forward and backward as CUDA graphs (GPU): on an
    # H100 the trainer's WRN-28-2 step took 11.5 ms, against about 18 ms in the default mode and 17 ms eager.
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "reduce-overhead"
    # cuDNN times its convolution algorithms for the step's shapes once and keeps the fastest (GPU only).
    # Its choice can differ between runs: false for bit-identical repeats of a GPU run.
    cudnn_benchmark: bool = True
    # Warm start: a checkpoint (.pt or run folder) whose weights (its EMA model when saved, else the raw one) a NEW run
    # starts from, with a fresh optimizer, LR schedule and iteration count. Shapes must match (same network, same number of
    # classes). A resumed run continues from its own checkpoint and does not read this again.
    init_from: str | None = None


@dataclass
class AlgorithmSpec:
    """``algorithm:``: the semi-supervised algorithm (``name``: a built-in of ignite_fixmatch.algorithms
    or ``package.module:Class``) and its own typed keys, written beside ``name`` in YAML
    (``algorithm.threshold``); ``params`` is the algorithm's ``Params`` dataclass built from them."""

    name: str = "fixmatch"
    params: Any = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.params)}


def default_algorithm() -> AlgorithmSpec:
    return algorithm_spec({}, "algorithm")


@dataclass
class OptimConfig:
    lr: float = 0.03
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    # reference: decay every parameter whose name has no "bn"; official: only conv/linear weights.
    wd_rule: Literal["reference", "official"] = "reference"


@dataclass
class TrainConfig:
    num_iters: int = 2**20
    # Iterations per Ignite "epoch": the period of EPOCH_* events (data streams are infinite).
    epoch_length: int = 1024
    # Interleave labeled/weak/strong parts before the forward pass so each batch-norm sees the same mix
    # (official code; matters when the batch is split over devices).
    interleave: bool = False


@dataclass
class DistConfig:
    # null: single process (CPU or one GPU), or whatever torchrun set up. "nccl" (GPUs) or "gloo" (CPU).
    backend: Literal["nccl", "gloo"] | None = None
    nproc_per_node: int | None = None  # processes spawned by Ignite on this node
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    # A collective that waits longer than this fails the job instead of hanging it.
    timeout_s: int = 600


def default_handlers() -> list[HandlerSpec]:
    return [
        HandlerSpec("ema"),
        HandlerSpec("cosine_lr"),
        HandlerSpec("terminate_on_nan"),
        HandlerSpec("evaluation"),
        HandlerSpec("checkpoint"),
        HandlerSpec("tensorboard"),
        HandlerSpec("progress"),
    ]


@dataclass
class Config:
    output_dir: str = "runs/fixmatch"
    seed: int = 0
    # Mixed precision. null (auto): on for a CUDA GPU, off on a CPU (bfloat16 there is emulated unless
    # the CPU has AVX512-BF16/AMX, and slower than float32).
    amp: bool | None = None
    # auto: bfloat16 where the device has it (no GradScaler, no host sync), else float16 + GradScaler.
    amp_dtype: Literal["auto", "float16", "bfloat16"] = "auto"
    # null: new run; "auto": newest checkpoint in output_dir (a new run if none); or a checkpoint path.
    resume: str | None = None
    overwrite: bool = False  # replace an earlier run of ours in output_dir (cleared); folders we did not write are refused
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmSpec = field(default_factory=default_algorithm)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    handlers: list[HandlerSpec] = field(default_factory=default_handlers)


# --------------------------------------------------------------------------- building from data


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(parts) + " or null"
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Turn a YAML value into the schema's type, refusing anything that does not fit exactly."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key) if value is not None else fail_key(key, value, _describe(tp))
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(allowed):
            return "on" if value else "off"  # YAML reads a bare on/off as a boolean: model.compile=off
        if value not in allowed or isinstance(value, bool):
            fail_key(key, value, _describe(tp))
        return value
    if tp is AlgorithmSpec:
        return algorithm_spec(value, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            fail_key(key, value, "a list")
        (item_tp,) = typing.get_args(tp)
        return [_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            fail_key(key, value, "a mapping with string keys")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            fail_key(key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            fail_key(key, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                fail_key(key, value, "a number")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            fail_key(key, value, "a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            fail_key(key, value, "a non-empty string")
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {key}")  # a bug in the schema, not user input



# The same conversion and wording for values outside the schema (handler params, checked against their annotations).
config_value = _convert
describe_type = _describe

def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "the top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        fail_key(where, data, "a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(
            f"unknown config key '{key}'. Known keys{' under ' + repr(prefix) if prefix else ''}: {', '.join(names)}."
        )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{prefix}.{f.name}" if prefix else f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key '{prefix}.{f.name}' is required.")
    return cls(**kwargs)


def algorithm_spec(value: Any, key: str) -> AlgorithmSpec:
    """``algorithm:`` -> AlgorithmSpec: ``name`` resolved to its class (imported), the other keys built
    into that class's ``Params`` dataclass, so a typo or a wrong type names ``algorithm.<key>``."""
    from ignite_fixmatch.algorithms import params_class

    if value is None:
        value = {}
    if not isinstance(value, dict):
        fail_key(key, value, "a mapping: name (e.g. fixmatch) and the algorithm's own keys")
    data = dict(value)
    name = data.pop("name", "fixmatch")
    if not isinstance(name, str) or not name.strip():
        fail_key(f"{key}.name", name, "an algorithm name (e.g. fixmatch) or 'package.module:Class'")
    params_cls = params_class(name)
    known = [f.name for f in dataclasses.fields(params_cls)]
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ConfigError(
            f"unknown config key '{key}.{unknown[0]}' for algorithm {name!r}. Known keys under {key!r}: name, {', '.join(known) or '(none)'}."
        )
    return AlgorithmSpec(name, _build(params_cls, data, key))


# --------------------------------------------------------------------------- checks of values


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        fail_key(key, value, allowed)


def validate(cfg: Config) -> Config:
    """Check the values a type cannot express. Returns cfg for chaining."""
    d, m, o, t, dist = cfg.data, cfg.model, cfg.optim, cfg.train, cfg.dist
    require(0 <= cfg.seed < 2**32, "seed", cfg.seed, "an integer in [0, 2^32)")
    require(d.num_labels == -1 or d.num_labels > 0, "data.num_labels", d.num_labels, "a positive integer or -1 (all)")
    n_cls = KNOWN_NUM_CLASSES.get(d.name)
    # with labels_file the file decides (data.read_labels_file); with imbalance_labeled the profile (long_tail.labeled_counts)
    if n_cls and d.num_labels > 0 and d.labels_file is None and not d.imbalance_labeled:
        require(
            d.num_labels % n_cls == 0,
            "data.num_labels",
            d.num_labels,
            f"a multiple of the {n_cls} classes of {d.name} (the split is balanced per class)",
        )
    if d.num_labels > 0 and not d.allow_labeled_repeats and d.labels_file is None:
        require(
            d.batch_size <= d.num_labels,
            "data.batch_size",
            d.batch_size,
            f"at most data.num_labels={d.num_labels} (a labeled batch cannot exceed the labeled set; "
            "set data.allow_labeled_repeats=true to repeat labeled images within a batch, as the paper does with 40 labels)",
        )
    require(d.image_size is None or 4 <= d.image_size <= 4096, "data.image_size", d.image_size, "null or 4..4096")
    require(d.channels in (None, 1, 3), "data.channels", d.channels, "null, 1 or 3")
    require(1 <= d.batch_size <= 2**20, "data.batch_size", d.batch_size, "an integer in [1, 2^20]")
    require(1 <= d.mu <= 1024, "data.mu", d.mu, "an integer in [1, 1024]")
    require(1 <= d.eval_batch_size <= 2**20, "data.eval_batch_size", d.eval_batch_size, "an integer in [1, 2^20]")
    require(0 <= d.num_workers <= 256, "data.num_workers", d.num_workers, "an integer in [0, 256]")
    require(d.unlabeled_dir is None or d.name == "folder", "data.unlabeled_dir", d.unlabeled_dir, "null unless data.name is 'folder'")
    require(d.split_seed is None or 0 <= d.split_seed < 2**32, "data.split_seed", d.split_seed, "null or an integer in [0, 2^32)")
    require(0 <= d.val_labels <= 2**20, "data.val_labels", d.val_labels, "an integer in [0, 2^20] (held-out labeled images per class)")
    require(1.0 <= d.imbalance_ratio <= 2**20, "data.imbalance_ratio", d.imbalance_ratio, "a number in [1, 2^20] (1 for balanced; 10 or 100 for a long tail)")
    if d.imbalance_labeled:
        require(d.imbalance_ratio > 1, "data.imbalance_labeled", True, "false unless data.imbalance_ratio > 1 (the labeled profile is the unlabeled one)")
        require(d.labels_file is None, "data.imbalance_labeled", True, "false when data.labels_file is set (the file decides the labeled set)")
        require(d.num_labels > 0, "data.imbalance_labeled", True, "false when data.num_labels is -1 (everything is labeled: nothing to distribute)")
        if n_cls:
            require(d.num_labels >= n_cls, "data.num_labels", d.num_labels, f"at least one per class ({n_cls} for {d.name}) with data.imbalance_labeled")
    require(10 <= m.depth <= 1000 and (m.depth - 4) % 6 == 0, "model.depth", m.depth, "6n+4 with n >= 1 (10, 16, 22, 28, ...), at most 1000")
    require(1 <= m.widen_factor <= 64, "model.widen_factor", m.widen_factor, "an integer in [1, 64]")
    require(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "a number in [0, 1)")
    require(0.0 <= m.leaky_slope < 1.0, "model.leaky_slope", m.leaky_slope, "a number in [0, 1)")
    require(0.0 < m.bn_momentum <= 1.0, "model.bn_momentum", m.bn_momentum, "a number in (0, 1]")
    cfg.algorithm.params.check()
    require(o.lr > 0.0, "optim.lr", o.lr, "a number > 0")
    require(0.0 <= o.momentum < 1.0, "optim.momentum", o.momentum, "a number in [0, 1)")
    require(not o.nesterov or o.momentum > 0, "optim.nesterov", o.nesterov, "false when optim.momentum is 0")
    require(o.weight_decay >= 0.0, "optim.weight_decay", o.weight_decay, "a number >= 0")
    require(1 <= t.num_iters <= 2**40, "train.num_iters", t.num_iters, "an integer in [1, 2^40]")
    require(1 <= t.epoch_length <= 2**40, "train.epoch_length", t.epoch_length, "an integer in [1, 2^40]")
    require(dist.nproc_per_node is None or 1 <= dist.nproc_per_node <= 1024, "dist.nproc_per_node", dist.nproc_per_node, "null or an integer in [1, 1024]")
    require(1 <= dist.nnodes <= 65536, "dist.nnodes", dist.nnodes, "an integer in [1, 65536]")
    require(0 <= dist.node_rank < dist.nnodes, "dist.node_rank", dist.node_rank, f"0..{dist.nnodes - 1} (dist.nnodes - 1)")
    require(dist.master_port is None or 1 <= dist.master_port <= 65535, "dist.master_port", dist.master_port, "1..65535")
    require(1 <= dist.timeout_s <= 7 * 24 * 3600, "dist.timeout_s", dist.timeout_s, "an integer in [1, 604800] (seconds)")
    if dist.nproc_per_node is not None:
        world = dist.nproc_per_node * dist.nnodes
        check_divisible(cfg, world)
    if dist.nnodes > 1:
        require(dist.nproc_per_node is not None, "dist.nproc_per_node", None, "an integer when dist.nnodes > 1")
        require(dist.backend is not None, "dist.backend", None, "'nccl' or 'gloo' when dist.nnodes > 1")
    require(cfg.resume is None or cfg.resume.strip() != "", "resume", cfg.resume, "null, 'auto' or a checkpoint path")
    for i, spec in enumerate(cfg.handlers):
        require(spec.name.strip() == spec.name and spec.name != "", f"handlers[{i}].name", spec.name, "a handler name")
    return cfg


def check_divisible(cfg: Config, world_size: int) -> None:
    """Batch sizes are global, as in the reference: each must split evenly over the processes."""
    for key, value in (("data.batch_size", cfg.data.batch_size), ("data.eval_batch_size", cfg.data.eval_batch_size)):
        require(
            value % world_size == 0,
            key,
            value,
            f"a multiple of the {world_size} processes (batch sizes are global and split evenly over processes)",
        )


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML file (with its bases) or nothing, apply overrides, build and validate the typed config."""
    data = read_config_file(Path(path)) if path is not None else {}
    return validate(_build(Config, apply_overrides(data, overrides), ""))


def to_dict(cfg: Config) -> dict:
    data = dataclasses.asdict(cfg)
    data["algorithm"] = cfg.algorithm.as_dict()
    return data


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(data: dict) -> Config:
    """Rebuild a config saved with :func:`to_dict` (e.g. from a checkpoint, also one written before the
    algorithm seam)."""
    return validate(_build(Config, upgrade_legacy(dict(data), "the saved config"), ""))
