"""How evaluation turns a file into the model's input, as one value that a checkpoint stores.

Evaluation reads an image with :class:`~ignite_fixmatch.datasets.source.ImageSource` (decode, convert
to the run's colour mode, resize bilinearly to the run's side), stacks uint8 pixels, and normalises
on the device with the data set's mean and std. Predict, export and suggest use this same object, so
an image gets exactly the pixels and numbers it would get in evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ignite_fixmatch.datasets.source import ImageSource, PathList

if TYPE_CHECKING:
    from ignite_fixmatch.datasets import DataSources

MODES = {1: "L", 3: "RGB"}


@dataclass(frozen=True)
class Preprocessing:
    """Colour mode ("L" or "RGB"), square side in pixels, and per-channel mean/std of [0, 1] pixels."""

    mode: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    @classmethod
    def from_sources(cls, sources: DataSources) -> Preprocessing:
        return cls(MODES[sources.channels], int(sources.default_image_size), tuple(map(float, sources.mean)), tuple(map(float, sources.std)))

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        mode, size = d["mode"], int(d["image_size"])
        mean, std = tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"])
        if mode not in MODES.values() or size < 1 or len(mean) != len(std) or len(mean) != (1 if mode == "L" else 3):
            raise ValueError(f"not a preprocessing record: {dict(d)!r}")
        return cls(mode, size, mean, std)

    def files(self, paths: Sequence[str]) -> ImageSource:
        """Image files (absolute or relative to the working directory) read as evaluation reads a test
        folder: ``load(i)`` raises ``DataError`` naming an unreadable file; ``uint8_batch`` stacks them."""
        absolute = [os.path.abspath(p) for p in paths]
        return ImageSource(
            targets=[-1] * len(absolute), classes=[], mode=self.mode, root=os.sep,
            paths=PathList.from_paths([p.lstrip(os.sep) for p in absolute]), image_size=self.image_size,
        )
