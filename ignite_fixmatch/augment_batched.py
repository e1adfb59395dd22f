"""Batched FixMatch augmentation on uint8 tensors (N, C, H, W): a whole batch at a time, CPU or GPU.

The per-image PIL path in :mod:`ignite_fixmatch.augment` stays the reference for correctness; this
module applies the *same* operations with the *same* parameter distributions to a batch:

* **Drawing** is separate from **applying**. :meth:`BatchedView.sample` draws one sample's
  parameters with the sample's own ``random.Random``, calling the PIL path's own samplers
  (``sample_ops``, ``sample_cutout_side``, ``cutout_box``) in the same order as ``WeakView`` /
  ``StrongView``: given the same seeded generator both paths make identical choices, so a run can
  switch path without changing what each sample gets, and resume stays exact. Draws cost a few
  microseconds per sample, no pixels. :meth:`BatchedView.sample_torch` draws the same distributions
  for a whole batch from a ``torch.Generator`` (on the GPU, for data that never leaves it).
* **Applying** (:meth:`BatchedView.__call__`) loops over the op slots and the 14 ops, never over
  images or pixels. With parameters on the CPU it groups the samples of each op by index; with
  parameters on a GPU it computes each op on the whole batch and selects with ``torch.where``, so
  the host never waits for the device.

Parameters travel as one float64 tensor per view, one row per sample (see :class:`Layout`), so a
batch dict of plain tensors can carry them to the device.

Agreement with PIL (checked op by op in tests/test_augment_batched.py): flips, crops, Cutout,
Identity, Solarize, Posterize, AutoContrast, Equalize, Brightness, Color, Contrast and Sharpness
reproduce Pillow's integer arithmetic (Rec. 601 fixed-point grey, float32 blend with truncation,
the SMOOTH kernel with rounding) and are bit-identical; Rotate/Shear/Translate use Pillow's
nearest-neighbour affine mapping (pixel centres, fill outside) in float64, equal except where a
source coordinate falls within rounding error of a pixel edge (Pillow accumulates coordinates
incrementally), i.e. a handful of pixels in a million.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ignite_fixmatch import augment as A

OP_NAMES: tuple[str, ...] = tuple(A.op_names_reference())  # op index = position here, in both variants
OP_INDEX = {name: i for i, name in enumerate(OP_NAMES)}
NO_OP = -1  # op slot left empty (official variant: an op drawn but not applied)
AFFINE_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
Params = Tensor  # (N, Layout.width) float64
GROUPINGS = ("auto", "index", "mask")


# ---------------------------------------------------------------- parameter layout


@dataclass(frozen=True)
class Layout:
    """Columns of one view's parameter row: flip, crop left/top, Cutout box, then n op ids and n magnitudes.

    The crop offsets index the padded image (0..2*pad; pad means no shift). The Cutout box is
    (x0, y0, x1, y1), right/bottom exclusive, empty when x1 <= x0. An empty op slot has id -1;
    an op without magnitude has NaN.
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

    def row(self, flip: bool, left: int, top: int, box: Sequence[int], ops: A.SampledOps) -> list[float]:
        """One sample's parameters as a list of floats (ints and op ids are exact in float64)."""
        if len(ops) > self.n_ops:
            raise ValueError(f"{len(ops)} ops drawn but the layout has {self.n_ops} slots")
        ids = [float(OP_INDEX[name]) for name, _ in ops] + [float(NO_OP)] * (self.n_ops - len(ops))
        mags = [math.nan if m is None else float(m) for _, m in ops] + [math.nan] * (self.n_ops - len(ops))
        return [float(flip), float(left), float(top), *map(float, box), *ids, *mags]


# ---------------------------------------------------------------- checks and conversions


def _check_batch(x: Tensor) -> None:
    """The ops are written for uint8 (N, C, H, W) with 1 or 3 channels, as the PIL path's L/RGB."""
    if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        dtype = x.dtype if isinstance(x, Tensor) else ""
        raise ValueError(f"images must be a uint8 tensor (N, C, H, W) with C in (1, 3), got {dtype} {shape}")


