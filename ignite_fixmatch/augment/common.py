"""Constants, argument checks and small helpers shared by the PIL and the batched augmentation.

Config values arrive from YAML or the command line: each check rejects the wrong type or range with a
message that names the argument, once, at construction rather than on every image.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

FILL_REFERENCE = (125, 123, 114)  # grey used by Cutout (about the CIFAR-10 mean)
VARIANTS = ("reference", "official")
PAD_MODES = ("constant", "reflect", "edge", "symmetric")
IMAGE_MODES = ("RGB", "L")

Fill = int | Sequence[int]


def check_rng(rng: object) -> None:
    """Refuse anything but a Random instance: passing the `random` module would silently use global state."""
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random instance, got {type(rng).__name__}: {rng!r}")


def check_image(img: object) -> None:
    """Fail early on modes the ops and fills are not written for (palette, RGBA, 16-bit)."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"img must be a PIL.Image.Image, got {type(img).__name__}")
    if img.mode not in IMAGE_MODES:
        raise ValueError(f"img.mode must be one of {IMAGE_MODES}, got {img.mode!r}; convert it first")


def check_batch(x: Tensor) -> None:
    """The batched ops are written for uint8 (N, C, H, W) with 1 or 3 channels, as the PIL path's L/RGB."""
    if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        dtype = x.dtype if isinstance(x, Tensor) else ""
        raise ValueError(f"images must be a uint8 tensor (N, C, H, W) with C in (1, 3), got {dtype} {shape}")


def check_int(name: str, value: object, minimum: int) -> int:
    """Reject bools, floats and strings where a count is expected."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_pad(pad: object, pad_mode: object) -> None:
    """Padding in pixels and one of the modes both paths implement."""
    check_int("pad", pad, 0)
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")


def check_flip(flip: object) -> bool:
    """A string such as "False" is truthy: the reference's type=bool defect, refused here."""
    if not isinstance(flip, bool):
        raise ValueError(f"flip must be a bool, got {flip!r}")
    return flip


def check_fill(name: str, fill: object) -> Fill:
    """A fill is one grey level or an RGB triple of 0..255 integers."""
    values = [fill] if isinstance(fill, int) and not isinstance(fill, bool) else fill
    ok = isinstance(values, (list, tuple)) and len(values) in (1, 3) and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in values
    )
    if not ok:
        raise ValueError(f"{name} must be an int or a 3-tuple of ints in 0..255, got {fill!r}")
    return fill if isinstance(fill, int) else tuple(fill)


def check_mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation needs one positive std per mean; catches a swapped or truncated config."""
    try:
        mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    except (TypeError, ValueError):
        raise ValueError(f"mean and std must be sequences of numbers, got mean={mean!r}, std={std!r}") from None
    if not mean_t or len(mean_t) != len(std_t):
        raise ValueError(f"mean and std must have the same non-zero length, got mean={mean!r}, std={std!r}")
    if not all(s > 0 and math.isfinite(s) for s in std_t):
        raise ValueError(f"std must be positive, got {std!r}")
    return mean_t, std_t


def fill_values(fill: Fill, channels: int) -> tuple[int, ...]:
    """The fill as one value per channel: one channel takes the rounded mean of a triple, three a triple."""
    if channels == 1:
        return (fill if isinstance(fill, int) else int(round(sum(fill) / len(fill))),)
    if isinstance(fill, int):
        return (fill,) * 3
    return tuple(fill) if len(fill) == 3 else (fill[0],) * 3


@functools.lru_cache(maxsize=256)
def cached_tensor(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant tensor, made once per device: building it from a list on every call would be a
    blocking host-to-device copy (a host synchronisation inside the step) on a GPU."""
    return torch.tensor(values, dtype=dtype, device=device)
