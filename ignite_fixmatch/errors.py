"""Every error a user can cause or meet, and the exit code the command line gives it: one place, and no
heavy import, so ``python -m ignite_fixmatch.main`` can refuse a bad config before torch is loaded.

Each message names the problem and the fix; the modules that raise them import them from here.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, NoReturn


class ConfigError(ValueError):
    """A configuration problem, with a message that says which key, what value and what is allowed."""


def fail_key(key: str, value: Any, allowed: str) -> NoReturn:
    """Raise the ConfigError of one key: its value (shortened) and what is allowed."""
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    raise ConfigError(f"config key '{key}': got {shown}, expected {allowed}.")


class DataError(ValueError):
    """A data problem (missing folder, empty class, unreadable image), naming the path."""


class OutputDirError(RuntimeError):
    """The output folder cannot be used as asked (exists, not writable)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with what is wrong and what to do."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, unwritable folder); the previous one is intact."""


class NonFiniteLossError(RuntimeError):
    """Training diverged (NaN or inf loss); the message names the iteration and the last good checkpoint."""


class Preempted(RuntimeError):
    """The run was stopped by a signal after saving a checkpoint."""


# Exit codes, so that job scripts can tell what happened (see README, "Failure modes and recovery").
EXIT_USER_ERROR = 2  # bad config, data, checkpoint or output folder: nothing was trained
EXIT_DIVERGED = 3  # non-finite loss: the last good checkpoint is intact
EXIT_SAVE_FAILED = 4  # a checkpoint could not be written: the previous one is intact
EXIT_PROCESS_DIED = 5  # a process of a multi-process job died (killed, out of memory): the others were stopped
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT: a checkpoint was written; run again with resume=auto (EX_TEMPFAIL)

EXIT_CODES = MappingProxyType(
    {
        ConfigError: EXIT_USER_ERROR,
        DataError: EXIT_USER_ERROR,
        CheckpointError: EXIT_USER_ERROR,
        OutputDirError: EXIT_USER_ERROR,
        NonFiniteLossError: EXIT_DIVERGED,
        CheckpointWriteError: EXIT_SAVE_FAILED,
        Preempted: EXIT_PREEMPTED,
    }
)


def error_line(error: BaseException) -> str:
    """One line: an error raised in a DataLoader worker carries the worker's traceback; keep its last line."""
    message = str(error)
    if "Original Traceback" in message:
        message = message.strip().splitlines()[-1]
    return " ".join(message.split())


def exit_code_of(error: BaseException) -> int | None:
    return next((code for kind, code in EXIT_CODES.items() if isinstance(error, kind)), None)
