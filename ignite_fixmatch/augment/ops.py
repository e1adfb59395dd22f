"""Batched FixMatch pixel ops on uint8 tensors (N, C, H, W): each sample with its own magnitude, CPU or GPU.

Every op reproduces Pillow's own arithmetic, so it is bit-identical to the per-image PIL op of the same
name (:mod:`.pil`; tests/test_augment_batched.py checks op by op): Rec. 601 fixed-point grey, the float32
ImageEnhance blend with truncation, the SMOOTH kernel with rounding, the float64 AutoContrast table and
Equalize's integer table. Ops that are a table of 256 levels per (sample, channel) also expose that table
(``*_lut``), which the one-pass slots of the device path (:mod:`.slots`) stack and pick from.

Speed: the code avoids bool-mask selects and 4-d fancy indexing, which are an order of magnitude slower
on CPU than int32 index_select and uint8 arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ignite_fixmatch.augment.common import Fill, cached_tensor, check_batch, check_image, check_mean_std
from ignite_fixmatch.augment.draws import OP_INDEX, OP_NAMES
from ignite_fixmatch.augment.geometry import AFFINE_OPS, affine, affine_matrices

# ---------------------------------------------------------------- conversions and helpers


def pil_to_uint8(img) -> Tensor:
    """PIL image (RGB or L) -> uint8 tensor (C, H, W), the input of the batched path."""
    check_image(img)
    a = torch.from_numpy(np.array(img, dtype=np.uint8))  # one copy out of PIL; stacking a batch makes it NCHW
    return a.unsqueeze(0) if a.dim() == 2 else a.permute(2, 0, 1)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float], memory_format=torch.contiguous_format) -> Tensor:
    """uint8 (N, C, H, W) -> float32 (x / 255 - mean) / std: the same float ops as the PIL path's to_tensor + normalize."""
    check_batch(x)
    mean_t, std_t = check_mean_std(mean, std)
    if len(mean_t) != x.shape[1]:
        raise ValueError(f"mean and std need one value per channel ({x.shape[1]}), got mean={mean_t!r}, std={std_t!r}")
    m = cached_tensor(mean_t, torch.float32, x.device).view(1, -1, 1, 1)
    s = cached_tensor(std_t, torch.float32, x.device).view(1, -1, 1, 1)
    x = x.contiguous(memory_format=memory_format)  # the layout change on 1-byte pixels, before the float copy
    return x.to(torch.float32).div_(255).sub_(m).div_(s)


def _col(v: Tensor) -> Tensor:
    """(M,) -> (M, 1, 1, 1) for broadcasting over images."""
    return v.view(-1, 1, 1, 1)


def _to_uint8(v: Tensor) -> Tensor:
    """Float in [0, 255] -> uint8 by truncation (on CPU via int32: much faster there than a direct cast;
    on a GPU directly: the same values, one kernel fewer)."""
    return v.to(torch.int32).to(torch.uint8) if v.device.type == "cpu" else v.to(torch.uint8)


def apply_lut(x: Tensor, lut: Tensor, index: Tensor | None = None) -> Tensor:
    """Map each (sample, channel) through its own 256-entry table ``lut`` (M, C, 256), values 0..255.

    ``index``: x's :func:`lut_index`, when the caller has already made it (for a histogram)."""
    index = lut_index(x) if index is None else index
    return lut.to(torch.uint8).reshape(-1).index_select(0, index.view(-1)).view(x.shape)


def lut_index(x: Tensor) -> Tensor:
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


