"""CTAugment's 19 ops, per image with Pillow (the official definitions) and per batch on uint8 tensors.

:func:`apply_pil` is google-research/fixmatch ``libml/ctaugment.py`` op by op (the reference for
correctness); :func:`apply_batch` applies one op slot to a batch, each sample its own op and magnitudes,
on CPU or GPU tensors, bit-identical to :func:`apply_pil` image by image (tests/test_ctaugment_ops.py).
It reuses the RandAugment arithmetic of :mod:`.ops` and :mod:`.geometry` (float32 blend with truncation,
the SMOOTH kernel, the AutoContrast/Equalize tables, Pillow's 16.16 nearest affine) and adds what
CTAugment has beyond RandAugment:

* ``blur``: ImageFilter.BLUR, the 5x5 ring kernel / 16 with Pillow's rounding (``(sum + 8) >> 4``,
  exact: every partial sum of the float kernel is a multiple of 1/16) and its 2-pixel border copied.
* ``rotate``: an integer angle, so Image.rotate's matrix (its own float64 maths, cos/sin rounded to 15
  digits) is a table of 91 rows made with Python's math, the same calls Pillow makes.
* ``rescale``: crop (Pillow rounds the float box half to even) then resize back with one of six filters.
  Pillow's Resample.c is reproduced per (size, box, filter): double coefficients per output pixel,
  normalised, to 22-bit fixed point; a horizontal then a vertical pass, each ``clip8((sum + 2^21) >> 22)``,
  a pass skipped when its size does not change; NEAREST is its scale-affine table instead. Each pass is an
  integer matrix applied as a float64 matmul (integer products and sums below 2^53: exact on any device).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torch import Tensor

from ignite_fixmatch.augment.common import check_batch, check_image
from ignite_fixmatch.augment.ctaugment_table import CTA_OP_INDEX, CTA_OPS, CUTOUT_GREY, MAX_PARAMS, RESCALE_METHODS, cutout_box
from ignite_fixmatch.augment.geometry import affine, paint_box
from ignite_fixmatch.augment.ops import auto_contrast, blend, brightness, color, contrast, equalize, posterize, sharpness, smooth, solarize

__all__ = ["CTA_OPS", "CTA_OP_INDEX", "CUTOUT_GREY", "MAX_PARAMS", "apply_batch", "apply_pil", "cutout_box", "rescale_crop"]

ROTATE_MAX = 45  # degrees: rotate's level 0..1 maps to round((2 level - 1) * 45)

# ---------------------------------------------------------------- per image: the official definitions


def _enhance(x: Image.Image, op: type, level: float) -> Image.Image:
    return op(x).enhance(0.1 + 1.9 * level)


def _imageop(x: Image.Image, op: Callable[[Image.Image], Image.Image], level: float) -> Image.Image:
    return Image.blend(x, op(x), level)


def _filter(x: Image.Image, op: type[ImageFilter.Filter], level: float) -> Image.Image:
    return Image.blend(x, x.filter(op), level)


def _affine(x: Image.Image, data: tuple[float, ...]) -> Image.Image:
    return x.transform(x.size, Image.Transform.AFFINE, data)


def _pil_rescale(x: Image.Image, scale: float, method: float) -> Image.Image:
    s = x.size
    scale *= 0.25
    crop = (scale * s[0], scale * s[1], s[0] * (1 - scale), s[1] * (1 - scale))
    methods = tuple(Image.Resampling[m.upper()] for m in RESCALE_METHODS)  # the official ANTIALIAS is LANCZOS
    return x.crop(crop).resize(x.size, methods[int(method * 5.99)])


def _pil_cutout(x: Image.Image, level: float, centre: tuple[int, int]) -> Image.Image:
    """The official loop paints the box pixel by pixel in place; here a painted copy, grey in every channel."""
    box = cutout_box(x.size, level, *centre)
    out = x.copy()
    if box[2] > box[0] and box[3] > box[1]:
        out.paste(CUTOUT_GREY if x.mode == "L" else (CUTOUT_GREY,) * 3, box)
    return out


def _shear(level: float) -> float:
    return (2 * level - 1) * 0.3


_PIL_OPS: dict[str, Callable[..., Image.Image]] = {
    "autocontrast": lambda x, level: _imageop(x, ImageOps.autocontrast, level),
    "blur": lambda x, level: _filter(x, ImageFilter.BLUR, level),
    "brightness": lambda x, b: _enhance(x, ImageEnhance.Brightness, b),
    "color": lambda x, c: _enhance(x, ImageEnhance.Color, c),
    "contrast": lambda x, c: _enhance(x, ImageEnhance.Contrast, c),
    "equalize": lambda x, level: _imageop(x, ImageOps.equalize, level),
    "invert": lambda x, level: _imageop(x, ImageOps.invert, level),
    "identity": lambda x: x,
    "posterize": lambda x, level: ImageOps.posterize(x, 1 + int(level * 7.999)),
    "rescale": _pil_rescale,
    "rotate": lambda x, angle: x.rotate(int(np.round((2 * angle - 1) * ROTATE_MAX))),
    "sharpness": lambda x, s: _enhance(x, ImageEnhance.Sharpness, s),
    "shear_x": lambda x, shear: _affine(x, (1, _shear(shear), 0, 0, 1, 0)),
    "shear_y": lambda x, shear: _affine(x, (1, 0, 0, _shear(shear), 1, 0)),
    "smooth": lambda x, level: _filter(x, ImageFilter.SMOOTH, level),
    "solarize": lambda x, th: ImageOps.solarize(x, int(th * 255.999)),
    "translate_x": lambda x, delta: _affine(x, (1, 0, _shear(delta) * x.size[0], 0, 1, 0)),
    "translate_y": lambda x, delta: _affine(x, (1, 0, 0, 0, 1, _shear(delta) * x.size[1])),
}
assert set(_PIL_OPS) | {"cutout"} == set(CTA_OP_INDEX)


def _check_level(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a magnitude in [0, 1], got {value!r}")
    return float(value)


def apply_pil(img: Image.Image, name: str, args: Sequence[float], centre: tuple[int, int] = (0, 0)) -> Image.Image:
    """One CTAugment op on a PIL image (RGB or L), as the official code defines it; a new image, ``img`` untouched.

    ``args``: one magnitude in [0, 1] per parameter of the op (none for identity, two for rescale);
    ``centre``: Cutout's (x, y) centre, which the official code draws with np.random (unused by other ops)."""
    check_image(img)
    if name not in CTA_OP_INDEX:
        raise ValueError(f"unknown CTAugment op {name!r}; known ops: {list(CTA_OP_INDEX)}")
    bins = CTA_OPS[CTA_OP_INDEX[name]].bins
    if len(args) != len(bins):
        raise ValueError(f"{name} takes {len(bins)} magnitude(s), got {len(args)}: {list(args)!r}")
    levels = [_check_level(f"{name}'s magnitude {j}", a) for j, a in enumerate(args)]
    if name == "cutout":
        return _pil_cutout(img, levels[0], (int(centre[0]), int(centre[1])))
    return _PIL_OPS[name](img, *levels)


