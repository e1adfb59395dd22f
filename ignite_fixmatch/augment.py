"""Per-image PIL augmentation for FixMatch: weak view, strong view (RandAugment + Cutout).

Every random choice is drawn from an explicit ``random.Random`` passed by the caller, never from
the global ``random``, numpy or torch generators: the caller seeds one generator per sample, so a
resumed run or a different number of data-loader workers produces the same images.

Two strong-augmentation variants are offered (see FIXMATCH.md, "Augmentation"):

* ``reference`` (LeeDoYup/FixMatch-pytorch, the default): 3 ops drawn with replacement from 14,
  each always applied with a magnitude uniform in its range, then Cutout of side U(0, 0.5) * width
  filled grey; all of it before flip and crop.
* ``official`` (google-research/fixmatch, RandAugment "rac"): 2 ops, each applied with
  probability 0.5 at an integer level 1..9 of 10; this runs after flip and crop and is followed
  by a fixed Cutout of side 16/32 of the width.

Drawing (``sample_ops``) and applying (``apply_ops``) are separate so that a batched tensor
implementation can reuse the same draws.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence, Union

import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision.transforms import functional as TF

FILL_REFERENCE = (125, 123, 114)  # grey used by Cutout (about the CIFAR-10 mean)
VARIANTS = ("reference", "official")
PAD_MODES = ("constant", "reflect", "edge", "symmetric")
IMAGE_MODES = ("RGB", "L")
OFFICIAL_MAX_LEVEL = 9  # official draws np.random.randint(1, 10): levels 1..9 of PARAMETER_MAX 10

Fill = Union[int, Sequence[int]]
Magnitude = Union[float, None]
Op = Callable[[Image.Image, Magnitude, Fill], Image.Image]
SampledOps = list[tuple[str, Magnitude]]

# Ops that take no magnitude: sample_ops reports None for them.
NO_MAGNITUDE_OPS = frozenset({"AutoContrast", "Equalize", "Identity"})


# ---------------------------------------------------------------- checks


def _check_rng(rng: object) -> None:
    """Refuse anything but a Random instance: passing the `random` module would silently use global state."""
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random instance, got {type(rng).__name__}: {rng!r}")


def _check_image(img: object) -> None:
    """Fail early on modes the ops and fills are not written for (palette, RGBA, 16-bit)."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"img must be a PIL.Image.Image, got {type(img).__name__}")
    if img.mode not in IMAGE_MODES:
        raise ValueError(f"img.mode must be one of {IMAGE_MODES}, got {img.mode!r}; convert it first")


def _check_int(name: str, value: object, minimum: int) -> int:
    """Config values arrive from YAML/CLI: reject bools, floats and strings with a clear message."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_pad(pad: object, pad_mode: object) -> None:
    """Validate padding arguments once, at construction, rather than on every image."""
    _check_int("pad", pad, 0)
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")


def _check_flip(flip: object) -> bool:
    """A string such as "False" is truthy: the reference's type=bool defect, refused here."""
    if not isinstance(flip, bool):
        raise ValueError(f"flip must be a bool, got {flip!r}")
    return flip


def _check_fill(name: str, fill: object) -> Fill:
    """A fill is one grey level or an RGB triple of 0..255 integers."""
    values = [fill] if isinstance(fill, int) and not isinstance(fill, bool) else fill
    ok = isinstance(values, (list, tuple)) and len(values) in (1, 3) and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in values
    )
    if not ok:
        raise ValueError(f"{name} must be an int or a 3-tuple of ints in 0..255, got {fill!r}")
    return fill if isinstance(fill, int) else tuple(fill)


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
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


def fill_for(img: Image.Image, fill: Fill) -> Union[int, tuple[int, ...]]:
    """Adapt a fill to the image mode: "L" takes one int (mean of a triple), "RGB" a triple."""
    if img.mode == "L":
        return fill if isinstance(fill, int) else int(round(sum(fill) / len(fill)))
    if isinstance(fill, int):
        return (fill, fill, fill)
    return tuple(fill) if len(fill) == 3 else (fill[0],) * 3


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


# ---------------------------------------------------------------- op tables


def randaugment_ops_reference() -> list[tuple[str, Op, float, float]]:
    """The reference's 14 ops as (name, op, low, high); magnitude ~ U(low, high), (0, 0) for none."""
    return [
        ("AutoContrast", auto_contrast, 0.0, 0.0),
        ("Brightness", brightness, 0.05, 0.95),
        ("Color", color, 0.05, 0.95),
        ("Contrast", contrast, 0.05, 0.95),
        ("Equalize", equalize, 0.0, 0.0),
        ("Identity", identity, 0.0, 0.0),
        ("Posterize", posterize, 4.0, 8.0),
        ("Rotate", rotate, -30.0, 30.0),
        ("Sharpness", sharpness, 0.05, 0.95),
        ("ShearX", shear_x, -0.3, 0.3),
        ("ShearY", shear_y, -0.3, 0.3),
        ("Solarize", solarize, 0.0, 256.0),
        ("TranslateX", translate_x_fraction, -0.3, 0.3),
        ("TranslateY", translate_y_fraction, -0.3, 0.3),
    ]


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


