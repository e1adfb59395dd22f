"""The random choices of the FixMatch views, defined once: op lists, magnitude ranges, levels, order of draws.

FixMatch (Sohn et al., 2020, "FixMatch: Simplifying Semi-Supervised Learning with Consistency and
Confidence") pairs a weak view (flip and shift, Section 2.3) with a strong one: RandAugment or CTAugment
followed by Cutout (Section 2.3; the appendix lists the transformations and their ranges). This project
implements RandAugment in two variants over the same 14 ops:

* ``reference`` (LeeDoYup/FixMatch-pytorch, the default): 3 ops drawn with replacement, each always
  applied with a magnitude uniform in its range, then Cutout of side U(0, 0.5) * width; all of it before
  the flip and crop.
* ``official`` (google-research/fixmatch, RandAugment "rac"): 2 ops, each applied with probability 0.5
  at an integer level 1..9 of 10; after the flip and crop, followed by a fixed Cutout of 16/32 of the width.

Both generators read the tables below. :class:`ViewDraws` draws one sample from its own ``random.Random``
(the PIL views and the batched loaders: the same calls in the same order, so both paths get identical
choices) or a whole batch from a ``torch.Generator`` (data held on the device: the same distributions,
other values). Drawing touches no pixels; applying is :mod:`.pil` or :mod:`.views`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ignite_fixmatch.augment.common import cached_tensor, check_rng

Magnitude = float | None
SampledOps = list[tuple[str, Magnitude]]
Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), right/bottom exclusive; empty when x1 <= x0

FLIP_P = 0.5  # horizontal flip probability (both views)
APPLY_P = 0.5  # official: probability that a drawn op is applied
NEGATE_P = 0.5  # official: probability that a signed op's magnitude is negated
OFFICIAL_MAX_LEVEL = 9  # official draws np.random.randint(1, 10): levels 1..9 of PARAMETER_MAX 10
NO_MAGNITUDE_OPS = frozenset({"AutoContrast", "Equalize", "Identity"})  # magnitude None (NaN in a row)


class ReferenceOp(NamedTuple):
    """A reference op: magnitude ~ U(low, high); (0, 0) for the ops without one."""

    name: str
    low: float
    high: float


class OfficialOp(NamedTuple):
    """An official op: level 1..9 -> magnitude (None: no magnitude), negated with p=0.5 when signed."""

    name: str
    level: Callable[[int], float] | None
    signed: bool


def _enhance_level(level: int) -> float:
    """Official enhance factor 0.1 + 0.18 * level (brightens as well as darkens)."""
    return level * 1.8 / 10 + 0.1


def _posterize_level(level: int) -> int:
    """Official bits kept: 4 - int(0.4 * level), i.e. 4..1 bits."""
    return 4 - int(level * 4 / 10)


def _rotate_level(level: int) -> int:
    """Official whole degrees: int(3 * level)."""
    return int(level * 30 / 10)


def _shear_level(level: int) -> float:
    """Official shear factor 0.03 * level."""
    return float(level) * 0.3 / 10


def _translate_level(level: int) -> int:
    """Official shift in pixels equals the level (whatever the image size)."""
    return int(level * 10 / 10)


def _solarize_level(level: int) -> int:
    """Official threshold 256 - int(25.6 * level)."""
    return 256 - int(level * 256 / 10)


REFERENCE_OPS: tuple[ReferenceOp, ...] = (  # its order: the op index of both variants (OP_NAMES)
    ReferenceOp("AutoContrast", 0.0, 0.0),
    ReferenceOp("Brightness", 0.05, 0.95),
    ReferenceOp("Color", 0.05, 0.95),
    ReferenceOp("Contrast", 0.05, 0.95),
    ReferenceOp("Equalize", 0.0, 0.0),
    ReferenceOp("Identity", 0.0, 0.0),
    ReferenceOp("Posterize", 4.0, 8.0),
    ReferenceOp("Rotate", -30.0, 30.0),
    ReferenceOp("Sharpness", 0.05, 0.95),
    ReferenceOp("ShearX", -0.3, 0.3),
    ReferenceOp("ShearY", -0.3, 0.3),
    ReferenceOp("Solarize", 0.0, 256.0),
    ReferenceOp("TranslateX", -0.3, 0.3),  # a fraction of the width
    ReferenceOp("TranslateY", -0.3, 0.3),  # a fraction of the height
)

OFFICIAL_OPS: tuple[OfficialOp, ...] = (  # its own order, which its draws index
    OfficialOp("Identity", None, False),
    OfficialOp("AutoContrast", None, False),
    OfficialOp("Equalize", None, False),
    OfficialOp("Rotate", _rotate_level, True),
    OfficialOp("Solarize", _solarize_level, False),
    OfficialOp("Color", _enhance_level, False),
    OfficialOp("Contrast", _enhance_level, False),
    OfficialOp("Brightness", _enhance_level, False),
    OfficialOp("Sharpness", _enhance_level, False),
    OfficialOp("ShearX", _shear_level, True),
    OfficialOp("TranslateX", _translate_level, True),  # pixels
    OfficialOp("TranslateY", _translate_level, True),
    OfficialOp("Posterize", _posterize_level, False),
    OfficialOp("ShearY", _shear_level, True),
)

OP_NAMES: tuple[str, ...] = tuple(op.name for op in REFERENCE_OPS)  # op index = position here, in both variants
OP_INDEX = {name: i for i, name in enumerate(OP_NAMES)}
NO_OP = -1  # op slot left empty (official variant: an op drawn but not applied)
assert {op.name for op in OFFICIAL_OPS} == set(OP_NAMES)


def op_names_reference() -> list[str]:
    """Names of the reference ops, in table order."""
    return [op.name for op in REFERENCE_OPS]


def op_names_official() -> list[str]:
    """Names of the official ops, in table order."""
    return [op.name for op in OFFICIAL_OPS]


# ---------------------------------------------------------------- one sample, random.Random


def draw_flip_crop(rng: random.Random, pad: int, flip: bool) -> tuple[bool, int, int]:
    """(flipped, crop left, crop top): flip with p=0.5 if ``flip``, then offsets 0..2*pad in the padded image
    (pad means no shift), as torchvision RandomHorizontalFlip + RandomCrop; no offset draws without padding."""
    flipped = flip and rng.random() < FLIP_P
    if pad == 0:
        return flipped, 0, 0
    return flipped, rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)


def draw_reference_ops(rng: random.Random, n: int) -> SampledOps:
    """n (name, magnitude) pairs with replacement; magnitude None for ops without one."""
    check_rng(rng)
    picks = rng.choices(REFERENCE_OPS, k=n)
    return [(op.name, None if op.name in NO_MAGNITUDE_OPS else op.low + (op.high - op.low) * rng.random()) for op in picks]


def draw_official_ops(rng: random.Random, n: int) -> SampledOps:
    """n ops and levels; only the applied ones are returned, as (name, signed magnitude or None)."""
    check_rng(rng)
    drawn = []
    for op in rng.choices(OFFICIAL_OPS, k=n):
        level = rng.randint(1, OFFICIAL_MAX_LEVEL)
        if rng.random() >= APPLY_P:
            continue
        magnitude = None if op.level is None else op.level(level)
        if op.signed and rng.random() < NEGATE_P:
            magnitude = -magnitude
        drawn.append((op.name, magnitude))
    return drawn


def draw_cutout_side(rng: random.Random, fraction: float, width: int) -> int:
    """Reference Cutout side in pixels: U(0, fraction) * width, rounded."""
    check_rng(rng)
    return round(fraction * rng.random() * width)


def official_cutout_side(width: int) -> int:
    """Official Cutout is 16 px on 32 px images: keep that fraction of the width."""
    return round(width * 16 / 32)


def cutout_box(size: tuple[int, int], side: int, rng: random.Random) -> Box:
    """Draw a centre pixel uniformly; return the (left, top, right, bottom) square clipped to the image."""
    check_rng(rng)
    w, h = size
    cx, cy = rng.randrange(w), rng.randrange(h)
    x0, y0 = cx - side // 2, cy - side // 2
    return max(0, x0), max(0, y0), min(w, x0 + side), min(h, y0 + side)


def draw_reference(rng: random.Random, n: int, cutout: float, size: tuple[int, int]) -> tuple[SampledOps, Box]:
    """Reference RandAugment: its ops, then its Cutout's side and box."""
    ops = draw_reference_ops(rng, n)
    return ops, cutout_box(size, draw_cutout_side(rng, cutout, size[0]), rng)


