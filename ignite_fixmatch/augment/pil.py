"""Per-image PIL augmentation for FixMatch: weak view, strong view (RandAugment + Cutout).

The weak view flips and shifts; the strong view adds RandAugment and Cutout (FixMatch, Sohn et al. 2020,
Section 2.3). What is drawn, with which ranges and in which order, is :mod:`.draws`; this module applies
it with Pillow and is the reference for correctness of the batched path (:mod:`.views`).

Every random choice is drawn from an explicit ``random.Random`` passed by the caller, never from the
global ``random``, numpy or torch generators: the caller seeds one generator per sample, so a resumed run
or a different number of data-loader workers produces the same images.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision.transforms import functional as TF

from ignite_fixmatch.augment.common import (
    FILL_REFERENCE,
    VARIANTS,
    Fill,
    check_fill,
    check_flip,
    check_image,
    check_int,
    check_mean_std,
    check_pad,
    check_rng,
    fill_values,
)
from ignite_fixmatch.augment.draws import (
    OFFICIAL_OPS,
    REFERENCE_OPS,
    Box,
    Magnitude,
    SampledOps,
    ViewDraws,
    cutout_box,
    draw_cutout_side,
    draw_flip_crop,
    draw_official_ops,
    draw_reference,
    draw_reference_ops,
)

Op = Callable[[Image.Image, Magnitude, Fill], Image.Image]


def fill_for(img: Image.Image, fill: Fill) -> int | tuple[int, ...]:
    """The fill in the form PIL takes for the image's mode: "L" one int, "RGB" a triple."""
    values = fill_values(fill, 1 if img.mode == "L" else 3)
    return values[0] if img.mode == "L" else values


# ---------------------------------------------------------------- primitive ops
# All ops share the signature (img, magnitude, fill) so the tables below can hold them uniformly.
# Geometric ops use nearest resampling and PIL's affine convention, as both implementations do.


def identity(img: Image.Image, v: Magnitude, fill: Fill) -> Image.Image:
    """Leave the image alone (one of the 14 RandAugment choices)."""
    return img


def auto_contrast(img: Image.Image, v: Magnitude, fill: Fill) -> Image.Image:
    """Stretch each channel to the full 0..255 range."""
    return ImageOps.autocontrast(img)


def equalize(img: Image.Image, v: Magnitude, fill: Fill) -> Image.Image:
    """Equalise each channel's histogram."""
    return ImageOps.equalize(img)


def brightness(img: Image.Image, v: Magnitude, fill: Fill) -> Image.Image:
    """Blend with black: factor < 1 darkens, > 1 brightens."""
    return ImageEnhance.Brightness(img).enhance(v)


def color(img: Image.Image, v: Magnitude, fill: Fill) -> Image.Image:
    """Blend with the greyscale image: factor < 1 desaturates (no-op on "L")."""
    return ImageEnhance.Color(img).enhance(v)


def contrast(img: Image.Image, v: Magnitude, fill: Fill) -> Image.Image:
    """Blend with the mean grey: factor < 1 lowers contrast."""
    return ImageEnhance.Contrast(img).enhance(v)


def sharpness(img: Image.Image, v: Magnitude, fill: Fill) -> Image.Image:
    """Blend with a smoothed image: factor < 1 blurs, > 1 sharpens."""
    return ImageEnhance.Sharpness(img).enhance(v)


def posterize(img: Image.Image, v: Magnitude, fill: Fill) -> Image.Image:
    """Keep int(v) high bits per channel (at least 1), as the reference truncates its float draw."""
    return ImageOps.posterize(img, max(1, min(8, int(v))))


def solarize(img: Image.Image, v: Magnitude, fill: Fill) -> Image.Image:
    """Invert pixels at or above threshold v: 0 inverts everything, 256 nothing."""
    return ImageOps.solarize(img, v)


def rotate(img: Image.Image, v: Magnitude, fill: Fill) -> Image.Image:
    """Rotate by v degrees counter-clockwise about the centre, keeping the size."""
    return img.rotate(v, fillcolor=fill_for(img, fill))


def _affine(img: Image.Image, data: tuple[float, ...], fill: Fill) -> Image.Image:
    """PIL affine: output pixel (x, y) samples input (a x + b y + c, d x + e y + f)."""
    return img.transform(img.size, Image.Transform.AFFINE, data, fillcolor=fill_for(img, fill))


def shear_x(img: Image.Image, v: Magnitude, fill: Fill) -> Image.Image:
    """Shear along x by factor v."""
    return _affine(img, (1, v, 0, 0, 1, 0), fill)


def shear_y(img: Image.Image, v: Magnitude, fill: Fill) -> Image.Image:
    """Shear along y by factor v."""
    return _affine(img, (1, 0, 0, v, 1, 0), fill)


def translate_x(img: Image.Image, v: Magnitude, fill: Fill) -> Image.Image:
    """Shift by v pixels along x (positive v moves the content left, PIL's convention)."""
    return _affine(img, (1, 0, v, 0, 1, 0), fill)