# ---------------------------------------------------------------- per batch: filters


def _filter_too_small(x: Tensor, k: int) -> bool:
    """Pillow's ImagingFilter returns a copy of an image smaller than its kernel."""
    return x.shape[2] < k or x.shape[3] < k


def blur(x: Tensor) -> Tensor:
    """ImageFilter.BLUR: the 16 pixels of the 5x5 ring around each pixel / 16, rounded, the 2-pixel border kept."""
    if _filter_too_small(x, 5):
        return x
    xi = x.to(torch.int32)
    rows5 = xi[..., :-4] + xi[..., 1:-3] + xi[..., 2:-2] + xi[..., 3:-1] + xi[..., 4:]  # (.., H, W - 4)
    box5 = rows5[..., :-4, :] + rows5[..., 1:-3, :] + rows5[..., 2:-2, :] + rows5[..., 3:-1, :] + rows5[..., 4:, :]
    rows3 = xi[..., 1:-3] + xi[..., 2:-2] + xi[..., 3:-1]
    box3 = rows3[..., 1:-3, :] + rows3[..., 2:-2, :] + rows3[..., 3:-1, :]
    out = x.clone()
    out[:, :, 2:-2, 2:-2] = box5.sub_(box3).add_(8).bitwise_right_shift_(4)
    return out