def pil_to_uint8(img) -> Tensor:
    """PIL image (RGB or L) -> uint8 tensor (C, H, W), the input of the batched path."""
    A._check_image(img)
    a = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
    return a.unsqueeze(0) if a.dim() == 2 else a.permute(2, 0, 1).contiguous()


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float], memory_format=torch.contiguous_format) -> Tensor:
    """uint8 (N, C, H, W) -> float32 (x / 255 - mean) / std: the same float ops as the PIL path's to_tensor + normalize."""
    _check_batch(x)
    mean_t, std_t = A._check_mean_std(mean, std)
    if len(mean_t) != x.shape[1]:
        raise ValueError(f"mean and std need one value per channel ({x.shape[1]}), got mean={mean_t!r}, std={std_t!r}")
    m = torch.tensor(mean_t, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std_t, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.to(torch.float32).div(255).sub(m).div(s).contiguous(memory_format=memory_format)


def fill_values(fill: A.Fill, channels: int) -> tuple[int, ...]:
    """The fill as one value per channel, as ``augment.fill_for`` adapts it to the PIL mode."""
    if channels == 1:
        return (fill if isinstance(fill, int) else int(round(sum(fill) / len(fill))),)
    if isinstance(fill, int):
        return (fill,) * 3
    return tuple(fill) if len(fill) == 3 else (fill[0],) * 3


def _fill_tensor(fill: A.Fill, x: Tensor) -> Tensor:
    return torch.tensor(fill_values(fill, x.shape[1]), dtype=torch.uint8, device=x.device).view(1, -1, 1, 1)


def _col(v: Tensor) -> Tensor:
    """(M,) -> (M, 1, 1, 1) for broadcasting over images."""
    return v.view(-1, 1, 1, 1)


# ---------------------------------------------------------------- pixel ops (uint8 in, uint8 out)
# Each takes a batch x (M, C, H, W) and per-sample magnitudes m (M,) float64 and returns a new batch.


def grey(x: Tensor) -> Tensor:
    """Pillow's RGB -> L: Rec. 601 in 16-bit fixed point with rounding ((r*19595 + g*38470 + b*7471 + 2^15) >> 16)."""
    if x.shape[1] == 1:
        return x
    xi = x.to(torch.int32)
    y = xi[:, 0:1] * 19595 + xi[:, 1:2] * 38470 + xi[:, 2:3] * 7471 + 0x8000
    return (y >> 16).to(torch.uint8)


def blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """Pillow's ImageEnhance blend in float32: trunc(d + f * (x - d)), clipped to 0..255."""
    d = degenerate.to(torch.float32)
    f = _col(factor.to(torch.float32))
    out = d + f * (x.to(torch.float32) - d)
    return out.clamp_(0, 255).to(torch.uint8)  # positive values: the cast truncates, as Pillow's


def _histogram(x: Tensor) -> Tensor:
    """Per (sample, channel) 256-bin counts, int64 (M, C, 256)."""
    m, c = x.shape[:2]
    offsets = torch.arange(m * c, device=x.device).view(m, c, 1) * 256
    flat = (x.reshape(m, c, -1).to(torch.int64) + offsets).reshape(-1)
    return torch.bincount(flat, minlength=m * c * 256).view(m, c, 256)


def _apply_lut(x: Tensor, lut: Tensor) -> Tensor:
    """Map each (sample, channel) through its own 256-entry table (M, C, 256)."""
    m, c, h, w = x.shape
    out = lut.clamp(0, 255).to(torch.uint8).gather(2, x.reshape(m, c, h * w).to(torch.int64))
    return out.view(m, c, h, w)


def identity(x: Tensor, m: Tensor, fill: A.Fill) -> Tensor:
    return x


def auto_contrast(x: Tensor, m: Tensor, fill: A.Fill) -> Tensor:
    """ImageOps.autocontrast: per channel, lut[i] = int(i * 255/(hi-lo) - lo * 255/(hi-lo)) in float64."""
    present = _histogram(x) > 0
    ramp = torch.arange(256, device=x.device)
    lo = torch.where(present, ramp, 256).amin(dim=2, keepdim=True)
    hi = torch.where(present, ramp, -1).amax(dim=2, keepdim=True)
    span = (hi - lo).clamp(min=1).to(torch.float64)
    scale = torch.full_like(span, 255.0) / span  # a true division: `255.0 / span` multiplies by a reciprocal
    offset = -lo.to(torch.float64) * scale
    lut = (ramp.to(torch.float64) * scale + offset).trunc().clamp(0, 255).to(torch.int64)
    return _apply_lut(x, torch.where(hi <= lo, ramp, lut))


def equalize(x: Tensor, m: Tensor, fill: A.Fill) -> Tensor:
    """ImageOps.equalize: step = (total - count of the top level) // 255, lut[i] = (step//2 + sum_{j<i} h[j]) // step."""
    h = _histogram(x)
    ramp = torch.arange(256, device=x.device)
    nonzero = h > 0
    top = torch.where(nonzero, ramp, -1).amax(dim=2, keepdim=True)
    last_count = h.gather(2, top.clamp(min=0))
    step = (h.sum(dim=2, keepdim=True) - last_count) // 255
    before = torch.cumsum(h, dim=2) - h
    lut = (step // 2 + before) // step.clamp(min=1)
    keep = (nonzero.sum(dim=2, keepdim=True) <= 1) | (step == 0)
    return _apply_lut(x, torch.where(keep, ramp, lut))


def brightness(x: Tensor, m: Tensor, fill: A.Fill) -> Tensor:
    return blend(torch.zeros_like(x), x, m)


def color(x: Tensor, m: Tensor, fill: A.Fill) -> Tensor:
    """Blend with the grey image (a no-op on one channel, as in Pillow)."""
    return x if x.shape[1] == 1 else blend(grey(x).expand_as(x), x, m)


def contrast(x: Tensor, m: Tensor, fill: A.Fill) -> Tensor:
    """Blend with the mean grey level, int(mean + 0.5) as ImageEnhance.Contrast computes it."""
    g = grey(x)
    mean = g.reshape(g.shape[0], -1).to(torch.float64).mean(dim=1)
    level = torch.floor(mean + 0.5).to(torch.uint8)
    return blend(_col(level).expand_as(x), x, m)


def smooth(x: Tensor) -> Tensor:
    """ImageFilter.SMOOTH: 3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13 rounded; border pixels kept."""
    xi = x.to(torch.int32)
    h, w = x.shape[2:]
    inner = 4 * xi[:, :, 1:-1, 1:-1]
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            inner = inner + xi[:, :, dy : h - 2 + dy, dx : w - 2 + dx]
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = torch.div(inner + 6, 13, rounding_mode="floor").to(torch.uint8)
    return out


def sharpness(x: Tensor, m: Tensor, fill: A.Fill) -> Tensor:
    return blend(smooth(x), x, m)


def posterize(x: Tensor, m: Tensor, fill: A.Fill) -> Tensor:
    """Keep int(m) high bits (1..8), as augment.posterize truncates the float draw."""
    bits = torch.nan_to_num(m, nan=8.0).trunc().clamp(1, 8).to(torch.int32)
    mask = (255 - ((1 << (8 - bits)) - 1)).to(torch.uint8)
    return x & _col(mask)


def solarize(x: Tensor, m: Tensor, fill: A.Fill) -> Tensor:
    """Invert levels at or above the threshold (0 inverts all, 256 nothing)."""
    return torch.where(x.to(torch.float64) < _col(m), x, 255 - x)


# ---------------------------------------------------------------- geometry


def _affine_matrices(ids: Tensor, m: Tensor, width: int, height: int, fractional_translate: bool) -> Tensor:
    """(M, 6) float64 PIL affine data: output (x, y) samples input (a x + b y + c, d x + e y + f).

    ``ids`` (M,) holds each row's op index (an affine op); ``m`` its magnitude."""
    n = m.shape[0]
    dev = m.device
    ids = ids.to(dev)
    v = torch.nan_to_num(m.to(torch.float64), nan=0.0)
    zero, one = torch.zeros(n, dtype=torch.float64, device=dev), torch.ones(n, dtype=torch.float64, device=dev)
    is_op = {name: ids == OP_INDEX[name] for name in AFFINE_OPS}
    shift_x = v * width if fractional_translate else v
    shift_y = v * height if fractional_translate else v
    mat = torch.stack([
        one,
        torch.where(is_op["ShearX"], v, zero),
        torch.where(is_op["TranslateX"], shift_x, zero),
        torch.where(is_op["ShearY"], v, zero),
        one,
        torch.where(is_op["TranslateY"], shift_y, zero),
    ], dim=1)
    # Image.rotate: counter-clockwise by v degrees about (w/2, h/2), as an affine map of the output
    rad = -torch.deg2rad(torch.remainder(v, 360.0))
    cos, sin = torch.cos(rad), torch.sin(rad)
    cx, cy = width / 2.0, height / 2.0
    rot = torch.stack([cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy], dim=1)
    return torch.where(is_op["Rotate"][:, None], rot, mat)


def affine(x: Tensor, mat: Tensor, fill: A.Fill) -> Tensor:
    """Nearest-neighbour affine exactly as Pillow computes it, fill outside the image.

    Pillow samples pixel centres: output (x, y) reads input floor(a (x + .5) + b (y + .5) + c), ...
    A pure translation (b = d = 0) is computed in float64 (ImagingScaleAffine); anything else in
    16.16 fixed point with coefficients rounded to 1/65536 (affine_fixed, used for images below
    32768 px), which this reproduces in int64.
    """
    n, c, h, w = x.shape
    dev = x.device
    ys = torch.arange(h, dtype=torch.float64, device=dev).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float64, device=dev).view(1, 1, w)
    a, b, cc, d, e, f = (mat[:, i].view(n, 1, 1) for i in range(6))
    # float path (translation): Pillow starts from c + a/2 and steps by a per pixel
    fx = torch.floor((cc + a * 0.5) + xs * a)
    fy = torch.floor((f + e * 0.5) + ys * e)
    # fixed path: FIX(v) = floor(v * 65536 + 0.5), then integer steps and >> 16 (floor)
    fix = lambda v: torch.floor(v * 65536.0 + 0.5).to(torch.int64)  # noqa: E731
    xi, yi = xs.to(torch.int64), ys.to(torch.int64)
    qx = (fix(cc + a * 0.5 + b * 0.5) + yi * fix(b) + xi * fix(a)) >> 16
    qy = (fix(f + d * 0.5 + e * 0.5) + yi * fix(e) + xi * fix(d)) >> 16
    translation = ((b == 0) & (d == 0)).expand(n, h, w)
    sx = torch.where(translation, fx.expand(n, h, w).to(torch.int64), qx.expand(n, h, w))
    sy = torch.where(translation, fy.expand(n, h, w).to(torch.int64), qy.expand(n, h, w))
    valid = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    index = (sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1)).view(n, 1, h * w)
    out = x.reshape(n, c, h * w).gather(2, index.expand(n, c, h * w)).view(n, c, h, w)
    return torch.where(valid.view(n, 1, h, w), out, _fill_tensor(fill, x))


