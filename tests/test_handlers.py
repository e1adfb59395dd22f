"""Built-in handlers and the plugin contract, on real Ignite Engines."""

import logging
import math
import re
import statistics

import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

from handlers.cosine_lr import cosine_factor
from helpers import cli, load_state, make_folder, tiny_overrides
from ignite_fixmatch.config import ConfigError, HandlerSpec, load_config
from ignite_fixmatch.plugins import Context, attach_all, build_handler, build_handlers


def make_ctx(tmp_path, model, num_iters, step=None):
    cfg = load_config(None, [f"train.num_iters={num_iters}"])
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=0.9)

    def default_step(engine, batch):
        return {"loss": torch.tensor(1.0), "mask_rate": torch.tensor(0.0), "lr": optimizer.param_groups[0]["lr"]}

    trainer = Engine(step or default_step)
    return Context(trainer=trainer, model=model, optimizer=optimizer, config=cfg, output_dir=tmp_path, logger=logging.getLogger("test"))


def test_cosine_lr_follows_the_fixmatch_formula(tmp_path):
    K = 64
    ctx = make_ctx(tmp_path, nn.Linear(2, 2), K)
    seen = []
    ctx.trainer._process_function = lambda e, b: seen.append(ctx.optimizer.param_groups[0]["lr"])
    attach_all(build_handlers([HandlerSpec("cosine_lr")]), ctx)
    ctx.trainer.run([0] * K, max_epochs=1)
    assert len(seen) == K
    for k in (0, 1, 10, 32, 63):
        assert seen[k] == pytest.approx(0.03 * math.cos(7 * math.pi * k / (16 * K)), rel=1e-9), k
    assert "lr_scheduler" in ctx.to_save


def _lrs_of_run(tmp_path, K, stop_at=None, resume_from=None):
    """The lr of every iteration of a cosine_lr run (real Engine, SGD, a checkpoint file on disk)."""
    tmp_path.mkdir()
    ctx = make_ctx(tmp_path, nn.Linear(2, 2), K)
    seen = []
    ctx.trainer._process_function = lambda e, b: seen.append([g["lr"] for g in ctx.optimizer.param_groups])
    attach_all(build_handlers([HandlerSpec("cosine_lr", {"warmup_iters": 4})]), ctx)
    to_save = {"trainer": ctx.trainer, "optimizer": ctx.optimizer, "lr_scheduler": ctx.to_save["lr_scheduler"]}
    if resume_from is not None:
        state = torch.load(resume_from, weights_only=True)
        for key, obj in to_save.items():
            obj.load_state_dict(state[key])
    if stop_at is not None:
        ctx.trainer.add_event_handler(Events.ITERATION_COMPLETED(once=stop_at), lambda e: e.terminate())
    ctx.trainer.run([0] * K, max_epochs=1)
    torch.save({key: obj.state_dict() for key, obj in to_save.items()}, tmp_path / "state.pt")
    return seen


def test_cosine_lr_warmup_and_resume_is_bit_exact(tmp_path):
    assert cosine_factor(0, 100, warmup=10) == 0.0 and cosine_factor(5, 100, warmup=10) == 0.5
    assert cosine_factor(10, 100, warmup=10) == 1.0
    K = 40
    whole = _lrs_of_run(tmp_path / "a", K)
    for k in (0, 2, 4, 17, 39):
        assert whole[k] == [0.03 * cosine_factor(k, K, warmup=4)], k
    first = _lrs_of_run(tmp_path / "b", K, stop_at=17)
    second = _lrs_of_run(tmp_path / "c", K, resume_from=tmp_path / "b" / "state.pt")
    assert len(first) == 17 and len(second) == K - 17
    assert first + second == whole  # ==, not approx: the resumed run sets exactly the same floats


def test_cosine_lr_loads_a_checkpoint_of_ignites_lrscheduler(tmp_path):
    """Runs checkpointed before cosine_lr was a plain handler saved Ignite's LRScheduler(LambdaLR) state."""
    from ignite.handlers import LRScheduler
    from torch.optim.lr_scheduler import LambdaLR

    old_opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.5)
    old = LRScheduler(LambdaLR(old_opt, lambda k: 1.0)).state_dict()
    ctx = make_ctx(tmp_path, nn.Linear(2, 2), 10)
    attach_all(build_handlers([HandlerSpec("cosine_lr")]), ctx)
    ctx.to_save["lr_scheduler"].load_state_dict(old)
    ctx.trainer.run([0] * 1, max_epochs=1)
    assert ctx.optimizer.param_groups[0]["lr"] == 0.5


