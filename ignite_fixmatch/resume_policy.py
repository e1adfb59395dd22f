"""Which settings may change when a run is resumed, and the check that applies it.

A checkpoint holds the resolved config it was trained with. A resumed run compares it with the config
it was given, key by key: a key that changes the training state, its maths or the data stream cannot
change (the optimizer's state would silently restore the old ``optim.lr``, the data order would no
longer be the one the checkpoint's iteration refers to, ...): such differences are refused, all of them
listed, before anything is written. A key that only says where, how fast or for how long the same run
goes on may change: it applies, and the change is logged. Either way the saved config says what runs.

Every key of the schema is in exactly one of the two tables (``tests/test_resume_policy.py`` checks it),
as a dotted prefix with the reason; a key in neither (a new one) is treated as fixed, the safe side.
No torch here: the check is a comparison of two plain mappings.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ignite_fixmatch.errors import ConfigError

if TYPE_CHECKING:
    from ignite_fixmatch.config import Config

# Cannot change on resume: dotted prefix -> why.
FIXED: Mapping[str, str] = MappingProxyType(
    {
        "seed": "seeds the split, the data order and every augmentation draw of the stream",
        "amp": "the numerics of every step, and whether a GradScaler state exists",
        "amp_dtype": "the numerics of every step, and whether a GradScaler state exists",
        "data.name": "another data set",
        "data.num_labels": "another labeled split",
        "data.split_seed": "another labeled split",
        "data.labels_file": "another labeled split",
        "data.val_labels": "other images held out, so another unlabeled stream",
        "data.imbalance_ratio": "other images kept per class, so another unlabeled stream (and, with imbalance_labeled, another labeled split)",
        "data.imbalance_labeled": "another labeled split",
        "data.image_size": "other inputs for the same weights",
        "data.channels": "other inputs (and another first layer)",
        "data.unlabeled_dir": "another unlabeled stream",
        "data.unlabeled_includes_labeled": "another unlabeled stream",
        "data.skip_corrupt": "other images in the streams, so other positions",
        "data.batch_size": "the batches a checkpoint's iteration refers to",
        "data.allow_labeled_repeats": "the batches a checkpoint's iteration refers to",
        "data.mu": "the batches a checkpoint's iteration refers to",
        "data.augment": "device augmentation draws from other generators than pil/batched",
        "data.randaugment": "another augmentation",
        "data.pad_mode": "another augmentation",
        "data.flip": "another augmentation",
        "model.name": "another network",
        "model.depth": "another network",
        "model.widen_factor": "another network",
        "model.dropout": "another network",
        "model.leaky_slope": "another network",
        "model.bn_momentum": "another network",
        "model.shortcut_variant": "another network",
        "model.sync_bn": "other batch-norm statistics under DDP",
        "algorithm": "another loss; an algorithm's state is saved for its own params",
        "optim": "the optimizer's saved state restores lr, momentum and weight decay: a change would not apply",
        "train.epoch_length": "the trainer's saved state holds it (Ignite refuses another)",
        "train.interleave": "other batch-norm statistics in the forward pass",
    }
)

# May change on resume (applied and logged): dotted prefix -> why.
CHANGEABLE: Mapping[str, str] = MappingProxyType(
    {
        "output_dir": "where the run is; resume=<path> may continue a checkpoint in another folder",
        "resume": "how the run starts",
        "overwrite": "used only by new runs",
        "train.num_iters": "run longer (or stop earlier, not before the checkpoint): cosine_lr follows the new total from here",
        "data.root": "where the same data is",
        "data.download": "whether missing data may be downloaded",
        "data.num_workers": "the stream does not depend on the number of workers",
        "data.eval_batch_size": "evaluation only, no training state",
        "data.cuda_graph": "the same kernels, launched as one graph",
        "model.compile": "speed: the same model and state",
        "model.compile_mode": "speed: the same model and state",
        "model.cudnn_benchmark": "speed: the same model and state",
        "model.channels_last": "speed: memory layout, the same weights",
        "model.init_from": "read only when a new run starts: a resumed run continues from its own checkpoint",
        "dist": "processes and rendezvous: the stream does not depend on the number of processes",
        "handlers": "what is attached; a handler with state must still be there to be restored",
    }
)


UNREPORTED = frozenset({"resume"})  # differs on every resume (null when the checkpoint was written): not a change


def flatten(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested config mapping; lists (``handlers``) are leaves."""
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from flatten(value, dotted + ".")
        else:
            yield dotted, value


