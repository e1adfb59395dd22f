"""CTAugment's 19 ops: the batched uint8 ops against the official per-image definitions (Pillow), pixel for pixel.

Every comparison is torch.equal (no tolerance): every op at every bin edge and at random magnitudes, RGB
and L, square and non-square sizes, rescale with all six filters, Cutout at the borders; a few cases are
checked by hand so that both paths cannot agree on a wrong mapping.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ignite_fixmatch.augment.ctaugment_ops import apply_batch, apply_pil, rescale_crop
from ignite_fixmatch.augment.ctaugment_table import CTA_OP_INDEX, CTA_OPS, CUTOUT_GREY, RESCALE_METHODS, cutout_box
from ignite_fixmatch.augment.ops import pil_to_uint8

SIZES = [("RGB", 16, 16), ("L", 16, 16), ("RGB", 32, 32), ("L", 32, 32), ("RGB", 24, 16), ("L", 24, 16)]  # (mode, w, h)


def images(n: int, mode: str, w: int, h: int, seed: int) -> list[Image.Image]:
    """Noise of varied level ranges (AutoContrast and Equalize need narrow ones), every 7th image flat."""
    rs = np.random.RandomState(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    out = []
    for i in range(n):
        lo = rs.randint(0, 200)
        hi = lo if i % 7 == 6 else rs.randint(lo + 1, 256)
        out.append(Image.fromarray(rs.randint(lo, hi + 1, shape).astype(np.uint8), mode))
    return out


def stack(imgs: list[Image.Image]) -> torch.Tensor:
    return torch.stack([pil_to_uint8(i) for i in imgs])


def pil_slot(imgs: list[Image.Image], ids: list[int], args: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """The reference: apply_pil image by image, each with its op's own number of magnitudes."""
    out = []
    for img, k, a, c in zip(imgs, ids, args.tolist(), centres.tolist()):
        out.append(pil_to_uint8(apply_pil(img, CTA_OPS[k].name, a[: len(CTA_OPS[k].bins)], (c[0], c[1]))))
    return torch.stack(out)


def magnitudes(op_bins: tuple[int, ...], rng: random.Random, n_random: int) -> torch.Tensor:
    """(M, 2): every bin edge k / bins (0 and 1 included) of the first parameter, the second one at its bin
    centres and edges in turn, then random values; NaN in a column the op does not use."""
    first = op_bins[0] if op_bins else 1
    rows = [[k / first, rng.random()] for k in range(first + 1)] + [[rng.random(), rng.random()] for _ in range(n_random)]
    if len(op_bins) == 2:
        second = [j / op_bins[1] for j in range(op_bins[1] + 1)] + [(j + 0.5) / op_bins[1] for j in range(op_bins[1])]
        rows = [[a, second[i % len(second)]] for i, (a, _) in enumerate(rows)]
    args = torch.tensor(rows, dtype=torch.float64)
    args[:, len(op_bins) :] = math.nan
    return args


# ---------------------------------------------------------------- every op, batched == official


@pytest.mark.parametrize("mode,w,h", SIZES)
def test_every_op_at_every_bin_edge_matches_the_official_definition(mode, w, h):
    for k, op in enumerate(CTA_OPS):
        rng = random.Random(f"{op.name}{mode}{w}{h}")
        args = magnitudes(op.bins, rng, 8)
        n = len(args)
        imgs = images(n, mode, w, h, seed=k + w + h)
        centres = torch.tensor([[rng.randrange(w), rng.randrange(h)] for _ in range(n)])
        x = stack(imgs)
        expected = pil_slot(imgs, [k] * n, args, centres)
        got = apply_batch(x, torch.full((n,), k), args, centres)
        assert torch.equal(got, expected), (op.name, (got != expected).any(dim=(1, 2, 3)).nonzero().flatten().tolist())
        assert torch.equal(x, stack(imgs)), op.name  # the input is untouched


