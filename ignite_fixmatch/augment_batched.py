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
* **Applying** (:meth:`BatchedView.__call__`) loops over the op slots, never over images or pixels.
  With parameters on the CPU it sorts the samples by op and applies each op once to its run; with
  parameters on a GPU each slot is three whole-batch passes whatever the ops (a level table per sample,
  one blend, one geometric gather: :meth:`BatchedView._slots_by_mask`), so the host never waits for the
  device (no ``.item()``, no ``nonzero``, constants cached per device, histograms without ``bincount``)
  and the kernel count, which sets the time on a GPU, stays low.

Parameters travel as one float64 tensor per view, one row per sample (see :class:`Layout`), so a
batch dict of plain tensors can carry them to the device.

Agreement with PIL (checked op by op and view by view in tests/test_augment_batched.py): every op
reproduces Pillow's own arithmetic and is bit-identical in those tests: Rec. 601 fixed-point grey,
the float32 ImageEnhance blend with truncation, the SMOOTH kernel with rounding, the float64
AutoContrast table, Equalize's integer table, and for Rotate/Shear Pillow's 16.16 fixed-point
nearest-neighbour affine (translations: its float64 path). The only room for a difference is a
source coordinate within float rounding of a pixel edge (cos/sin of an angle, c + 0.5), documented
as a tolerance of 1e-3 of the pixels in the tests.

Speed: on one CPU core the strong view runs 5-8x faster than the per-image PIL path (see
``python -m benchmarks.run``); the code avoids bool-mask selects and 4-d fancy indexing, which are
an order of magnitude slower on CPU than int32 index_select and uint8 arithmetic.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

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
_AFFINE_KEY = len(OP_NAMES)  # sort key shared by the five affine ops


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
        """One sample's parameters as a list of numbers (ints and op ids are exact in float64)."""
        empty = self.n_ops - len(ops)
        if empty < 0:
            raise ValueError(f"{len(ops)} ops drawn but the layout has {self.n_ops} slots")
        row = [flip, left, top, *box]
        row += [OP_INDEX[name] for name, _ in ops]
        row += [NO_OP] * empty
        row += [math.nan if m is None else m for _, m in ops]
        row += [math.nan] * empty
        return row


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
    a = torch.from_numpy(np.array(img, dtype=np.uint8))  # one copy out of PIL; stacking a batch makes it NCHW
    return a.unsqueeze(0) if a.dim() == 2 else a.permute(2, 0, 1)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float], memory_format=torch.contiguous_format) -> Tensor:
    """uint8 (N, C, H, W) -> float32 (x / 255 - mean) / std: the same float ops as the PIL path's to_tensor + normalize."""
    _check_batch(x)
    mean_t, std_t = A._check_mean_std(mean, std)
    if len(mean_t) != x.shape[1]:
        raise ValueError(f"mean and std need one value per channel ({x.shape[1]}), got mean={mean_t!r}, std={std_t!r}")
    m = _const(mean_t, torch.float32, x.device).view(1, -1, 1, 1)
    s = _const(std_t, torch.float32, x.device).view(1, -1, 1, 1)
    x = x.contiguous(memory_format=memory_format)  # the layout change on 1-byte pixels, before the float copy
    return x.to(torch.float32).div_(255).sub_(m).div_(s)


def fill_values(fill: A.Fill, channels: int) -> tuple[int, ...]:
    """The fill as one value per channel, as ``augment.fill_for`` adapts it to the PIL mode."""
    if channels == 1:
        return (fill if isinstance(fill, int) else int(round(sum(fill) / len(fill))),)
    if isinstance(fill, int):
        return (fill,) * 3
    return tuple(fill) if len(fill) == 3 else (fill[0],) * 3


