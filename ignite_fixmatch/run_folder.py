"""The run folder: what is ours, what a new run may replace, and one run at a time in it.

Three rules keep ``output_dir`` safe (issue 15):

* **Only our own folders are ever emptied.** A run folder is recognised by the marker file
  :data:`MARKER`, written when a run first takes the folder, or (folders of older versions) by
  ``config.yaml`` + ``train.log`` + ``checkpoints/`` together. A folder holding anything else is refused,
  naming what is there, and never touched, with or without ``overwrite=true``. Even a run folder is never
  emptied when it is the working directory, one of its parents, the home folder (or a parent of it), or
  ``data.root`` / ``data.unlabeled_dir`` or a folder containing them. What is removed is logged.
* **A failed start does not block the corrected rerun.** We chose to recognise a run folder with no
  checkpoint and no ``results.json`` as *free*: nothing in it can be resumed or is a result, so a new run
  replaces what the failed start left (config.yaml, train.log, an empty checkpoints/) without
  ``overwrite=true``. This keeps ``training()``'s order (folder, log and config first, so that a data error
  is in train.log) and needs no cleanup on the error paths, which a SIGKILL would skip anyway.
* **One run at a time.** Process 0 holds an exclusive ``fcntl.flock`` on :data:`MARKER` for the whole run
  and writes its pid, host and start time in it; a second run on the folder is refused with
  :class:`OutputDirError` (exit 2) naming the first. The kernel drops the lock when the process ends,
  however it ends (SIGKILL, OOM kill, power loss), so a stale lock needs no handling: the file stays as
  the marker, the lock does not. flock is per host; on a network filesystem it depends on the server.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from pathlib import Path

from ignite_fixmatch.checkpoint_names import CHECKPOINT_DIR, list_checkpoints
from ignite_fixmatch.errors import OutputDirError

try:
    import fcntl
except ImportError:  # Windows: no flock; the folder rules still apply, the one-run-at-a-time lock does not
    fcntl = None  # type: ignore[assignment]

MARKER = ".ignite-fixmatch-run"
OLD_RUN_FILES = ("config.yaml", "train.log", CHECKPOINT_DIR)  # what every run of older versions wrote at start
LOGGER_NAME = "ignite_fixmatch"

_held: dict[Path, int] = {}  # run folder -> descriptor of its locked marker, kept open for the life of the process


def is_run_folder(out: Path) -> bool:
    """Whether ``out`` was written by a run of ours: its marker, or the three files every older run wrote."""
    return (out / MARKER).is_file() or all((out / name).exists() for name in OLD_RUN_FILES)


def holds_results(out: Path) -> bool:
    """Whether a run folder holds something worth keeping: a checkpoint to resume or a results.json."""
    return bool(list_checkpoints(out)) or (out / "results.json").exists()


def describe_entries(out: Path, shown: int = 5) -> str:
    """A few names of what is in ``out``, and how many entries in all, for an error message."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    more = f", ... ({len(names)} entries in all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def protected_reason(out: Path, data_dirs: list[str | None]) -> str | None:
    """Why ``out`` must never be emptied (working directory, home, data), or None."""
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if cwd == out or cwd.is_relative_to(out):
        return "the working directory" if cwd == out else f"a parent of the working directory {str(cwd)!r}"
    if home.is_relative_to(out):
        return "the home folder" if home == out else "a parent of the home folder"
    for d in (Path(d).expanduser().resolve() for d in data_dirs if d):
        if d.is_relative_to(out):
            return f"the data folder {str(d)!r}" if d == out else f"a folder containing the data folder {str(d)!r}"
    return None


def check_reusable(out: Path, resume: str | None, overwrite: bool, data_dirs: list[str | None]) -> list[Path]:
    """What a run must remove from ``out`` before using it (nothing, or what an earlier run of ours left);
    raises :class:`OutputDirError` for a folder it must not use. Touches nothing."""
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output_dir {str(out)!r} exists and is a file. Choose another output_dir.")
    if not out.is_dir() or not any(out.iterdir()):
        return []
    if not is_run_folder(out):
        raise OutputDirError(
            f"output_dir {str(out)!r} holds files that no ignite-fixmatch run wrote ({describe_entries(out)}); "
            "nothing in it was touched, and overwrite=true never deletes them. Choose a new or empty output_dir."
        )
    if resume is not None:
        return []
    if holds_results(out) and not overwrite:
        raise OutputDirError(
            f"output_dir {str(out)!r} already holds a run. To continue it: resume=auto; to replace it: "
            "overwrite=true (the run's files are deleted); or choose another output_dir."
        )
    reason = protected_reason(out, data_dirs)
    if reason is not None:
        raise OutputDirError(f"output_dir {str(out)!r} is {reason}; it is never emptied. Choose another output_dir.")
    return sorted(p for p in out.iterdir() if p.name != MARKER)


def lock_run_folder(out: Path) -> None:
    """Create ``out`` and hold an exclusive lock on its marker for the rest of this process, writing who
    holds it; a folder locked by another process is refused, naming that process."""
    if out in _held:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / MARKER, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputDirError(f"output_dir {str(out)!r} cannot be created: {e}. Choose a writable output_dir.") from None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputDirError(f"output_dir {str(out)!r} is in use by {holder}. Wait for it, or choose another output_dir.") from None
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"the run of process {os.getpid()} on {socket.gethostname()} (started {started})\n".encode(), 0)
    _held[out] = fd


def release_run_folder(out: Path) -> None:
    """Give up the lock on ``out`` held by this process (the end of the process does it too)."""
    fd = _held.pop(Path(out).expanduser().resolve(), None)
    if fd is not None:
        os.close(fd)


def remove_entries(out: Path, entries: list[Path]) -> None:
    """Delete what an earlier run of ours left in ``out`` (never the marker, which holds our lock), saying what."""
    if not entries:
        return
    names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries)
    for child in entries:
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    logging.getLogger(LOGGER_NAME).warning("Removed from %s what an earlier run left: %s", out, names)


def take_run_folder(output_dir: str, resume: str | None, overwrite: bool, data_dirs: list[str | None]) -> Path:
    """Check, lock, then (under the lock, checked again) clear ``output_dir`` for this run; returns its path."""
    out = Path(output_dir).expanduser().resolve()
    try:
        check_reusable(out, resume, overwrite, data_dirs)  # refuse before creating anything in the folder
    except OSError as e:
        raise OutputDirError(f"output_dir {str(out)!r} cannot be read: {e}. Choose another output_dir.") from None
    lock_run_folder(out)
    try:
        remove_entries(out, check_reusable(out, resume, overwrite, data_dirs))
        (out / CHECKPOINT_DIR).mkdir(exist_ok=True)
    except OSError as e:
        release_run_folder(out)
        raise OutputDirError(f"output_dir {str(out)!r} cannot be prepared: {e}. Choose a writable output_dir.") from None
    except OutputDirError:
        release_run_folder(out)
        raise
    return out
