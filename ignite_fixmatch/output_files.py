"""Files the after-training commands write for the user (``--out``, ``--json``, ``--sheet``, ...).

Two rules, kept here once: an output that cannot (or may not) be written is refused before any work,
not after minutes of it; and a file is written whole or not at all (a temporary file beside it, renamed
into place), so an existing file is only ever replaced by a complete one.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path


class OutputError(RuntimeError):
    """An output file that cannot be written, or exists and may not be replaced; names the option."""


def check_output(path: Path, option: str, overwrite: bool) -> None:
    """Refuse an output that is a folder, lies in a missing folder, exists (unless ``overwrite``) or cannot
    be written. Tried for real (``os.access`` says yes to root on a read-only mount): a temporary file is
    created and removed in the target's folder, where the result will be written and renamed."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option}: {str(path)!r} is a directory; give a file name inside it.")
    if not path.parent.is_dir():
        raise OutputError(f"{option}: folder {str(path.parent)!r} does not exist; create it or write elsewhere.")
    if path.exists() and not overwrite:
        raise OutputError(f"{option}: {str(path)!r} exists; pass --overwrite to replace it, or choose another name.")
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.check."):
            pass
    except OSError as e:
        raise OutputError(f"{option}: {str(path)!r} cannot be written ({e.strerror or e}); write elsewhere.") from None


def write_atomically(path: Path, write: Callable[[Path], None], option: str | None = None, overwrite: bool = True) -> None:
    """``write(tmp)`` to a fresh temporary file beside ``path``, then rename it over ``path``. If ``write``
    raises, nothing is left behind and an existing ``path`` is untouched. With ``overwrite`` false, a file
    that appeared at ``path`` while ``write`` ran is refused (naming ``option``) rather than replaced."""
    path = Path(path)
    # a fresh name, created by ``write`` itself: the file gets the umask's permissions (mkstemp's are 0600)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        write(tmp)
        if not overwrite and path.exists():
            raise OutputError(f"{option or str(path)}: {str(path)!r} was created by someone else meanwhile; pass --overwrite, or choose another name.")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