def _reflect_index(i: Tensor, size: int, mode: str) -> Tensor:
    """Map padded coordinates back into 0..size-1 (constant: -1 marks the zero border)."""
    if mode == "constant":
        return torch.where((i >= 0) & (i < size), i, -1)
    if mode == "edge":
        return i.clamp(0, size - 1)
    if mode == "reflect":  # mirror without repeating the edge (numpy/torch "reflect")
        period = 2 * (size - 1)
        if period == 0:
            return torch.zeros_like(i)
        j = torch.remainder(i, period)
        return torch.where(j < size, j, period - j)
    period = 2 * size  # symmetric: mirror repeating the edge
    j = torch.remainder(i, period)
    return torch.where(j < size, j, period - 1 - j)


def flip_pad_crop(x: Tensor, flip: Tensor, left: Tensor, top: Tensor, pad: int, pad_mode: str) -> Tensor:
    """augment.pad_crop_flip for a batch: optional horizontal flip, then the window at (left, top) of the padded image."""
    n, c, h, w = x.shape
    dev = x.device
    cols = torch.arange(w, device=dev).view(1, w) + left.to(torch.int64).view(n, 1) - pad
    rows = torch.arange(h, device=dev).view(1, h) + top.to(torch.int64).view(n, 1) - pad
    cols, rows = _reflect_index(cols, w, pad_mode), _reflect_index(rows, h, pad_mode)
    flipped = flip.view(n, 1) > 0.5
    cols = torch.where(flipped & (cols >= 0), w - 1 - cols, cols)  # the flip comes before the padding
    out = x.gather(2, rows.clamp(min=0).view(n, 1, h, 1).expand(n, c, h, w))
    out = out.gather(3, cols.clamp(min=0).view(n, 1, 1, w).expand(n, c, h, w))
    inside = (rows >= 0).view(n, 1, h, 1) & (cols >= 0).view(n, 1, 1, w)
    return torch.where(inside, out, torch.zeros((), dtype=x.dtype, device=dev))


