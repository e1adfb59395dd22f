"""What a checkpoint holds besides models and optimizer, where checkpoints live, and loading them safely.

Checkpoints are written by the ``checkpoint`` handler as ``OUTPUT/checkpoints/checkpoint_<iteration>.pt``
(and ``best_checkpoint_<iteration>_top1=<score>.pt``). Loading always uses ``torch.load(weights_only=True)``:
a file that would need to run code to unpickle is refused.
"""

from __future__ import annotations

import pickle
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.handlers import Checkpoint

from ignite_fixmatch.checkpoint_names import CHECKPOINT_DIR, checkpoint_iteration, list_checkpoints, newest_checkpoint  # noqa: F401
from ignite_fixmatch.config import Config, to_dict
from ignite_fixmatch.errors import CheckpointError, CheckpointWriteError  # noqa: F401

PROJECT_KEYS = ("model", "config", "trainer")  # saved by every training run (training.py, to_save)
NOT_OURS = "not a checkpoint of this project"


class RNGState:
    """Every random generator of this process (python, numpy, torch CPU and CUDA), as a checkpointable object.

    Stored in plain tensors and ints so that ``weights_only=True`` loading accepts it.
    """

    def state_dict(self) -> dict[str, Any]:
        py_version, py_state, py_gauss = random.getstate()
        np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        state = {
            "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
            "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        py = state["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
        npy = state["numpy"]
        np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


class ConfigRecord:
    """The resolved config, stored in every checkpoint so that evaluation and resume need no YAML file."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.loaded: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return to_dict(self.cfg)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loaded = dict(state)


class ClassesRecord:
    """The class names of the training data: resuming or evaluating on other classes is refused.

    Also stores the evaluation preprocessing (``Preprocessing.to_dict()``: mode, image size, mean, std),
    so predict, export and suggest need neither the data set nor its files to rebuild it.
    """

    def __init__(self, classes: list[str], preprocessing: Mapping[str, Any] | None = None) -> None:
        self.classes = list(classes)
        self.preprocessing = dict(preprocessing) if preprocessing is not None else None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"classes": self.classes}
        if self.preprocessing is not None:
            state["preprocessing"] = self.preprocessing
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = list(state["classes"])
        if saved != self.classes:
            only_saved = sorted(set(saved) - set(self.classes))
            only_here = sorted(set(self.classes) - set(saved))
            detail = f"checkpoint has {len(saved)} classes, the data has {len(self.classes)}"
            if only_saved or only_here:
                detail += f"; only in the checkpoint: {', '.join(only_saved[:10]) or '-'}; only in the data: {', '.join(only_here[:10]) or '-'}"
            else:
                detail += "; same names in another order"
            raise CheckpointError(f"the checkpoint was trained on other classes than this data ({detail}). Use the data it was trained on.")


def find_resume_checkpoint(resume: str | None, output_dir: Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """``resume: auto`` -> the newest intact checkpoint in the run's folder (None if there is none yet);
    a path -> that file, which must exist (a damaged one is refused later, when it is loaded)."""
    if resume is None:
        return None
    if resume == "auto":
        return newest_intact_checkpoint(output_dir, warn or (lambda message: None))
    path = Path(resume)
    if path.is_dir():
        raise CheckpointError(f"resume: {str(path)!r} is a directory, not a checkpoint file. {_directory_advice(path)}")
    if not path.is_file():
        raise CheckpointError(f"resume: checkpoint {str(path)!r} does not exist. Give an existing .pt file, or resume=auto.")
    return path


def _directory_advice(folder: Path) -> str:
    """What to give instead of a folder: its newest checkpoint when it is a run (or checkpoints) folder."""
    run_dir = folder.parent if folder.name == CHECKPOINT_DIR else folder
    newest = newest_checkpoint(run_dir)
    example = f"resume={newest}" if newest is not None else f"resume={folder / CHECKPOINT_DIR / 'checkpoint_<iteration>.pt'}"
    return f"Give one .pt file in it (e.g. {example}), or resume=auto with output_dir={run_dir} to continue that run."


def newest_intact_checkpoint(output_dir: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest checkpoint of a run that reads back whole, for ``resume: auto``.

    A newer file cut short (full disk, an interrupted copy) must not stop the run when an intact older
    one sits beside it: it is skipped, and ``warn`` says which and why. Damaged files and no intact one
    is an error (starting anew would silently throw the run away); no file at all is a new run (None).
    """
    skipped = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            read_checkpoint(path)
        except CheckpointError as e:
            skipped.append(str(e))
            warn(f"resume=auto: skipping {path.name}, it cannot be used: {e}")
            continue
        return path
    if skipped:
        raise CheckpointError(
            f"resume=auto: no checkpoint in {str(Path(output_dir) / CHECKPOINT_DIR)!r} can be used ({' | '.join(skipped)}). "
            "Give an intact one as resume=PATH, or start a new run (overwrite=true or another output_dir)."
        )
    return None


def _clean(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _refused_global(error: Exception) -> str | None:
    """The object torch refused to rebuild (e.g. ``posix.system``): torch 2.x writes "unsupported GLOBAL
    posix.system" (older: "Unsupported global: GLOBAL posix.system"). None when no global is named
    (then the bytes were garbage, not code)."""
    match = re.search(r"GLOBAL\s+([\w.]+)", _clean(str(error)))
    return match.group(1) if match else None


def _first_line(text: str, limit: int = 200) -> str:
    """One line of an error for a one-line message; torch's own advice to load with
    ``weights_only=False`` (unsafe: it runs the file's code) is never passed on."""
    advice = ("weights_only", "Weights only", "file an issue", "documentation of torch.load")
    lines = [line.strip() for line in _clean(text).splitlines() if line.strip() and not any(a in line for a in advice)]
    return lines[0][:limit] if lines else ""


def _not_ours(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {str(path)!r} is {NOT_OURS}: {why}.")


def _load(path: Path) -> Any:
    """``torch.load(weights_only=True)``; every failure becomes a CheckpointError (exit 2) that says why.

    The bytes are untrusted: torch's readers raise anything on damaged input (KeyError, IndexError,
    UnicodeDecodeError, ValueError, RuntimeError...), so every exception is caught, not a list of them.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be opened: {e.strerror or e}.") from None
    except pickle.UnpicklingError as e:
        refused = _refused_global(e)
        if refused is not None:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was refused: it would call {refused} when unpickled, which could run "
                "arbitrary code; it was not loaded. Only load files you trust."
            ) from None
        raise _unreadable(path, _first_line(str(e)) or type(e).__name__) from None
    except Exception as e:  # noqa: BLE001 - see the docstring
        raise _unreadable(path, f"{type(e).__name__}: {_first_line(str(e))}") from None


def _unreadable(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {str(path)!r} cannot be read: it is truncated, damaged or {NOT_OURS} ({detail}).")


def _check_structure(obj: Any, path: Path, required: Sequence[str]) -> dict[str, Any]:
    """What torch could unpickle is only a checkpoint of this project if it holds the state dicts a run
    saves: a dict with ``required`` keys whose values are dicts. Named when missing or of another type."""
    if not isinstance(obj, dict):
        raise _not_ours(path, f"it holds a {type(obj).__name__}, not a dict of state dicts")
    missing = [key for key in required if key not in obj]
    if missing:
        keys = ", ".join(map(str, list(obj)[:12])) or "none"
        raise _not_ours(path, f"it holds no {', '.join(missing)} (its keys: {keys})")
    wrong = [f"its {key} is a {type(obj[key]).__name__}" for key in required if not isinstance(obj[key], Mapping)]
    if wrong:
        raise _not_ours(path, "; ".join(wrong) + ", not a state dict")
    return obj


def read_checkpoint(path: Path, required: Sequence[str] = PROJECT_KEYS) -> dict[str, Any]:
    """Load a checkpoint file safely (no code execution), with errors that say what is wrong; it must
    hold the ``required`` entries (default: what every training run saves)."""
    return _check_structure(_load(path), path, required)


def shape_mismatches(model: torch.nn.Module, state: Mapping[str, Any], shown: int = 5) -> str:
    """What differs between a model and a state dict (missing keys, other shapes), the first ``shown``
    items and a count of the rest; empty when the state fits."""
    own = model.state_dict()
    problems = []
    for k in sorted(set(own) | set(state), key=str):  # str: a damaged file may hold keys of other types
        if k not in state:
            problems.append(f"{k}: missing in the checkpoint")
        elif k not in own:
            problems.append(f"{k}: not in this model")
        elif hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape):
            problems.append(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
    rest = len(problems) - shown
    return "; ".join(problems[:shown]) + (f"; and {rest} more" if rest > 0 else "")


def load_into(to_load: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Restore every object of ``to_load`` from the checkpoint at ``path``; returns the raw checkpoint.

    A model of another shape (other architecture, other number of classes) is refused with the list
    of differences; objects the checkpoint lacks are named.
    """
    ckpt = read_checkpoint(path, required=[k for k in PROJECT_KEYS if k in to_load])
    missing = [k for k in to_load if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"checkpoint {str(path)!r} lacks {', '.join(missing)}: it was written by another configuration "
            "(e.g. without the ema handler). Resume with the same handlers, or start a new run."
        )
    _check_structure(ckpt, path, list(to_load))
    for key, obj in to_load.items():
        module = getattr(obj, "module", obj)
        if isinstance(module, torch.nn.Module):
            problems = shape_mismatches(module, ckpt[key])
            if problems:
                raise CheckpointError(
                    f"checkpoint {str(path)!r} does not fit this model ({key}): {problems}. "
                    "It was trained with another model or data set (number of classes); use the config it was saved with."
                )
    _restore(to_load, ckpt, path)
    return ckpt


def _restore(to_load: Mapping[str, Any], ckpt: Mapping[str, Any], path: Path) -> None:
    """Ignite's ``load_objects``; a state dict damaged inside (a renamed entry, a value of another type)
    fails in whichever ``load_state_dict`` meets it, with any exception: all become a CheckpointError."""
    try:
        Checkpoint.load_objects(to_load, {k: ckpt[k] for k in to_load})
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - see the docstring
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be restored: its content is damaged or {NOT_OURS} "
            f"({type(e).__name__}: {_first_line(str(e))})."
        ) from None