def translate_y(img: Image.Image, v: Magnitude, fill: Fill) -> Image.Image:
    """Shift by v pixels along y (positive v moves the content up)."""
    return _affine(img, (1, 0, 0, 0, 1, v), fill)


def translate_x_fraction(img: Image.Image, v: Magnitude, fill: Fill) -> Image.Image:
    """Reference TranslateX: v is a fraction of the width."""
    return translate_x(img, v * img.size[0], fill)


def translate_y_fraction(img: Image.Image, v: Magnitude, fill: Fill) -> Image.Image:
    """Reference TranslateY: v is a fraction of the height."""
    return translate_y(img, v * img.size[1], fill)


# ---------------------------------------------------------------- op tables: the draws' ops, applied with PIL

OFFICIAL_PIL_OPS: dict[str, Op] = {
    "AutoContrast": auto_contrast, "Brightness": brightness, "Color": color, "Contrast": contrast, "Equalize": equalize,
    "Identity": identity, "Posterize": posterize, "Rotate": rotate, "Sharpness": sharpness, "ShearX": shear_x,
    "ShearY": shear_y, "Solarize": solarize, "TranslateX": translate_x, "TranslateY": translate_y,
}
REFERENCE_PIL_OPS: dict[str, Op] = {**OFFICIAL_PIL_OPS, "TranslateX": translate_x_fraction, "TranslateY": translate_y_fraction}


def randaugment_ops_reference() -> list[tuple[str, Op, float, float]]:
    """The reference's 14 ops as (name, op, low, high); magnitude ~ U(low, high), (0, 0) for none."""
    return [(op.name, REFERENCE_PIL_OPS[op.name], op.low, op.high) for op in REFERENCE_OPS]


def randaugment_ops_official() -> list[tuple[str, Op, Callable[[int], float] | None, bool]]:
    """The official 14 ops (its order) as (name, op, level -> magnitude or None, random sign?)."""
    return [(op.name, OFFICIAL_PIL_OPS[op.name], op.level, op.signed) for op in OFFICIAL_OPS]


def _apply(table: dict[str, Op], img: Image.Image, ops: SampledOps, fill: Fill) -> Image.Image:
    """Apply already drawn (name, magnitude) pairs in order; no randomness here."""
    check_image(img)
    for name, magnitude in ops:
        if name not in table:
            raise ValueError(f"unknown op {name!r}; known ops: {sorted(table)}")
        img = table[name](img, magnitude, fill)
    return img


# ---------------------------------------------------------------- cutout


def fill_box(img: Image.Image, box: Box, fill: Fill) -> Image.Image:
    """Return a copy with box (right/bottom exclusive) painted in fill; the input stays untouched."""
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        return img
    out = img.copy()
    out.paste(fill_for(out, fill), box)
    return out


def cutout(img: Image.Image, side: int, rng: random.Random, fill: Fill) -> Image.Image:
    """Cutout: a `side` x `side` square centred at a uniform pixel, clipped to the image, filled grey."""
    check_image(img)
    if isinstance(side, bool) or not isinstance(side, int) or side < 0:
        raise ValueError(f"side must be an integer >= 0, got {side!r}")
    return fill_box(img, cutout_box(img.size, side, rng), fill)


# ---------------------------------------------------------------- RandAugment


class RandAugmentReference:
    """Reference RandAugment: n ops with replacement, always applied, uniform magnitudes, then Cutout."""

    def __init__(self, n: int = 3, cutout: float = 0.5, fill: Fill = FILL_REFERENCE, affine_fill: Fill = 0):
        """`affine_fill` fills the corners uncovered by Rotate/Shear/Translate: black, as PIL's default in the reference."""
        self.n = check_int("n", n, 1)
        if isinstance(cutout, bool) or not isinstance(cutout, (int, float)) or not 0.0 <= cutout <= 1.0:
            raise ValueError(f"cutout must be a fraction of the width in [0, 1], got {cutout!r}")
        self.cutout = float(cutout)
        self.fill = check_fill("fill", fill)
        self.affine_fill = check_fill("affine_fill", affine_fill)

    def sample_ops(self, rng: random.Random) -> SampledOps:
        """Draw n (name, magnitude) pairs; magnitude None for ops without one."""
        return draw_reference_ops(rng, self.n)

    def apply_ops(self, img: Image.Image, ops: SampledOps) -> Image.Image:
        """Apply drawn ops in order (no Cutout)."""
        return _apply(REFERENCE_PIL_OPS, img, ops, self.affine_fill)

    def sample_cutout_side(self, width: int, rng: random.Random) -> int:
        """Cutout side in pixels: U(0, cutout) * width, rounded."""
        return draw_cutout_side(rng, self.cutout, width)

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        """Draw and apply the ops, then a Cutout of random size."""
        ops, box = draw_reference(rng, self.n, self.cutout, img.size)
        return fill_box(self.apply_ops(img, ops), box, self.fill)