def cutout(x: Tensor, box: Tensor, fill: A.Fill) -> Tensor:
    """Paint each sample's (x0, y0, x1, y1) box (right/bottom exclusive) in the fill colour."""
    n, c, h, w = x.shape
    b = box.to(torch.int64)
    xs = torch.arange(w, device=x.device).view(1, 1, 1, w)
    ys = torch.arange(h, device=x.device).view(1, 1, h, 1)
    inside = (xs >= _col(b[:, 0])) & (xs < _col(b[:, 2])) & (ys >= _col(b[:, 1])) & (ys < _col(b[:, 3]))
    return torch.where(inside, _fill_tensor(fill, x), x)


PixelOp = Callable[[Tensor, Tensor, A.Fill], Tensor]
PIXEL_OPS: dict[str, PixelOp] = {
    "AutoContrast": auto_contrast,
    "Brightness": brightness,
    "Color": color,
    "Contrast": contrast,
    "Equalize": equalize,
    "Identity": identity,
    "Posterize": posterize,
    "Sharpness": sharpness,
    "Solarize": solarize,
}
assert set(PIXEL_OPS) | set(AFFINE_OPS) == set(OP_NAMES)


def apply_op(name: str, x: Tensor, m: Tensor, fill: A.Fill, fractional_translate: bool) -> Tensor:
    """One named op on a whole batch, each sample with its own magnitude."""
    if name in PIXEL_OPS:
        return PIXEL_OPS[name](x, m, fill)
    ids = torch.full((x.shape[0],), OP_INDEX[name], dtype=torch.int64, device=x.device)
    return affine(x, _affine_matrices(ids, m.to(x.device), x.shape[3], x.shape[2], fractional_translate), fill)


