"""Tests for ignite_fixmatch.augment.pil and .draws: real PIL images, real torchvision functional, seeded draws."""
from __future__ import annotations

import collections
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ignite_fixmatch.augment import draws as D
from ignite_fixmatch.augment import pil as A
from ignite_fixmatch.augment.common import FILL_REFERENCE, VARIANTS

SIZES = [("RGB", 32, 32), ("L", 8, 8), ("RGB", 96, 64)]  # (mode, width, height)
MEAN3, STD3 = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)


def noise(mode: str = "RGB", w: int = 32, h: int = 32, seed: int = 0, low: int = 0) -> Image.Image:
    """A random image whose pixels are all >= low."""
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    arr = np.random.RandomState(seed).randint(low, 256, shape, dtype=np.uint8)
    return Image.fromarray(arr, mode)


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


def assert_valid(out: Image.Image, ref: Image.Image) -> None:
    assert isinstance(out, Image.Image)
    assert out.size == ref.size and out.mode == ref.mode
    a = arr(out)
    assert a.dtype == np.uint8 and a.shape == arr(ref).shape


# ---------------------------------------------------------------- every op at its extremes


@pytest.mark.parametrize("mode,w,h", SIZES)
def test_reference_ops_at_min_and_max_magnitude(mode, w, h):
    img = noise(mode, w, h)
    ops = A.randaugment_ops_reference()
    assert len(ops) == 14
    for name, op, low, high in ops:
        for magnitude in ([None] if name in D.NO_MAGNITUDE_OPS else [low, high]):
            for fill in (0, FILL_REFERENCE):
                assert_valid(op(img, magnitude, fill), img)


@pytest.mark.parametrize("mode,w,h", SIZES)
def test_official_ops_at_min_and_max_level(mode, w, h):
    img = noise(mode, w, h)
    ops = A.randaugment_ops_official()
    assert len(ops) == 14
    for _name, op, to_magnitude, signed in ops:
        for level in (1, D.OFFICIAL_MAX_LEVEL):
            magnitude = None if to_magnitude is None else to_magnitude(level)
            for sign in ((1, -1) if signed else (1,)):
                value = None if magnitude is None else sign * magnitude
                assert_valid(op(img, value, FILL_REFERENCE), img)


def test_op_names_match_tables_and_cover_the_same_14_ops():
    assert D.op_names_reference() == [t[0] for t in A.randaugment_ops_reference()]
    assert D.op_names_official() == [t[0] for t in A.randaugment_ops_official()]
    assert len(set(D.op_names_reference())) == 14
    assert set(D.op_names_reference()) == set(D.op_names_official())


def test_reference_magnitude_ranges_are_the_spec():
    ranges = {name: (low, high) for name, _, low, high in A.randaugment_ops_reference()}
    for name in ("Brightness", "Color", "Contrast", "Sharpness"):
        assert ranges[name] == (0.05, 0.95)
    assert ranges["Posterize"] == (4, 8)
    assert ranges["Rotate"] == (-30, 30)
    assert ranges["Solarize"] == (0, 256)
    for name in ("ShearX", "ShearY", "TranslateX", "TranslateY"):
        assert ranges[name] == (-0.3, 0.3)


def test_official_level_to_magnitude_is_the_spec():
    table = {name: (to_mag, signed) for name, _, to_mag, signed in A.randaugment_ops_official()}
    expected = {  # name: (level 1, level 9)
        "Brightness": (0.28, 1.72), "Color": (0.28, 1.72), "Contrast": (0.28, 1.72), "Sharpness": (0.28, 1.72),
        "Posterize": (4, 1), "Rotate": (3, 27), "ShearX": (0.03, 0.27), "ShearY": (0.03, 0.27),
        "TranslateX": (1, 9), "TranslateY": (1, 9), "Solarize": (231, 26),
    }
    for name, (at1, at9) in expected.items():
        to_mag, _ = table[name]
        assert to_mag(1) == pytest.approx(at1) and to_mag(9) == pytest.approx(at9), name
    assert table["Posterize"][0](5) == 2 and table["Solarize"][0](5) == 128
    assert {n for n, (_, signed) in table.items() if signed} == {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}
    assert all(table[n][0] is None for n in D.NO_MAGNITUDE_OPS)


# ---------------------------------------------------------------- what the ops do