@functools.lru_cache(maxsize=256)
def _const(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant tensor, made once per device: building it from a list on every call would be a
    blocking host-to-device copy (a host synchronisation inside the step) on a GPU."""
    return torch.tensor(values, dtype=dtype, device=device)


def _colour(fill: A.Fill, c: int, device: torch.device) -> Tensor:
    """(1, C, 1, 1) uint8 fill colour."""
    return _const(fill_values(fill, c), torch.uint8, device).view(1, c, 1, 1)


def _col(v: Tensor) -> Tensor:
    """(M,) -> (M, 1, 1, 1) for broadcasting over images."""
    return v.view(-1, 1, 1, 1)


def _to_uint8(v: Tensor) -> Tensor:
    """Float in [0, 255] -> uint8 by truncation (on CPU via int32: much faster there than a direct cast;
    on a GPU directly: the same values, one kernel fewer)."""
    return v.to(torch.int32).to(torch.uint8) if v.device.type == "cpu" else v.to(torch.uint8)


# ---------------------------------------------------------------- gathers and masks
# Speed notes (CPU; the same code runs on GPU): index_select with int32 indices is the fastest gather;
# torch.where / masked_fill with bool masks over images are ~10x slower than uint8 arithmetic, so
# geometry reads from a copy with a one-pixel fill border (out-of-range coordinates are clamped onto
# it) and Cutout is painted with 0/1 uint8 masks.


def pad_border(x: Tensor, fill: A.Fill, width: int = 1) -> Tensor:
    """A copy of x with a ``width``-pixel border in the fill colour: (N, C, H + 2w, W + 2w)."""
    n, c, h, w = x.shape
    out = torch.empty(n, c, h + 2 * width, w + 2 * width, dtype=torch.uint8, device=x.device)
    out[:] = _colour(fill, c, x.device)
    out[:, :, width : width + h, width : width + w] = x
    return out


def gather(src: Tensor, index: Tensor) -> Tensor:
    """out[n, c, p] = src[n, c].flatten()[index[n, p]] for int32 index (N, H, W): (N, C, H, W)."""
    n, c = src.shape[:2]
    h, w = index.shape[1:]
    base = torch.arange(n * c, dtype=torch.int32, device=src.device).view(n, c, 1) * (src.shape[2] * src.shape[3])
    flat = (index.reshape(n, 1, h * w) + base).view(-1)
    return src.reshape(-1).index_select(0, flat).view(n, c, h, w)


def paint_box(x: Tensor, box: Tensor, fill: A.Fill, offset: int = 0, inplace: bool = False) -> Tensor:
    """Paint each sample's (x0, y0, x1, y1) box, shifted by ``offset`` pixels, in the fill colour."""
    n, c, h, w = x.shape
    b = box.to(device=x.device, dtype=torch.int32) + offset
    xs = torch.arange(w, dtype=torch.int32, device=x.device).view(1, w)
    ys = torch.arange(h, dtype=torch.int32, device=x.device).view(1, h)
    in_x = ((xs >= b[:, 0:1]) & (xs < b[:, 2:3])).to(torch.uint8).view(n, 1, 1, w)
    in_y = ((ys >= b[:, 1:2]) & (ys < b[:, 3:4])).to(torch.uint8).view(n, 1, h, 1)
    mask = in_y * in_x  # (N, 1, H, W) of 0/1
    colour = _colour(fill, c, x.device)
    out = x if inplace else x.clone()
    return out.sub_(out * mask).add_(mask * colour)  # no wrap-around: x - x*m >= 0, then + fill where m


def apply_lut(x: Tensor, lut: Tensor, index: Optional[Tensor] = None) -> Tensor:
    """Map each (sample, channel) through its own 256-entry table ``lut`` (M, C, 256), values 0..255.

    ``index``: x's :func:`_lut_index`, when the caller has already made it (for a histogram)."""
    index = _lut_index(x) if index is None else index
    return lut.to(torch.uint8).reshape(-1).index_select(0, index.view(-1)).view(x.shape)


def _lut_index(x: Tensor) -> Tensor:
    """int32 (M, C, H*W): pixel value + 256 * (sample * C + channel), the index into stacked LUTs or histograms."""
    m, c = x.shape[:2]
    base = torch.arange(m * c, dtype=torch.int32, device=x.device).view(m, c, 1) * 256
    return x.reshape(m, c, -1).to(torch.int32) + base


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
    """Pillow's ImageEnhance blend in float32: trunc(d + f * (x - d)), clipped to 0..255.

    Same float32 operations in the same order as Pillow's C (ImagingBlend), so bit-identical."""
    f = _col(factor.to(torch.float32))
    out = x.to(torch.float32).sub_(degenerate).mul_(f).add_(degenerate)
    return _to_uint8(out.clamp_(0, 255))


def _ramp(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The 256 levels 0..255 (a LUT's input), made once per device and dtype."""
    return _const(tuple(range(256)), dtype, device)


def _brightness_lut(m: Tensor) -> Tensor:
    """(M, 256) uint8: Brightness as a table, the float32 f * level of :func:`brightness`."""
    ramp = _ramp(torch.float32, m.device).view(1, 256)
    return _to_uint8((ramp * m.to(torch.float32).view(-1, 1)).clamp_(0, 255))


def _blend_lut(level: Tensor, m: Tensor) -> Tensor:
    """(M, 256) uint8: :func:`blend` with a flat degenerate image ``level`` (M,), as a table."""
    ramp = _ramp(torch.float32, m.device).view(1, 256)
    d = level.to(torch.float32).view(-1, 1)
    return _to_uint8((ramp - d).mul_(m.to(torch.float32).view(-1, 1)).add_(d).clamp_(0, 255))


def _contrast_level(g: Tensor) -> Tensor:
    """(M,) int64: the mean of each grey image rounded as ImageEnhance.Contrast does, int(mean + 0.5)."""
    count = g[0].numel()
    total = g.reshape(g.shape[0], -1).sum(dim=1, dtype=torch.int64)
    return torch.div(2 * total + count, 2 * count, rounding_mode="floor")  # floor(mean + 1/2), exactly


def brightness(x: Tensor, m: Tensor, fill: A.Fill) -> Tensor:
    """Blend with black: f * x (adding the zero image changes nothing)."""
    return _to_uint8(x.to(torch.float32).mul_(_col(m.to(torch.float32))).clamp_(0, 255))


def color(x: Tensor, m: Tensor, fill: A.Fill) -> Tensor:
    """Blend with the grey image (a no-op on one channel, as in Pillow)."""
    return x if x.shape[1] == 1 else blend(grey(x), x, m)


def contrast(x: Tensor, m: Tensor, fill: A.Fill) -> Tensor:
    """Blend with the mean grey level, int(mean + 0.5) as ImageEnhance.Contrast computes it."""
    return blend(_col(_contrast_level(grey(x)).to(torch.float32)), x, m)


def smooth(x: Tensor) -> Tensor:
    """ImageFilter.SMOOTH: 3x3 kernel [1 1 1; 1 5 1; 1 1 1] / 13 rounded; border pixels kept.

    Integer sums (separable box + 4 x centre); (s + 6) // 13 as (s + 6) * 5042 >> 16, exact for s <= 3315."""
    xi = x.to(torch.int32)
    rows = xi[:, :, :, :-2] + xi[:, :, :, 1:-1] + xi[:, :, :, 2:]
    box = rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]
    inner = box.add_(xi[:, :, 1:-1, 1:-1] * 4).add_(6).mul_(5042).bitwise_right_shift_(16)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = inner
    return out


def sharpness(x: Tensor, m: Tensor, fill: A.Fill) -> Tensor:
    return blend(smooth(x), x, m)


def identity(x: Tensor, m: Tensor, fill: A.Fill) -> Tensor:
    return x


def _auto_contrast_lut(x: Tensor) -> Tensor:
    """(M, C, 256) uint8: ImageOps.autocontrast's table, lut[i] = int(i * s - lo * s) with s = 255 / (hi - lo)
    in float64, per channel. A flat channel (hi <= lo) keeps its levels: scale 1, offset 0."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    lo = flat.amin(dim=2, keepdim=True).to(torch.float64)
    hi = flat.amax(dim=2, keepdim=True).to(torch.float64)
    flat_channel = hi <= lo
    span = torch.where(flat_channel, 255.0, hi - lo)
    scale = torch.full_like(span, 255.0) / span  # a true division: `255.0 / span` multiplies by a reciprocal
    offset = torch.where(flat_channel, 0.0, -lo * scale)
    lut = (_ramp(torch.float64, x.device) * scale).add_(offset).clamp_(0, 255)
    return _to_uint8(lut)  # int() truncates, as Python's int()


def auto_contrast(x: Tensor, m: Tensor, fill: A.Fill) -> Tensor:
    """ImageOps.autocontrast (see :func:`_auto_contrast_lut`)."""
    return apply_lut(x, _auto_contrast_lut(x))


def _equalize_lut(index: Tensor, m: int, c: int) -> Tensor:
    """(M, C, 256) uint8: ImageOps.equalize's table from the images' :func:`_lut_index`:
    step = (total - count of the top level) // 255, lut[i] = (step//2 + sum_{j<i} h[j]) // step."""
    h = _counts(index.view(-1), m * c * 256).view(m, c, 256)
    ramp = _ramp(torch.int64, index.device)
    nonzero = h > 0
    top = torch.where(nonzero, ramp, -1).amax(dim=2, keepdim=True)
    last_count = h.gather(2, top.clamp(min=0))
    step = (h.sum(dim=2, keepdim=True) - last_count) // 255
    before = torch.cumsum(h, dim=2) - h
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp(max=255)  # Pillow clips the table to 8 bits
    return torch.where((nonzero.sum(dim=2, keepdim=True) <= 1) | (step == 0), ramp, lut).to(torch.uint8)


def equalize(x: Tensor, m: Tensor, fill: A.Fill) -> Tensor:
    """ImageOps.equalize (see :func:`_equalize_lut`)."""
    index = _lut_index(x)
    return apply_lut(x, _equalize_lut(index, x.shape[0], x.shape[1]), index)


def _counts(index: Tensor, bins: int, use_bincount: Optional[bool] = None) -> Tensor:
    """Histogram of int32 indices: bincount on CPU (fastest there); index_add_ elsewhere, because
    CUDA's bincount reads the maximum back to the host (a synchronisation)."""
    if use_bincount if use_bincount is not None else index.device.type == "cpu":
        return torch.bincount(index, minlength=bins)
    ones = torch.ones((), dtype=torch.int64, device=index.device).expand(index.numel())
    return torch.zeros(bins, dtype=torch.int64, device=index.device).index_add_(0, index, ones)


def _posterize_mask(m: Tensor) -> Tensor:
    """(M,) uint8: the bits that int(m) high bits (1..8) keep, as augment.posterize truncates the float draw."""
    bits = torch.nan_to_num(m, nan=8.0).trunc().clamp(1, 8).to(torch.int32)
    return (255 - ((1 << (8 - bits)) - 1)).to(torch.uint8)


def posterize(x: Tensor, m: Tensor, fill: A.Fill) -> Tensor:
    """Keep int(m) high bits (1..8)."""
    return x & _col(_posterize_mask(m))


def _solarize_lut(m: Tensor) -> Tensor:
    """(M, 256) uint8: levels at or above the threshold inverted (0 inverts all, 256 nothing)."""
    ramp = _ramp(torch.float64, m.device)
    return torch.where(ramp < m.view(-1, 1).to(torch.float64), ramp, 255 - ramp).to(torch.uint8)


def solarize(x: Tensor, m: Tensor, fill: A.Fill) -> Tensor:
    """Invert levels at or above the threshold, as a per-sample table."""
    return apply_lut(x, _solarize_lut(m.to(x.device)).view(-1, 1, 256).expand(-1, x.shape[1], 256))


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


def affine_source(mat: Tensor, width: int, height: int) -> Tensor:
    """Source pixel of each output pixel under Pillow's nearest affine, as int32 (N, H, W) flat indices
    into the image with a one-pixel border (:func:`pad_border`); out-of-image reads land on the border.

    Pillow samples pixel centres: output (x, y) reads input floor(a (x + .5) + b (y + .5) + c), ...
    in 16.16 fixed point with coefficients rounded to 1/65536 (affine_fixed, used for images below
    32768 px), reproduced here in int32. A pure translation (b = d = 0) Pillow computes in float64
    (ImagingScaleAffine): its start is then the exact floor(c + 0.5), steps stay 1.
    """
    n, dev = mat.shape[0], mat.device
    a, b, c, d, e, f = mat.unbind(1)
    translation = ((b == 0) & (d == 0)).view(n, 1)
    # x and y side by side, and all six 16.16 roundings in one pass: a GPU pays per kernel, not per element
    fixed = torch.stack([c + a * 0.5 + b * 0.5, f + d * 0.5 + e * 0.5, b, e, a, d], dim=1)
    fixed = torch.floor(fixed * 65536.0 + 0.5).to(torch.int32)
    start = torch.where(translation, torch.floor(torch.stack([c + a * 0.5, f + e * 0.5], dim=1)).to(torch.int32) * 65536, fixed[:, 0:2])
    ys = torch.arange(height, dtype=torch.int32, device=dev).view(1, 1, height, 1)
    xs = torch.arange(width, dtype=torch.int32, device=dev).view(1, 1, 1, width)
    pair = lambda v: v.reshape(n, 2, 1, 1)  # noqa: E731
    s = (pair(start) + pair(fixed[:, 2:4]) * ys) + pair(fixed[:, 4:6]) * xs  # (n, [x, y], h, w) in 16.16
    s = torch.minimum(s.bitwise_right_shift_(16).clamp_(min=-1), _const((width, height), torch.int32, dev).view(1, 2, 1, 1))
    sx, sy = s.unbind(1)
    return (sy * (width + 2)).add_(sx).add_(width + 3)  # (sy + 1) * (w + 2) + (sx + 1)


def affine(x: Tensor, mat: Tensor, fill: A.Fill) -> Tensor:
    """Nearest-neighbour affine exactly as Pillow computes it, fill outside the image."""
    return gather(pad_border(x, fill), affine_source(mat, x.shape[3], x.shape[2]))


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


def crop_source(flip: Tensor, left: Tensor, top: Tensor, pad: int, pad_mode: str, width: int, height: int) -> tuple[Tensor, Tensor]:
    """Rows (N, H) and columns (N, W) of augment.pad_crop_flip's window in the image with a one-pixel
    border (:func:`pad_border`): constant padding reads the border."""
    n, dev = flip.shape[0], flip.device
    cols = torch.arange(width, device=dev).view(1, width) + left.to(torch.int64).view(n, 1) - pad
    rows = torch.arange(height, device=dev).view(1, height) + top.to(torch.int64).view(n, 1) - pad
    cols, rows = _reflect_index(cols, width, pad_mode), _reflect_index(rows, height, pad_mode)
    flipped = (flip.view(n, 1) > 0.5) & (cols >= 0)  # the flip comes before the padding
    cols = torch.where(flipped, width - 1 - cols, cols)
    cols = torch.where(cols < 0, -1, cols) + 1  # -1 (constant border) -> border column 0
    rows = torch.where(rows < 0, -1, rows) + 1
    return rows.to(torch.int32), cols.to(torch.int32)


def flip_pad_crop(
    x: Tensor, flip: Tensor, left: Tensor, top: Tensor, pad: int, pad_mode: str, box: Optional[Tensor] = None, fill: A.Fill = 0
) -> Tensor:
    """augment.pad_crop_flip for a batch: optional horizontal flip, then the window at (left, top) of the padded image.

    With ``box``, a Cutout of the *input* (x0, y0, x1, y1) in ``fill`` is painted first (reference order)."""
    n, c, h, w = x.shape
    src = pad_border(x, 0)  # constant padding is black
    if box is not None:
        paint_box(src, box, fill, offset=1, inplace=True)
    rows, cols = crop_source(flip, left, top, pad, pad_mode, w, h)
    return gather(src, rows.view(n, h, 1) * (w + 2) + cols.view(n, 1, w))


def cutout(x: Tensor, box: Tensor, fill: A.Fill) -> Tensor:
    """Paint each sample's (x0, y0, x1, y1) box (right/bottom exclusive) in the fill colour."""
    return paint_box(x, box, fill)


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
LUT_CANDIDATES = ("Identity", "Brightness", "Contrast", "AutoContrast", "Equalize", "Posterize", "Solarize")
"""The ops that are a per-(sample, channel) table of levels; every other op's table is the identity."""


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
        low = _const(tuple(lo for _, _, lo, _ in table), torch.float64, g["device"])
        high = _const(tuple(hi for _, _, _, hi in table), torch.float64, g["device"])
        none = _const(tuple(nm in A.NO_MAGNITUDE_OPS for nm, *_ in table), torch.bool, g["device"])
        picks = torch.randint(0, len(table), (n, ra.n), **g)
        u = torch.rand(n, ra.n, dtype=torch.float64, **g)
        mags = low[picks] + (high[picks] - low[picks]) * u
        ids = _const(tuple(OP_INDEX[nm] for nm, *_ in table), torch.int64, g["device"])[picks]
        return ids.to(torch.float64), torch.where(none[picks], math.nan, mags)

    @staticmethod
    def _torch_official_ops(ra: A.RandAugmentOfficial, n: int, g: dict) -> tuple[Tensor, Tensor]:
        """n ops, each applied with p=0.5 at level 1..9 (sign + or - with p=0.5 where signed); applied ones first."""
        table = A.randaugment_ops_official()
        dev = g["device"]
        levels = range(1, A.OFFICIAL_MAX_LEVEL + 1)
        by_level = _const(
            tuple(tuple(math.nan if f is None else float(f(lv)) for lv in levels) for _, _, f, _ in table), torch.float64, dev
        )
        signed = _const(tuple(s for *_, s in table), torch.bool, dev)
        picks = torch.randint(0, len(table), (n, ra.n), **g)
        level = torch.randint(0, A.OFFICIAL_MAX_LEVEL, (n, ra.n), **g)
        applied = torch.rand(n, ra.n, dtype=torch.float64, **g) < 0.5
        negative = (torch.rand(n, ra.n, dtype=torch.float64, **g) < 0.5) & signed[picks]
        mags = torch.where(negative, -1.0, 1.0) * by_level[picks, level]
        ids = _const(tuple(OP_INDEX[nm] for nm, *_ in table), torch.int64, dev)[picks].to(torch.float64)
        order = torch.argsort((~applied).to(torch.int8), dim=1, stable=True)  # applied ops keep their order, first
        ids = torch.where(applied, ids, float(NO_OP)).gather(1, order)
        mags = torch.where(applied, mags, math.nan).gather(1, order)
        return ids, mags

    # -- applying -----------------------------------------------------------------------------

    def _affine_fill(self) -> A.Fill:
        return self.randaugment.affine_fill if self.randaugment is not None else 0

    def _randaugment(self, x: Tensor, params: Params, grouping: str) -> Tensor:
        """Apply the op slots in order: group samples per op (CPU params) or one pass per slot (device params)."""
        ids_all, mags_all = params[:, self.layout.ops], params[:, self.layout.mags]
        fill, fractional = self._affine_fill(), self.variant == "reference"
        by_index = grouping == "index" or (grouping == "auto" and params.device.type == "cpu")
        if not by_index:
            return self._slots_by_mask(x, ids_all.to(torch.int64), mags_all, fill, fractional)
        ids_host = ids_all.to(torch.int64)
        for k in range(self.layout.n_ops):
            x = self._slot_by_index(x, ids_host[:, k], mags_all[:, k], fill, fractional)
        return x

    @staticmethod
    def _slot_by_index(x: Tensor, ids: Tensor, mags: Tensor, fill: A.Fill, fractional: bool) -> Tensor:
        """Sort the samples by op, apply each op once to its contiguous run, and restore the order.

        The five affine ops share one run (one gather). Whole-image moves use index_select on rows,
        the fast path on CPU (indexing or index_copy_ on 4-d uint8 is many times slower)."""
        n, dev = x.shape[0], x.device
        key = ids.clone()
        key[ids == OP_INDEX["Identity"]] = NO_OP
        for name in AFFINE_OPS:
            key[ids == OP_INDEX[name]] = _AFFINE_KEY
        order = torch.argsort(key, stable=True)
        keys, counts = torch.unique_consecutive(key[order], return_counts=True)
        xs = x.reshape(n, -1).index_select(0, order.to(dev)).view_as(x)
        pieces, start = [], 0
        for k, count in zip(keys.tolist(), counts.tolist()):
            chunk, rows = xs[start : start + count], order[start : start + count]
            start += count
            if k == NO_OP:
                pieces.append(chunk)
            elif k == _AFFINE_KEY:
                mat = _affine_matrices(ids[rows], mags[rows].to(dev), x.shape[3], x.shape[2], fractional)
                pieces.append(affine(chunk, mat, fill))
            else:
                pieces.append(PIXEL_OPS[OP_NAMES[k]](chunk, mags[rows].to(dev), fill))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n)
        return torch.cat(pieces).reshape(n, -1).index_select(0, inverse.to(dev)).view_as(x)

    @staticmethod
    def _slots_by_mask(x: Tensor, ids: Tensor, mags: Tensor, fill: A.Fill, fractional: bool) -> Tensor:
        """All op slots with no host synchronisation (for parameters on a GPU): every sample's op of a slot
        is computed in one pass over the batch, whichever op it is.

        On a GPU the cost of this path is the number of kernels it launches (each touches under 2 MB), not
        their arithmetic, so each slot is three whole-batch steps instead of one per op:

        1. a per-(sample, channel) table of 256 levels, applied with one gather: Identity, Brightness,
           Contrast, AutoContrast, Equalize, Posterize and Solarize are all level tables; the chosen op's
           table is picked per sample from the stacked candidates;
        2. Color and Sharpness blend with a degenerate image (grey, smoothed), one blend for both;
        3. one nearest-neighbour gather, the identity for samples whose op is not geometric.

        What depends only on the parameters (Brightness, Posterize and Solarize tables, the affine source
        pixels) is computed for all slots at once. The arithmetic is that of the per-op functions, so the
        images are bit-identical to grouping by index (tests/test_augment_batched.py)."""
        n, c, h, w = x.shape
        slots = ids.shape[1]
        ids, mags = ids.t().reshape(-1), torch.nan_to_num(mags.t().reshape(-1), nan=0.0)  # slot-major rows
        # the candidate table of each op id, ids shifted by one so that an empty slot (NO_OP) is the identity
        table_of = _const((0, *(LUT_CANDIDATES.index(nm) if nm in LUT_CANDIDATES else 0 for nm in OP_NAMES)), torch.int64, x.device)
        choice = table_of[ids + 1].view(slots, n, 1, 1, 1).expand(slots, n, 1, c, 256)
        by_params = {
            "Brightness": _brightness_lut(mags),
            "Posterize": _posterize_mask(mags).view(-1, 1) & _ramp(torch.uint8, x.device).view(1, 256),
            "Solarize": _solarize_lut(mags),
        }
        by_params = {k: v.view(slots, n, 1, 256).expand(slots, n, c, 256) for k, v in by_params.items()}
        mat = _affine_matrices(ids, mags, w, h, fractional)  # the identity for samples whose op is not affine
        source = affine_source(mat, w, h).view(slots, n, h, w)
        is_color = (ids == OP_INDEX["Color"]).view(slots, n, 1, 1, 1)
        blends = is_color | (ids == OP_INDEX["Sharpness"]).view(slots, n, 1, 1, 1)
        mags = mags.view(slots, n)
        identity_lut = _ramp(torch.uint8, x.device).view(1, 1, 256).expand(n, c, 256)
        for k in range(slots):
            index, g = _lut_index(x), grey(x)
            candidates = {
                "Identity": identity_lut,
                "Contrast": _blend_lut(_contrast_level(g), mags[k]).view(n, 1, 256).expand(n, c, 256),
                "AutoContrast": _auto_contrast_lut(x),
                "Equalize": _equalize_lut(index, n, c),
                **{name: table[k] for name, table in by_params.items()},
            }
            luts = torch.stack([candidates[name] for name in LUT_CANDIDATES], dim=1)  # (N, K, C, 256)
            out = apply_lut(x, luts.gather(1, choice[k]).view(n, c, 256), index)
            blended = blend(torch.where(is_color[k], g, smooth(x)), x, mags[k])
            out = torch.where(blends[k], blended, out)
            x = gather(pad_border(out, fill), source[k])
        return x

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
        if self.variant == "reference":  # Cutout and flip/crop share one gather
            x = self._randaugment(x, params, grouping)
            return flip_pad_crop(x, flip, left, top, self.pad, self.pad_mode, p_dev[:, Layout.BOX], self.fill)
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


def collate_columns(items: Sequence[tuple]) -> tuple[Tensor, ...]:
    """Stack each field of the samples: tensors with torch.stack, ints (targets) as int64."""
    return tuple(
        torch.stack(column) if isinstance(column[0], Tensor) else torch.tensor(column, dtype=torch.long)
        for column in zip(*items)
    )


class BatchedAugment:
    """``data.augment: batched``: the loaders carry uint8 images and per-sample draws; this
    ``batch_transform`` (run by the trainer on its device, before the forward) makes the views.

    Batch keys in: x, x_weak, y, u, u_weak, u_strong, u_y (``x``/``u`` uint8 images, ``*_weak``/
    ``*_strong`` parameter rows). Out: x, y, u_w, u_s, u_y as the PIL path's loaders give them,
    normalised float32 in the model's memory format.
    """

    DRAW_KEYS = ("x_weak", "u", "u_weak", "u_strong")

    def __init__(
        self, variant: str, pad: int, pad_mode: str, flip: bool, mean: Sequence[float], std: Sequence[float],
        channels_last: bool = False, fill: A.Fill = A.FILL_REFERENCE,
    ) -> None:
        self.weak = BatchedView(None, pad, pad_mode, flip, fill)
        self.strong = BatchedView(variant, pad, pad_mode, flip, fill)
        self.mean, self.std = A._check_mean_std(mean, std)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def labeled_views(self) -> list[Callable]:
        """Views for AugmentedDataset: (uint8 image, weak draws)."""
        return [to_uint8_view, ParamSampler(self.weak)]

    def unlabeled_views(self) -> list[Callable]:
        """Views for AugmentedDataset: (uint8 image, weak draws, strong draws), drawn in the PIL views' order."""
        return [to_uint8_view, ParamSampler(self.weak), ParamSampler(self.strong)]

    @staticmethod
    def batch(labeled: tuple[Tensor, ...], unlabeled: tuple[Tensor, ...]) -> dict[str, Tensor]:
        """The loaders' collated tuples as the trainer's batch dict."""
        x, x_weak, y = labeled
        u, u_weak, u_strong, u_y = unlabeled
        return {"x": x, "x_weak": x_weak, "y": y, "u": u, "u_weak": u_weak, "u_strong": u_strong, "u_y": u_y}

    def _normalize(self, x: Tensor) -> Tensor:
        return normalize(x, self.mean, self.std, memory_format=self.memory_format)

    def __call__(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {k: v for k, v in batch.items() if k not in self.DRAW_KEYS}
        x = batch["x"].contiguous()  # the trainer may have made it channels_last; the ops read NCHW
        u = batch["u"].contiguous()
        if x.shape[1:] == u.shape[1:]:  # both weak views in one call: per-sample ops, half the kernels
            weak = self.weak(torch.cat([x, u]), torch.cat([batch["x_weak"], batch["u_weak"]]))
            x_w, u_w = weak[: len(x)], weak[len(x) :]
        else:
            x_w, u_w = self.weak(x, batch["x_weak"]), self.weak(u, batch["u_weak"])
        out["x"] = self._normalize(x_w)
        out["u_w"] = self._normalize(u_w)
        out["u_s"] = self._normalize(self.strong(u, batch["u_strong"]))
        return out
