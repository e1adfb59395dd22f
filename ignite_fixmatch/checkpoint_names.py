"""Where checkpoints live and what their file names say: the one parser of ``checkpoint_<iteration>.pt``
and ``best_checkpoint_<iteration>_top1=<score>.pt`` (written by the checkpoint handler through Ignite's
``Checkpoint``), used by resume, the checkpoint and ClearML handlers and evaluation. No torch import.
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^(?P<best>best_)?checkpoint_(?P<iteration>\d+)(?:_top1=(?P<score>[-+0-9.eE]+))?\.pt$")


def checkpoint_iteration(path: Path) -> int:
    """The iteration a checkpoint file was written at; -1 for a name that is not a checkpoint's."""
    m = _NAME.match(Path(path).name)
    return int(m.group("iteration")) if m else -1


def is_best(path: Path) -> bool:
    m = _NAME.match(Path(path).name)
    return bool(m and m.group("best"))


def best_score(path: Path) -> float:
    """The top-1 in a best checkpoint's name (best_checkpoint_<iteration>_top1=<score>.pt)."""
    m = _NAME.match(Path(path).name)
    if not m or m.group("score") is None:
        raise ValueError(f"{Path(path).name!r} is not the name of a best checkpoint (best_checkpoint_<iteration>_top1=<score>.pt)")
    return float(m.group("score"))


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Resumable checkpoints of a run, oldest first (regular ones after best ones of the same iteration)."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("*.pt") if checkpoint_iteration(p) >= 0]
    return sorted(found, key=lambda p: (checkpoint_iteration(p), not is_best(p)))


def newest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint ``resume: auto`` continues from, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def best_checkpoint(output_dir: Path) -> Path | None:
    """The best checkpoint with the highest top-1, the latest iteration on a tie."""
    best = [p for p in list_checkpoints(output_dir) if is_best(p)]
    return max(best, key=lambda p: (best_score(p), checkpoint_iteration(p))) if best else None
