"""CTAugment's op table (google-research/fixmatch, ``libml/ctaugment.py``): names, bins and the Cutout box.

Torch-free, so the policy's shape (how many weights, which op has which parameters) can be read without
importing torch. Applying the ops is :mod:`.ctaugment_ops`.
"""

from __future__ import annotations

from typing import NamedTuple


class CTAOp(NamedTuple):
    """One op: its official name and the number of bins of each of its parameters (magnitudes in [0, 1])."""

    name: str
    bins: tuple[int, ...]


CTA_OPS: tuple[CTAOp, ...] = (  # the official registration order (op ids index this tuple)
    CTAOp("autocontrast", (17,)),
    CTAOp("blur", (17,)),
    CTAOp("brightness", (17,)),
    CTAOp("color", (17,)),
    CTAOp("contrast", (17,)),
    CTAOp("cutout", (17,)),
    CTAOp("equalize", (17,)),
    CTAOp("invert", (17,)),
    CTAOp("identity", ()),
    CTAOp("posterize", (8,)),
    CTAOp("rescale", (17, 6)),
    CTAOp("rotate", (17,)),
    CTAOp("sharpness", (17,)),
    CTAOp("shear_x", (17,)),
    CTAOp("shear_y", (17,)),
    CTAOp("smooth", (17,)),
    CTAOp("solarize", (17,)),
    CTAOp("translate_x", (17,)),
    CTAOp("translate_y", (17,)),
)
CTA_OP_INDEX: dict[str, int] = {op.name: i for i, op in enumerate(CTA_OPS)}
MAX_PARAMS = 2  # rescale (scale, method); every other op has at most one
CUTOUT_GREY = 127  # the official Cutout paints (127, 127, 127); one channel: 127
RESCALE_METHODS = ("lanczos", "bicubic", "bilinear", "box", "hamming", "nearest")  # official order, picked by int(method * 5.99)


def cutout_side(size: tuple[int, int], level: float) -> int:
    """The official ``1 + int(level * min(w, h) * 0.499)``: 16 at level 1 on 32x32, 1 (an empty box) at level 0."""
    return 1 + int(level * min(size) * 0.499)


def cutout_box(size: tuple[int, int], level: float, cx: int, cy: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), right/bottom exclusive, of the official Cutout centred at (cx, cy) on an image of
    ``size`` (w, h): ``side // 2`` either side of the centre, clipped to the image (so an odd side paints
    ``side - 1`` pixels, as the official loop does)."""
    w, h = size
    half = cutout_side(size, level) // 2
    return max(0, cx - half), max(0, cy - half), min(w, cx + half), min(h, cy + half)