def _rule(key: str, table: Mapping[str, str]) -> str | None:
    """The longest prefix of ``key`` in ``table`` (a dotted prefix matches itself and its sub-keys)."""
    matches = [p for p in table if key == p or key.startswith(p + ".")]
    return max(matches, key=len) if matches else None


def may_change(key: str) -> bool:
    """Whether ``key`` may differ from the checkpoint's: a fixed rule at least as specific wins; unknown keys are fixed."""
    changeable, fixed = _rule(key, CHANGEABLE), _rule(key, FIXED)
    return changeable is not None and (fixed is None or len(changeable) > len(fixed))


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for every leaf that differs; a missing side is None."""
    old, new = dict(flatten(saved)), dict(flatten(current))
    return [(k, old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


def _shown(value: Any, limit: int = 60) -> str:
    """A value short enough for a one-line message (handler lists can be long)."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(changes: list[tuple[str, Any, Any]]) -> str:
    """``key old -> new, ...`` for messages and the log."""
    return ", ".join(f"{k} {_shown(a)} -> {_shown(b)}" for k, a, b in changes)


def check_resume(saved: Mapping[str, Any], current: Mapping[str, Any], iteration: int) -> list[tuple[str, Any, Any]]:
    """Refuse (ConfigError) a resume whose config differs from the checkpoint's in a key that cannot change,
    or that would stop before the checkpoint's ``iteration``; return the allowed changes, for the log.

    Every process holds the same config and checkpoint, so every process decides alike and raises alike."""
    changes = [c for c in differences(saved, current) if c[0] not in UNREPORTED]
    refused = [c for c in changes if not may_change(c[0])]
    if refused:
        raise ConfigError(
            f"resume: these settings differ from the checkpoint's and cannot change on resume: {describe(refused)}; "
            "to change them start a new run (another output_dir), or drop them from the command line."
        )
    num_iters = current.get("train", {}).get("num_iters")
    if isinstance(num_iters, int) and num_iters < iteration:
        raise ConfigError(
            f"resume: train.num_iters={num_iters} is below the checkpoint's iteration {iteration}. "
            f"Give train.num_iters >= {iteration}, or resume from an earlier checkpoint (resume=<path>)."
        )
    return changes


def saved_config(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's config in today's schema (defaults for keys added since), or None if it has none.

    Falls back to the stored mapping as it is when today's schema refuses it (an old checkpoint)."""
    from ignite_fixmatch.config import from_dict, to_dict

    stored = checkpoint.get("config")
    if not isinstance(stored, Mapping):
        return None
    try:
        return to_dict(from_dict(dict(stored)))
    except ConfigError:
        return dict(stored)


def read_resume_record(path: Path) -> tuple[dict[str, Any] | None, int]:
    """(the checkpoint's config, its iteration), read before anything of the run is written or built.

    Memory-mapped (the tensors are not read: the whole file is loaded again into the run's objects
    later); a file that cannot be mapped is read by ``read_checkpoint``, whose errors say what is wrong."""
    import torch

    from ignite_fixmatch.resume import read_checkpoint

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - read again the checked way: refused, truncated, or an old format
        ckpt = read_checkpoint(path)
    if not isinstance(ckpt, Mapping):
        ckpt = read_checkpoint(path)  # raises: not a checkpoint of this project
    trainer = ckpt.get("trainer")
    iteration = int(trainer.get("iteration", 0)) if isinstance(trainer, Mapping) else 0
    return saved_config(ckpt), iteration


def check_resume_config(cfg: Config, path: Path | None) -> list[tuple[str, Any, Any]]:
    """Refuse a resume from ``path`` with a config that differs where it cannot (ConfigError, on every
    process alike); return what changed and applies, for the log. Called before anything of the run is
    written, so a refused resume leaves the run's folder as it was. Nothing to check without a checkpoint
    (a new run) or in a checkpoint without a config."""
    if path is None:
        return []
    from ignite_fixmatch.config import to_dict

    saved, iteration = read_resume_record(path)
    return [] if saved is None else check_resume(saved, to_dict(cfg), iteration)