def test_solarize_posterize_and_enhance_semantics():
    img = noise()
    a = arr(img).astype(int)
    assert (arr(A.solarize(img, 0, 0)) == 255 - a).all()
    assert (arr(A.solarize(img, 256, 0)) == a).all()
    assert (arr(A.posterize(img, 4.9, 0)) == (a & 0xF0)).all()  # float draw truncated to 4 bits
    assert (arr(A.brightness(img, 1.0, 0)) == a).all()
    assert arr(A.brightness(img, 0.05, 0)).mean() < 0.1 * a.mean()


def test_reference_translate_is_a_fraction_of_the_size_and_fills_black():
    img = noise("RGB", 40, 24, low=1)  # non-square: X uses the width (10 px), Y the height (6 px)
    out = arr(A.RandAugmentReference().apply_ops(img, [("TranslateX", 0.25)]))
    assert (out[:, :30] == arr(img)[:, 10:]).all()
    assert (out[:, 30:] == 0).all()
    out = arr(A.RandAugmentReference().apply_ops(img, [("TranslateY", -0.25)]))
    assert (out[6:] == arr(img)[:-6]).all()
    assert (out[:6] == 0).all()


def test_official_translate_is_in_pixels_and_fills_grey():
    img = noise("RGB", 96, 64, low=1)
    out = arr(A.RandAugmentOfficial().apply_ops(img, [("TranslateX", 9)]))
    assert (out[:, :87] == arr(img)[:, 9:]).all()
    assert (out[:, 87:] == FILL_REFERENCE).all()


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_geometric_fill_per_variant_and_mode(mode):
    img = Image.new(mode, (32, 32), 255 if mode == "L" else (255, 255, 255))
    grey = FILL_REFERENCE if mode == "RGB" else 121  # L takes the rounded mean of the triple
    black = (0, 0, 0) if mode == "RGB" else 0
    for op in ("Rotate", "ShearX"):
        ref = A.RandAugmentReference().apply_ops(img, [(op, 30.0 if op == "Rotate" else 0.3)])
        off = A.RandAugmentOfficial().apply_ops(img, [(op, 27 if op == "Rotate" else 0.27)])
        corner = (0, 31) if op == "Rotate" else (31, 31)
        assert ref.getpixel(corner) == black, op
        assert off.getpixel(corner) == grey, op


def test_apply_ops_rejects_unknown_op_and_bad_mode():
    with pytest.raises(ValueError, match="Invert"):
        A.RandAugmentReference().apply_ops(noise(), [("Invert", None)])
    with pytest.raises(ValueError, match="RGBA"):
        A.RandAugmentOfficial()(noise().convert("RGBA"), random.Random(0))


# ---------------------------------------------------------------- drawing


def test_reference_draws_exactly_n_ops_with_magnitudes_in_range():
    ra = A.RandAugmentReference()
    rng = random.Random(1)
    ranges = {name: (low, high) for name, _, low, high in A.randaugment_ops_reference()}
    seen = collections.defaultdict(list)
    for _ in range(1500):
        ops = ra.sample_ops(rng)
        assert len(ops) == 3
        for name, magnitude in ops:
            if name in D.NO_MAGNITUDE_OPS:
                assert magnitude is None
            else:
                low, high = ranges[name]
                assert low <= magnitude <= high, (name, magnitude)
                seen[name].append(magnitude)
    assert len(A.RandAugmentReference(n=5).sample_ops(rng)) == 5
    for name, values in seen.items():  # the draws also reach both ends of the range
        low, high = ranges[name]
        assert min(values) < low + 0.03 * (high - low) and max(values) > high - 0.03 * (high - low), name


def chi_square(counts: collections.Counter, names: list[str]) -> float:
    total = sum(counts.values())
    expected = total / len(names)
    assert set(counts) <= set(names)
    return sum((counts[n] - expected) ** 2 / expected for n in names)


def test_reference_op_choice_is_uniform():
    ra, rng = A.RandAugmentReference(), random.Random(2)
    counts = collections.Counter(name for _ in range(1400) for name, _ in ra.sample_ops(rng))
    # 13 degrees of freedom: P(chi2 > 40) is about 1e-4; the seed is fixed, so this never flakes.
    assert chi_square(counts, D.op_names_reference()) < 40