def randaugment_ops_official() -> list[tuple[str, Op, Union[Callable[[int], float], None], bool]]:
    """The official 14 ops (its order) as (name, op, level -> magnitude or None, random sign?)."""
    return [
        ("Identity", identity, None, False),
        ("AutoContrast", auto_contrast, None, False),
        ("Equalize", equalize, None, False),
        ("Rotate", rotate, _rotate_level, True),
        ("Solarize", solarize, _solarize_level, False),
        ("Color", color, _enhance_level, False),
        ("Contrast", contrast, _enhance_level, False),
        ("Brightness", brightness, _enhance_level, False),
        ("Sharpness", sharpness, _enhance_level, False),
        ("ShearX", shear_x, _shear_level, True),
        ("TranslateX", translate_x, _translate_level, True),
        ("TranslateY", translate_y, _translate_level, True),
        ("Posterize", posterize, _posterize_level, False),
        ("ShearY", shear_y, _shear_level, True),
    ]


def op_names_reference() -> list[str]:
    """Names of the reference ops, in table order."""
    return [name for name, *_ in randaugment_ops_reference()]


def op_names_official() -> list[str]:
    """Names of the official ops, in table order."""
    return [name for name, *_ in randaugment_ops_official()]


def _apply(table: dict[str, Op], img: Image.Image, ops: SampledOps, fill: Fill) -> Image.Image:
    """Apply already drawn (name, magnitude) pairs in order; no randomness here."""
    _check_image(img)
    for name, magnitude in ops:
        if name not in table:
            raise ValueError(f"unknown op {name!r}; known ops: {sorted(table)}")
        img = table[name](img, magnitude, fill)
    return img


# ---------------------------------------------------------------- cutout


def cutout_box(size: tuple[int, int], side: int, rng: random.Random) -> tuple[int, int, int, int]:
    """Draw a centre pixel uniformly; return the (left, top, right, bottom) square clipped to the image."""
    _check_rng(rng)
    w, h = size
    cx, cy = rng.randrange(w), rng.randrange(h)
    x0, y0 = cx - side // 2, cy - side // 2
    return max(0, x0), max(0, y0), min(w, x0 + side), min(h, y0 + side)


def fill_box(img: Image.Image, box: tuple[int, int, int, int], fill: Fill) -> Image.Image:
    """Return a copy with box (right/bottom exclusive) painted in fill; the input stays untouched."""
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        return img
    out = img.copy()
    out.paste(fill_for(out, fill), box)
    return out


def cutout(img: Image.Image, side: int, rng: random.Random, fill: Fill) -> Image.Image:
    """Cutout: a `side` x `side` square centred at a uniform pixel, clipped to the image, filled grey."""
    _check_image(img)
    if isinstance(side, bool) or not isinstance(side, int) or side < 0:
        raise ValueError(f"side must be an integer >= 0, got {side!r}")
    return fill_box(img, cutout_box(img.size, side, rng), fill)


def official_cutout_side(width: int) -> int:
    """Official Cutout is 16 px on 32 px images: keep that fraction of the width."""
    return round(width * 16 / 32)


# ---------------------------------------------------------------- RandAugment


class RandAugmentReference:
    """Reference RandAugment: n ops with replacement, always applied, uniform magnitudes, then Cutout."""

    def __init__(self, n: int = 3, cutout: float = 0.5, fill: Fill = FILL_REFERENCE, affine_fill: Fill = 0):
        """`affine_fill` fills the corners uncovered by Rotate/Shear/Translate: black, as PIL's default in the reference."""
        self.n = _check_int("n", n, 1)
        if isinstance(cutout, bool) or not isinstance(cutout, (int, float)) or not 0.0 <= cutout <= 1.0:
            raise ValueError(f"cutout must be a fraction of the width in [0, 1], got {cutout!r}")
        self.cutout = float(cutout)
        self.fill = _check_fill("fill", fill)
        self.affine_fill = _check_fill("affine_fill", affine_fill)
        self._ops = [(name, low, high) for name, _, low, high in randaugment_ops_reference()]
        self._table = {name: op for name, op, _, _ in randaugment_ops_reference()}

    def sample_ops(self, rng: random.Random) -> SampledOps:
        """Draw n (name, magnitude) pairs; magnitude None for ops without one."""
        _check_rng(rng)
        picks = rng.choices(self._ops, k=self.n)
        return [
            (name, None if name in NO_MAGNITUDE_OPS else low + (high - low) * rng.random())
            for name, low, high in picks
        ]

    def apply_ops(self, img: Image.Image, ops: SampledOps) -> Image.Image:
        """Apply drawn ops in order (no Cutout)."""
        return _apply(self._table, img, ops, self.affine_fill)

    def sample_cutout_side(self, width: int, rng: random.Random) -> int:
        """Cutout side in pixels: U(0, cutout) * width, rounded."""
        _check_rng(rng)
        return round(self.cutout * rng.random() * width)

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        """Draw and apply the ops, then a Cutout of random size."""
        img = self.apply_ops(img, self.sample_ops(rng))
        return cutout(img, self.sample_cutout_side(img.size[0], rng), rng, self.fill)