def _smooth(x: Tensor) -> Tensor:
    return x if _filter_too_small(x, 3) else smooth(x)


# ---------------------------------------------------------------- per batch: geometry


def _rotate_data(angle: int, w: int, h: int) -> tuple[float, ...]:
    """Image.rotate's affine data for ``angle`` degrees (no centre, translate or expand), with Pillow's own float64 maths."""
    angle = angle % 360.0
    if angle == 0:
        return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # Pillow returns a copy
    centre = (w / 2, h / 2)
    rad = -math.radians(angle)
    m = [round(math.cos(rad), 15), round(math.sin(rad), 15), 0.0, round(-math.sin(rad), 15), round(math.cos(rad), 15), 0.0]
    x, y = -centre[0] - 0, -centre[1] - 0
    m[2], m[5] = m[0] * x + m[1] * y + m[2], m[3] * x + m[4] * y + m[5]
    m[2] += centre[0]
    m[5] += centre[1]
    return tuple(m)


@functools.lru_cache(maxsize=64)
def _rotate_table(w: int, h: int, device: torch.device) -> Tensor:
    """(91, 6) float64: the affine data of every rotate angle -45..45 on a w x h image."""
    return torch.tensor([_rotate_data(a, w, h) for a in range(-ROTATE_MAX, ROTATE_MAX + 1)], dtype=torch.float64, device=device)


def _affine_data(slot: int, value: Tensor) -> Tensor:
    """(M, 6) affine data, the identity with entry ``slot`` set to ``value`` (M,): shear_x 1, translate_x 2, shear_y 3, translate_y 5."""
    data = torch.zeros(value.shape[0], 6, dtype=torch.float64, device=value.device)
    data[:, 0] = data[:, 4] = 1.0
    data[:, slot] = value
    return data


def _rotate(x: Tensor, args: Tensor) -> Tensor:
    degrees = torch.round((2 * args[:, 0] - 1) * ROTATE_MAX).to(torch.int64)  # round half to even, as np.round
    return affine(x, _rotate_table(x.shape[3], x.shape[2], x.device).index_select(0, degrees + ROTATE_MAX), 0)


def _cutout(x: Tensor, args: Tensor, centres: Tensor) -> Tensor:
    """:func:`.ctaugment_table.cutout_box` per sample, in the same float64 operations."""
    h, w = x.shape[2:]
    half = (1 + torch.trunc(args[:, 0] * min(w, h) * 0.499).to(torch.int64)) // 2
    cx, cy = centres[:, 0], centres[:, 1]
    box = torch.stack([(cx - half).clamp(min=0), (cy - half).clamp(min=0), (cx + half).clamp(max=w), (cy + half).clamp(max=h)], 1)
    return paint_box(x, box, CUTOUT_GREY)


# ---------------------------------------------------------------- per batch: rescale (Pillow's Resample.c)

PRECISION_BITS = 22  # Resample.c: 32 - 8 - 2
_HAMMING_A, _HAMMING_B = float(np.float32(0.54)), float(np.float32(0.46))  # Resample.c writes 0.54f, 0.46f


def _box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _hamming(x: float) -> float:
    x = abs(x)
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x = x * math.pi
    return math.sin(x) / x * (_HAMMING_A + _HAMMING_B * math.cos(x))


def _bicubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


_FILTERS: dict[str, tuple[Callable[[float], float], float]] = {
    "lanczos": (_lanczos, 3.0), "bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0), "box": (_box, 0.5), "hamming": (_hamming, 1.0),
}


def rescale_crop(size: tuple[int, int], scale: float) -> tuple[int, int, int, int]:
    """The integer box Image.crop cuts for rescale's float crop: each edge rounded by Python's round (half to even)."""
    s, scale = size, scale * 0.25
    crop = (scale * s[0], scale * s[1], s[0] * (1 - scale), s[1] * (1 - scale))
    x0, y0, x1, y1 = (int(round(v)) for v in crop)
    return x0, y0, x1, y1