def _diverging_step(bad_iteration, value=math.nan):
    """Loss 1.0, except ``value`` at ``bad_iteration`` and the iteration after it, finite again later."""

    def step(engine, batch):
        it = engine.state.iteration
        loss = value if bad_iteration <= it <= bad_iteration + 1 else 1.0
        return {"loss": torch.tensor(loss), "mask_rate": torch.tensor(0.0), "lr": 0.03}

    return step


@pytest.mark.parametrize("check_every,seen_at", [(50, 20), (5, 10), (1, 7)])
def test_terminate_on_nan_read_late_names_the_exact_first_bad_iteration(tmp_path, check_every, seen_at):
    from ignite_fixmatch.trainer import NonFiniteLossError

    ctx = make_ctx(tmp_path, nn.Linear(2, 2), 20, _diverging_step(7, math.inf))
    attach_all(build_handlers([HandlerSpec("terminate_on_nan", {"check_every": check_every})]), ctx)
    with pytest.raises(NonFiniteLossError) as e:
        ctx.trainer.run([0] * 20, max_epochs=1)
    assert "loss is inf at iteration 7: training diverged" in str(e.value)
    assert f"detected at iteration {seen_at}" in str(e.value) and "none saved yet" in str(e.value)
    assert ctx.trainer.state.iteration == seen_at


def _nan_run_with_checkpoints(tmp_path, bad_iteration, every, signal_at=None):
    """A real run of the ema, terminate_on_nan (read every 50) and checkpoint handlers; raises at the NaN."""
    import os
    import signal

    from ignite_fixmatch.preemption import PreemptionGuard

    model = nn.Linear(2, 2)
    inner = _diverging_step(bad_iteration)

    def step(engine, batch):
        with torch.no_grad():
            model.weight.add_(engine.state.iteration if engine.state.iteration < bad_iteration else math.nan)
        if engine.state.iteration == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)  # preemption: the guard saves at the end of this iteration
        return inner(engine, batch)

    ctx = make_ctx(tmp_path, model, 20, step)
    ctx.to_save.update({"trainer": ctx.trainer, "model": model})
    specs = [HandlerSpec("ema"), HandlerSpec("terminate_on_nan"), HandlerSpec("checkpoint", {"every": every, "keep_best": 0})]
    attach_all(build_handlers(specs), ctx)
    guard = PreemptionGuard(ctx.logger)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    guard.install()
    try:
        guard.attach(ctx.trainer, ctx.save_checkpoint, lambda: "")
        ctx.trainer.run([0] * 20, max_epochs=1)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    return ctx


def test_no_checkpoint_is_written_after_a_nan_between_reads(tmp_path):
    from ignite_fixmatch.trainer import NonFiniteLossError

    with pytest.raises(NonFiniteLossError) as e:
        _nan_run_with_checkpoints(tmp_path, bad_iteration=6, every=4)
    assert "loss is nan at iteration 6" in str(e.value) and "detected at iteration 8" in str(e.value)
    assert str(tmp_path / "checkpoints" / "checkpoint_4.pt") in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint_4.pt"]
    saved = torch.load(tmp_path / "checkpoints" / "checkpoint_4.pt", weights_only=True)
    assert torch.isfinite(saved["model"]["weight"]).all() and torch.isfinite(saved["ema_model"]["weight"]).all()


def test_the_preemption_save_is_refused_after_a_nan_between_reads(tmp_path):
    from ignite_fixmatch.trainer import NonFiniteLossError

    with pytest.raises(NonFiniteLossError) as e:  # not Preempted: nothing was saved
        _nan_run_with_checkpoints(tmp_path, bad_iteration=3, every=100, signal_at=5)
    assert "loss is nan at iteration 3" in str(e.value) and "detected at iteration 5" in str(e.value)
    assert not list((tmp_path / "checkpoints").iterdir())


