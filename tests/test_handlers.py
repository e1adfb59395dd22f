"""Built-in handlers and the plugin contract, on real Ignite Engines."""

import logging
import math
import statistics

import pytest
import torch
from ignite.engine import Engine
from torch import nn

from helpers import cli, load_state, make_folder, tiny_overrides
from ignite_fixmatch.config import ConfigError, HandlerSpec, load_config
from ignite_fixmatch.plugins import Context, attach_all, build_handler, build_handlers
from handlers.cosine_lr import cosine_factor


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


def test_cosine_lr_warmup_and_state_survives(tmp_path):
    assert cosine_factor(0, 100, warmup=10) == 0.0 and cosine_factor(5, 100, warmup=10) == 0.5
    assert cosine_factor(10, 100, warmup=10) == 1.0
    ctx = make_ctx(tmp_path, nn.Linear(2, 2), 40)
    attach_all(build_handlers([HandlerSpec("cosine_lr", {"warmup_iters": 4})]), ctx)
    ctx.trainer.run([0] * 20, max_epochs=1)
    state = ctx.to_save["lr_scheduler"].state_dict()
    ctx2 = make_ctx(tmp_path, nn.Linear(2, 2), 40)
    attach_all(build_handlers([HandlerSpec("cosine_lr", {"warmup_iters": 4})]), ctx2)
    ctx2.to_save["lr_scheduler"].load_state_dict(state)
    assert ctx2.to_save["lr_scheduler"].lr_scheduler.last_epoch == ctx.to_save["lr_scheduler"].lr_scheduler.last_epoch


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
        (HandlerSpec("logging:Logger", {"name": "x"}), ["no attach(ctx) method"]),
    ],
)
def test_bad_handlers_are_refused_with_the_handler_named(spec, words):
    with pytest.raises(ConfigError) as e:
        build_handler(spec, 0)
    for w in words:
        assert w in str(e.value)


def test_a_user_handler_loaded_by_dotted_path_fires_and_is_checkpointed(tmp_path):
    data = make_folder(tmp_path)
    out = tmp_path / "run"
    handlers = (
        "handlers=[{name: ema}, {name: evaluation, params: {every: 20}}, {name: checkpoint, params: {every: 10}}, "
        "{name: 'examples.mask_rate_alarm:MaskRateAlarm', params: {min_rate: 1.0, patience: 4}}]"
    )
    result = cli(["configs/quickstart.yaml", *tiny_overrides(data, out), handlers, "fixmatch.threshold=1.0"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("MaskRateAlarm: mask_rate below 1.000 for 4 iterations") == 5  # 20 iterations / 4
    state = load_state(out / "checkpoints" / "checkpoint_20.pt")
    assert state["mask_rate_alarm"] == {"low_for": 0, "alarms": 5}


@pytest.mark.parametrize("buffers", ["copy", "update"])
def test_fused_ema_update_equals_ignites_loop(tmp_path, buffers):
    from ignite.handlers import EMAHandler

    from handlers.ema import ForeachEMAHandler

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
