"""CTAugment's policy (augment/ctaugment.py): bin probabilities, inverse-CDF draws, probe updates against
hand-computed values; its views on the PIL and batched paths; and its place in real runs (resume, DDP)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from ignite_fixmatch.augment import ctaugment as C
from ignite_fixmatch.augment.ctaugment_table import CTA_OP_INDEX, CTA_OPS


def _param(policy: C.CTAPolicy, op: str, j: int = 0) -> tuple[int, int, int]:
    """(index into policy.params, start in weights, bins) of one op parameter."""
    i = int(policy.param_of[CTA_OP_INDEX[op], j])
    _, _, start, bins = policy.params[i]
    return i, start, bins


def test_the_table_has_the_official_ops_and_bins():
    policy = C.CTAPolicy()
    assert len(CTA_OPS) == 19
    bins = {op.name: tuple(op.bins) for op in CTA_OPS}
    assert bins["identity"] == () and bins["posterize"] == (8,) and bins["rescale"] == (17, 6)
    assert all(b == (17,) for n, b in bins.items() if n not in ("identity", "posterize", "rescale"))
    assert policy.weights.numel() == 16 * 17 + 8 + 17 + 6
    assert torch.equal(policy.weights, torch.ones_like(policy.weights))


def test_fresh_weights_give_uniform_bins():
    for p in C.CTAPolicy().probabilities():
        np.testing.assert_allclose(p, np.full(len(p), 1 / len(p)))


def test_probabilities_follow_rate_to_p_by_hand():
    policy = C.CTAPolicy()
    i, start, bins = _param(policy, "posterize")
    policy.weights[start : start + bins] = torch.tensor([1.0, 0.5, 0.8, 0.79, 0.0, 1.0, 0.9, 0.78], dtype=torch.float64)
    # (w + 0.01) / 1.01: 1, 0.5049, 0.8020, 0.7921 (< 0.8: 0), 0.0099, 1, 0.8990, 0.7822 (< 0.8: 0)
    expected = np.array([1.01, 0, 0.81, 0, 0, 1.01, 0.91, 0]) / 1.01
    np.testing.assert_allclose(policy.probabilities()[i], expected / expected.sum())


def _rows_with(op: str, v: float, r: float, n: int = 1) -> torch.Tensor:
    """Strong rows whose slots both hold ``op`` with bin-choice ``v`` and position ``r`` for every parameter."""
    row = [0.0, 0.0, 0.0] + [float(CTA_OP_INDEX[op]), v, r, v, r, 3.0, 4.0] * C.DEPTH + [5.0, 6.0]
    return torch.tensor([row] * n, dtype=torch.float64)


def test_resolve_picks_the_bin_by_inverse_cdf_and_never_a_zero_bin():
    policy = C.CTAPolicy()
    _, start, bins = _param(policy, "posterize")  # 8 bins
    w = torch.zeros(bins, dtype=torch.float64)
    w[[2, 5]] = 1.0  # only bins 2 and 5 pass the threshold: probability 1/2 each
    policy.weights[start : start + bins] = w
    for v, expected_bin in [(0.0, 2), (0.49, 2), (0.5, 5), (0.999, 5)]:
        ids, args, centres, final = policy.resolve(_rows_with("posterize", v, 0.25))
        assert ids.tolist() == [[CTA_OP_INDEX["posterize"]] * C.DEPTH]
        assert args[0, 0, 0].item() == pytest.approx((expected_bin + 0.25) / 8)
        assert args[0, 0, 1].item() == 0.0  # posterize has no second parameter
        assert centres.tolist() == [[[3, 4]] * C.DEPTH] and final.tolist() == [[5, 6]]


def test_resolve_of_a_fresh_policy_is_uniform_over_the_range():
    """Uniform bins: the value is (floor(v * bins) + r) / bins, i.e. about v when r = v * bins mod 1."""
    policy = C.CTAPolicy()
    _, args, _, _ = policy.resolve(_rows_with("rotate", 0.40, 0.5))
    assert args[0, 0, 0].item() == pytest.approx((math.floor(0.40 * 17) + 0.5) / 17)
    _, args, _, _ = policy.resolve(_rows_with("rescale", 0.90, 0.0))
    assert args[0, 0].tolist() == pytest.approx([math.floor(0.9 * 17) / 17, math.floor(0.9 * 6) / 6])


def test_probe_update_by_hand():
    policy = C.CTAPolicy()
    _, start, bins = _param(policy, "rotate")
    ids = torch.tensor([[CTA_OP_INDEX["rotate"], CTA_OP_INDEX["identity"]], [CTA_OP_INDEX["rotate"], CTA_OP_INDEX["rotate"]]])
    args = torch.tensor([[[0.5, 0.0], [0.0, 0.0]], [[0.5, 0.0], [0.99, 0.0]]], dtype=torch.float64)
    policy.update(ids, args, torch.tensor([0.2, 1.0], dtype=torch.float64))
    b = int(0.5 * 17 * 0.999)  # 8
    first = 0.99 * 1.0 + 0.01 * 0.2  # probe 0 slot 0
    second = 0.99 * first + 0.01 * 1.0  # probe 1 slot 0, the same bin, after it
    assert policy.weights[start + b].item() == pytest.approx(second, abs=1e-15)
    assert policy.weights[start + int(0.99 * 17 * 0.999)].item() == pytest.approx(1.0)  # proximity 1 keeps 1
    changed = torch.nonzero(policy.weights != 1.0).flatten().tolist()
    assert changed == [start + b]  # identity has no bins; nothing else moved


def test_update_of_a_two_parameter_op_moves_both_bins():
    policy = C.CTAPolicy()
    _, s_scale, _ = _param(policy, "rescale", 0)
    _, s_method, _ = _param(policy, "rescale", 1)
    policy.update(torch.tensor([[CTA_OP_INDEX["rescale"]] * 2]), torch.tensor([[[0.0, 1.0], [0.0, 1.0]]], dtype=torch.float64), torch.tensor([0.0]))
    assert policy.weights[s_scale].item() == pytest.approx(0.99**2)
    assert policy.weights[s_method + 5].item() == pytest.approx(0.99**2)  # int(1.0 * 6 * 0.999) = 5


def test_table_and_summary_show_every_parameter():
    policy = C.CTAPolicy()
    lines = policy.table().splitlines()
    assert len(lines) == 19 - 1 + 1  # identity has no parameter; rescale has two
    assert lines[0].startswith("autocontrast") and "rescale.method" in policy.summary()
    assert policy.summary()["posterize"] == [0.125] * 8


def test_state_round_trips_through_a_checkpoint_file(tmp_path):
    policy = C.CTAPolicy()
    policy.update(torch.tensor([[0, 1]]), torch.tensor([[[0.3, 0.0], [0.7, 0.0]]], dtype=torch.float64), torch.tensor([0.1]))
    torch.save({"ctaugment": policy.state_dict()}, tmp_path / "c.pt")
    fresh = C.CTAPolicy()
    fresh.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True)["ctaugment"])
    assert torch.equal(fresh.weights, policy.weights)
    rows = torch.tensor([C.draw_strong_row(random.Random(s), 2, True, (16, 16)) for s in range(20)], dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(fresh.resolve(rows), policy.resolve(rows)))


def test_draws_depend_only_on_the_generator():
    a = C.draw_strong_row(random.Random(7), 2, True, (16, 12))
    assert a == C.draw_strong_row(random.Random(7), 2, True, (16, 12))
    assert len(a) == C.STRONG_WIDTH and len(C.draw_probe_row(random.Random(7), (16, 12))) == C.PROBE_WIDTH
    g = torch.Generator().manual_seed(0)
    rows = C.strong_rows_torch(4000, 2, True, (16, 12), g)
    ops = rows[:, 3].long()
    assert ops.min() == 0 and ops.max() == len(CTA_OPS) - 1
    counts = torch.bincount(ops, minlength=len(CTA_OPS)).double()
    assert (counts / counts.mean() - 1).abs().max() < 0.25  # uniform over the 19 ops
    assert rows[:, -2].max() <= 15 and rows[:, -1].max() <= 11 and rows[:, C.LEFT].max() <= 4
    probes = C.probe_rows_torch(50, (16, 12), g)
    ids, args, centres = C.CTAPolicy.probe_ops(probes)
    assert ids.shape == (50, C.DEPTH) and args.shape == (50, C.DEPTH, 2) and 0 <= args.min() and args.max() < 1


def _views(with_pil: bool, policy: C.CTAPolicy, channels: int = 3) -> C.CTAugmentViews:
    mean, std = (0.5,) * channels, (0.25,) * channels
    return C.CTAugmentViews(policy, pad=2, pad_mode="constant", flip=True, mean=mean, std=std, with_pil=with_pil)


def _learned_policy() -> C.CTAPolicy:
    """A policy whose weights are far from uniform, so the bins it allows differ per op."""
    policy = C.CTAPolicy()
    g = torch.Generator().manual_seed(3)
    policy.weights.copy_(torch.rand(policy.weights.shape, generator=g, dtype=torch.float64))
    return policy


@pytest.mark.parametrize("channels", [3, 1])
def test_pil_and_batched_paths_make_the_same_views(channels):
    """``data.augment: pil`` (Pillow per image) and batched (uint8 batch ops) agree pixel for pixel."""
    policy = _learned_policy()
    g = torch.Generator().manual_seed(1)
    n = 48
    x = torch.randint(0, 256, (8, channels, 16, 16), dtype=torch.uint8, generator=g)
    u = torch.randint(0, 256, (n, channels, 16, 16), dtype=torch.uint8, generator=g)
    pil_views, batched_views = _views(True, policy, channels), _views(False, policy, channels)
    batch = {
        "x": x, "y": torch.arange(8) % 3, "u": u, "u_y": torch.zeros(n, dtype=torch.long), "u_idx": torch.arange(n),
        "x_weak": batched_views.weak.sample_torch(8, (16, 16), g),
        "x_probe": C.probe_rows_torch(8, (16, 16), g),
        "u_weak": batched_views.weak.sample_torch(n, (16, 16), g),
        "u_strong": C.strong_rows_torch(n, 2, True, (16, 16), g),
    }
    a, b = pil_views(batch), batched_views(batch)
    for key in ("x", "u_w", "u_s", "probe", "probe_ids", "probe_args"):
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(b["u_s"], b["u_w"])


def test_a_strong_view_ends_with_cutout_at_level_1():
    """An image of one colour stays that colour under identity ops; the final Cutout paints its grey square."""
    policy = C.CTAPolicy()
    views = _views(False, policy)
    row = [0.0, 2.0, 2.0] + [float(CTA_OP_INDEX["identity"]), 0.5, 0.5, 0.5, 0.5, 0.0, 0.0] * C.DEPTH + [8.0, 8.0]
    out = views.strong_view(torch.full((1, 3, 16, 16), 200, dtype=torch.uint8), torch.tensor([row], dtype=torch.float64))
    side = 1 + int(16 * 0.499)  # 8: official cutout(level 1) on 16 x 16; the box is centre -+ side // 2
    grey = out[0, 0] == 127
    assert grey.sum().item() == side * side and grey[4:12, 4:12].all()
    assert (out[0][:, ~grey] == 200).all()


class _Constant(nn.Module):
    """A 'model' that predicts class 0 with certainty: probes of class 0 have proximity 1, others 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.full((x.shape[0], 3), -30.0)
        logits[:, 0] = 30.0
        return logits


