"""The batched tensor augmentation against the per-image PIL path (the reference for correctness).

Tolerances: every op and view is compared pixel by pixel with Pillow's output. Flip, crop (all pad
modes), Cutout, Identity, Solarize, Posterize, AutoContrast, Equalize, Brightness, Color, Contrast
and Sharpness must be bit-identical. Rotate, ShearX/Y and TranslateX/Y reproduce Pillow's
nearest-neighbour mapping (16.16 fixed point, float64 for translations) and may differ only where a
source coordinate lies within float rounding of a pixel edge: at most AFFINE_TOLERANCE of the
pixels (in practice none here). Normalised float outputs must be bit-identical to the PIL views'.
"""
from __future__ import annotations

import collections
import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ignite_fixmatch.augment import draws as D
from ignite_fixmatch.augment import pil as A
from ignite_fixmatch.augment.common import FILL_REFERENCE, PAD_MODES, VARIANTS
from ignite_fixmatch.augment.geometry import AFFINE_OPS, cutout
from ignite_fixmatch.augment.ops import apply_op, histogram, normalize, pil_to_uint8
from ignite_fixmatch.augment.views import BatchedView

SIZES = [("RGB", 32, 32), ("L", 8, 8), ("RGB", 40, 24)]  # (mode, width, height)
MEAN3, STD3 = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)
AFFINE_TOLERANCE = 1e-3  # fraction of pixels allowed to differ for the five affine ops


def images(n: int, mode: str = "RGB", w: int = 32, h: int = 32, seed: int = 0) -> list[Image.Image]:
    """Noise images of varied contrast (narrow and wide level ranges exercise AutoContrast/Equalize)."""
    rs = np.random.RandomState(seed)
    out = []
    for i in range(n):
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        lo = rs.randint(0, 250)
        hi = rs.randint(lo + 1, 256)
        if i % 5 == 0:
            lo, hi = 0, 255  # full range: AutoContrast leaves it alone
        if i % 7 == 0:
            hi = lo  # a flat image: both histogram ops must leave it alone
        out.append(Image.fromarray(rs.randint(lo, hi + 1, shape).astype(np.uint8), mode))
    return out


def stack(imgs: list[Image.Image]) -> torch.Tensor:
    return torch.stack([pil_to_uint8(i) for i in imgs])


def mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
    return (a != b).float().mean().item()


def reference_magnitudes(name: str, n: int, rng: random.Random) -> list:
    """Magnitudes across the reference range, both ends included."""
    (low, high), = [(lo, hi) for nm, _, lo, hi in A.randaugment_ops_reference() if nm == name]
    if name in D.NO_MAGNITUDE_OPS:
        return [None] * n
    return [low, high] + [low + (high - low) * rng.random() for _ in range(n - 2)]


