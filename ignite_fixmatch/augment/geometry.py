"""Batched geometry on uint8 tensors (N, C, H, W): Pillow's nearest-neighbour affine, flip/pad/crop, Cutout.

Every output pixel is read from a copy of the batch with a one-pixel fill border through one int32 gather
(out-of-image coordinates land on the border), which is both the fastest way on a CPU and free of host
synchronisation on a GPU. Rotate and Shear reproduce Pillow's 16.16 fixed-point nearest-neighbour affine,
translations its float64 path; the only room for a difference is a source coordinate within float rounding
of a pixel edge (cos/sin of an angle, c + 0.5), a tolerance of 1e-3 of the pixels in the tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ignite_fixmatch.augment.common import Fill, cached_tensor, fill_values
from ignite_fixmatch.augment.draws import OP_INDEX

AFFINE_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


def _colour(fill: Fill, c: int, device: torch.device) -> Tensor:
    """(1, C, 1, 1) uint8 fill colour."""
    return cached_tensor(fill_values(fill, c), torch.uint8, device).view(1, c, 1, 1)


# ---------------------------------------------------------------- gathers and masks
# Speed notes (CPU; the same code runs on GPU): index_select with int32 indices is the fastest gather;
# torch.where / masked_fill with bool masks over images are ~10x slower than uint8 arithmetic, so
# geometry reads from a copy with a one-pixel fill border (out-of-range coordinates are clamped onto
# it) and Cutout is painted with 0/1 uint8 masks.


def pad_border(x: Tensor, fill: Fill, width: int = 1) -> Tensor:
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


def paint_box(x: Tensor, box: Tensor, fill: Fill, offset: int = 0, inplace: bool = False) -> Tensor:
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


# ---------------------------------------------------------------- geometry


def affine_matrices(ids: Tensor, m: Tensor, width: int, height: int, fractional_translate: bool) -> Tensor:
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
    s = torch.minimum(s.bitwise_right_shift_(16).clamp_(min=-1), cached_tensor((width, height), torch.int32, dev).view(1, 2, 1, 1))
    sx, sy = s.unbind(1)
    return (sy * (width + 2)).add_(sx).add_(width + 3)  # (sy + 1) * (w + 2) + (sx + 1)


def affine(x: Tensor, mat: Tensor, fill: Fill) -> Tensor:
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
    """Rows (N, H) and columns (N, W) of pil.pad_crop_flip's window in the image with a one-pixel
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
    x: Tensor, flip: Tensor, left: Tensor, top: Tensor, pad: int, pad_mode: str, box: Tensor | None = None, fill: Fill = 0
) -> Tensor:
    """pil.pad_crop_flip for a batch: optional horizontal flip, then the window at (left, top) of the padded image.

    With ``box``, a Cutout of the *input* (x0, y0, x1, y1) in ``fill`` is painted first (reference order)."""
    n, c, h, w = x.shape
    src = pad_border(x, 0)  # constant padding is black
    if box is not None:
        paint_box(src, box, fill, offset=1, inplace=True)
    rows, cols = crop_source(flip, left, top, pad, pad_mode, w, h)
    return gather(src, rows.view(n, h, 1) * (w + 2) + cols.view(n, 1, w))


def cutout(x: Tensor, box: Tensor, fill: Fill) -> Tensor:
    """Paint each sample's (x0, y0, x1, y1) box (right/bottom exclusive) in the fill colour."""
    return paint_box(x, box, fill)