def test_official_applies_each_op_with_probability_half_and_choice_is_uniform():
    ra, rng = A.RandAugmentOfficial(), random.Random(3)
    lengths, counts = collections.Counter(), collections.Counter()
    for _ in range(4000):
        ops = ra.sample_ops(rng)
        lengths[len(ops)] += 1
        counts.update(name for name, _ in ops)
    assert set(lengths) == {0, 1, 2}
    for k, p in {0: 0.25, 1: 0.5, 2: 0.25}.items():  # Binomial(2, 0.5)
        assert abs(lengths[k] / 4000 - p) < 0.03, (k, lengths)
    assert chi_square(counts, D.op_names_official()) < 40


def test_official_levels_and_signs_cover_the_spec():
    ra, rng = A.RandAugmentOfficial(n=4), random.Random(4)
    table = {name: (to_mag, signed) for name, _, to_mag, signed in A.randaugment_ops_official()}
    seen = collections.defaultdict(set)
    for _ in range(3000):
        for name, magnitude in ra.sample_ops(rng):
            seen[name].add(magnitude)
    for name, (to_mag, signed) in table.items():
        if to_mag is None:
            assert seen[name] == {None}
            continue
        allowed = {to_mag(level) for level in range(1, 10)}
        if signed:
            allowed |= {-m for m in allowed}
        assert seen[name] == allowed, name  # every level 1..9 (and both signs) seen, nothing else


@pytest.mark.parametrize("cls", [A.RandAugmentOfficial, lambda: A.RandAugmentReference(cutout=0.0)])
def test_call_applies_what_sample_ops_draws(cls):
    ra, img = cls(), noise()
    for seed in range(20):
        drawn = ra.apply_ops(img, ra.sample_ops(random.Random(seed)))
        assert (arr(ra(img, random.Random(seed))) == arr(drawn)).all()


def test_randaugment_changes_images_and_never_returns_a_bad_image():
    img = noise("RGB", 96, 64)
    for ra in (A.RandAugmentReference(), A.RandAugmentOfficial()):
        changed = 0
        for seed in range(30):
            out = ra(img, random.Random(seed))
            assert_valid(out, img)
            changed += not (arr(out) == arr(img)).all()
        assert changed >= 10


# ---------------------------------------------------------------- cutout