class RandAugmentOfficial:
    """Official RandAugment ("rac" without its Cutout): n ops, each applied with p=0.5, level 1..9."""

    def __init__(self, n: int = 2, fill: Fill = FILL_REFERENCE, affine_fill: Fill | None = None):
        """`affine_fill` None uses `fill`: official fills uncovered corners with mid-grey (0 in its [-1, 1] scale)."""
        self.n = check_int("n", n, 1)
        self.fill = check_fill("fill", fill)
        self.affine_fill = self.fill if affine_fill is None else check_fill("affine_fill", affine_fill)

    def sample_ops(self, rng: random.Random) -> SampledOps:
        """Draw n ops and levels; return only the applied ones as (name, signed magnitude or None)."""
        return draw_official_ops(rng, self.n)

    def apply_ops(self, img: Image.Image, ops: SampledOps) -> Image.Image:
        """Apply drawn ops in order."""
        return _apply(OFFICIAL_PIL_OPS, img, ops, self.affine_fill)

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        """Draw and apply the ops (the fixed Cutout belongs to StrongView, after flip and crop)."""
        return self.apply_ops(img, self.sample_ops(rng))


# ---------------------------------------------------------------- flip, crop, tensor


def flip_crop(img: Image.Image, flipped: bool, left: int, top: int, pad: int, pad_mode: str) -> Image.Image:
    """Apply drawn flip and crop: flip, pad by `pad` px (constant: black, as in the reference), crop at (left, top)."""
    if flipped:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if pad == 0:
        return img
    w, h = img.size
    padded = TF.pad(img, [pad], fill=0, padding_mode=pad_mode)
    return padded.crop((left, top, left + w, top + h))


def pad_crop_flip(
    img: Image.Image, rng: random.Random, pad: int, pad_mode: str = "constant", flip: bool = True
) -> Image.Image:
    """Horizontal flip with p=0.5 (if flip), then pad by `pad` px and crop back to the input size.

    Same order and offsets (0..2*pad inclusive) as torchvision RandomHorizontalFlip + RandomCrop.
    """
    check_image(img)
    check_rng(rng)
    check_pad(pad, pad_mode)
    check_flip(flip)
    return flip_crop(img, *draw_flip_crop(rng, pad, flip), pad, pad_mode)


def to_normalized_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL -> float32 CHW in [0, 1] -> (x - mean) / std per channel (mean/std as fractions of 255)."""
    tensor = TF.to_tensor(img)
    if len(mean) != tensor.shape[0] or len(std) != tensor.shape[0]:
        raise ValueError(
            f"mean and std need one value per channel ({tensor.shape[0]} for mode {img.mode!r}), "
            f"got mean={tuple(mean)!r}, std={tuple(std)!r}"
        )
    return TF.normalize(tensor, list(mean), list(std))


class WeakView:
    """Weak augmentation: flip (if flip) + pad/crop, then a normalised float tensor CHW."""

    def __init__(self, pad: int, pad_mode: str, flip: bool, mean: Sequence[float], std: Sequence[float]):
        check_pad(pad, pad_mode)
        self.pad, self.pad_mode, self.flip = pad, pad_mode, check_flip(flip)
        self.mean, self.std = check_mean_std(mean, std)

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        img = pad_crop_flip(img, rng, self.pad, self.pad_mode, self.flip)
        return to_normalized_tensor(img, self.mean, self.std)


class StrongView:
    """Strong augmentation in either variant's order, then a normalised float tensor CHW.

    reference: RandAugmentReference (with its Cutout) -> flip + crop.
    official: flip + crop -> RandAugmentOfficial -> Cutout of side 16/32 of the width.
    """

    def __init__(
        self,
        variant: str,
        pad: int,
        pad_mode: str,
        flip: bool,
        mean: Sequence[float],
        std: Sequence[float],
        fill: Fill = FILL_REFERENCE,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        check_pad(pad, pad_mode)
        self.variant = variant
        self.pad, self.pad_mode, self.flip = pad, pad_mode, check_flip(flip)
        self.mean, self.std = check_mean_std(mean, std)
        self.fill = check_fill("fill", fill)
        self.randaugment: RandAugmentReference | RandAugmentOfficial
        if variant == "reference":
            self.randaugment = RandAugmentReference(fill=self.fill)
            self.draws = ViewDraws(variant, pad, self.flip, self.randaugment.n, self.randaugment.cutout)
        else:
            self.randaugment = RandAugmentOfficial(fill=self.fill)
            self.draws = ViewDraws(variant, pad, self.flip, self.randaugment.n)

    def augment(self, img: Image.Image, rng: random.Random) -> Image.Image:
        """The augmented PIL image before normalisation (useful to look at)."""
        check_image(img)
        d = self.draws.draw(rng, img.size)
        if self.variant == "reference":
            img = fill_box(self.randaugment.apply_ops(img, d.ops), d.box, self.fill)
            return flip_crop(img, d.flip, d.left, d.top, self.pad, self.pad_mode)
        img = flip_crop(img, d.flip, d.left, d.top, self.pad, self.pad_mode)
        return fill_box(self.randaugment.apply_ops(img, d.ops), d.box, self.fill)

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        return to_normalized_tensor(self.augment(img, rng), self.mean, self.std)