def official_magnitudes(name: str, n: int, rng: random.Random) -> list:
    """Every official level 1..9 with both signs where signed."""
    (to_mag, signed), = [(f, s) for nm, _, f, s in A.randaugment_ops_official() if nm == name]
    if to_mag is None:
        return [None] * n
    return [to_mag(1 + i % 9) * (-1 if signed and (i // 9) % 2 else 1) for i in range(n)]


# ---------------------------------------------------------------- op by op


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode,w,h", SIZES)
def test_each_op_matches_pil(variant, mode, w, h):
    imgs = images(36, mode, w, h, seed=w + h)
    x = stack(imgs)
    ra = A.RandAugmentReference() if variant == "reference" else A.RandAugmentOfficial()
    draw = reference_magnitudes if variant == "reference" else official_magnitudes
    for name in D.OP_NAMES:
        mags = draw(name, len(imgs), random.Random(name))
        expected = stack([ra.apply_ops(img, [(name, m)]) for img, m in zip(imgs, mags)])
        m = torch.tensor([math.nan if v is None else v for v in mags], dtype=torch.float64)
        got = apply_op(name, x, m, ra.affine_fill, fractional_translate=variant == "reference")
        allowed = AFFINE_TOLERANCE if name in AFFINE_OPS else 0.0
        assert mismatch(got, expected) <= allowed, (name, mismatch(got, expected))
    assert torch.equal(x, stack(imgs))  # inputs untouched


def test_ops_that_must_change_images_do():
    """Guards the comparison above against both sides being no-ops."""
    x = stack(images(8))
    for name, m in [("Rotate", 20.0), ("Solarize", 100.0), ("Equalize", None), ("Sharpness", 0.1), ("TranslateY", 0.2)]:
        mags = torch.full((8,), math.nan if m is None else m, dtype=torch.float64)
        assert mismatch(apply_op(name, x, mags, 0, True), x) > 0.1, name


def test_affine_fill_per_variant_and_mode():
    for mode, grey in (("RGB", FILL_REFERENCE), ("L", (121,))):
        white = stack([Image.new(mode, (32, 32), 255 if mode == "L" else (255, 255, 255))])
        m = torch.tensor([30.0], dtype=torch.float64)
        ref = apply_op("Rotate", white, m, A.RandAugmentReference().affine_fill, True)
        off = apply_op("Rotate", white, m, A.RandAugmentOfficial().affine_fill, False)
        assert ref[0, :, 31, 0].tolist() == [0] * len(grey)
        assert off[0, :, 31, 0].tolist() == list(grey)


def test_cutout_and_flip_pad_crop_match_pil():
    imgs = images(12, "RGB", 24, 16)
    x = stack(imgs)
    rng = random.Random(0)
    boxes = [D.cutout_box((24, 16), rng.randrange(0, 20), rng) for _ in imgs]
    expected = stack([A.fill_box(img, box, FILL_REFERENCE) for img, box in zip(imgs, boxes)])
    assert torch.equal(cutout(x, torch.tensor(boxes, dtype=torch.float64), FILL_REFERENCE), expected)
    for pad_mode in PAD_MODES:
        for seed in range(6):
            rng = random.Random(seed)
            expected = stack([A.pad_crop_flip(img, rng, 4, pad_mode, True) for img in imgs])
            view = BatchedView(None, 4, pad_mode, True)
            rng = random.Random(seed)
            params = torch.tensor([view.sample(rng, img.size) for img in imgs], dtype=torch.float64)
            assert torch.equal(view(x, params), expected), (pad_mode, seed)


def test_normalize_is_bit_identical_to_the_pil_path():
    imgs = images(5)
    expected = torch.stack([A.to_normalized_tensor(img, MEAN3, STD3) for img in imgs])
    got = normalize(stack(imgs), MEAN3, STD3, memory_format=torch.channels_last)
    assert torch.equal(got, expected) and got.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="one value per channel"):
        normalize(stack(images(1, "L", 8, 8)), MEAN3, STD3)


# ---------------------------------------------------------------- whole views, same draws


def pil_views(img, rng, weak: A.WeakView, strong: A.StrongView) -> tuple[Image.Image, Image.Image]:
    """What AugmentedDataset does for an unlabeled sample: weak then strong from one generator, as images."""
    w = A.pad_crop_flip(img, rng, weak.pad, weak.pad_mode, weak.flip)
    return w, strong.augment(img, rng)


@pytest.mark.parametrize("variant,pad_mode", [("reference", "constant"), ("official", "reflect")])
@pytest.mark.parametrize("mode,w,h", SIZES)
def test_views_reproduce_the_pil_views_sample_by_sample(variant, pad_mode, mode, w, h):
    """Same per-sample generator -> same draws -> the same weak and strong images as the PIL path."""
    mean, std = (MEAN3, STD3) if mode == "RGB" else ((0.5,), (0.25,))
    pad = max(1, w // 8)
    weak_pil, strong_pil = A.WeakView(pad, pad_mode, True, mean, std), A.StrongView(variant, pad, pad_mode, True, mean, std)
    weak, strong = BatchedView(None, pad, pad_mode, True), BatchedView(variant, pad, pad_mode, True)
    imgs = images(60, mode, w, h, seed=3)
    expected_w, expected_s, rows_w, rows_s = [], [], [], []
    for i, img in enumerate(imgs):
        ew, es = pil_views(img, random.Random(i), weak_pil, strong_pil)
        expected_w.append(ew)
        expected_s.append(es)
        rng = random.Random(i)
        rows_w.append(weak.sample(rng, img.size))
        rows_s.append(strong.sample(rng, img.size))
    x = stack(imgs)
    pw, ps = torch.tensor(rows_w, dtype=torch.float64), torch.tensor(rows_s, dtype=torch.float64)
    assert torch.equal(weak(x, pw), stack(expected_w))
    got_s = strong(x, ps)
    assert mismatch(got_s, stack(expected_s)) <= AFFINE_TOLERANCE
    assert torch.equal(strong(x, ps, grouping="mask"), got_s)  # the GPU-style selection gives the same images
    # the float tensors the model sees, through the PIL views' own __call__
    expected = torch.stack([strong_pil(img, _after_weak(i, img, weak_pil)) for i, img in enumerate(imgs)])
    assert (normalize(got_s, mean, std) != expected).float().mean().item() <= AFFINE_TOLERANCE


def _after_weak(seed: int, img, weak: A.WeakView) -> random.Random:
    rng = random.Random(seed)
    weak(img, rng)
    return rng


@pytest.mark.parametrize("variant", VARIANTS)
def test_sample_consumes_the_generator_like_the_pil_view(variant):
    """Anything drawn after the views (none today) would stay in step between the two paths."""
    img = images(1)[0]
    strong_pil, strong = A.StrongView(variant, 4, "constant", True, MEAN3, STD3), BatchedView(variant, 4, "constant", True)
    for seed in range(30):
        r1, r2 = random.Random(seed), random.Random(seed)
        strong_pil(img, r1)
        strong.sample(r2, img.size)
        assert r1.getstate() == r2.getstate()


def test_sample_reuses_sample_ops_so_choices_are_identical():
    ra, view = A.RandAugmentReference(), BatchedView("reference", 4, "constant", True)
    for seed in range(50):
        ops = ra.sample_ops(random.Random(seed))
        row = torch.tensor(view.sample(random.Random(seed), (32, 32)), dtype=torch.float64)
        assert [D.OP_NAMES[int(i)] for i in row[view.layout.ops]] == [name for name, _ in ops]
        mags = row[view.layout.mags].tolist()
        assert [None if math.isnan(m) else m for m in mags] == [m for _, m in ops]


# ---------------------------------------------------------------- torch.Generator draws: same distributions


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov distance."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b)).max())


def ks_critical(n: int, m: int, alpha: float = 1e-4) -> float:
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def chi_square_two_sample(c1: collections.Counter, c2: collections.Counter) -> tuple[float, int]:
    """Chi-square statistic that two count tables come from one distribution, and its degrees of freedom."""
    keys = sorted(set(c1) | set(c2), key=repr)
    n1, n2 = sum(c1.values()), sum(c2.values())
    stat = 0.0
    for k in keys:
        total = c1[k] + c2[k]
        e1, e2 = total * n1 / (n1 + n2), total * n2 / (n1 + n2)
        stat += (c1[k] - e1) ** 2 / e1 + (c2[k] - e2) ** 2 / e2
    return stat, len(keys) - 1


def chi_square_limit(dof: int) -> float:
    """About the 1e-4 upper quantile (Wilson-Hilferty); the seeds are fixed, so the tests never flake."""
    z = 3.72
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def draws_from_rows(view: BatchedView, rows: torch.Tensor) -> tuple[collections.Counter, dict, np.ndarray]:
    """(op counts, magnitudes per op, other columns) from parameter rows."""
    ids, mags = rows[:, view.layout.ops], rows[:, view.layout.mags]
    counts, values = collections.Counter(), collections.defaultdict(list)
    for i, m in zip(ids.flatten().tolist(), mags.flatten().tolist()):
        if i == D.NO_OP:
            continue
        counts[D.OP_NAMES[int(i)]] += 1
        if not math.isnan(m):
            values[D.OP_NAMES[int(i)]].append(m)
    return counts, values, rows[:, :7].numpy()


@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_generator_draws_have_the_pil_distributions(variant):
    n, size = 6000, (32, 24)
    view = BatchedView(variant, 4, "constant", True)
    pil_rows = torch.tensor([view.sample(random.Random(s), size) for s in range(n)], dtype=torch.float64)
    torch_rows = view.sample_torch(n, size, torch.Generator().manual_seed(0))
    assert torch_rows.shape == pil_rows.shape and torch_rows.dtype == torch.float64
    c1, v1, o1 = draws_from_rows(view, pil_rows)
    c2, v2, o2 = draws_from_rows(view, torch_rows)
    assert set(c1) == set(c2) == set(D.OP_NAMES)
    stat, dof = chi_square_two_sample(c1, c2)  # op choice
    assert stat < chi_square_limit(dof), (stat, dof)
    for name in v1:  # magnitudes, op by op
        if variant == "reference":
            assert ks_statistic(np.array(v1[name]), np.array(v2[name])) < ks_critical(len(v1[name]), len(v2[name])), name
        else:  # discrete levels and signs
            stat, dof = chi_square_two_sample(collections.Counter(v1[name]), collections.Counter(v2[name]))
            assert set(v1[name]) == set(v2[name]) and stat < chi_square_limit(dof), name
    applied1 = collections.Counter((pil_rows[:, view.layout.ops] != D.NO_OP).sum(1).tolist())
    applied2 = collections.Counter((torch_rows[:, view.layout.ops] != D.NO_OP).sum(1).tolist())
    stat, dof = chi_square_two_sample(applied1, applied2)  # official: Binomial(2, 1/2) ops applied
    assert stat < chi_square_limit(max(dof, 1))
    for col in range(7):  # flip, crop offsets, cutout box
        a, b = o1[:, col], o2[:, col]
        assert ks_statistic(a, b) < ks_critical(n, n), col
        assert a.min() == b.min() and a.max() == b.max(), col


def test_torch_generator_draws_are_seeded_and_valid():
    view = BatchedView("reference", 4, "reflect", True)
    a = view.sample_torch(64, (32, 32), torch.Generator().manual_seed(5))
    same = view.sample_torch(64, (32, 32), torch.Generator().manual_seed(5))
    assert torch.equal(a.nan_to_num(-1.0), same.nan_to_num(-1.0))  # NaN marks ops without magnitude
    assert not torch.equal(a.nan_to_num(-1.0), view.sample_torch(64, (32, 32), torch.Generator().manual_seed(6)).nan_to_num(-1.0))
    out = view(stack(images(64)), a)
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.uint8


# ---------------------------------------------------------------- errors and devices


def test_clear_errors():
    view = BatchedView("reference", 4, "constant", True)
    x = stack(images(2))
    with pytest.raises(ValueError, match="uint8"):
        view(x.float(), torch.zeros(2, view.layout.width, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"params must have shape \(2, 13\)"):
        view(x, torch.zeros(2, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="grouping"):
        view(x, torch.zeros(2, 13, dtype=torch.float64), grouping="fast")
    with pytest.raises(ValueError, match="variant"):
        BatchedView("rand", 4, "constant", True)
    with pytest.raises(ValueError, match="pad_mode"):
        BatchedView(None, 4, "wrap", True)


def test_histogram_without_bincount_counts_the_same():
    """The GPU histogram (index_add_, no host sync) gives bincount's counts."""
    index = torch.randint(0, 512, (5000,), dtype=torch.int32)
    assert torch.equal(histogram(index, 600, use_bincount=False), histogram(index, 600, use_bincount=True))
    assert histogram(index, 600, use_bincount=False).sum() == 5000


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode,w,h", SIZES)
def test_device_path_gives_the_index_paths_images_for_every_op_in_every_slot(variant, mode, w, h):
    """The one-pass slots of the device path (grouping="mask") against grouping by index, bit for bit:
    each op in each slot (after every other op in the slot before), empty official slots included,
    on images of every contrast, flat ones too."""
    view = BatchedView(variant, max(1, w // 8), "constant", True)
    ra, draw = view.randaugment, reference_magnitudes if variant == "reference" else official_magnitudes
    names = list(D.OP_NAMES) + ([None] if variant == "official" else [])  # None: an empty slot (NO_OP)
    rng = random.Random(w * h)
    rows, imgs = [], images(len(names) * len(names), mode, w, h, seed=h)
    for i, img in enumerate(imgs):  # sample i: op names[i % K] in one slot, names[i // K] in the others
        row = view.sample(random.Random(i), img.size)
        for k in range(ra.n):
            name = names[i % len(names)] if k == i % ra.n else names[i // len(names)]
            m = None if name is None else draw(name, 3, rng)[rng.randrange(3)]
            row[view.layout.ops.start + k] = D.NO_OP if name is None else D.OP_INDEX[name]
            row[view.layout.mags.start + k] = math.nan if m is None else m
        rows.append(row)
    x, params = stack(imgs), torch.tensor(rows, dtype=torch.float64)
    by_index = view(x, params, grouping="index")
    assert torch.equal(view(x, params, grouping="mask"), by_index)
    assert mismatch(by_index, x) > 0.2  # the ops did change the images


@pytest.mark.parametrize("variant", VARIANTS)
def test_device_path_never_reads_the_device_and_launches_few_kernels(variant):
    """The device path runs on the meta device, where any read of a value back to the host would raise
    (a GPU would synchronise there), and one step's augmentation (64 + 448 weak, 448 strong) dispatches a
    bounded number of kernels: on a GPU their count, not their arithmetic, sets the time (2.7 us each on
    an H100). Grouping every op of a slot in one pass took it from 953 to 486 (reference)."""
    from benchmarks.run import augmentation_kernels

    assert augmentation_kernels(variant=variant) <= 520


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_images():
    view = BatchedView("reference", 4, "constant", True)
    x = stack(images(40))
    params = torch.tensor([view.sample(random.Random(s), (32, 32)) for s in range(40)], dtype=torch.float64)
    expected = view(x, params)
    assert torch.equal(view(x.cuda(), params.cuda()).cpu(), expected)  # mask grouping on the device
    assert torch.equal(view(x.cuda(), params).cpu(), expected)  # index grouping from host params


# ---------------------------------------------------------------- wired: data.augment=batched


def _stream(overrides: list[str], start: int = 0):
    from ignite_fixmatch.config import load_config
    from ignite_fixmatch.data import FixMatchStream, build_data, sources_from_config

    cfg = load_config(None, ["data.num_workers=0", *overrides])
    data = build_data(cfg, sources_from_config(cfg))
    return data, iter(FixMatchStream(data, cfg, 0, 1, start_iteration=lambda: start))


@pytest.mark.parametrize("dataset", ["digits", "folder"])
def test_batched_stream_gives_the_pil_streams_batches(dataset, tmp_path):
    """Same samples, same draws: the trainer's batch_transform rebuilds the PIL loaders' tensors."""
    if dataset == "digits":  # 8x8 grey
        base = ["data.name=digits", "data.num_labels=50", "data.batch_size=10", "data.mu=2"]
    else:  # 16x16 RGB files, official RandAugment, reflect padding
        import datagen

        root = datagen.make_image_folder(tmp_path / "images", n_train_per_class=8, size=(16, 16))
        base = ["data.name=folder", f"data.root={root}", "data.num_labels=6", "data.batch_size=6", "data.mu=3",
                "data.randaugment=official", "data.pad_mode=reflect"]
    _, pil = _stream([*base, "data.augment=pil"])
    data, batched = _stream([*base, "data.augment=batched"])
    assert data.batched is not None
    for _ in range(3):
        expected, raw = next(pil), next(batched)
        assert raw["x"].dtype == raw["u"].dtype == torch.uint8 and raw["u_strong"].dtype == torch.float64
        got = data.batched(raw)
        assert set(got) == set(expected) == {"x", "y", "u_w", "u_s", "u_y", "u_idx"}
        for key in ("x", "y", "u_w", "u_y", "u_idx"):
            assert torch.equal(got[key], expected[key]), key
        assert (got["u_s"] != expected["u_s"]).float().mean().item() <= AFFINE_TOLERANCE
        assert got["u_s"].is_contiguous(memory_format=torch.channels_last)  # model.channels_last is the default
    _, resumed = _stream([*base, "data.augment=batched"], start=2)  # resume needs no sampler state
    assert torch.equal(next(resumed)["u_strong"].nan_to_num(-1.0), raw["u_strong"].nan_to_num(-1.0))


@pytest.mark.slow
def test_cli_trains_with_batched_augmentation(tmp_path):
    """The real CLI: data.augment=batched reaches the trainer and a short run finishes."""
    from helpers import cli, make_folder, tiny_overrides

    out = tmp_path / "run"
    args = tiny_overrides(make_folder(tmp_path), out, "data.augment=batched", "train.num_iters=4", "train.epoch_length=2")
    result = cli(["configs/quickstart.yaml", *args])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "augment: batched" in (out / "config.yaml").read_text()
    assert json.loads((out / "results.json").read_text())["iteration"] == 4
