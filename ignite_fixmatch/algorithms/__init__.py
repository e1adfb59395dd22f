"""Semi-supervised algorithms behind one seam (see ``base.Algorithm``), registered by name.

``algorithm.name`` in the config is a built-in name (below) or ``package.module:ClassName`` for an
algorithm of your own, importable from the working directory, as for handlers.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

from ignite_fixmatch.algorithms.base import Algorithm, NoParams, StepOutput
from ignite_fixmatch.plugin_import import import_by_name

BUILTINS: Mapping[str, str] = MappingProxyType(
    {
        "fixmatch": "ignite_fixmatch.algorithms.fixmatch:FixMatch",
    }
)


def resolve_algorithm(name: str) -> type[Algorithm]:
    """A built-in name or ``module.path:Class`` -> the algorithm class (a ConfigError if it is not one)."""
    from ignite_fixmatch.config import ConfigError

    cls = import_by_name(name, BUILTINS, what="algorithm")
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise ConfigError(f"algorithm {name!r} is a {type(cls).__name__}, not a subclass of ignite_fixmatch.algorithms.Algorithm.")
    return cls


def build_algorithm(name: str, params: Any, *, num_classes: int, num_unlabeled: int) -> Algorithm:
    """The algorithm of a config, sized for the run's data."""
    return resolve_algorithm(name)(params, num_classes=num_classes, num_unlabeled=num_unlabeled)


__all__ = ["Algorithm", "BUILTINS", "NoParams", "StepOutput", "build_algorithm", "resolve_algorithm"]