# ---------------------------------------------------------------- views


class BatchedView:
    """A weak or strong FixMatch view for a batch of uint8 images, driven by per-sample parameters.

    ``variant`` None is the weak view (flip + pad/crop); "reference" and "official" are the strong
    views of :class:`augment.StrongView` (same order of operations, fills and Cutout).
    """

    def __init__(
        self, variant: Optional[str], pad: int, pad_mode: str, flip: bool, fill: A.Fill = A.FILL_REFERENCE
    ) -> None:
        if variant not in (None, *A.VARIANTS):
            raise ValueError(f"variant must be None (weak view) or one of {A.VARIANTS}, got {variant!r}")
        A._check_pad(pad, pad_mode)
        self.variant = variant
        self.pad, self.pad_mode, self.flip = pad, pad_mode, A._check_flip(flip)
        self.fill = A._check_fill("fill", fill)
        self.randaugment: Union[A.RandAugmentReference, A.RandAugmentOfficial, None] = None
        if variant == "reference":
            self.randaugment = A.RandAugmentReference(fill=self.fill)
        elif variant == "official":
            self.randaugment = A.RandAugmentOfficial(fill=self.fill)
        self.layout = Layout(0 if self.randaugment is None else self.randaugment.n)

    # -- drawing ------------------------------------------------------------------------------

    def _sample_flip_crop(self, rng: random.Random) -> tuple[bool, int, int]:
        """The draws of augment.pad_crop_flip, in its order."""
        flipped = self.flip and rng.random() < 0.5
        if self.pad == 0:
            return flipped, 0, 0
        return flipped, rng.randint(0, 2 * self.pad), rng.randint(0, 2 * self.pad)

    def sample(self, rng: random.Random, size: tuple[int, int]) -> list[float]:
        """One sample's parameter row, drawn from ``rng`` exactly as the PIL view of the same variant would.

        ``size`` is the image's (width, height)."""
        A._check_rng(rng)
        w, h = size
        ra = self.randaugment
        if ra is None:
            return self.layout.row(*self._sample_flip_crop(rng), (0, 0, 0, 0), [])
        if isinstance(ra, A.RandAugmentReference):
            ops = ra.sample_ops(rng)
            box = A.cutout_box((w, h), ra.sample_cutout_side(w, rng), rng)
            return self.layout.row(*self._sample_flip_crop(rng), box, ops)
        flip_crop = self._sample_flip_crop(rng)
        ops = ra.sample_ops(rng)
        box = A.cutout_box((w, h), A.official_cutout_side(w), rng)
        return self.layout.row(*flip_crop, box, ops)

    def sample_torch(self, n: int, size: tuple[int, int], generator: torch.Generator) -> Params:
        """Parameters of ``n`` samples from a torch.Generator (on its device): same distributions as :meth:`sample`.

        For data that lives on the GPU: seed the generator per (seed, iteration) for exact resume."""
        w, h = size
        dev = generator.device
        g = dict(generator=generator, device=dev)
        out = torch.full((n, self.layout.width), math.nan, dtype=torch.float64, device=dev)
        out[:, Layout.FLIP] = (torch.rand(n, dtype=torch.float64, **g) < 0.5) if self.flip else 0.0
        out[:, Layout.LEFT] = torch.randint(0, 2 * self.pad + 1, (n,), **g)
        out[:, Layout.TOP] = torch.randint(0, 2 * self.pad + 1, (n,), **g)
        out[:, Layout.BOX] = 0.0
        ra = self.randaugment
        if ra is None:
            return out
        if isinstance(ra, A.RandAugmentReference):
            ids, mags = self._torch_reference_ops(ra, n, g)
            side = torch.round(ra.cutout * torch.rand(n, dtype=torch.float64, **g) * w)
        else:
            ids, mags = self._torch_official_ops(ra, n, g)
            side = torch.full((n,), float(A.official_cutout_side(w)), dtype=torch.float64, device=dev)
        cx = torch.randint(0, w, (n,), **g).to(torch.float64)
        cy = torch.randint(0, h, (n,), **g).to(torch.float64)
        x0, y0 = cx - torch.div(side, 2, rounding_mode="floor"), cy - torch.div(side, 2, rounding_mode="floor")
        out[:, Layout.BOX] = torch.stack([x0.clamp(min=0), y0.clamp(min=0), (x0 + side).clamp(max=w), (y0 + side).clamp(max=h)], 1)
        out[:, self.layout.ops] = ids
        out[:, self.layout.mags] = mags
        return out

    @staticmethod
    def _torch_reference_ops(ra: A.RandAugmentReference, n: int, g: dict) -> tuple[Tensor, Tensor]:
        """n ops with replacement, uniform over 14; magnitude low + (high - low) * U, NaN for ops without one."""
        table = A.randaugment_ops_reference()
        low = torch.tensor([lo for _, _, lo, _ in table], dtype=torch.float64, device=g["device"])
        high = torch.tensor([hi for _, _, _, hi in table], dtype=torch.float64, device=g["device"])
        none = torch.tensor([nm in A.NO_MAGNITUDE_OPS for nm, *_ in table], device=g["device"])
        picks = torch.randint(0, len(table), (n, ra.n), **g)
        u = torch.rand(n, ra.n, dtype=torch.float64, **g)
        mags = low[picks] + (high[picks] - low[picks]) * u
        ids = torch.tensor([OP_INDEX[nm] for nm, *_ in table], device=g["device"])[picks]
        return ids.to(torch.float64), torch.where(none[picks], math.nan, mags)

    @staticmethod
    def _torch_official_ops(ra: A.RandAugmentOfficial, n: int, g: dict) -> tuple[Tensor, Tensor]:
        """n ops, each applied with p=0.5 at level 1..9 (sign + or - with p=0.5 where signed); applied ones first."""
        table = A.randaugment_ops_official()
        dev = g["device"]
        levels = range(1, A.OFFICIAL_MAX_LEVEL + 1)
        by_level = torch.tensor(
            [[math.nan if f is None else float(f(lv)) for lv in levels] for _, _, f, _ in table], dtype=torch.float64, device=dev
        )
        signed = torch.tensor([s for *_, s in table], device=dev)
        picks = torch.randint(0, len(table), (n, ra.n), **g)
        level = torch.randint(0, A.OFFICIAL_MAX_LEVEL, (n, ra.n), **g)
        applied = torch.rand(n, ra.n, dtype=torch.float64, **g) < 0.5
        negative = (torch.rand(n, ra.n, dtype=torch.float64, **g) < 0.5) & signed[picks]
        mags = torch.where(negative, -1.0, 1.0) * by_level[picks, level]
        ids = torch.tensor([OP_INDEX[nm] for nm, *_ in table], device=dev)[picks].to(torch.float64)
        order = torch.argsort((~applied).to(torch.int8), dim=1, stable=True)  # applied ops keep their order, first
        ids = torch.where(applied, ids, float(NO_OP)).gather(1, order)
        mags = torch.where(applied, mags, math.nan).gather(1, order)
        return ids, mags

    # -- applying -----------------------------------------------------------------------------

    def _affine_fill(self) -> A.Fill:
        return self.randaugment.affine_fill if self.randaugment is not None else 0

    def _randaugment(self, x: Tensor, params: Params, grouping: str) -> Tensor:
        """Apply the op slots in order; group samples per op (CPU params) or select per op (device params)."""
        ids_all, mags_all = params[:, self.layout.ops], params[:, self.layout.mags]
        fill, fractional = self._affine_fill(), self.variant == "reference"
        by_index = grouping == "index" or (grouping == "auto" and params.device.type == "cpu")
        ids_host = ids_all.to(torch.int64) if by_index else None
        for k in range(self.layout.n_ops):
            if by_index:
                x = self._slot_by_index(x, ids_host[:, k], mags_all[:, k], fill, fractional)
            else:
                x = self._slot_by_mask(x, ids_all[:, k].to(torch.int64), mags_all[:, k], fill, fractional)
        return x

    @staticmethod
    def _slot_by_index(x: Tensor, ids: Tensor, mags: Tensor, fill: A.Fill, fractional: bool) -> Tensor:
        """Gather the samples of each op, apply it once to them, scatter back; affine ops share one gather."""
        x = x.clone()
        for op_id in torch.unique(ids).tolist():
            name = OP_NAMES[op_id] if op_id != NO_OP else "Identity"
            if name in PIXEL_OPS and name != "Identity":
                rows = torch.nonzero(ids == op_id).flatten().to(x.device)
                x[rows] = PIXEL_OPS[name](x[rows], mags[ids == op_id].to(x.device), fill)
        geometric = torch.zeros_like(ids, dtype=torch.bool)
        for name in AFFINE_OPS:
            geometric |= ids == OP_INDEX[name]
        if geometric.any():  # the five affine ops share one gather
            rows = torch.nonzero(geometric).flatten().to(x.device)
            mat = _affine_matrices(ids[geometric], mags[geometric].to(x.device), x.shape[3], x.shape[2], fractional)
            x[rows] = affine(x[rows], mat, fill)
        return x

    @staticmethod
    def _slot_by_mask(x: Tensor, ids: Tensor, mags: Tensor, fill: A.Fill, fractional: bool) -> Tensor:
        """Every op on the whole batch, kept where chosen: no host synchronisation (for GPU params)."""
        out, mags = x, torch.nan_to_num(mags, nan=0.0)
        for op_id, name in enumerate(OP_NAMES):
            if name == "Identity":
                continue
            chosen = _col(ids == op_id)
            out = torch.where(chosen, apply_op(name, x, mags, fill, fractional), out)
        return out

    def __call__(self, x: Tensor, params: Params, grouping: str = "auto") -> Tensor:
        """Augment a uint8 batch (N, C, H, W) with its parameter rows (N, width); returns uint8 (N, C, H, W).

        ``grouping`` "auto": parameters on the CPU group the samples of each op by index (least work);
        parameters on a GPU select each op's result by mask (no host synchronisation). "index" or
        "mask" force one way; both give the same images."""
        _check_batch(x)
        if grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
        if params.dim() != 2 or params.shape != (x.shape[0], self.layout.width):
            raise ValueError(f"params must have shape ({x.shape[0]}, {self.layout.width}), got {tuple(params.shape)}")
        p_dev = params.to(x.device)
        flip, left, top = p_dev[:, Layout.FLIP], p_dev[:, Layout.LEFT], p_dev[:, Layout.TOP]
        if self.variant is None:
            return flip_pad_crop(x, flip, left, top, self.pad, self.pad_mode)
        if self.variant == "reference":
            x = cutout(self._randaugment(x, params, grouping), p_dev[:, Layout.BOX], self.fill)
            return flip_pad_crop(x, flip, left, top, self.pad, self.pad_mode)
        x = flip_pad_crop(x, flip, left, top, self.pad, self.pad_mode)
        return cutout(self._randaugment(x, params, grouping), p_dev[:, Layout.BOX], self.fill)


class ParamSampler:
    """A drop-in 'view' for data.AugmentedDataset: returns the parameter row instead of an image.

    AugmentedDataset calls each view with the sample's generator in order, so [weak, strong]
    samplers consume the generator exactly as [WeakView, StrongView] do."""

    def __init__(self, view: BatchedView) -> None:
        self.view = view

    def __call__(self, img, rng: random.Random) -> Tensor:
        return torch.tensor(self.view.sample(rng, img.size), dtype=torch.float64)


def to_uint8_view(img, rng: random.Random) -> Tensor:
    """A 'view' that returns the image itself as uint8 (C, H, W) and draws nothing."""
    return pil_to_uint8(img)
