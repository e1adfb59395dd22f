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
class AlignmentParams:
    """Distribution alignment (ReMixMatch), a switch every built-in has (``algorithms/alignment.py``).

    A base of each built-in's Params listed *first* among its bases, so that its keys come after the
    algorithm's own (dataclass fields follow the reversed MRO): ``config.yaml`` reads threshold first."""

    distribution_alignment: bool = False  # align the weak view's probabilities to the labeled class distribution
    da_window: int = 128  # unlabeled batches in DA's running mean (ReMixMatch: 128)

    def check(self) -> None:
        require(self.da_window >= 1, "algorithm.da_window", self.da_window, "an integer >= 1")


@dataclass
class _FixMatchKeys:
    threshold: float = 0.95  # confidence at or above which a pseudo-label is used (tau)
    lambda_u: float = 1.0  # weight of the unlabeled loss; 0 trains on labels only
    hard_label: bool = True  # hard pseudo-labels; false uses softmax(logits_weak / T)
    T: float = 0.5  # temperature of soft pseudo-labels


@dataclass
class FixMatchParams(AlignmentParams, _FixMatchKeys):
    def check(self) -> None:
        require(0.0 <= self.threshold <= 1.0, "algorithm.threshold", self.threshold, "a number in [0, 1]")
        require(self.lambda_u >= 0.0, "algorithm.lambda_u", self.lambda_u, "a number >= 0")
        require(self.T > 0.0, "algorithm.T", self.T, "a number > 0")
        AlignmentParams.check(self)


@dataclass
class FlexMatchParams(FixMatchParams):
    """FixMatch's keys (``threshold`` is FlexMatch's tau, the ceiling of every class's threshold) and the warm-up."""

    warmup: bool = True  # thresholds stay low while most unlabeled images were never confidently predicted


@dataclass
class _FreeMatchKeys:
    lambda_u: float = 1.0  # weight of the unlabeled loss; 0 trains on labels only
    hard_label: bool = True  # hard pseudo-labels; false uses softmax(logits_weak / T)
    T: float = 0.5  # temperature of soft pseudo-labels
    momentum: float = 0.999  # lambda of the EMAs of the global and per-class confidence
    fairness_weight: float = 0.01  # weight of the self-adaptive fairness loss; 0 turns it off


@dataclass
class FreeMatchParams(AlignmentParams, _FreeMatchKeys):
    def check(self) -> None:
        require(self.lambda_u >= 0.0, "algorithm.lambda_u", self.lambda_u, "a number >= 0")
        require(self.T > 0.0, "algorithm.T", self.T, "a number > 0")
        require(0.0 < self.momentum < 1.0, "algorithm.momentum", self.momentum, "a number in (0, 1)")
        require(self.fairness_weight >= 0.0, "algorithm.fairness_weight", self.fairness_weight, "a number >= 0")
        AlignmentParams.check(self)