def test_feedback_moves_the_probed_bins_toward_the_proximity():
    policy = C.CTAPolicy()
    views = _views(False, policy)
    model = _Constant()
    ids = torch.tensor([[CTA_OP_INDEX["rotate"], CTA_OP_INDEX["identity"]], [CTA_OP_INDEX["solarize"], CTA_OP_INDEX["identity"]]])
    args = torch.tensor([[[0.1, 0.0], [0.0, 0.0]], [[0.9, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    batch = {"probe": torch.zeros(2, 3, 4, 4), "y": torch.tensor([0, 2]), "probe_ids": ids, "probe_args": args}
    views.feedback(lambda images: torch.softmax(model(images), 1), batch)
    _, r0, _ = _param(policy, "rotate")
    _, s0, _ = _param(policy, "solarize")
    assert policy.weights[r0 + int(0.1 * 17 * 0.999)].item() == pytest.approx(1.0)  # right and sure: proximity 1
    assert policy.weights[s0 + int(0.9 * 17 * 0.999)].item() == pytest.approx(0.99)  # wrong and sure: proximity 0
    assert (policy.weights != 1.0).sum().item() == 1


# --------------------------------------------------------------------------- real runs

CTA = "data.randaugment=ctaugment"


@pytest.fixture(scope="module")
def cta_run(folder, tmp_path_factory):
    """A real 20-iteration CTAugment run on the batched path: (run folder, its command line)."""
    from helpers import cli, tiny_overrides

    out = tmp_path_factory.mktemp("cta") / "batched"
    args = ["configs/quickstart.yaml", *tiny_overrides(folder, out, CTA, "data.augment=batched")]
    result = cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, args


def _policy_at(run, iteration: int = 20) -> torch.Tensor:
    from helpers import load_state

    return load_state(run / "checkpoints" / f"checkpoint_{iteration}.pt")["ctaugment"]["weights"]


@pytest.mark.slow
def test_a_run_learns_its_policy_and_saves_it_in_every_checkpoint(cta_run):
    run, _ = cta_run
    w15, w20 = _policy_at(run, 15), _policy_at(run, 20)
    assert w20.dtype == torch.float64 and not torch.equal(w15, w20)  # updated every step
    # 20 steps x 6 probes x 2 ops: about 240 bin updates, each bin moved from 1 toward a proximity in [0, 1]
    moved = (w20 != 1.0).sum().item()
    assert 50 < moved < 240 and w20.max() <= 1.0 and w20.min() >= 0.9**24


@pytest.mark.slow
def test_the_pil_path_trains_exactly_as_the_batched_one(cta_run, tmp_path):
    """Per-image Pillow ops (data.augment=pil) and uint8 batch ops give the same pixels, so the same run."""
    from helpers import cli, final_state_matches

    run, args = cta_run
    out = tmp_path / "pil"
    result = cli([*args, "data.augment=pil", f"output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    final_state_matches(run, out)
    assert torch.equal(_policy_at(run), _policy_at(out))


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical_with_the_policy(cta_run, tmp_path):
    from helpers import cli, final_state_matches, kill_after_checkpoint

    run, args = cta_run
    out = tmp_path / "killed"
    args = [*args, f"output_dir={out}"]
    kill_after_checkpoint(args, out)
    result = cli([*args, "resume=auto"])
    assert result.returncode == 0 and "Resumed from" in result.stderr, result.stderr[-3000:]
    final_state_matches(run, out)
    assert torch.equal(_policy_at(run), _policy_at(out))


@pytest.mark.slow
def test_the_device_path_learns_a_policy_too(folder, tmp_path):
    from helpers import cli, tiny_overrides

    out = tmp_path / "device"
    result = cli(["configs/quickstart.yaml", *tiny_overrides(folder, out, CTA, "data.augment=device", "train.num_iters=10")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (_policy_at(out, 10) != 1.0).sum().item() > 20


# Two processes sampling from one policy, and its exact resume under DDP:
# tests/test_algorithm_variants.py::test_flexmatch_with_alignment_and_ctaugment_under_two_processes_resumes_exactly_with_equal_state