@dataclass(frozen=True)
class Draws:
    """One sample's choices for one view; the weak view has no box (all 0) and no ops."""

    flip: bool
    left: int
    top: int
    box: Box
    ops: SampledOps


# ---------------------------------------------------------------- parameter rows


@dataclass(frozen=True)
class Layout:
    """Columns of one view's parameter row: flip, crop left/top, Cutout box, then n op ids and n magnitudes.

    Parameters travel as one float64 tensor per view, one row per sample, so a batch dict of plain tensors
    can carry them to the device. The crop offsets index the padded image (0..2*pad; pad means no shift).
    The Cutout box is (x0, y0, x1, y1), right/bottom exclusive, empty when x1 <= x0. An empty op slot has
    id -1; an op without magnitude has NaN.
    """

    n_ops: int

    FLIP, LEFT, TOP, BOX = 0, 1, 2, slice(3, 7)
    OPS_START = 7

    @property
    def ops(self) -> slice:
        return slice(self.OPS_START, self.OPS_START + self.n_ops)

    @property
    def mags(self) -> slice:
        return slice(self.OPS_START + self.n_ops, self.OPS_START + 2 * self.n_ops)

    @property
    def width(self) -> int:
        return self.OPS_START + 2 * self.n_ops

    def row(self, d: Draws) -> list[float]:
        """One sample's draws as a list of numbers (ints and op ids are exact in float64)."""
        empty = self.n_ops - len(d.ops)
        if empty < 0:
            raise ValueError(f"{len(d.ops)} ops drawn but the layout has {self.n_ops} slots")
        row = [d.flip, d.left, d.top, *d.box]
        row += [OP_INDEX[name] for name, _ in d.ops]
        row += [NO_OP] * empty
        row += [math.nan if m is None else m for _, m in d.ops]
        row += [math.nan] * empty
        return row


