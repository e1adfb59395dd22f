"""RandAugment's op slots on a batch: each slot applies every sample's own op, in two equivalent ways.

* :func:`slot_by_index` (parameters on the CPU): sort the samples by op, apply each op once to its run,
  restore the order. Least work, but it reads the op ids on the host.
* :func:`slots_by_mask` (parameters on a GPU): every slot is three whole-batch passes whatever the ops,
  with no host synchronisation (no ``.item()``, no ``nonzero``, constants cached per device, histograms
  without ``bincount``), so the host never waits for the device and the kernel count, which sets the
  time on a GPU, stays low.

Both use the arithmetic of :mod:`.ops` and :mod:`.geometry`, so they give the same images bit for bit
(tests/test_augment_batched.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ignite_fixmatch.augment.common import Fill, cached_tensor
from ignite_fixmatch.augment.draws import NO_OP, OP_INDEX, OP_NAMES
from ignite_fixmatch.augment.geometry import AFFINE_OPS, affine, affine_matrices, affine_source, gather, pad_border
from ignite_fixmatch.augment.ops import (
    PIXEL_OPS,
    apply_lut,
    auto_contrast_lut,
    blend,
    blend_lut,
    brightness_lut,
    contrast_level,
    equalize_lut,
    grey,
    level_ramp,
    lut_index,
    posterize_mask,
    smooth,
    solarize_lut,
)

GROUPINGS = ("auto", "index", "mask")
LUT_CANDIDATES = ("Identity", "Brightness", "Contrast", "AutoContrast", "Equalize", "Posterize", "Solarize")
"""The ops that are a per-(sample, channel) table of levels; every other op's table is the identity."""
_AFFINE_KEY = len(OP_NAMES)  # sort key shared by the five affine ops


def apply_slots(x: Tensor, ids: Tensor, mags: Tensor, fill: Fill, fractional: bool, grouping: str = "auto") -> Tensor:
    """Apply the op slots (ids, mags: (N, slots)) in order: by index for CPU parameters, by mask for device ones.

    ``fractional``: translations are fractions of the size (reference), not pixels (official)."""
    by_index = grouping == "index" or (grouping == "auto" and ids.device.type == "cpu")
    if not by_index:
        return slots_by_mask(x, ids.to(torch.int64), mags, fill, fractional)
    ids_host = ids.to(torch.int64)
    for k in range(ids.shape[1]):
        x = slot_by_index(x, ids_host[:, k], mags[:, k], fill, fractional)
    return x


def slot_by_index(x: Tensor, ids: Tensor, mags: Tensor, fill: Fill, fractional: bool) -> Tensor:
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
            mat = affine_matrices(ids[rows], mags[rows].to(dev), x.shape[3], x.shape[2], fractional)
            pieces.append(affine(chunk, mat, fill))
        else:
            pieces.append(PIXEL_OPS[OP_NAMES[k]](chunk, mags[rows].to(dev), fill))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n)
    return torch.cat(pieces).reshape(n, -1).index_select(0, inverse.to(dev)).view_as(x)


def slots_by_mask(x: Tensor, ids: Tensor, mags: Tensor, fill: Fill, fractional: bool) -> Tensor:
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
    table_of = cached_tensor((0, *(LUT_CANDIDATES.index(nm) if nm in LUT_CANDIDATES else 0 for nm in OP_NAMES)), torch.int64, x.device)
    choice = table_of[ids + 1].view(slots, n, 1, 1, 1).expand(slots, n, 1, c, 256)
    by_params = {
        "Brightness": brightness_lut(mags),
        "Posterize": posterize_mask(mags).view(-1, 1) & level_ramp(torch.uint8, x.device).view(1, 256),
        "Solarize": solarize_lut(mags),
    }
    by_params = {k: v.view(slots, n, 1, 256).expand(slots, n, c, 256) for k, v in by_params.items()}
    mat = affine_matrices(ids, mags, w, h, fractional)  # the identity for samples whose op is not affine
    source = affine_source(mat, w, h).view(slots, n, h, w)
    is_color = (ids == OP_INDEX["Color"]).view(slots, n, 1, 1, 1)
    blends = is_color | (ids == OP_INDEX["Sharpness"]).view(slots, n, 1, 1, 1)
    mags = mags.view(slots, n)
    identity_lut = level_ramp(torch.uint8, x.device).view(1, 1, 256).expand(n, c, 256)
    for k in range(slots):
        index, g = lut_index(x), grey(x)
        candidates = {
            "Identity": identity_lut,
            "Contrast": blend_lut(contrast_level(g), mags[k]).view(n, 1, 256).expand(n, c, 256),
            "AutoContrast": auto_contrast_lut(x),
            "Equalize": equalize_lut(index, n, c),
            **{name: table[k] for name, table in by_params.items()},
        }
        luts = torch.stack([candidates[name] for name in LUT_CANDIDATES], dim=1)  # (N, K, C, 256)
        out = apply_lut(x, luts.gather(1, choice[k]).view(n, c, 256), index)
        blended = blend(torch.where(is_color[k], g, smooth(x)), x, mags[k])
        out = torch.where(blends[k], blended, out)
        x = gather(pad_border(out, fill), source[k])
    return x