class RandAugmentOfficial:
    """Official RandAugment ("rac" without its Cutout): n ops, each applied with p=0.5, level 1..9."""

    def __init__(self, n: int = 2, fill: Fill = FILL_REFERENCE, affine_fill: Union[Fill, None] = None):
        """`affine_fill` None uses `fill`: official fills uncovered corners with mid-grey (0 in its [-1, 1] scale)."""
        self.n = _check_int("n", n, 1)
        self.fill = _check_fill("fill", fill)
        self.affine_fill = self.fill if affine_fill is None else _check_fill("affine_fill", affine_fill)
        self._ops = [(name, to_mag, signed) for name, _, to_mag, signed in randaugment_ops_official()]
        self._table = {name: op for name, op, _, _ in randaugment_ops_official()}

    def sample_ops(self, rng: random.Random) -> SampledOps:
        """Draw n ops and levels; return only the applied ones as (name, signed magnitude or None)."""
        _check_rng(rng)
        drawn = []
        for name, to_mag, signed in rng.choices(self._ops, k=self.n):
            level = rng.randint(1, OFFICIAL_MAX_LEVEL)
            if rng.random() >= 0.5:
                continue
            magnitude = None if to_mag is None else to_mag(level)
            if signed and rng.random() < 0.5:
                magnitude = -magnitude
            drawn.append((name, magnitude))
        return drawn

    def apply_ops(self, img: Image.Image, ops: SampledOps) -> Image.Image:
        """Apply drawn ops in order."""
        return _apply(self._table, img, ops, self.affine_fill)

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        """Draw and apply the ops (the fixed Cutout belongs to StrongView, after flip and crop)."""
        return self.apply_ops(img, self.sample_ops(rng))


# ---------------------------------------------------------------- flip, crop, tensor


def pad_crop_flip(
    img: Image.Image, rng: random.Random, pad: int, pad_mode: str = "constant", flip: bool = True
) -> Image.Image:
    """Horizontal flip with p=0.5 (if flip), then pad by `pad` px and crop back to the input size.

    Same order and offsets (0..2*pad inclusive) as torchvision RandomHorizontalFlip + RandomCrop;
    constant padding is black, as in the reference.
    """
    _check_image(img)
    _check_rng(rng)
    _check_pad(pad, pad_mode)
    _check_flip(flip)
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if pad == 0:
        return img
    w, h = img.size
    padded = TF.pad(img, [pad], fill=0, padding_mode=pad_mode)
    left, top = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
    return padded.crop((left, top, left + w, top + h))


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
        _check_pad(pad, pad_mode)
        self.pad, self.pad_mode, self.flip = pad, pad_mode, _check_flip(flip)
        self.mean, self.std = _check_mean_std(mean, std)

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
        _check_pad(pad, pad_mode)
        self.variant = variant
        self.pad, self.pad_mode, self.flip = pad, pad_mode, _check_flip(flip)
        self.mean, self.std = _check_mean_std(mean, std)
        self.fill = _check_fill("fill", fill)
        if variant == "reference":
            self.randaugment = RandAugmentReference(fill=self.fill)
        else:
            self.randaugment = RandAugmentOfficial(fill=self.fill)

    def augment(self, img: Image.Image, rng: random.Random) -> Image.Image:
        """The augmented PIL image before normalisation (useful to look at)."""
        if self.variant == "reference":
            img = self.randaugment(img, rng)
            return pad_crop_flip(img, rng, self.pad, self.pad_mode, self.flip)
        img = pad_crop_flip(img, rng, self.pad, self.pad_mode, self.flip)
        img = self.randaugment(img, rng)
        return cutout(img, official_cutout_side(img.size[0]), rng, self.fill)

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        return to_normalized_tensor(self.augment(img, rng), self.mean, self.std)