class ViewDraws:
    """The draws of one view: ``variant`` None is the weak view, "reference" / "official" the strong ones.

    The order of the draws is the PIL views' order of operations: reference RandAugment and its Cutout
    before the flip and crop; official flip and crop, RandAugment, then Cutout. ``n_ops`` and ``cutout``
    (the reference's Cutout fraction) come from the RandAugment settings."""

    def __init__(self, variant: str | None, pad: int, flip: bool, n_ops: int = 0, cutout: float = 0.0) -> None:
        self.variant, self.pad, self.flip, self.n_ops, self.cutout = variant, pad, flip, n_ops, cutout
        self.layout = Layout(0 if variant is None else n_ops)

    def draw(self, rng: random.Random, size: tuple[int, int]) -> Draws:
        """One sample's draws from its own generator; ``size`` is the image's (width, height)."""
        check_rng(rng)
        if self.variant is None:
            return Draws(*draw_flip_crop(rng, self.pad, self.flip), (0, 0, 0, 0), [])
        if self.variant == "reference":
            ops, box = draw_reference(rng, self.n_ops, self.cutout, size)
            return Draws(*draw_flip_crop(rng, self.pad, self.flip), box, ops)
        flip_crop = draw_flip_crop(rng, self.pad, self.flip)
        ops = draw_official_ops(rng, self.n_ops)
        return Draws(*flip_crop, cutout_box(size, official_cutout_side(size[0]), rng), ops)

    def row(self, rng: random.Random, size: tuple[int, int]) -> list[float]:
        """:meth:`draw` as a parameter row."""
        return self.layout.row(self.draw(rng, size))

    def rows_torch(self, n: int, size: tuple[int, int], generator: torch.Generator) -> Tensor:
        """Parameter rows of ``n`` samples from a torch.Generator (on its device): the distributions of :meth:`draw`."""
        w, h = size
        g = dict(generator=generator, device=generator.device)
        out = torch.full((n, self.layout.width), math.nan, dtype=torch.float64, device=generator.device)
        out[:, Layout.FLIP] = (torch.rand(n, dtype=torch.float64, **g) < FLIP_P) if self.flip else 0.0
        out[:, Layout.LEFT] = torch.randint(0, 2 * self.pad + 1, (n,), **g)
        out[:, Layout.TOP] = torch.randint(0, 2 * self.pad + 1, (n,), **g)
        out[:, Layout.BOX] = 0.0
        if self.variant is None:
            return out
        if self.variant == "reference":
            ids, mags = _reference_ops_torch(n, self.n_ops, g)
            side = torch.round(self.cutout * torch.rand(n, dtype=torch.float64, **g) * w)
        else:
            ids, mags = _official_ops_torch(n, self.n_ops, g)
            side = torch.full((n,), float(official_cutout_side(w)), dtype=torch.float64, device=generator.device)
        out[:, Layout.BOX] = _cutout_boxes_torch(side, w, h, g)
        out[:, self.layout.ops] = ids
        out[:, self.layout.mags] = mags
        return out


