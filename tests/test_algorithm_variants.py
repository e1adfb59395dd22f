"""FlexMatch, FreeMatch and distribution alignment on the algorithm seam: their maths against hand-computed
values, their state through a checkpoint and torch.compile, and real runs through the CLI that resume
bit-identically (one process and two)."""

import io
import json
import math

import pytest
import torch

from helpers import (
    assert_same_tensors,
    cli,
    final_state_matches,
    kill_after_checkpoint,
    kill_two_processes_after_checkpoint,
    load_state,
    tiny_overrides,
    with_handler,
)
from ignite_fixmatch.algorithms import BUILTINS, build_algorithm, resolve_algorithm
from ignite_fixmatch.algorithms.alignment import DA_PROBS, DistributionAlignment, align, labeled_distribution, running_mean
from ignite_fixmatch.algorithms.fixmatch import FixMatch
from ignite_fixmatch.algorithms.flexmatch import FlexMatch, class_counts, class_thresholds, last_confident, learning_effect
from ignite_fixmatch.algorithms.freematch import FreeMatch, fairness_loss, self_adaptive_thresholds
from ignite_fixmatch.config import ConfigError, load_config

TOY = "tests.toy_algorithm:ClassTableMatch"


def logits_of(probs: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is ``probs``."""
    return torch.tensor(probs).log()


def step(algo, logits_w: torch.Tensor, u_idx=None, logits_s=None):
    """One forward of ``algo`` on a weak view (the labeled part: two fixed samples)."""
    n = len(logits_w)
    u_idx = torch.arange(n) if u_idx is None else torch.as_tensor(u_idx)
    logits_s = logits_w.clone() if logits_s is None else logits_s
    return algo(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), torch.tensor([0, 1]), logits_w, logits_s, u_idx, torch.tensor(0))


# --------------------------------------------------------------------------- distribution alignment


def test_alignment_helpers_hand_computed():
    assert torch.allclose(labeled_distribution([1, 3], 2), torch.tensor([0.25, 0.75]))
    assert torch.allclose(labeled_distribution(None, 4), torch.full((4,), 0.25))
    with pytest.raises(ValueError, match="3 entries for 2 classes"):
        labeled_distribution([1, 2, 3], 2)
    history = torch.tensor([[0.8, 0.2], [0.6, 0.4], [9.0, 9.0]])  # the third row is not filled: never read
    assert torch.allclose(running_mean(history, torch.tensor(2)), torch.tensor([0.7, 0.3]))
    assert torch.allclose(running_mean(history, torch.tensor(0)), torch.tensor([0.5, 0.5]))  # none filled: uniform
    # [0.5, 0.5] * [0.25, 0.75] / [0.4, 0.6] = [0.3125, 0.625] -> [1/3, 2/3]; each row renormalised
    aligned = align(torch.tensor([[0.5, 0.5], [0.4, 0.6]]), torch.tensor([0.25, 0.75]), torch.tensor([0.4, 0.6]))
    assert torch.allclose(aligned, torch.tensor([[1 / 3, 2 / 3], [0.25, 0.75]]))


def test_alignment_ring_buffer_window_two_three_updates():
    da = DistributionAlignment(2, window=2, labeled_counts=[1, 3])
    assert torch.allclose(da(torch.tensor([[0.5, 0.5]])), torch.tensor([[0.25, 0.75]]))  # running uniform at first
    da.update(torch.tensor([[0.9, 0.1], [0.7, 0.3]]))  # one row: the mean of the (gathered) batch
    assert (da.filled.item(), da.next.item()) == (1, 1)
    assert torch.allclose(running_mean(da.history, da.filled), torch.tensor([0.8, 0.2]))
    da.update(torch.tensor([[0.6, 0.4]]))
    assert (da.filled.item(), da.next.item()) == (2, 0)
    assert torch.allclose(running_mean(da.history, da.filled), torch.tensor([0.7, 0.3]))
    da.update(torch.tensor([[0.2, 0.8]]))  # overwrites the oldest row
    assert (da.filled.item(), da.next.item()) == (2, 1)
    assert torch.allclose(da.history, torch.tensor([[0.2, 0.8], [0.6, 0.4]]))
    assert torch.allclose(da(torch.tensor([[0.5, 0.5]])), torch.tensor([[1 / 3, 2 / 3]]))  # running [0.4, 0.6]


def test_fixmatch_with_alignment_uses_the_aligned_probabilities():
    plain = FixMatch.create(num_classes=3, threshold=0.6)
    aligned = build_algorithm("fixmatch", FixMatch.Params(threshold=0.6, distribution_alignment=True), num_classes=3, num_unlabeled=0,
                              labeled_counts=[1, 1, 2])
    assert not plain.has_state() and plain.alignment is None and plain.state_dict() == {}  # its checkpoint does not change
    assert aligned.has_state() and set(aligned.state_dict()) == {"alignment.p_labeled", "alignment.history", "alignment.filled", "alignment.next"}
    logits_w = logits_of([[0.5, 0.2, 0.3], [0.3, 0.2, 0.5]])
    # aligned (running uniform): p * [0.25, 0.25, 0.5] renormalised: [0.5, 0.2, 0.6]/1.3 and [0.3, 0.2, 1.0]/1.5
    out, ref = step(aligned, logits_w), step(plain, logits_w)
    assert ref.pseudo_labels.tolist() == [0, 2] and ref.mask.tolist() == [0.0, 0.0]
    assert out.pseudo_labels.tolist() == [2, 2] and out.mask.tolist() == [0.0, 1.0]  # 0.6/1.3 = 0.46, 1.0/1.5 = 0.67
    assert torch.equal(out.stats[DA_PROBS], torch.softmax(logits_w, dim=1))  # DA learns from the raw probabilities
    aligned.update_state(**out.stats)
    assert aligned.alignment.filled.item() == 1
    assert torch.allclose(aligned.alignment.history[0], torch.tensor([0.4, 0.2, 0.4]))


def test_alignment_keys_exist_for_every_builtin_and_are_checked():
    for name in BUILTINS:
        cfg = load_config(None, [f"algorithm.name={name}", "algorithm.distribution_alignment=true", "algorithm.da_window=4"])
        assert (cfg.algorithm.params.distribution_alignment, cfg.algorithm.params.da_window) == (True, 4)
        algo = build_algorithm(name, cfg.algorithm.params, num_classes=3, num_unlabeled=5, labeled_counts=[1, 2, 3])
        assert torch.allclose(algo.alignment.p_labeled, torch.tensor([1 / 6, 2 / 6, 3 / 6]))
        assert algo.alignment.history.shape == (4, 3)
        with pytest.raises(ConfigError, match=r"'algorithm\.da_window': got 0, expected an integer >= 1"):
            load_config(None, [f"algorithm.name={name}", "algorithm.da_window=0"])
    with pytest.raises(ConfigError, match=r"'algorithm\.momentum': got 1\.0, expected a number in \(0, 1\)"):
        load_config(None, ["algorithm.name=freematch", "algorithm.momentum=1.0"])
    with pytest.raises(ConfigError, match=r"'algorithm\.fairness_weight': got -0\.1, expected a number >= 0"):
        load_config(None, ["algorithm.name=freematch", "algorithm.fairness_weight=-0.1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'algorithm\.threshold' for algorithm 'freematch'"):
        load_config(None, ["algorithm.name=freematch", "algorithm.threshold=0.9"])


def test_a_users_algorithm_with_the_old_init_still_builds():
    cfg = load_config(None, [f"algorithm.name={TOY}", "algorithm.thresholds=[0.1, 0.2, 0.3]"])
    assert not resolve_algorithm(TOY).uses_labeled_counts
    algo = build_algorithm(cfg.algorithm.name, cfg.algorithm.params, num_classes=3, num_unlabeled=4, labeled_counts=[2, 2, 2])
    assert algo.last_label.shape == (4,)


# --------------------------------------------------------------------------- FlexMatch


def test_flexmatch_beta_thresholds_and_mask_hand_computed():
    selected = torch.tensor([0, 0, 0, 1, 1, 2, -1, -1, -1, -1])  # 10 unlabeled images: sigma = [3, 2, 1], 4 unused
    sigma, unselected = class_counts(selected, 3)
    assert sigma.tolist() == [3, 2, 1] and unselected.item() == 4
    beta = learning_effect(sigma, unselected, warmup=True)  # divided by max(3, 4)
    assert torch.allclose(beta, torch.tensor([0.75, 0.5, 0.25]))
    # M(x) = x / (2 - x): 0.6, 1/3, 1/7, times tau 0.9
    assert torch.allclose(class_thresholds(beta, 0.9), torch.tensor([0.54, 0.3, 0.9 / 7]))
    no_warmup = learning_effect(sigma, unselected, warmup=False)  # divided by max(3, 1)
    assert torch.allclose(class_thresholds(no_warmup, 0.9), torch.tensor([0.9, 0.45, 0.18]))
    assert learning_effect(torch.zeros(3, dtype=torch.long), torch.tensor(10), warmup=False).tolist() == [0.0, 0.0, 0.0]

    flex = FlexMatch.create(num_classes=3, num_unlabeled=10, threshold=0.9)
    flex.selected_label.copy_(selected)
    logits_w = logits_of([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.35, 0.45], [0.2, 0.25, 0.55], [0.3, 0.4, 0.3], [0.95, 0.03, 0.02]])
    out = step(flex, logits_w, u_idx=[6, 7, 8, 9, 3, 0])
    assert out.pseudo_labels.tolist() == [0, 0, 2, 2, 1, 0]
    # 0.6 > 0.54, 0.5 < 0.54, 0.45 > 0.129, 0.55 > 0.129, 0.4 > 0.3, 0.95 > 0.54
    assert out.mask.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert out.metrics["threshold_mean"].item() == pytest.approx((0.54 + 0.3 + 0.9 / 7) / 3, rel=1e-6)
    assert out.stats["confident"].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]  # the fixed tau 0.9 picks what is remembered
    flex.update_state(**out.stats)
    assert flex.selected_label.tolist() == [0, 0, 0, 1, 1, 2, -1, -1, -1, -1]  # image 0 again class 0
    out = step(flex, logits_of([[0.02, 0.03, 0.95], [0.05, 0.93, 0.02]]), u_idx=[6, 0])
    flex.update_state(**out.stats)
    assert flex.selected_label.tolist() == [1, 0, 0, 1, 1, 2, 2, -1, -1, -1]


def test_flexmatch_update_is_deterministic_for_repeated_indices():
    selected = torch.tensor([-1, 0, -1, -1, 1, -1, -1, -1])
    # gathered rows in rank order: index 3 twice confident (the later row wins), index 5 not confident, index 1 unchanged
    new = last_confident(selected, torch.tensor([3, 5, 3, 7, 3]), torch.tensor([2, 1, 0, 2, 1]), torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]))
    assert new.tolist() == [-1, 0, -1, 0, 1, -1, -1, 2]


# --------------------------------------------------------------------------- FreeMatch


def test_freematch_ema_updates_thresholds_and_mask_hand_computed():
    free = FreeMatch.create(num_classes=3, momentum=0.5)
    assert torch.allclose(free.tau_g, torch.tensor(1 / 3)) and torch.allclose(free.p_tilde, torch.full((3,), 1 / 3))
    free.update_state(probs=torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]))
    # tau_g: 0.5/3 + 0.5 * mean(0.7, 0.6); p_tilde: 0.5/3 + 0.5 * [0.4, 0.4, 0.2]; label_hist: 0.5/3 + 0.5 * [0.5, 0.5, 0]
    assert free.tau_g.item() == pytest.approx(1 / 6 + 0.325, rel=1e-6)
    assert torch.allclose(free.p_tilde, torch.tensor([1 / 6 + 0.2, 1 / 6 + 0.2, 1 / 6 + 0.1]))
    assert torch.allclose(free.label_hist, torch.tensor([1 / 6 + 0.25, 1 / 6 + 0.25, 1 / 6]))
    thresholds = self_adaptive_thresholds(free.tau_g, free.p_tilde)  # p_tilde / max * tau_g
    expected = torch.tensor([1.0, 1.0, (1 / 6 + 0.1) / (1 / 6 + 0.2)]) * (1 / 6 + 0.325)  # 0.4917, 0.4917, 0.3576
    assert torch.allclose(thresholds, expected)
    out = step(free, logits_of([[0.5, 0.3, 0.2], [0.3, 0.3, 0.4], [0.45, 0.35, 0.2], [0.34, 0.33, 0.33]]))
    assert out.pseudo_labels.tolist() == [0, 2, 0, 0]
    assert out.mask.tolist() == [1.0, 1.0, 0.0, 0.0]  # 0.5 >= 0.4917, 0.4 >= 0.3576, 0.45 < 0.4917, 0.34 < 0.4917
    assert out.metrics["tau_global"].item() == pytest.approx(1 / 6 + 0.325, rel=1e-6)
    assert torch.equal(out.stats["probs"], torch.softmax(logits_of([[0.5, 0.3, 0.2], [0.3, 0.3, 0.4], [0.45, 0.35, 0.2], [0.34, 0.33, 0.33]]), 1))


def test_freematch_fairness_loss_hand_computed():
    probs_s = torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.9, 0.1]])
    p_tilde, label_hist = torch.tensor([0.6, 0.4]), torch.tensor([0.75, 0.25])
    # masked: rows 0 and 1. h_bar = [0.5, 0.5] (their argmax 0 and 1), p_bar = [0.6, 0.4]: p_bar / h_bar normalised = [0.6, 0.4];
    # p_tilde / label_hist = [0.8, 1.6] normalised = [1/3, 2/3]; loss = sum target * log(modulated)
    loss = fairness_loss(probs_s, torch.tensor([1.0, 1.0, 0.0]), p_tilde, label_hist)
    assert loss.item() == pytest.approx(math.log(0.6) / 3 + 2 * math.log(0.4) / 3, rel=1e-5)
    logits = torch.zeros(3, 2, requires_grad=True)
    empty = fairness_loss(torch.softmax(logits, dim=1), torch.zeros(3), p_tilde, label_hist)
    empty.backward()
    assert empty.item() == 0.0 and torch.equal(logits.grad, torch.zeros(3, 2))  # nothing masked: 0, and no NaN in the gradient


def test_freematch_total_loss_adds_the_weighted_fairness_term():
    free = FreeMatch.create(num_classes=3, fairness_weight=0.5)
    logits_w, logits_s = logits_of([[0.8, 0.1, 0.1], [0.1, 0.7, 0.2]]), logits_of([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    out = step(free, logits_w, logits_s=logits_s)
    assert out.mask.tolist() == [1.0, 1.0]  # tau(c) = 1/3 for every class at the start
    expected = out.metrics["loss_x"] + out.metrics["loss_u"] + 0.5 * out.metrics["loss_fair"]
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6) and out.metrics["loss_fair"].item() < 0
    off = step(FreeMatch.create(num_classes=3, fairness_weight=0.0), logits_w, logits_s=logits_s)
    assert off.metrics["loss_fair"].item() == 0.0 and off.loss.item() == pytest.approx((out.metrics["loss_x"] + out.metrics["loss_u"]).item())


# --------------------------------------------------------------------------- state and compile


def _random_step_inputs(seed: int, num_unlabeled: int = 12, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 3, generator=g) * 3, torch.randint(0, 3, (4,), generator=g), torch.randn(n, 3, generator=g) * 3,
            torch.randn(n, 3, generator=g) * 3, torch.randint(0, num_unlabeled, (n,), generator=g), torch.tensor(0))


def _built(name: str, da: bool):
    cfg = load_config(None, [f"algorithm.name={name}", f"algorithm.distribution_alignment={str(da).lower()}", "algorithm.da_window=3"])
    params = cfg.algorithm.params
    if name != "freematch":
        params.threshold = 0.6
    else:
        params.momentum = 0.5  # the state moves visibly in one update
    return build_algorithm(name, params, num_classes=3, num_unlabeled=12, labeled_counts=[1, 2, 3])


@pytest.mark.parametrize("name", ["fixmatch", "flexmatch", "freematch"])
def test_state_round_trips_through_a_weights_only_checkpoint(name, tmp_path):
    algo = _built(name, da=True)
    for seed in range(3):
        algo.update_state(**algo(*_random_step_inputs(seed)).stats)
    buffer = io.BytesIO()
    torch.save(algo.state_dict(), buffer)
    buffer.seek(0)
    fresh = _built(name, da=True)
    assert not all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), algo.state_dict().values()))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same_tensors(fresh.state_dict(), algo.state_dict())
    a, b = algo(*_random_step_inputs(9)), fresh(*_random_step_inputs(9))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.mask, b.mask) and torch.equal(a.pseudo_labels, b.pseudo_labels)


@pytest.mark.slow
def test_compiled_forward_gives_the_eager_loss_before_and_after_an_update():
    """Every built-in with DA off and on, compiled as the trainer compiles its step (fullgraph not required):
    one compiled function over all six, which costs one compile instead of six."""
    import torch._dynamo

    torch._dynamo.reset()
    algos = {f"{name}-{'da' if da else 'plain'}": _built(name, da) for name in ("fixmatch", "flexmatch", "freematch") for da in (False, True)}
    compiled = torch.compile(lambda *inputs: {key: algo(*inputs) for key, algo in algos.items()})
    for seed in range(2):
        inputs = _random_step_inputs(seed)
        outputs = compiled(*inputs)
        for key, algo in algos.items():
            eager, comp = algo(*inputs), outputs[key]
            assert comp.loss.item() == pytest.approx(eager.loss.item(), rel=1e-5), key
            for metric in algo.metric_names:
                assert comp.metrics[metric].item() == pytest.approx(eager.metrics[metric].item(), rel=1e-5, abs=1e-6), (key, metric)
            assert torch.equal(comp.mask, eager.mask) and torch.equal(comp.pseudo_labels, eager.pseudo_labels), key
            algo.update_state(**eager.stats)  # eager, after the step, as the trainer does
    assert algos["flexmatch-da"].alignment.filled.item() == 2 and algos["freematch-plain"].tau_g.item() != pytest.approx(1 / 3)
    torch._dynamo.reset()


# --------------------------------------------------------------------------- real runs through the CLI

# flexmatch: tau 0.8 leaves part of the 24 images unselected at iteration 5 (at 0.5 all are selected by then)
VARIANTS = {
    "flexmatch": ["algorithm.name=flexmatch", "algorithm.threshold=0.8"],
    "freematch_da": ["algorithm.name=freematch", "algorithm.distribution_alignment=true"],
}


def run_args(folder, out, variant: str) -> list[str]:
    """The tiny run of ``variant``: tiny_overrides without FixMatch's threshold (FreeMatch has none)."""
    args = ["configs/quickstart.yaml", *tiny_overrides(folder, out), *VARIANTS[variant]]
    return [a for a in args if a != "algorithm.threshold=0.5"]


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant_run(request, folder, tmp_path_factory):
    """(variant, output folder) of one uninterrupted tiny run (20 iterations, checkpoints every 5)."""
    out = tmp_path_factory.mktemp(request.param) / "run"
    result = cli(run_args(folder, out, request.param))
    assert result.returncode == 0, result.stderr[-3000:]
    return request.param, out


@pytest.mark.slow
def test_a_variant_trains_through_the_cli_and_checkpoints_its_state(variant_run):
    variant, out = variant_run
    state = load_state(out / "checkpoints" / "checkpoint_20.pt")["algorithm"]
    if variant == "flexmatch":
        assert set(state) == {"selected_label"} and (state["selected_label"] >= 0).sum() > 0  # some images were confidently labeled
    else:
        assert {"tau_g", "p_tilde", "label_hist", "alignment.history", "alignment.filled"} <= set(state)
        assert state["alignment.filled"].item() == 20 and state["tau_g"].item() != pytest.approx(1 / 3)
        assert torch.allclose(state["alignment.p_labeled"], torch.full((3,), 1 / 3))  # 2 labeled per class
    assert json.loads((out / "results.json").read_text())["iteration"] == 20


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical_with_the_algorithms_state(variant_run, folder, tmp_path):
    variant, reference = variant_run
    out = tmp_path / "killed"
    args = run_args(folder, out, variant)
    kill_after_checkpoint(args, out, iteration=5)  # early: FlexMatch's selection is still partial there
    killed_at = load_state(out / "checkpoints" / "checkpoint_5.pt")["algorithm"]
    result = cli([*args, "resume=auto"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from" in result.stderr
    final_state_matches(reference, out)
    ref_state = load_state(reference / "checkpoints" / "checkpoint_20.pt")["algorithm"]
    assert_same_tensors(ref_state, load_state(out / "checkpoints" / "checkpoint_20.pt")["algorithm"])
    assert not all(torch.equal(killed_at[k], ref_state[k]) for k in ref_state)  # the state moved after the kill
    if variant == "flexmatch":
        assert 0 < (killed_at["selected_label"] >= 0).sum() < (ref_state["selected_label"] >= 0).sum()
    else:  # a resume that did not restore the state would end with 15 rows in DA's ring
        assert (killed_at["alignment.filled"].item(), ref_state["alignment.filled"].item()) == (5, 20)
    assert json.loads((reference / "results.json").read_text())["history"] == json.loads((out / "results.json").read_text())["history"]


@pytest.mark.slow
def test_flexmatch_with_alignment_and_ctaugment_under_two_processes_resumes_exactly_with_equal_state(folder, tmp_path):
    """2 gloo processes, 20 steps, killed after iteration 10 and resumed: every process holds the same FlexMatch
    and DA state and the same CTAugment policy (each process probes its own half of the labeled batch; the
    updates are gathered in rank order), all equal to the uninterrupted job's, and the weights are bit-identical."""
    from test_distributed import LAUNCH_TIMEOUT, assert_same_final_state, spawn_args

    def args(out):
        run = [*run_args(folder, out, "flexmatch"), "algorithm.distribution_alignment=true", "data.randaugment=ctaugment", "data.mu=4"]
        run = with_handler(run, "tests.helpers:DumpState", prefix=f"{out}.policy", key="ctaugment")
        return with_handler(run, "tests.toy_algorithm:DumpAlgorithmState", prefix=str(out))

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    result = cli([*args(reference), *spawn_args()], timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    kill_two_processes_after_checkpoint(args(resumed), resumed)
    result = cli([*args(resumed), *spawn_args(), "resume=auto"], timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0 and "Resumed from" in result.stderr, result.stderr[-3000:]

    policies = [torch.load(f"{d}.policy.rank{r}.pt", weights_only=True)["weights"] for d in (reference, resumed) for r in (0, 1)]
    assert all(torch.equal(policies[0], w) for w in policies[1:])
    assert torch.equal(policies[0], load_state(reference / "checkpoints" / "checkpoint_20.pt")["ctaugment"]["weights"])
    assert (policies[0] != 1.0).sum().item() > 50  # 20 steps x 6 probes (3 per process) x 2 ops moved it
    ref0, ref1, res0, res1 = (torch.load(f"{d}.rank{r}.pt", weights_only=True) for d in (reference, resumed) for r in (0, 1))
    for state in (ref1, res0, res1):
        assert_same_tensors(ref0, state)
    assert (ref0["selected_label"] >= 0).sum() > 0 and ref0["alignment.filled"].item() == 20  # one ring row per (global) step
    assert_same_final_state(reference, resumed)
    assert_same_tensors(load_state(reference / "checkpoints" / "checkpoint_20.pt")["algorithm"], ref0)