def test_no_evaluation_of_diverged_weights(tmp_path):
    """The evaluation handler calls ctx.guards (terminate_on_nan's check) before every evaluation."""
    from types import SimpleNamespace

    from ignite_fixmatch.trainer import NonFiniteLossError

    ctx = make_ctx(tmp_path, nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), 20, _diverging_step(3))
    ctx.device = torch.device("cpu")
    ctx.data = SimpleNamespace(sources=SimpleNamespace(num_classes=2, mean=(0.5,) * 3, std=(0.25,) * 3))
    ctx.loaders["test"] = [(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))]
    specs = [HandlerSpec("evaluation", {"every": 2, "models": ["raw"]}), HandlerSpec("terminate_on_nan")]
    planned = build_handlers(specs)
    assert [type(h).__name__ for h in planned] == ["StopOnNonFinite", "Evaluation"]  # the guard first, whatever the list says
    attach_all(planned, ctx)
    evaluation = planned[1]
    with pytest.raises(NonFiniteLossError, match="at iteration 3"):
        ctx.trainer.run([0] * 20, max_epochs=1)
    assert [r["iteration"] for r in evaluation.history] == [2] and ctx.trainer.state.iteration == 4  # evaluated at 2, refused at 4


def test_ema_averages_weights_and_copies_batchnorm_buffers(tmp_path):
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    nn.init.constant_(model[0].weight, 0.0)

    def step(engine, batch):  # the "update": weight += 1, and a BN statistic that changes
        with torch.no_grad():
            model[0].weight += 1.0
            model[1].running_mean.fill_(float(engine.state.iteration))
        return {"loss": torch.tensor(0.0)}

    ctx = make_ctx(tmp_path, model, 3, step)
    attach_all(build_handlers([HandlerSpec("ema", {"decay": 0.9})]), ctx)
    ctx.trainer.run([0] * 3, max_epochs=1)
    expected = 0.0
    for w in (1.0, 2.0, 3.0):
        expected = 0.9 * expected + 0.1 * w
    ema = ctx.ema_model
    assert ema[0].weight.item() == pytest.approx(expected)
    assert ema[1].running_mean.item() == 3.0  # copied, not averaged
    assert ctx.to_save["ema_model"] is ema and not ema.training


def test_evaluation_reports_best_and_median_of_last_20():
    from handlers.evaluation import Evaluation

    ev = Evaluation(every=1)
    ev.history = [{"iteration": i, "ema": {"top1": float(i % 7), "top5": 0.0, "loss": 0.0}} for i in range(25)]
    r = ev.results()
    assert r["best_top1"] == 6.0 and r["top1"] == 24 % 7
    assert r["median20_top1"] == statistics.median([float(i % 7) for i in range(5, 25)])
    again = Evaluation(every=1)
    again.load_state_dict(ev.state_dict())
    assert again.results() == r


@pytest.mark.parametrize(
    "spec,words",
    [
        (HandlerSpec("nope"), ["unknown handler 'nope'", "ema", "package.module:ClassName"]),
        (HandlerSpec("no_such_pkg.mod:Thing"), ["cannot import module 'no_such_pkg.mod'"]),
        (HandlerSpec("examples.mask_rate_alarm:Missing"), ["has no attribute 'Missing'"]),
        (HandlerSpec("ema", {"decy": 0.9}), ["handlers[0] (ema)", "decy", "Accepted params: decay, buffers"]),
        (HandlerSpec("ema", {"decay": 1.5}), ["handlers[0] (ema)", "decay must be in (0, 1)"]),
        (HandlerSpec("checkpoint", {"every": 0}), ["handlers[0] (checkpoint)", "every"]),
        (HandlerSpec("terminate_on_nan", {"check_every": 0}), ["handlers[0] (terminate_on_nan)", "check_every must be an integer >= 1"]),
        (HandlerSpec("logging:Logger", {"name": "x"}), ["no attach(ctx) method"]),
    ],
)
def test_bad_handlers_are_refused_with_the_handler_named(spec, words):
    with pytest.raises(ConfigError) as e:
        build_handler(spec, 0)
    for w in words:
        assert w in str(e.value)