def level_ramp(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The 256 levels 0..255 (a LUT's input), made once per device and dtype."""
    return cached_tensor(tuple(range(256)), dtype, device)


def brightness_lut(m: Tensor) -> Tensor:
    """(M, 256) uint8: Brightness as a table, the float32 f * level of :func:`brightness`."""
    ramp = level_ramp(torch.float32, m.device).view(1, 256)
    return _to_uint8((ramp * m.to(torch.float32).view(-1, 1)).clamp_(0, 255))


def blend_lut(level: Tensor, m: Tensor) -> Tensor:
    """(M, 256) uint8: :func:`blend` with a flat degenerate image ``level`` (M,), as a table."""
    ramp = level_ramp(torch.float32, m.device).view(1, 256)
    d = level.to(torch.float32).view(-1, 1)
    return _to_uint8((ramp - d).mul_(m.to(torch.float32).view(-1, 1)).add_(d).clamp_(0, 255))


def contrast_level(g: Tensor) -> Tensor:
    """(M,) int64: the mean of each grey image rounded as ImageEnhance.Contrast does, int(mean + 0.5)."""
    count = g[0].numel()
    total = g.reshape(g.shape[0], -1).sum(dim=1, dtype=torch.int64)
    return torch.div(2 * total + count, 2 * count, rounding_mode="floor")  # floor(mean + 1/2), exactly


def brightness(x: Tensor, m: Tensor, fill: Fill) -> Tensor:
    """Blend with black: f * x (adding the zero image changes nothing)."""
    return _to_uint8(x.to(torch.float32).mul_(_col(m.to(torch.float32))).clamp_(0, 255))


def color(x: Tensor, m: Tensor, fill: Fill) -> Tensor:
    """Blend with the grey image (a no-op on one channel, as in Pillow)."""
    return x if x.shape[1] == 1 else blend(grey(x), x, m)


def contrast(x: Tensor, m: Tensor, fill: Fill) -> Tensor:
    """Blend with the mean grey level, int(mean + 0.5) as ImageEnhance.Contrast computes it."""
    return blend(_col(contrast_level(grey(x)).to(torch.float32)), x, m)


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


def sharpness(x: Tensor, m: Tensor, fill: Fill) -> Tensor:
    return blend(smooth(x), x, m)


def identity(x: Tensor, m: Tensor, fill: Fill) -> Tensor:
    return x


def auto_contrast_lut(x: Tensor) -> Tensor:
    """(M, C, 256) uint8: ImageOps.autocontrast's table, lut[i] = int(i * s - lo * s) with s = 255 / (hi - lo)
    in float64, per channel. A flat channel (hi <= lo) keeps its levels: scale 1, offset 0."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    lo = flat.amin(dim=2, keepdim=True).to(torch.float64)
    hi = flat.amax(dim=2, keepdim=True).to(torch.float64)
    flat_channel = hi <= lo
    span = torch.where(flat_channel, 255.0, hi - lo)
    scale = torch.full_like(span, 255.0) / span  # a true division: `255.0 / span` multiplies by a reciprocal
    offset = torch.where(flat_channel, 0.0, -lo * scale)
    lut = (level_ramp(torch.float64, x.device) * scale).add_(offset).clamp_(0, 255)
    return _to_uint8(lut)  # int() truncates, as Python's int()


def auto_contrast(x: Tensor, m: Tensor, fill: Fill) -> Tensor:
    """ImageOps.autocontrast (see :func:`auto_contrast_lut`)."""
    return apply_lut(x, auto_contrast_lut(x))


def equalize_lut(index: Tensor, m: int, c: int) -> Tensor:
    """(M, C, 256) uint8: ImageOps.equalize's table from the images' :func:`lut_index`:
    step = (total - count of the top level) // 255, lut[i] = (step//2 + sum_{j<i} h[j]) // step."""
    h = histogram(index.view(-1), m * c * 256).view(m, c, 256)
    ramp = level_ramp(torch.int64, index.device)
    nonzero = h > 0
    top = torch.where(nonzero, ramp, -1).amax(dim=2, keepdim=True)
    last_count = h.gather(2, top.clamp(min=0))
    step = (h.sum(dim=2, keepdim=True) - last_count) // 255
    before = torch.cumsum(h, dim=2) - h
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp(max=255)  # Pillow clips the table to 8 bits
    return torch.where((nonzero.sum(dim=2, keepdim=True) <= 1) | (step == 0), ramp, lut).to(torch.uint8)


def equalize(x: Tensor, m: Tensor, fill: Fill) -> Tensor:
    """ImageOps.equalize (see :func:`equalize_lut`)."""
    index = lut_index(x)
    return apply_lut(x, equalize_lut(index, x.shape[0], x.shape[1]), index)


def histogram(index: Tensor, bins: int, use_bincount: bool | None = None) -> Tensor:
    """Histogram of int32 indices: bincount on CPU (fastest there); index_add_ elsewhere, because
    CUDA's bincount reads the maximum back to the host (a synchronisation)."""
    if use_bincount if use_bincount is not None else index.device.type == "cpu":
        return torch.bincount(index, minlength=bins)
    ones = torch.ones((), dtype=torch.int64, device=index.device).expand(index.numel())
    return torch.zeros(bins, dtype=torch.int64, device=index.device).index_add_(0, index, ones)


def posterize_mask(m: Tensor) -> Tensor:
    """(M,) uint8: the bits that int(m) high bits (1..8) keep, as pil.posterize truncates the float draw."""
    bits = torch.nan_to_num(m, nan=8.0).trunc().clamp(1, 8).to(torch.int32)
    return (255 - ((1 << (8 - bits)) - 1)).to(torch.uint8)


def posterize(x: Tensor, m: Tensor, fill: Fill) -> Tensor:
    """Keep int(m) high bits (1..8)."""
    return x & _col(posterize_mask(m))


def solarize_lut(m: Tensor) -> Tensor:
    """(M, 256) uint8: levels at or above the threshold inverted (0 inverts all, 256 nothing)."""
    ramp = level_ramp(torch.float64, m.device)
    return torch.where(ramp < m.view(-1, 1).to(torch.float64), ramp, 255 - ramp).to(torch.uint8)


def solarize(x: Tensor, m: Tensor, fill: Fill) -> Tensor:
    """Invert levels at or above the threshold, as a per-sample table."""
    return apply_lut(x, solarize_lut(m.to(x.device)).view(-1, 1, 256).expand(-1, x.shape[1], 256))


# ---------------------------------------------------------------- the op table


PixelOp = Callable[[Tensor, Tensor, Fill], Tensor]
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


def apply_op(name: str, x: Tensor, m: Tensor, fill: Fill, fractional_translate: bool) -> Tensor:
    """One named op on a whole batch, each sample with its own magnitude."""
    if name in PIXEL_OPS:
        return PIXEL_OPS[name](x, m, fill)
    ids = torch.full((x.shape[0],), OP_INDEX[name], dtype=torch.int64, device=x.device)
    return affine(x, affine_matrices(ids, m.to(x.device), x.shape[3], x.shape[2], fractional_translate), fill)
