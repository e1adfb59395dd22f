"""The algorithm seam: FixMatch behind it, typed params in the config, a user's algorithm by dotted path
with state that a real Engine updates, a checkpoint restores and torch.compile leaves alone."""

import math
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn

from helpers import assert_same_tensors
from ignite_fixmatch.algorithms import BUILTINS, build_algorithm, params_class, resolve_algorithm
from ignite_fixmatch.algorithms.fixmatch import FixMatch
from ignite_fixmatch.algorithms.params import FixMatchParams
from ignite_fixmatch.config import ConfigError, dump_yaml, from_dict, load_config, to_dict
from ignite_fixmatch.resume import load_into
from ignite_fixmatch.trainer import PSEUDO_KEYS, create_trainer, step_metric_names

TOY = "tests.toy_algorithm:ClassTableMatch"  # by dotted path from the working directory, as a user names theirs


def fixmatch(threshold=0.95, lambda_u=1.0, hard_label=True, T=0.5) -> FixMatch:
    return FixMatch(FixMatchParams(threshold, lambda_u, hard_label, T), num_classes=2, num_unlabeled=4)


def test_fixmatch_loss_mask_and_metrics_hand_computed():
    logits_x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    logits_w = torch.tensor([[4.0, 0.0], [0.5, 0.0]])  # p_max = 0.982 (passes 0.95), 0.622 (does not)
    logits_s = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    out = fixmatch()(logits_x, y, logits_w, logits_s, torch.tensor([0, 1]), torch.tensor(0))
    loss_x = (-math.log(math.e**2 / (math.e**2 + 1)) - math.log(1 / (1 + math.e))) / 2
    loss_u = -math.log(math.e / (math.e + 1)) / 2  # the one confident sample, averaged over both
    assert out.mask.tolist() == [1.0, 0.0] and out.pseudo_labels.tolist() == [0, 0]
    assert out.metrics["loss_x"].item() == pytest.approx(loss_x, rel=1e-6)
    assert out.metrics["loss_u"].item() == pytest.approx(loss_u, rel=1e-6)
    assert out.loss.item() == pytest.approx(loss_x + loss_u, rel=1e-6)
    assert out.stats == {}
    off = fixmatch(lambda_u=0.0)(logits_x, y, logits_w, logits_s, torch.tensor([0, 1]), torch.tensor(0))
    assert off.loss.item() == pytest.approx(loss_x, rel=1e-6) and off.mask.tolist() == [1.0, 0.0]
    assert not fixmatch().has_state()


def test_every_builtin_algorithm_resolves():
    for name in BUILTINS:
        cls = resolve_algorithm(name)
        assert params_class(name) is cls.Params  # the config checks a built-in without importing torch
        assert cls(cls.Params(), num_classes=3, num_unlabeled=5) is not None


def test_algorithm_params_are_typed_and_checked_in_the_config():
    cfg = load_config(None, ["algorithm.threshold=0.7", "algorithm.hard_label=false"])
    assert (cfg.algorithm.name, cfg.algorithm.params.threshold, cfg.algorithm.params.hard_label) == ("fixmatch", 0.7, False)
    assert "algorithm:\n  name: fixmatch\n  threshold: 0.7\n" in dump_yaml(cfg)
    with pytest.raises(ConfigError, match=r"'algorithm\.threshold': got 1\.5, expected a number in \[0, 1\]"):
        load_config(None, ["algorithm.threshold=1.5"])
    with pytest.raises(ConfigError, match=r"unknown config key 'algorithm\.treshold'.*threshold, lambda_u"):
        load_config(None, ["algorithm.treshold=0.5"])
    with pytest.raises(ConfigError, match=r"'algorithm\.hard_label': got 'yes', expected true or false"):
        load_config(None, ["algorithm.hard_label='yes'"])
    with pytest.raises(ConfigError, match=r"unknown algorithm 'flexmach'. Built-in algorithms: fixmatch"):
        load_config(None, ["algorithm.name=flexmach"])
    with pytest.raises(ConfigError, match=r"cannot import module 'no_such_module'"):
        load_config(None, ["algorithm.name=no_such_module:Algo"])
    with pytest.raises(ConfigError, match=r"not a subclass of ignite_fixmatch.algorithms.Algorithm"):
        load_config(None, ["algorithm.name=ignite_fixmatch.config:Config"])