@pytest.mark.slow
def test_a_user_handler_loaded_by_dotted_path_fires_and_is_checkpointed(tmp_path):
    data = make_folder(tmp_path)
    out = tmp_path / "run"
    handlers = (
        "handlers=[{name: ema}, {name: evaluation, params: {every: 20}}, {name: checkpoint, params: {every: 10}}, "
        "{name: 'examples.mask_rate_alarm:MaskRateAlarm', params: {min_rate: 1.0, patience: 4}}]"
    )
    result = cli(["configs/quickstart.yaml", *tiny_overrides(data, out), handlers, "algorithm.threshold=1.0"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("MaskRateAlarm: mask_rate below 1.000 for 4 iterations") == 5  # 20 iterations / 4
    state = load_state(out / "checkpoints" / "checkpoint_20.pt")
    assert state["mask_rate_alarm"] == {"low_for": 0, "alarms": 5}


@pytest.mark.parametrize("buffers", ["copy", "update"])
def test_fused_ema_update_equals_ignites_loop(tmp_path, buffers):
    from ignite.handlers import EMAHandler

    from ignite_fixmatch.foreach_ema import ForeachEMAHandler

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 3))
    ours = ForeachEMAHandler(model, momentum=0.01, handle_buffers=buffers)
    ignites = EMAHandler(model, momentum=0.01, handle_buffers=buffers)

    def step(engine, batch):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()
        model(torch.randn(2, 3, 8, 8))  # moves the batch-norm statistics
        return {}

    trainer = Engine(step)
    ours.attach(trainer, name="m1")
    ignites.attach(trainer, name="m2")
    trainer.run([0] * 5, max_epochs=1)
    for a, b in zip(ours.ema_model.state_dict().values(), ignites.ema_model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_progress_averages_the_window_since_the_last_line(tmp_path, caplog):
    losses = iter(float(i) for i in range(1, 100))

    def step(engine, batch):
        v = next(losses)
        return {"loss": torch.tensor(v), "loss_x": torch.tensor(v), "loss_u": torch.tensor(0.0), "mask_rate": torch.tensor(0.5), "lr": 0.03}

    ctx = make_ctx(tmp_path, nn.Linear(2, 2), 8, step)
    ctx.logger = logging.getLogger("progress-test")
    attach_all(build_handlers([HandlerSpec("progress", {"every": 4, "mode": "log"})]), ctx)
    with caplog.at_level(logging.INFO, logger="progress-test"):
        ctx.trainer.run([0] * 8, max_epochs=1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "iteration 4/8  loss 2.5000" in lines[0] and "iteration 8/8  loss 6.5000" in lines[1]  # means of 1-4 and 5-8
    assert "mask_rate 0.500" in lines[0] and "ETA" in lines[0]


def test_progress_speed_and_eta_come_from_the_latest_window(tmp_path, caplog, monkeypatch):
    """A slow first window (compiling) must not drag the speed or the ETA of later lines."""
    import types

    import handlers.progress

    # The handler's clock is a fake one that only the steps move: 0.4 s for the first, 0.005 s for each other.
    clock = types.SimpleNamespace(now=1000.0)
    monkeypatch.setattr(handlers.progress, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))

    def step(engine, batch):
        clock.now += 0.4 if engine.state.iteration == 1 else 0.005
        return {"loss": torch.tensor(1.0), "loss_x": torch.tensor(1.0), "loss_u": torch.tensor(0.0), "mask_rate": torch.tensor(0.5), "lr": 0.03}

    ctx = make_ctx(tmp_path, nn.Linear(2, 2), 1000, step)  # 1000 iterations planned, 8 run: the ETA counts
    ctx.logger = logging.getLogger("progress-speed-test")
    attach_all(build_handlers([HandlerSpec("progress", {"every": 4, "mode": "log"})]), ctx)
    with caplog.at_level(logging.INFO, logger="progress-speed-test"):
        ctx.trainer.run([0] * 8, max_epochs=1)
    lines = [r.getMessage() for r in caplog.records]
    rates = [float(re.search(r"([\d.]+) it/s", line).group(1)) for line in lines]
    assert rates == [pytest.approx(4 / 0.415, abs=0.05), pytest.approx(4 / 0.02, abs=0.05)]  # 9.6 it/s, then 200 (overall: 18.4)
    # ETA of the second line: 992 iterations at 200 it/s = 4.96 s (at the overall speed it would be 53.9 s).
    assert "ETA 0:01:43" in lines[0] and "ETA 0:00:04" in lines[1], lines  # first: 996 at 9.64 it/s = 103 s