def _resample_weights(in_size: int, out_size: int, method: str) -> np.ndarray:
    """(out_size, in_size) int64: Pillow's fixed-point weights for resizing one axis from in_size to out_size
    (a copy scaled by 2^22 where Pillow skips the pass or copies)."""
    k = np.zeros((out_size, in_size), dtype=np.int64)
    one = 1 << PRECISION_BITS
    if method == "nearest":  # _imaging.c: an affine scale, ImagingScaleAffine's pretabulated positions
        step = in_size / out_size
        xo = 0.0 + step * 0.5
        for xx in range(out_size):
            k[xx, int(xo)] = one  # xo >= 0: COORD is (int)
            xo += step
        return k
    if in_size == out_size:  # need_horizontal / need_vertical false
        return np.eye(out_size, dtype=np.int64) * one
    filt, support = _FILTERS[method]
    scale = float(in_size) / out_size  # precompute_coeffs, in0 = 0, in1 = in_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    for xx in range(out_size):
        center = 0.0 + (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)  # C's (int) truncates toward zero, as int()
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = [filt((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = 0.0
        for v in w:  # in order: sum() would compensate
            ww += v
        for x, v in enumerate(w):
            v = v / ww if ww != 0.0 else v
            k[xx, xmin + x] = int(-0.5 + v * one) if v < 0 else int(0.5 + v * one)  # normalize_coeffs_8bpc
    return k


@functools.lru_cache(maxsize=512)
def _rescale_weights(w: int, h: int, box: tuple[int, int, int, int], method: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """float64 (W, W) and (H, H): the horizontal and vertical passes of crop(box).resize((w, h), method), the
    crop folded in (zero outside it)."""
    x0, y0, x1, y1 = box
    kx, ky = np.zeros((w, w), dtype=np.int64), np.zeros((h, h), dtype=np.int64)
    kx[:, x0:x1] = _resample_weights(x1 - x0, w, method)
    ky[:, y0:y1] = _resample_weights(y1 - y0, h, method)
    return torch.from_numpy(kx).to(device, torch.float64), torch.from_numpy(ky).to(device, torch.float64)


def _clip8(s: Tensor) -> Tensor:
    """Resample.c's clip8((sum + 2^21) >> 22) on exact float64 integer sums."""
    return s.add_(1 << (PRECISION_BITS - 1)).mul_(2.0**-PRECISION_BITS).floor_().clamp_(0, 255)


def _rescale(x: Tensor, args_host: Tensor) -> Tensor:
    """Each sample's crop + resize back, from its (scale, method) read on the host (the weights are cached per box)."""
    h, w = x.shape[2:]
    keys = [(rescale_crop((w, h), s), RESCALE_METHODS[int(m * 5.99)]) for s, m in args_host.tolist()]
    weights = [_rescale_weights(w, h, box, method, x.device) for box, method in keys]
    kx = torch.stack([k[0] for k in weights]).transpose(1, 2).unsqueeze(1)  # (M, 1, W_in, W_out)
    ky = torch.stack([k[1] for k in weights]).unsqueeze(1)  # (M, 1, H_out, H_in)
    rows = _clip8(torch.matmul(x.to(torch.float64), kx))
    return _clip8(torch.matmul(ky, rows)).to(torch.uint8)


# ---------------------------------------------------------------- per batch: the op table and one slot

BatchOp = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (x, args (M, 2), centres (M, 2), args on the host) -> x


def _enhance_factor(args: Tensor) -> Tensor:
    return 0.1 + 1.9 * args[:, 0]  # the float64 operations of _enhance


def _shear_t(args: Tensor) -> Tensor:
    return (2 * args[:, 0] - 1) * 0.3


BATCH_OPS: dict[str, BatchOp] = {
    "autocontrast": lambda x, a, c, ah: blend(x, auto_contrast(x, a, 0), a[:, 0]),
    "blur": lambda x, a, c, ah: blend(x, blur(x), a[:, 0]),
    "brightness": lambda x, a, c, ah: brightness(x, _enhance_factor(a), 0),
    "color": lambda x, a, c, ah: color(x, _enhance_factor(a), 0),
    "contrast": lambda x, a, c, ah: contrast(x, _enhance_factor(a), 0),
    "cutout": lambda x, a, c, ah: _cutout(x, a, c),
    "equalize": lambda x, a, c, ah: blend(x, equalize(x, a, 0), a[:, 0]),
    "invert": lambda x, a, c, ah: blend(x, 255 - x, a[:, 0]),
    "identity": lambda x, a, c, ah: x,
    "posterize": lambda x, a, c, ah: posterize(x, 1 + torch.trunc(a[:, 0] * 7.999), 0),
    "rescale": lambda x, a, c, ah: _rescale(x, ah),
    "rotate": lambda x, a, c, ah: _rotate(x, a),
    "sharpness": lambda x, a, c, ah: sharpness(x, _enhance_factor(a), 0),
    "shear_x": lambda x, a, c, ah: affine(x, _affine_data(1, _shear_t(a)), 0),
    "shear_y": lambda x, a, c, ah: affine(x, _affine_data(3, _shear_t(a)), 0),
    "smooth": lambda x, a, c, ah: blend(x, _smooth(x), a[:, 0]),
    "solarize": lambda x, a, c, ah: solarize(x, torch.trunc(a[:, 0] * 255.999), 0),
    "translate_x": lambda x, a, c, ah: affine(x, _affine_data(2, _shear_t(a) * x.shape[3]), 0),
    "translate_y": lambda x, a, c, ah: affine(x, _affine_data(5, _shear_t(a) * x.shape[2]), 0),
}
assert set(BATCH_OPS) == set(CTA_OP_INDEX)
_PARAM_COUNT = torch.tensor([len(op.bins) for op in CTA_OPS])


def _check_slot(x: Tensor, ids: Tensor, args: Tensor, centres: Tensor) -> tuple[Tensor, Tensor]:
    """Shapes, op ids and the magnitudes the ops use (NaN or anything in the unused columns); returns ids and args on the host."""
    check_batch(x)
    n = x.shape[0]
    if ids.shape != (n,) or args.shape != (n, MAX_PARAMS) or centres.shape != (n, 2):
        raise ValueError(f"a slot needs ids (N,), args (N, {MAX_PARAMS}) and centres (N, 2) for N = {n} images, got "
                         f"{tuple(ids.shape)}, {tuple(args.shape)}, {tuple(centres.shape)}")
    ids_host, args_host = ids.to("cpu", torch.int64), args.to("cpu", torch.float64)
    if n and not (0 <= int(ids_host.min()) and int(ids_host.max()) < len(CTA_OPS)):
        raise ValueError(f"op ids must be in 0..{len(CTA_OPS) - 1} (CTA_OPS), got {sorted(set(ids_host.tolist()))}")
    used = torch.arange(MAX_PARAMS).view(1, -1) < _PARAM_COUNT[ids_host].view(-1, 1)
    bad = used & ~((args_host >= 0) & (args_host <= 1))
    if bad.any():
        i, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"sample {i}: {CTA_OPS[int(ids_host[i])].name}'s magnitude {j} must be in [0, 1], got {float(args_host[i, j])!r}")
    return ids_host, args_host


def apply_batch(x: Tensor, ids: Tensor, args: Tensor, centres: Tensor) -> Tensor:
    """One op slot on uint8 images (N, C, H, W): sample i gets op ``CTA_OPS[ids[i]]`` with magnitudes ``args[i]``
    (float64 (N, 2), unused columns ignored) and, for Cutout, centre ``centres[i]`` (int64 (N, 2), x then y).
    A new batch, bit-identical to :func:`apply_pil` image by image; ``x`` is untouched.

    The samples are grouped by op (the ids are read on the host), each op runs once on its group."""
    ids_host, args_host = _check_slot(x, ids, args, centres)
    n, dev = x.shape[0], x.device
    if n == 0:
        return x.clone()
    order = torch.argsort(ids_host, stable=True)
    keys, counts = torch.unique_consecutive(ids_host[order], return_counts=True)
    order_dev = order.to(dev)
    xs = x.reshape(n, -1).index_select(0, order_dev).view_as(x)
    a_s = args.to(dev, torch.float64).index_select(0, order_dev)
    c_s = centres.to(dev, torch.int64).index_select(0, order_dev)
    ah_s = args_host[order]
    pieces, start = [], 0
    for k, count in zip(keys.tolist(), counts.tolist()):
        rows = slice(start, start + count)
        start += count
        pieces.append(BATCH_OPS[CTA_OPS[k].name](xs[rows], a_s[rows], c_s[rows], ah_s[rows]))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n)
    return torch.cat(pieces).reshape(n, -1).index_select(0, inverse.to(dev)).view_as(x)
