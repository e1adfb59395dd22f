"""The typed config keys (``algorithm.<key>``) of the built-in algorithms.

They live apart from the algorithm classes, which are torch modules, so that a config is loaded and
checked without importing torch (a bad value is refused in about a second). An algorithm of your own
keeps its ``Params`` beside its class.
"""

from __future__ import annotations

from dataclasses import dataclass

from ignite_fixmatch.config import require


@dataclass
class NoParams:
    """An algorithm without config keys."""

    def check(self) -> None:
        """Raise ConfigError (naming ``algorithm.<key>``) for a value its type cannot refuse."""


@dataclass
class FixMatchParams:
    threshold: float = 0.95  # confidence at or above which a pseudo-label is used (tau)
    lambda_u: float = 1.0  # weight of the unlabeled loss; 0 trains on labels only
    hard_label: bool = True  # hard pseudo-labels; false uses softmax(logits_weak / T)
    T: float = 0.5  # temperature of soft pseudo-labels

    def check(self) -> None:
        require(0.0 <= self.threshold <= 1.0, "algorithm.threshold", self.threshold, "a number in [0, 1]")
        require(self.lambda_u >= 0.0, "algorithm.lambda_u", self.lambda_u, "a number >= 0")
        require(self.T > 0.0, "algorithm.T", self.T, "a number > 0")