def test_the_comparison_is_not_vacuous():
    """Each op but identity changes the images at some magnitude, so agreeing means agreeing on a change."""
    imgs = images(8, "RGB", 16, 16, seed=1)
    x = stack(imgs)
    for k, op in enumerate(CTA_OPS):
        changed = False
        for level in (0.0, 0.3, 1.0):
            args = torch.tensor([[level, 0.5]] * 8, dtype=torch.float64)
            got = apply_batch(x, torch.full((8,), k), args, torch.full((8, 2), 8))
            changed |= not torch.equal(got, x)
        assert changed == (op.name != "identity"), op.name


@pytest.mark.parametrize("mode,w,h", [("RGB", 32, 32), ("L", 24, 16)])
def test_one_slot_with_mixed_ops_keeps_each_sample_in_its_place(mode, w, h):
    n = 120
    rng = random.Random(7)
    ids = [rng.randrange(len(CTA_OPS)) for _ in range(n)]
    args = torch.tensor([[rng.random(), rng.random()] for _ in range(n)], dtype=torch.float64)
    args[torch.tensor([len(CTA_OPS[k].bins) < 2 for k in ids]), 1] = math.nan  # unused columns may hold anything
    centres = torch.tensor([[rng.randrange(w), rng.randrange(h)] for _ in range(n)])
    imgs = images(n, mode, w, h, seed=5)
    got = apply_batch(stack(imgs), torch.tensor(ids), args, centres)
    assert torch.equal(got, pil_slot(imgs, ids, args, centres))


def test_two_slots_in_a_row_match_pil_in_a_row():
    """The strong view's shape: two op slots then Cutout at level 1, as the policy applies them."""
    n, rng = 40, random.Random(3)
    imgs = images(n, "RGB", 32, 32, seed=9)
    x, expected = stack(imgs), imgs
    for slot in range(3):
        ids = [rng.randrange(len(CTA_OPS)) for _ in range(n)] if slot < 2 else [CTA_OP_INDEX["cutout"]] * n
        args = torch.tensor([[rng.random() if slot < 2 else 1.0, rng.random()] for _ in range(n)], dtype=torch.float64)
        centres = torch.tensor([[rng.randrange(32), rng.randrange(32)] for _ in range(n)])
        x = apply_batch(x, torch.tensor(ids), args, centres)
        rows = zip(expected, ids, args.tolist(), centres.tolist())
        expected = [apply_pil(img, CTA_OPS[k].name, a[: len(CTA_OPS[k].bins)], tuple(c)) for img, k, a, c in rows]
    assert torch.equal(x, stack(expected))


# ---------------------------------------------------------------- rescale: every filter, several scales


@pytest.mark.parametrize("mode,w,h", [("RGB", 16, 16), ("L", 32, 32), ("RGB", 24, 16), ("L", 8, 40), ("RGB", 40, 8), ("L", 5, 7)])
def test_rescale_with_every_filter_and_scale_matches_pillow(mode, w, h):
    """8 x 40: small scales keep the 8 columns (Pillow skips that pass) while cropping rows."""
    scales = [k / 17 for k in range(18)] + [0.1, 0.2, 0.3125, 0.5, 0.625, 0.999]  # 0.3125, 0.625: crop edges at .5 on 32 / 16 px
    methods = [(j + 0.5) / 6 for j in range(6)] + [1.0]
    assert {RESCALE_METHODS[int(m * 5.99)] for m in methods} == set(RESCALE_METHODS)
    args = torch.tensor([[s, m] for s in scales for m in methods], dtype=torch.float64)
    n = len(args)
    imgs = images(n, mode, w, h, seed=w * h)
    k = CTA_OP_INDEX["rescale"]
    centres = torch.zeros(n, 2, dtype=torch.int64)
    assert torch.equal(apply_batch(stack(imgs), torch.full((n,), k), args, centres), pil_slot(imgs, [k] * n, args, centres))


def test_rescale_crop_rounds_half_to_even_as_pillow():
    assert rescale_crop((32, 32), 0.0) == (0, 0, 32, 32)
    assert rescale_crop((32, 32), 1.0) == (8, 8, 24, 24)
    assert rescale_crop((16, 16), 0.625) == (2, 2, 14, 14)  # 2.5 -> 2, 13.5 -> 14 (half to even)
    assert rescale_crop((24, 16), 0.5) == (3, 2, 21, 14)