def filled_box(out: np.ndarray, fill) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    mask = (out == fill).all(axis=-1) if out.ndim == 3 else out == fill
    if not mask.any():
        return mask, None
    ys, xs = np.nonzero(mask)
    return mask, (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_cutout_fills_a_clipped_square_with_the_fill_colour():
    img = Image.new("RGB", (32, 24))
    fill, side, interior, clipped = (200, 100, 50), 10, 0, 0
    edge_widths = []
    for seed in range(100):
        out = arr(A.cutout(img, side, random.Random(seed), fill))
        mask, box = filled_box(out, fill)
        x0, y0, x1, y1 = box
        assert mask[y0:y1, x0:x1].all() and mask.sum() == (x1 - x0) * (y1 - y0)  # a solid rectangle
        assert (out[~mask] == 0).all()  # nothing else touched
        assert x1 - x0 <= side and y1 - y0 <= side
        if 0 < x0 and 0 < y0 and x1 < 32 and y1 < 24:
            assert (x1 - x0, y1 - y0) == (side, side)
            interior += 1
        else:
            clipped += 1
        if x0 == 0 or x1 == 32:
            edge_widths.append((x0 == 0, x1 - x0))
    assert interior > 10 and clipped > 10
    for left in (True, False):  # a square over either edge is cut off, not shifted inside
        assert min(width for at_left, width in edge_widths if at_left == left) < side
    assert (arr(img) == 0).all()  # input untouched


def test_cutout_grey_level_for_L_and_edge_cases():
    img = Image.new("L", (8, 8))
    out = arr(A.cutout(img, 4, random.Random(0), FILL_REFERENCE))
    assert set(np.unique(out)) == {0, 121}
    assert (arr(A.cutout(img, 0, random.Random(0), 255)) == 0).all()
    assert (arr(A.cutout(img, 100, random.Random(0), 255)) == 255).all()
    with pytest.raises(ValueError, match="side"):
        A.cutout(img, -1, random.Random(0), 255)


def test_reference_cutout_side_is_up_to_half_the_width():
    ra = A.RandAugmentReference()
    sides = [ra.sample_cutout_side(64, random.Random(s)) for s in range(300)]
    assert min(sides) <= 2 and max(sides) >= 30 and max(sides) <= 32
    assert D.official_cutout_side(32) == 16 and D.official_cutout_side(96) == 48


# ---------------------------------------------------------------- pad, crop, flip


def windows(a: np.ndarray, pad: int, mode: str) -> dict[tuple[bool, int, int], np.ndarray]:
    """Every (flipped, left, top) crop a correct pad_crop_flip may return."""
    h, w = a.shape[:2]
    out = {}
    for flipped in (False, True):
        src = a[:, ::-1] if flipped else a
        widths = ((pad, pad), (pad, pad)) + (((0, 0),) if a.ndim == 3 else ())
        padded = np.pad(src, widths, mode=mode)
        for left in range(2 * pad + 1):
            for top in range(2 * pad + 1):
                out[(flipped, left, top)] = padded[top:top + h, left:left + w]
    return out


def test_pad_crop_flip_identity_without_pad_and_flip():
    for mode, w, h in SIZES:
        img = noise(mode, w, h)
        for seed in range(5):
            out = A.pad_crop_flip(img, random.Random(seed), pad=0, pad_mode="constant", flip=False)
            assert out.size == img.size and out.mode == img.mode and (arr(out) == arr(img)).all()


def test_pad_crop_flip_flips_half_the_time():
    img = noise()
    flips = sum(
        (arr(A.pad_crop_flip(img, random.Random(s), pad=0, flip=True)) == arr(img)[:, ::-1]).all()
        for s in range(200)
    )
    assert 70 < flips < 130


@pytest.mark.parametrize("pad_mode,np_mode", [("reflect", "reflect"), ("constant", "constant")])
def test_pad_crop_flip_is_a_window_of_the_padded_image(pad_mode, np_mode):
    img = noise("RGB", 24, 16, low=1)
    candidates = windows(arr(img), 4, np_mode)
    hits, zero_seen = set(), False
    for seed in range(300):
        out = arr(A.pad_crop_flip(img, random.Random(seed), pad=4, pad_mode=pad_mode, flip=True))
        assert out.shape == arr(img).shape
        match = [k for k, c in candidates.items() if (c == out).all()]
        assert len(match) == 1
        hits.add(match[0])
        zero_seen |= bool((out == 0).all(axis=-1).any())
    assert {k[1] for k in hits} == set(range(9)) and {k[2] for k in hits} == set(range(9))
    assert {k[0] for k in hits} == {False, True}
    assert zero_seen == (pad_mode == "constant")  # reflect never shows a constant (black) border


# ---------------------------------------------------------------- views


def test_weak_view_shape_dtype_and_normalisation_by_hand():
    rgb = (100, 150, 200)
    view = A.WeakView(pad=4, pad_mode="reflect", flip=True, mean=MEAN3, std=STD3)
    out = view(Image.new("RGB", (32, 24), rgb), random.Random(0))
    assert out.shape == (3, 24, 32) and out.dtype == torch.float32
    for c in range(3):
        expected = (rgb[c] / 255 - MEAN3[c]) / STD3[c]
        assert torch.allclose(out[c], torch.full((24, 32), expected), atol=1e-6)
    grey = A.WeakView(pad=2, pad_mode="reflect", flip=False, mean=[0.5], std=[0.25])
    out = grey(Image.new("L", (8, 8), 51), random.Random(0))
    assert out.shape == (1, 8, 8) and torch.allclose(out, torch.full((1, 8, 8), (0.2 - 0.5) / 0.25))


def test_weak_view_constant_padding_shows_black_border_value():
    view = A.WeakView(pad=4, pad_mode="constant", flip=False, mean=[0.5], std=[0.5])
    values = set()
    for seed in range(20):
        values |= set(view(Image.new("L", (8, 8), 255), random.Random(seed)).unique().tolist())
    assert values == {-1.0, 1.0}


def test_to_normalized_tensor_needs_one_mean_per_channel():
    with pytest.raises(ValueError, match="mean"):
        A.to_normalized_tensor(Image.new("L", (8, 8)), MEAN3, STD3)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode,w,h", SIZES)
def test_strong_view_output(variant, mode, w, h):
    mean, std = (MEAN3, STD3) if mode == "RGB" else ([0.5], [0.5])
    view = A.StrongView(variant, pad=4, pad_mode="reflect", flip=True, mean=mean, std=std)
    img = noise(mode, w, h)
    weak = A.WeakView(4, "reflect", True, mean, std)
    for seed in range(10):
        out = view(img, random.Random(seed))
        assert out.shape == (len(mean), h, w) and out.dtype == torch.float32 and torch.isfinite(out).all()
        assert not torch.equal(out, weak(img, random.Random(seed)))


def test_strong_view_order_per_variant():
    img, pad, mode = noise("RGB", 32, 32), 4, "constant"
    for seed in range(10):
        rng = random.Random(seed)  # reference: RandAugment (with its cutout) before flip + crop
        expected = A.pad_crop_flip(A.RandAugmentReference()(img, rng), rng, pad, mode, True)
        got = A.StrongView("reference", pad, mode, True, MEAN3, STD3)(img, random.Random(seed))
        assert torch.equal(got, A.to_normalized_tensor(expected, MEAN3, STD3))

        rng = random.Random(seed)  # official: flip + crop, RandAugment, fixed 16 px cutout
        x = A.pad_crop_flip(img, rng, pad, mode, True)
        x = A.cutout(A.RandAugmentOfficial()(x, rng), 16, rng, FILL_REFERENCE)
        got = A.StrongView("official", pad, mode, True, MEAN3, STD3)(img, random.Random(seed))
        assert torch.equal(got, A.to_normalized_tensor(x, MEAN3, STD3))


@pytest.mark.parametrize(
    "make",
    [
        lambda: A.WeakView(4, "reflect", True, MEAN3, STD3),
        lambda: A.StrongView("reference", 4, "constant", True, MEAN3, STD3),
        lambda: A.StrongView("official", 4, "reflect", True, MEAN3, STD3),
    ],
)
def test_views_are_deterministic_per_seed_and_picklable(make):
    view, img = make(), noise("RGB", 32, 32)
    a, b = view(img, random.Random(123)), view(img, random.Random(123))
    assert torch.equal(a, b)
    assert not torch.equal(a, view(img, random.Random(124)))
    clone = pickle.loads(pickle.dumps(view))  # DataLoader workers may pickle the view
    assert torch.equal(clone(img, random.Random(123)), a)


def test_global_random_generators_are_untouched():
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    img = noise()
    for variant in VARIANTS:
        view = A.StrongView(variant, 4, "reflect", True, MEAN3, STD3)
        for seed in range(20):
            view(img, random.Random(seed))
            A.WeakView(4, "constant", True, MEAN3, STD3)(img, random.Random(seed))
    assert random.getstate() == states[0]
    assert (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda: A.RandAugmentReference(n=0), ["n", "0", ">= 1"]),
        (lambda: A.RandAugmentOfficial(n=0), ["n", "0", ">= 1"]),
        (lambda: A.RandAugmentReference(cutout=0.7 * 2), ["cutout", "1.4"]),
        (lambda: A.RandAugmentReference(fill=(300, 0, 0)), ["fill", "300"]),
        (lambda: A.StrongView("fancy", 4, "reflect", True, MEAN3, STD3), ["variant", "'fancy'", "reference", "official"]),
        (lambda: A.WeakView(-1, "reflect", True, MEAN3, STD3), ["pad", "-1"]),
        (lambda: A.StrongView("official", -2, "reflect", True, MEAN3, STD3), ["pad", "-2"]),
        (lambda: A.WeakView(4, "wrap", True, MEAN3, STD3), ["pad_mode", "'wrap'", "reflect", "constant"]),
        (lambda: A.StrongView("reference", 4, "wrap", True, MEAN3, STD3), ["pad_mode", "'wrap'"]),
        (lambda: A.WeakView(4, "reflect", "False", MEAN3, STD3), ["flip", "'False'"]),
        (lambda: A.WeakView(4, "reflect", True, MEAN3, STD3[:2]), ["mean", "std"]),
        (lambda: A.WeakView(4, "reflect", True, MEAN3, (0.2, 0.0, 0.2)), ["std"]),
    ],
)
def test_constructor_errors_name_the_argument(make, words):
    with pytest.raises(ValueError) as info:
        make()
    for word in words:
        assert word in str(info.value)


def test_rng_must_be_an_explicit_generator():
    view = A.WeakView(4, "reflect", True, MEAN3, STD3)
    with pytest.raises(TypeError, match="rng"):
        view(noise(), random)  # the module would silently use the global generator
    with pytest.raises(TypeError, match="rng"):
        A.RandAugmentReference().sample_ops(np.random.default_rng(0))
