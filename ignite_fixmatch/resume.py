"""What a checkpoint holds besides models and optimizer, where checkpoints live, and loading them safely.

Checkpoints are written by the ``checkpoint`` handler as ``OUTPUT/checkpoints/checkpoint_<iteration>.pt``
(and ``best_checkpoint_<iteration>_top1=<score>.pt``). Loading always uses ``torch.load(weights_only=True)``:
a file that would need to run code to unpickle is refused.
"""

from __future__ import annotations

import pickle
import random
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.handlers import Checkpoint

from ignite_fixmatch.checkpoint_names import CHECKPOINT_DIR, checkpoint_iteration, list_checkpoints, newest_checkpoint  # noqa: F401
from ignite_fixmatch.config import Config, to_dict
from ignite_fixmatch.errors import CheckpointError, CheckpointWriteError  # noqa: F401


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
    """The class names of the training data: resuming or evaluating on other classes is refused."""

    def __init__(self, classes: list[str]) -> None:
        self.classes = list(classes)

    def state_dict(self) -> dict[str, Any]:
        return {"classes": self.classes}

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


def find_resume_checkpoint(resume: str | None, output_dir: Path) -> Path | None:
    """``resume: auto`` -> the newest checkpoint in the run's folder (None if there is none yet);
    a path -> that file, which must exist."""
    if resume is None:
        return None
    if resume == "auto":
        return newest_checkpoint(output_dir)
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"resume: checkpoint {str(path)!r} does not exist. Give an existing .pt file, or resume=auto.")
    return path


def _refusal_detail(error: Exception) -> str:
    """The part of torch's long refusal that names the offending object, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    for line in text.splitlines():
        if "Unsupported global" in line:
            return line.strip().split(" was not an allowed global")[0]
    lines = text.strip().splitlines()
    return lines[0] if lines else type(error).__name__


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint file safely (no code execution), with errors that say what is wrong."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was refused: it holds objects that only a full (unsafe) unpickling could "
            f"rebuild, which could run arbitrary code. Only load files you trust. Details: {_refusal_detail(e)}"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read (truncated or not a checkpoint?): {str(e) or type(e).__name__}"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a checkpoint of this project (it holds a {type(obj).__name__}).")
    return obj


def shape_mismatches(model: torch.nn.Module, state: Mapping[str, Any], shown: int = 5) -> str:
    """What differs between a model and a state dict (missing keys, other shapes), the first ``shown``
    items and a count of the rest; empty when the state fits."""
    own = model.state_dict()
    problems = []
    for k in sorted(set(own) | set(state)):
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
    ckpt = read_checkpoint(path)
    missing = [k for k in to_load if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"checkpoint {str(path)!r} lacks {', '.join(missing)}: it was written by another configuration "
            "(e.g. without the ema handler). Resume with the same handlers, or start a new run."
        )
    for key, obj in to_load.items():
        module = getattr(obj, "module", obj)
        if isinstance(module, torch.nn.Module):
            problems = shape_mismatches(module, ckpt[key])
            if problems:
                raise CheckpointError(
                    f"checkpoint {str(path)!r} does not fit this model ({key}): {problems}. "
                    "It was trained with another model or data set (number of classes); use the config it was saved with."
                )
    Checkpoint.load_objects(to_load, {k: ckpt[k] for k in to_load})
    return ckpt