def test_a_users_algorithm_loads_by_dotted_path_with_its_own_params():
    cfg = load_config(None, [f"algorithm.name={TOY}", "algorithm.thresholds=[0.2, 0.5, 0.9]"])
    assert cfg.algorithm.params.thresholds == [0.2, 0.5, 0.9]
    with pytest.raises(ConfigError, match=r"'algorithm\.thresholds'.*numbers in \[0, 1\]"):
        load_config(None, [f"algorithm.name={TOY}", "algorithm.thresholds=[2.0]"])
    with pytest.raises(ConfigError, match=r"unknown config key 'algorithm\.threshold' for algorithm .*thresholds, default"):
        load_config(None, [f"algorithm.name={TOY}", "algorithm.threshold=0.5"])
    assert from_dict(to_dict(cfg)) == cfg  # what a checkpoint stores rebuilds the same config


def test_naming_another_algorithm_starts_from_its_own_keys(tmp_path):
    """The quick start's file holds FixMatch's keys; switching algorithm on the command line (or in a
    config based on it) does not carry them to an algorithm that has other keys."""
    cfg = load_config("configs/quickstart.yaml", [f"algorithm.name={TOY}", "algorithm.default=0.3"])
    assert cfg.algorithm.name == TOY and cfg.algorithm.params.default == 0.3
    child = tmp_path / "toy.yaml"
    child.write_text(f"base: {Path('configs/quickstart.yaml').resolve()}\nalgorithm: {{name: '{TOY}'}}\n")
    assert load_config(child).algorithm.params.thresholds == []
    same = load_config("configs/quickstart.yaml", ["algorithm.name=fixmatch", "algorithm.lambda_u=0"])
    assert (same.algorithm.params.lambda_u, same.algorithm.params.threshold) == (0.0, 0.95)  # same algorithm: keys kept


def test_the_old_fixmatch_section_reads_as_the_algorithm(tmp_path):
    cfg = load_config(None, ["fixmatch.threshold=0.6", "fixmatch.interleave=true"])
    assert cfg.algorithm.params.threshold == 0.6 and cfg.train.interleave is True
    old = to_dict(cfg)
    old.pop("algorithm")
    old["fixmatch"] = {"threshold": 0.8, "lambda_u": 0.0, "hard_label": True, "T": 0.5, "interleave": False}
    restored = from_dict(old)  # the config inside a checkpoint written before the seam
    assert restored.algorithm.params.threshold == 0.8 and restored.algorithm.params.lambda_u == 0.0
    both = tmp_path / "both.yaml"
    both.write_text("fixmatch: {threshold: 0.5}\nalgorithm: {name: fixmatch}\n")
    with pytest.raises(ConfigError, match="both 'fixmatch:' and 'algorithm:'"):
        load_config(both)


def _toy(num_unlabeled=6, thresholds=(0.0, 0.0, 0.99)):
    cfg = load_config(None, [f"algorithm.name={TOY}", f"algorithm.thresholds={list(thresholds)}"])
    return build_algorithm(cfg.algorithm.name, cfg.algorithm.params, num_classes=3, num_unlabeled=num_unlabeled)


def test_a_users_algorithm_with_state_hand_computed():
    algo = _toy()
    assert algo.has_state()
    logits_w = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, 9.0]])
    out = algo(torch.zeros(2, 3), torch.tensor([0, 1]), logits_w, torch.zeros(4, 3), torch.tensor([4, 1, 2, 3]), torch.tensor(0))
    # class 2 needs 0.99: softmax(0, 0, 5) max = 0.9867 fails, softmax(0, 0, 9) = 0.99975 passes
    assert out.mask.tolist() == [1.0, 1.0, 0.0, 1.0]
    algo.update_state(**out.stats)
    assert algo.last_label.tolist() == [-1, 1, -1, 2, 0, -1]
    assert algo.class_counts.tolist() == [1.0, 1.0, 1.0]


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))

    def forward(self, x):
        return self.body(x)


def _batches(n: int, b: int = 4, mu: int = 2, num_unlabeled: int = 6):
    g = torch.Generator().manual_seed(0)
    return [
        {
            "x": torch.randn(b, 3, 4, 4, generator=g), "y": torch.randint(0, 3, (b,), generator=g),
            "u_w": torch.randn(b * mu, 3, 4, 4, generator=g), "u_s": torch.randn(b * mu, 3, 4, 4, generator=g),
            "u_y": torch.randint(0, 3, (b * mu,), generator=g), "u_idx": torch.randint(0, num_unlabeled, (b * mu,), generator=g),
        }
        for _ in range(n)
    ]


def _train(algo, compile_model=False, iterations=4):
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    trainer = create_trainer(model, opt, torch.device("cpu"), algo, compile_model=compile_model)
    trainer.run(_batches(iterations), max_epochs=1)
    return model, trainer