def test_rescale_by_hand():
    img = images(1, "RGB", 16, 16, seed=4)[0]
    a = pil_to_uint8(img)
    for m in (0.0, 0.5, 1.0):  # scale 0: the whole image, resized to its own size, is a copy with every filter
        assert torch.equal(pil_to_uint8(apply_pil(img, "rescale", [0.0, m])), a)
    # scale 1, nearest: the centre 8 x 8 (4..11) doubled, each pixel 2 x 2
    got = apply_batch(a.unsqueeze(0), torch.tensor([CTA_OP_INDEX["rescale"]]), torch.tensor([[1.0, 1.0]], dtype=torch.float64), torch.zeros(1, 2))
    idx = torch.arange(16) // 2 + 4
    assert torch.equal(got[0], a[:, idx][:, :, idx])


# ---------------------------------------------------------------- Cutout, posterize, rotate, blur by hand


@pytest.mark.parametrize("size,level,centre,box", [
    ((32, 32), 1.0, (16, 16), (8, 8, 24, 24)),  # side 1 + int(15.968) = 16
    ((16, 16), 1.0, (8, 8), (4, 4, 12, 12)),  # side 8
    ((32, 32), 1.0, (0, 0), (0, 0, 8, 8)),  # clipped at the top-left border
    ((32, 32), 1.0, (31, 31), (23, 23, 32, 32)),  # and at the bottom-right: 9 x 9
    ((24, 16), 1.0, (23, 0), (19, 0, 24, 4)),  # non-square: the side follows min(w, h) = 16 -> 8
    ((32, 32), 0.0, (5, 5), (5, 5, 5, 5)),  # side 1: the official box is empty
    ((32, 32), 0.1, (5, 5), (4, 4, 6, 6)),  # side 1 + int(1.5968) = 2
])
def test_cutout_box(size, level, centre, box):
    assert cutout_box(size, level, *centre) == box
    k = CTA_OP_INDEX["cutout"]
    for mode in ("RGB", "L"):
        img = Image.new(mode, size, 0)
        expected = torch.zeros(pil_to_uint8(img).shape, dtype=torch.uint8)
        expected[:, box[1] : box[3], box[0] : box[2]] = CUTOUT_GREY
        assert torch.equal(pil_to_uint8(apply_pil(img, "cutout", [level], centre)), expected)
        args, c = torch.tensor([[level, 0.0]], dtype=torch.float64), torch.tensor([centre])
        assert torch.equal(apply_batch(pil_to_uint8(img).unsqueeze(0), torch.tensor([k]), args, c)[0], expected)


def test_posterize_bits_by_hand():
    img = Image.new("RGB", (16, 16), (200, 100, 255))
    assert pil_to_uint8(apply_pil(img, "posterize", [0.0]))[:, 0, 0].tolist() == [128, 0, 128]  # 1 bit
    assert pil_to_uint8(apply_pil(img, "posterize", [1.0]))[:, 0, 0].tolist() == [200, 100, 255]  # 1 + int(7.999) = 8 bits
    x = pil_to_uint8(img).unsqueeze(0).expand(2, -1, -1, -1)
    got = apply_batch(x, torch.full((2,), CTA_OP_INDEX["posterize"]), torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64), torch.zeros(2, 2))
    assert got[:, :, 0, 0].tolist() == [[128, 0, 128], [200, 100, 255]]


