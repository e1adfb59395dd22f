"""FixMatch maths against hand-computed values, and the real Engine step (the trainer) around it."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ignite_fixmatch.algorithms.fixmatch import FixMatch
from ignite_fixmatch.algorithms.losses import consistency_loss, masked_accuracy, pseudo_labels, supervised_loss
from ignite_fixmatch.models import build_model
from ignite_fixmatch.trainer import PSEUDO_KEYS, create_trainer, de_interleave, forward_logits, interleave, parameter_groups


def test_supervised_loss_hand_computed():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    expected = (-math.log(math.e**2 / (math.e**2 + 1)) - math.log(1 / (1 + math.e))) / 2
    assert supervised_loss(logits, y).item() == pytest.approx(expected, rel=1e-6)


def test_pseudo_labels_mask_at_or_above_threshold():
    # softmax([log 3, 0]) = [0.75, 0.25]; softmax([0, log 9]) = [0.1, 0.9]; uniform -> 0.5
    logits = torch.tensor([[math.log(3), 0.0], [0.0, math.log(9)], [0.0, 0.0]])
    probs, labels, mask = pseudo_labels(logits, threshold=0.75)
    assert labels.tolist() == [0, 1, 0]
    assert mask.tolist() == [1.0, 1.0, 0.0]  # 0.75 >= 0.75 counts
    assert probs[1, 1].item() == pytest.approx(0.9)
    _, _, strict = pseudo_labels(logits, threshold=0.8)
    assert strict.tolist() == [0.0, 1.0, 0.0]


def test_hard_consistency_loss_averages_over_all_samples():
    weak = torch.tensor([[0.0, math.log(9)], [0.0, 0.0]])  # confident class 1; uncertain
    strong = torch.tensor([[1.0, 0.0], [5.0, -5.0]])
    loss, mask, labels = consistency_loss(strong, weak, threshold=0.9, hard_label=True)
    ce_first = -math.log(1 / (1 + math.e))  # CE([1, 0], class 1)
    assert mask.tolist() == [1.0, 0.0]
    assert labels.tolist() == [1, 0]
    assert loss.item() == pytest.approx(ce_first / 2, rel=1e-6)  # masked-out sample counts as 0 in the mean


def test_soft_consistency_loss_with_temperature():
    weak = torch.tensor([[0.0, math.log(9)]])
    strong = torch.tensor([[1.0, 0.0]])
    loss, mask, _ = consistency_loss(strong, weak, threshold=0.5, hard_label=False, T=0.5)
    # softmax(weak / 0.5) = [1, 81] / 82
    targets = torch.tensor([1 / 82, 81 / 82])
    log_p = F.log_softmax(strong, dim=1)[0]
    expected = -(targets * log_p).sum().item()
    assert mask.item() == 1.0
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_no_gradient_through_weak_branch():
    weak = torch.randn(4, 3, requires_grad=True)
    strong = torch.randn(4, 3, requires_grad=True)
    for hard in (True, False):
        loss, _, _ = consistency_loss(strong, weak, threshold=0.0, hard_label=hard, T=0.5)
        loss.backward()
        assert weak.grad is None
        assert strong.grad is not None and strong.grad.abs().sum() > 0
        strong.grad = None


def test_interleave_round_trip_and_mixing():
    mu, b = 3, 4
    x = torch.arange(b * (2 * mu + 1)).float().view(-1, 1)
    mixed = interleave(x, 2 * mu + 1)
    assert not torch.equal(mixed, x)
    assert torch.equal(de_interleave(mixed, 2 * mu + 1), x)
    # the first b rows (one device's share under DataParallel) take every 7th row: labeled, weak and strong alike
    assert mixed[:b].flatten().tolist() == [0.0, 7.0, 14.0, 21.0]


def test_masked_accuracy_nan_when_nothing_passes():
    pseudo = torch.tensor([1, 2, 3])
    true = torch.tensor([1, 0, 3])
    assert masked_accuracy(pseudo, true, torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx(0.5)
    assert math.isnan(masked_accuracy(pseudo, true, torch.zeros(3)).item())
    assert math.isnan(masked_accuracy(pseudo, torch.full((3,), -1), torch.ones(3)).item())


def fixmatch(threshold: float, lambda_u: float = 1.0) -> FixMatch:
    return FixMatch.create(num_classes=10, threshold=threshold, lambda_u=lambda_u, hard_label=True, T=1.0)


def _logits_with_y(logits, y):
    logits_x, logits_w, logits_s = logits
    return logits_x, y, logits_w, logits_s


def test_forward_interleave_gives_same_losses_without_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x, y = torch.randn(2, 3, 2, 2), torch.tensor([1, 4])
    uw, us = torch.randn(6, 3, 2, 2), torch.randn(6, 3, 2, 2)
    algorithm, no_index = fixmatch(0.0), torch.zeros(6, dtype=torch.long)
    a = algorithm(*_logits_with_y(forward_logits(model, x, uw, us, use_interleave=False), y), no_index, no_index[0])
    b = algorithm(*_logits_with_y(forward_logits(model, x, uw, us, use_interleave=True), y), no_index, no_index[0])
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)


def test_lambda_u_zero_trains_on_labels_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x, y = torch.randn(2, 3, 2, 2), torch.tensor([1, 4])
    uw, us = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    no_index = torch.zeros(4, dtype=torch.long)
    out = fixmatch(0.0, lambda_u=0.0)(*_logits_with_y(forward_logits(model, x, uw, us), y), no_index, no_index[0])
    assert out.loss.item() == pytest.approx(out.metrics["loss_x"].item())
    assert out.mask.sum().item() == 4  # still reported


def test_weight_decay_groups_reference_and_official():
    model = build_model("wrn", 10, depth=10, widen_factor=1)
    ref_decay, ref_none = parameter_groups(model, 5e-4, "reference")
    off_decay, off_none = parameter_groups(model, 5e-4, "official")
    named = {id(p): n for n, p in model.named_parameters()}
    assert all("bn" not in named[id(p)] for p in ref_decay["params"])
    assert all("bn" in named[id(p)] for p in ref_none["params"])
    assert any(named[id(p)] == "fc.bias" for p in ref_decay["params"])  # reference decays the classifier bias
    assert all(p.dim() > 1 for p in off_decay["params"])
    assert any(named[id(p)] == "fc.bias" for p in off_none["params"])
    assert ref_none["weight_decay"] == 0.0 and ref_decay["weight_decay"] == 5e-4
    total = sum(1 for _ in model.parameters())
    assert len(ref_decay["params"]) + len(ref_none["params"]) == total == len(off_decay["params"]) + len(off_none["params"])


def _batch(b=4, mu=2, classes=10, size=8):
    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(b, 3, size, size, generator=g),
        "y": torch.randint(0, classes, (b,), generator=g),
        "u_w": torch.randn(b * mu, 3, size, size, generator=g),
        "u_s": torch.randn(b * mu, 3, size, size, generator=g),
        "u_y": torch.randint(0, classes, (b * mu,), generator=g),
        "u_idx": torch.arange(b * mu),
    }


@pytest.mark.parametrize("amp", [False, True])
def test_engine_step_updates_weights_and_returns_flat_metrics(amp):
    torch.manual_seed(0)
    model = build_model("wrn", 10, depth=10, widen_factor=1)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    trainer = create_trainer(
        model, opt, torch.device("cpu"), fixmatch(0.0), amp=amp, amp_dtype="bfloat16", channels_last=True
    )
    batch = _batch()
    trainer.run([batch], max_epochs=1)
    out = trainer.state.output
    assert set(out) == {"loss", "loss_x", "loss_u", "mask_rate", "pseudo_acc", "lr", *PSEUDO_KEYS}
    assert all(isinstance(out[k], torch.Tensor) and out[k].dim() == 0 for k in ("loss", "loss_x", "loss_u", "mask_rate", "pseudo_acc"))
    assert all(out[k].shape == (10,) and out[k].dtype == torch.float32 for k in PSEUDO_KEYS)  # one entry per class
    assert out["mask_rate"].item() == 1.0  # threshold 0: everything passes
    assert out["loss"].item() == pytest.approx(out["loss_x"].item() + out["loss_u"].item(), rel=1e-4)
    assert out["lr"] == 0.1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.slow
def test_compiled_step_matches_eager_and_keeps_the_model_plain():
    def run(compile_model):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        trainer = create_trainer(model, opt, torch.device("cpu"), fixmatch(0.0), compile_model=compile_model)
        trainer.run([_batch()] * 2, max_epochs=1)
        return model, trainer.state.output

    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, out_e = run(False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    compiled, out_c = run(True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the forward really was compiled
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefix: checkpoints stay portable
    for a, b in zip(eager.parameters(), compiled.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    assert out_c["loss"].item() == pytest.approx(out_e["loss"].item(), rel=1e-4)


def test_amp_auto_is_bfloat16_on_gpus_and_off_on_cpus():
    from ignite_fixmatch.trainer import amp_enabled, needs_grad_scaler, resolve_amp_dtype

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert amp_enabled(cpu, None) is False and amp_enabled(gpu, None) is True
    assert amp_enabled(cpu, True) is True and amp_enabled(gpu, False) is False
    assert resolve_amp_dtype(cpu, "auto") == torch.bfloat16
    assert resolve_amp_dtype(gpu, "float16") == torch.float16
    assert needs_grad_scaler(cpu, True, "float16") and not needs_grad_scaler(cpu, None, "float16")
    assert not needs_grad_scaler(cpu, True, "bfloat16")


@pytest.mark.slow
def test_reduce_overhead_mode_trains_like_eager_on_cpu():
    """The default compile mode (reduce-overhead: CUDA graphs on a GPU) compiles and trains on a CPU too."""
    import torch._dynamo

    def run(compile_model):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        trainer = create_trainer(
            model, opt, torch.device("cpu"), fixmatch(0.0),
            compile_model=compile_model, compile_mode="reduce-overhead",
        )
        trainer.run([_batch()] * 3, max_epochs=1)
        return model

    torch._dynamo.reset()
    eager, compiled = run(False), run(True)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_a_model_that_cannot_be_compiled_trains_eagerly_with_a_warning(monkeypatch, caplog):
    """A real compiler failure (no C++ compiler for inductor's CPU kernels) at the first step: the run
    warns once and trains without compiling, with the eager run's weights."""
    import logging

    import torch._dynamo
    import torch._inductor.config

    def run(compile_model):
        torch.manual_seed(2)
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 7), nn.ReLU(), nn.Linear(7, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        trainer = create_trainer(
            model, opt, torch.device("cpu"), fixmatch(0.0), compile_model=compile_model,
        )
        trainer.run([_batch()] * 3, max_epochs=1)
        return model

    eager = run(False)
    torch._dynamo.reset()
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("no-such-cxx-compiler",))
    with caplog.at_level(logging.WARNING, logger="ignite_fixmatch.trainer"):
        fallback = run(True)
    torch._dynamo.reset()
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed at the first step" in r.getMessage()]
    assert len(warnings) == 1 and "model.compile=off" in warnings[0]
    for a, b in zip(eager.parameters(), fallback.parameters()):
        assert torch.equal(a, b)