def test_the_engine_updates_the_algorithms_state_and_reports_its_metrics():
    algo = _toy(thresholds=(0.0, 0.0, 0.0))
    _, trainer = _train(algo)
    out = trainer.state.output
    assert step_metric_names(algo) == ("loss", "loss_x", "loss_u", "confident_seen", "mask_rate", "pseudo_acc")
    assert set(out) == {*step_metric_names(algo), "lr", *PSEUDO_KEYS}
    assert out["pseudo_counts"].sum().item() == 8  # the last step's 8 unlabeled samples, all confident
    assert out["mask_rate"].item() == 1.0  # thresholds 0: every pseudo-label is used
    assert algo.class_counts.sum().item() == 4 * 8  # 4 steps of 8 unlabeled samples, all confident
    seen = {int(i) for batch in _batches(4) for i in batch["u_idx"]}
    assert {i for i, label in enumerate(algo.last_label.tolist()) if label >= 0} == seen
    assert out["confident_seen"].item() == len({int(i) for batch in _batches(3) for i in batch["u_idx"]})  # read before step 4's update


def test_the_algorithms_state_goes_through_a_checkpoint(tmp_path):
    algo = _toy(thresholds=(0.0, 0.0, 0.0))
    _train(algo)
    to_save = {"algorithm": algo, "model": TinyNet()}  # two objects: Ignite then keys the file by name, as the trainer's does
    Checkpoint(to_save, DiskSaver(str(tmp_path), require_empty=False))(Engine(lambda e, b: None))
    fresh = _toy(thresholds=(0.0, 0.0, 0.0))
    assert not torch.equal(fresh.last_label, algo.last_label)
    load_into({"algorithm": fresh, "model": TinyNet()}, next(tmp_path.glob("*.pt")))  # weights_only=True, as every load here
    assert_same_tensors(fresh.state_dict(), algo.state_dict())


@pytest.mark.slow
def test_compiled_step_gives_the_eager_losses_and_state():
    import torch._dynamo

    torch._dynamo.reset()
    eager_algo, compiled_algo = _toy(thresholds=(0.3, 0.3, 0.3)), _toy(thresholds=(0.3, 0.3, 0.3))
    eager, out_e = _train(eager_algo)
    compiled, out_c = _train(compiled_algo, compile_model=True)
    torch._dynamo.reset()
    for key in ("loss", "loss_x", "loss_u", "confident_seen", "mask_rate"):
        assert out_c.state.output[key].item() == pytest.approx(out_e.state.output[key].item(), rel=1e-5), key
    assert torch.equal(eager_algo.last_label, compiled_algo.last_label)
    assert torch.equal(eager_algo.class_counts, compiled_algo.class_counts)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_a_users_algorithm_under_two_processes_resumes_exactly_with_equal_state(folder, tmp_path):
    """The done-when of the seam: a dotted-path algorithm with state, 20 iterations on 2 gloo processes,
    killed after iteration 10 and resumed: every process holds the same state, equal to the
    uninterrupted job's, and the weights are bit-identical."""
    from test_distributed import CONFIG, LAUNCH_TIMEOUT, assert_same_final_state, spawn_args

    from helpers import cli, kill_two_processes_after_checkpoint, load_state, tiny_overrides, with_handler

    def args(out):
        run = [CONFIG, *tiny_overrides(folder, out), f"algorithm.name={TOY}", "algorithm.default=0.4", "data.mu=4"]
        run = [a for a in run if not a.startswith("algorithm.threshold=")]  # FixMatch's key; the toy has thresholds
        return with_handler(run, "tests.toy_algorithm:DumpAlgorithmState", prefix=str(out))

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    result = cli([*args(reference), *spawn_args()], timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    kill_two_processes_after_checkpoint(args(resumed), resumed)
    killed_at = load_state(resumed / "checkpoints" / "checkpoint_10.pt")["algorithm"]
    result = cli([*args(resumed), *spawn_args(), "resume=auto"], timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0 and "Resumed from" in result.stderr, result.stderr[-3000:]

    ref0, ref1, res0, res1 = (torch.load(f"{d}.rank{r}.pt", weights_only=True) for d in (reference, resumed) for r in (0, 1))
    for state in (ref1, res0, res1):
        assert_same_tensors(ref0, state)
    assert ref0["class_counts"].sum() > killed_at["class_counts"].sum() > 0  # it learned before and after the kill
    assert (ref0["last_label"] >= 0).sum() > 0
    assert_same_final_state(reference, resumed)
    assert_same_tensors(load_state(reference / "checkpoints" / "checkpoint_20.pt")["algorithm"], ref0)