def test_rotate_angles_by_hand():
    img = images(1, "L", 16, 16, seed=2)[0]
    levels, degrees = [0.0, 0.5, 1.0, 0.25, 0.75], [-45, 0, 45, -22, 22]  # np.round(+-22.5) to even: +-22
    expected = stack([img.rotate(d) for d in degrees])
    assert torch.equal(stack([apply_pil(img, "rotate", [v]) for v in levels]), expected)
    args = torch.tensor([[v, 0.0] for v in levels], dtype=torch.float64)
    assert torch.equal(apply_batch(stack([img] * 5), torch.full((5,), CTA_OP_INDEX["rotate"]), args, torch.zeros(5, 2)), expected)
    every_angle = torch.tensor([[(a / 45 + 1) / 2, 0.0] for a in range(-45, 46)], dtype=torch.float64)
    x = pil_to_uint8(img).unsqueeze(0).expand(91, -1, -1, -1)
    got = apply_batch(x, torch.full((91,), CTA_OP_INDEX["rotate"]), every_angle, torch.zeros(91, 2))
    assert torch.equal(got, stack([img.rotate(a) for a in range(-45, 46)]))


def test_blur_by_hand():
    """BLUR averages the ring of 16 pixels two away (not the centre 3 x 3), rounded; the 2-pixel border is kept."""
    x = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    x[0, 0, 8, 8] = 160
    args = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    got = apply_batch(x, torch.tensor([CTA_OP_INDEX["blur"]]), args, torch.zeros(1, 2))[0, 0]
    assert got[8, 8] == 0 and got[8, 9] == 0 and got[8, 10] == 10 and got[6, 6] == 10  # (160 + 8) >> 4
    assert int(got.sum()) == 16 * 10
    edge = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    edge[0, 0, 1, 1] = 160  # a border pixel: kept; its ring neighbours inside see it
    got = apply_batch(edge, torch.tensor([CTA_OP_INDEX["blur"]]), args, torch.zeros(1, 2))[0, 0]
    assert got[1, 1] == 160 and got[3, 3] == 10 and got[2, 2] == 0


# ---------------------------------------------------------------- the table and bad input


def test_table_is_the_official_registration():
    assert [(op.name, op.bins) for op in CTA_OPS] == [
        ("autocontrast", (17,)), ("blur", (17,)), ("brightness", (17,)), ("color", (17,)), ("contrast", (17,)), ("cutout", (17,)),
        ("equalize", (17,)), ("invert", (17,)), ("identity", ()), ("posterize", (8,)), ("rescale", (17, 6)), ("rotate", (17,)),
        ("sharpness", (17,)), ("shear_x", (17,)), ("shear_y", (17,)), ("smooth", (17,)), ("solarize", (17,)), ("translate_x", (17,)),
        ("translate_y", (17,)),
    ]


def test_bad_input_is_refused_with_the_reason():
    img = images(1, "RGB", 16, 16, seed=0)[0]
    with pytest.raises(ValueError, match="unknown CTAugment op 'Rotate'"):
        apply_pil(img, "Rotate", [0.5])
    with pytest.raises(ValueError, match="rescale takes 2 magnitude"):
        apply_pil(img, "rescale", [0.5])
    with pytest.raises(ValueError, match=r"rotate's magnitude 0 must be a magnitude in \[0, 1\], got 1.5"):
        apply_pil(img, "rotate", [1.5])
    with pytest.raises(ValueError, match="mode must be one of"):
        apply_pil(img.convert("RGBA"), "identity", [])
    x, c = stack([img, img]), torch.zeros(2, 2, dtype=torch.int64)
    ok = torch.tensor([[0.5, math.nan], [0.5, 0.5]], dtype=torch.float64)
    with pytest.raises(ValueError, match="op ids must be in 0..18"):
        apply_batch(x, torch.tensor([0, 19]), ok, c)
    with pytest.raises(ValueError, match=r"sample 1: rescale's magnitude 1 must be in \[0, 1\], got nan"):
        apply_batch(x, torch.tensor([0, CTA_OP_INDEX["rescale"]]), torch.tensor([[0.5, 0.5], [0.5, math.nan]], dtype=torch.float64), c)
    with pytest.raises(ValueError, match=r"args \(N, 2\)"):
        apply_batch(x, torch.tensor([0, 1]), ok[:, :1], c)
    assert apply_batch(x[:0], torch.zeros(0, dtype=torch.int64), ok[:0], c[:0]).shape == (0, 3, 16, 16)