# ---------------------------------------------------------------- a batch, torch.Generator


def _tabled(values: Sequence, dtype: torch.dtype, device: torch.device) -> Tensor:
    return cached_tensor(tuple(values), dtype, device)


def _reference_ops_torch(n: int, n_ops: int, g: dict) -> tuple[Tensor, Tensor]:
    """(ids, magnitudes) (n, n_ops): ops uniform over the table; magnitude low + (high - low) * U, NaN for none."""
    dev = g["device"]
    low = _tabled([op.low for op in REFERENCE_OPS], torch.float64, dev)
    high = _tabled([op.high for op in REFERENCE_OPS], torch.float64, dev)
    none = _tabled([op.name in NO_MAGNITUDE_OPS for op in REFERENCE_OPS], torch.bool, dev)
    picks = torch.randint(0, len(REFERENCE_OPS), (n, n_ops), **g)
    u = torch.rand(n, n_ops, dtype=torch.float64, **g)
    mags = low[picks] + (high[picks] - low[picks]) * u
    ids = _tabled([OP_INDEX[op.name] for op in REFERENCE_OPS], torch.int64, dev)[picks]
    return ids.to(torch.float64), torch.where(none[picks], math.nan, mags)


def _official_ops_torch(n: int, n_ops: int, g: dict) -> tuple[Tensor, Tensor]:
    """(ids, magnitudes) (n, n_ops): each op applied with p=0.5 at level 1..9, negated with p=0.5 where
    signed; the applied ones first, in their order, as :func:`draw_official_ops` returns only those."""
    dev = g["device"]
    levels = range(1, OFFICIAL_MAX_LEVEL + 1)
    by_level = _tabled([tuple(math.nan if op.level is None else float(op.level(lv)) for lv in levels) for op in OFFICIAL_OPS], torch.float64, dev)
    signed = _tabled([op.signed for op in OFFICIAL_OPS], torch.bool, dev)
    picks = torch.randint(0, len(OFFICIAL_OPS), (n, n_ops), **g)
    level = torch.randint(0, OFFICIAL_MAX_LEVEL, (n, n_ops), **g)
    applied = torch.rand(n, n_ops, dtype=torch.float64, **g) < APPLY_P
    negative = (torch.rand(n, n_ops, dtype=torch.float64, **g) < NEGATE_P) & signed[picks]
    mags = torch.where(negative, -1.0, 1.0) * by_level[picks, level]
    ids = _tabled([OP_INDEX[op.name] for op in OFFICIAL_OPS], torch.int64, dev)[picks].to(torch.float64)
    order = torch.argsort((~applied).to(torch.int8), dim=1, stable=True)  # applied ops keep their order, first
    ids = torch.where(applied, ids, float(NO_OP)).gather(1, order)
    mags = torch.where(applied, mags, math.nan).gather(1, order)
    return ids, mags


def _cutout_boxes_torch(side: Tensor, w: int, h: int, g: dict) -> Tensor:
    """(n, 4) boxes of :func:`cutout_box`: a uniform centre pixel, the square clipped to the image."""
    n = side.shape[0]
    cx = torch.randint(0, w, (n,), **g).to(torch.float64)
    cy = torch.randint(0, h, (n,), **g).to(torch.float64)
    x0, y0 = cx - torch.div(side, 2, rounding_mode="floor"), cy - torch.div(side, 2, rounding_mode="floor")
    return torch.stack([x0.clamp(min=0), y0.clamp(min=0), (x0 + side).clamp(max=w), (y0 + side).clamp(max=h)], 1)
