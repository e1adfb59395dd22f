"""Names in a config that stand for code: a built-in name, or ``package.module:Attribute``.

Handlers and algorithms are both named this way; code of your own is imported from the working
directory (where the run was started), as a script's own modules would be.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def import_by_name(name: str, builtins: Mapping[str, str], *, what: str) -> Any:
    """``name`` (a key of ``builtins``, or ``module.path:Attribute``) -> the object it names.

    ``what`` ("handler", "algorithm") words the ConfigError raised for a name that does not resolve.
    """
    from ignite_fixmatch.config import ConfigError

    target = builtins.get(name, name)
    if ":" not in target:
        raise ConfigError(
            f"unknown {what} {name!r}. Built-in {what}s: {', '.join(builtins)}; "
            f"a {what} of your own is named 'package.module:ClassName' (importable from the working directory)."
        )
    module_name, _, attr = target.partition(":")
    cwd = str(Path.cwd())
    if cwd not in sys.path:  # code of your own is found relative to where the run was started
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{what} {name!r}: cannot import module {module_name!r} ({e}). Is it on PYTHONPATH or in the working directory?") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{what} {name!r}: module {module_name!r} has no attribute {attr!r}.") from None
