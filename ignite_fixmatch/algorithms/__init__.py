"""Semi-supervised algorithms behind one seam (``base.Algorithm``), registered by name.

``algorithm.name`` in the config is a built-in name (``BUILTINS``) or ``package.module:ClassName`` for an
algorithm of your own, importable from the working directory, as for handlers. This module does not
import torch: the config is checked against a built-in's ``Params`` (``params.py``) before torch loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

from ignite_fixmatch.plugin_import import import_by_name

if TYPE_CHECKING:
    from ignite_fixmatch.algorithms.base import Algorithm


class Builtin(NamedTuple):
    algorithm: str  # "module:Class", a torch module
    params: str  # "module:Params", its config keys (importable without torch)


BUILTINS: Mapping[str, Builtin] = MappingProxyType(
    {
        "fixmatch": Builtin("ignite_fixmatch.algorithms.fixmatch:FixMatch", "ignite_fixmatch.algorithms.params:FixMatchParams"),
        "flexmatch": Builtin("ignite_fixmatch.algorithms.flexmatch:FlexMatch", "ignite_fixmatch.algorithms.params:FlexMatchParams"),
        "freematch": Builtin("ignite_fixmatch.algorithms.freematch:FreeMatch", "ignite_fixmatch.algorithms.params:FreeMatchParams"),
    }
)


def resolve_algorithm(name: str) -> type[Algorithm]:
    """A built-in name or ``module.path:Class`` -> the algorithm class (a ConfigError if it is not one)."""
    from ignite_fixmatch.algorithms.base import Algorithm
    from ignite_fixmatch.config import ConfigError

    cls = import_by_name(name, {k: b.algorithm for k, b in BUILTINS.items()}, what="algorithm")
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise ConfigError(f"algorithm {name!r} is a {type(cls).__name__}, not a subclass of ignite_fixmatch.algorithms.Algorithm.")
    return cls


def params_class(name: str) -> type:
    """The dataclass of an algorithm's config keys: a built-in's without importing torch, a user's from its class."""
    if name in BUILTINS:
        return import_by_name(name, {k: b.params for k, b in BUILTINS.items()}, what="algorithm")
    return resolve_algorithm(name).Params


def build_algorithm(name: str, params: Any, *, num_classes: int, num_unlabeled: int, labeled_counts: list[int] | None = None) -> Algorithm:
    """The algorithm of a config, sized for the run's data.

    ``labeled_counts`` (labeled images per class) goes only to a class that sets ``uses_labeled_counts``,
    so an algorithm written with the two-size ``__init__`` keeps working."""
    cls = resolve_algorithm(name)
    extra = {"labeled_counts": labeled_counts} if cls.uses_labeled_counts else {}
    return cls(params, num_classes=num_classes, num_unlabeled=num_unlabeled, **extra)


def __getattr__(name: str) -> Any:
    """``Algorithm`` and ``StepOutput`` (torch types) load on first use, keeping this module light."""
    if name in ("Algorithm", "StepOutput"):
        from ignite_fixmatch.algorithms import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Algorithm", "BUILTINS", "Builtin", "StepOutput", "build_algorithm", "params_class", "resolve_algorithm"]
