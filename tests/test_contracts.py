"""The handler contract: declared needs/provides/uses/priority, the attach order resolved from them, the
errors for a list that cannot work, and the order the handlers then fire in on real Engines."""

from __future__ import annotations

import csv
import logging
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine, Events
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from helpers import ROOT, cli, subprocess_env, tiny_overrides
from ignite_fixmatch.config import ConfigError, HandlerSpec, load_config
from ignite_fixmatch.plugins import BUILTINS, DEFAULT, Context, Handler, attach_all, build_handler, build_handlers, plan_handlers

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def names(specs: list[HandlerSpec]) -> list[str]:
    return [item.spec.name.rpartition(":")[2] for item in plan_handlers(specs)]


def specs_of(*entries: str | tuple[str, dict]) -> list[HandlerSpec]:
    return [HandlerSpec(e) if isinstance(e, str) else HandlerSpec(*e) for e in entries]


# Handlers of one's own, named f"{__name__}:Class" (the test folder is on sys.path).
class Plain:
    def attach(self, ctx: Context) -> None: ...


class Provider:
    provides = ("x",)
    priority = 90  # after everything, were it not for Consumer's need

    def attach(self, ctx: Context) -> None: ...


class Consumer:
    needs = ("x",)
    priority = 10

    def attach(self, ctx: Context) -> None: ...


class CycleA:
    provides, needs = ("a",), ("b",)

    def attach(self, ctx: Context) -> None: ...


class CycleB:
    provides, uses = ("b",), ("a",)

    def attach(self, ctx: Context) -> None: ...


class RankZeroProvider(Provider):
    rank_zero_only = True


class BadDeclaration:
    needs = "ema_model"  # a string, not a tuple of names

    def attach(self, ctx: Context) -> None: ...


HERE = __name__


# ---------------------------------------------------------------------- the sort


def test_the_quick_start_order_is_kept_except_the_checkpoint_goes_last():
    listed = load_config(QUICKSTART).handlers
    assert [spec.name for spec in listed] == ["ema", "cosine_lr", "terminate_on_nan", "evaluation", "checkpoint", "tensorboard", "progress"]
    planned = names(listed)
    assert planned == ["ema", "cosine_lr", "terminate_on_nan", "evaluation", "tensorboard", "progress", "checkpoint"]


@pytest.mark.parametrize(
    "listed,planned",
    [
        # tensorboard before evaluation: it used to find no evaluator to log
        (["tensorboard", "evaluation", "ema"], ["ema", "evaluation", "tensorboard"]),
        (["checkpoint", "tensorboard", "evaluation", "terminate_on_nan", "ema"], ["ema", "terminate_on_nan", "evaluation", "tensorboard", "checkpoint"]),
        # clearml after the evaluation (its evaluators) and the checkpoint (its final save), though REPORT < PERSIST
        (["clearml", "checkpoint", "progress", "evaluation", "ema"], ["ema", "evaluation", "progress", "checkpoint", "clearml"]),
        (["timer", "progress", "ema", "evaluation", "checkpoint"], ["ema", "evaluation", "progress", "checkpoint", "timer"]),
        # nothing but priorities: ties keep the list order
        (["progress", "tensorboard", "cosine_lr", "ema"], ["cosine_lr", "ema", "progress", "tensorboard"]),
    ],
)
def test_order_comes_from_declarations_not_list_position(listed, planned):
    assert names(specs_of(*listed)) == planned


def test_a_handler_without_declarations_goes_between_measuring_and_reporting():
    plain = f"{HERE}:Plain"
    assert names(specs_of("tensorboard", plain, "ema", "evaluation", "checkpoint")) == ["ema", "evaluation", "Plain", "tensorboard", "checkpoint"]


def test_a_need_outranks_priority_and_a_missing_use_is_no_error():
    assert names(specs_of(f"{HERE}:Consumer", f"{HERE}:Provider", "ema")) == ["ema", "Provider", "Consumer"]
    assert names(specs_of(f"{HERE}:CycleB", "ema")) == ["ema", "CycleB"]  # uses 'a', which nobody provides


def test_builtins_build_with_defaults_and_declare_their_contract():
    for name in BUILTINS:
        handler = build_handler(HandlerSpec(name), 0)
        assert isinstance(handler, Handler), name
        for attr in ("provides", "needs", "uses"):
            value = getattr(handler, attr, ())
            assert isinstance(value, tuple) and all(isinstance(v, str) for v in value), (name, attr)
        assert isinstance(getattr(handler, "priority", DEFAULT), int), name
    evaluation = build_handler(HandlerSpec("evaluation", {"models": ["raw", "ema"]}), 0)
    assert evaluation.provides == ("evaluators", "evaluator:raw", "evaluator:ema") and evaluation.needs == ("ema_model",)
    assert build_handler(HandlerSpec("evaluation", {"models": ["raw"]}), 0).needs == ()
    assert build_handler(HandlerSpec("checkpoint", {"best_model": "raw"}), 0).needs == ("evaluator:raw",)
    assert build_handler(HandlerSpec("checkpoint", {"keep_best": 0}), 0).needs == ()


PLAN_WITHOUT_TORCH = """
import sys
from ignite_fixmatch.config import ConfigError, HandlerSpec
from ignite_fixmatch.plugins import BUILTINS, plan_handlers
plan_handlers([HandlerSpec(name) for name in BUILTINS] + [HandlerSpec("examples.mask_rate_alarm:MaskRateAlarm")])
try:  # the error for a missing dependency builds every built-in to say which one provides it
    plan_handlers([HandlerSpec("evaluation", {"models": ["ema"]})])
except ConfigError as e:
    assert "add the 'ema' handler" in str(e), e
else:
    raise AssertionError("a missing ema handler was not refused")
heavy = sorted({m.partition(".")[0] for m in sys.modules} & {"torch", "ignite", "torchvision", "tensorboard", "clearml"})
assert not heavy, f"planning the handlers imported {heavy}"
"""


def test_handlers_are_built_and_planned_without_importing_torch():
    """A bad handler list is refused before torch loads (about 2.5 s): the handler modules and the plugin
    contract import torch, Ignite and the loggers only when attached."""
    result = subprocess.run([sys.executable, "-c", PLAN_WITHOUT_TORCH], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]


# ---------------------------------------------------------------------- refused lists


@pytest.mark.parametrize(
    "listed,words",
    [
        (
            ["cosine_lr", ("evaluation", {"models": ["ema"]})],
            ["handlers[1] (evaluation) needs 'ema_model'", "add the 'ema' handler", "set evaluation's models to [raw]"],
        ),
        (["ema", "checkpoint"], ["handlers[1] (checkpoint) needs 'evaluator:ema'", "add the 'evaluation' handler", "keep_best to 0"]),
        (
            ["ema", "evaluation", ("checkpoint", {"best_model": "raw"})],
            ["handlers[2] (checkpoint) needs 'evaluator:raw'", "give handlers[1] (evaluation) params that provide it"],
        ),
        ([f"{HERE}:Consumer"], [f"handlers[0] ({HERE}:Consumer) needs 'x', which no handler in the list provides: add a handler that provides it"]),
    ],
)
def test_a_missing_dependency_names_both_handlers_and_the_fix(listed, words):
    with pytest.raises(ConfigError) as e:
        plan_handlers(specs_of(*listed))
    for w in words:
        assert w in str(e.value)


def test_a_cycle_is_refused_naming_its_handlers():
    with pytest.raises(ConfigError) as e:
        plan_handlers(specs_of("ema", f"{HERE}:CycleA", f"{HERE}:CycleB"))
    message = str(e.value)
    assert "cycle" in message and f"handlers[1] ({HERE}:CycleA)" in message and f"handlers[2] ({HERE}:CycleB)" in message
    assert "handlers[0]" not in message


def test_a_handler_on_every_process_cannot_need_a_rank_zero_one():
    with pytest.raises(ConfigError, match=r"handlers\[1\] .*runs on every process and needs 'x'.*handlers\[0\].*process 0 only"):
        plan_handlers(specs_of(f"{HERE}:RankZeroProvider", f"{HERE}:Consumer"))


def test_declarations_must_be_tuples_of_names():
    with pytest.raises(ConfigError, match=r"handlers\[0\] .*needs must be a tuple of capability names"):
        plan_handlers(specs_of(f"{HERE}:BadDeclaration"))


# ---------------------------------------------------------------------- real Engines


def real_ctx(tmp_path, num_iters: int) -> Context:
    """A tiny model, a trainer whose step returns the FixMatch metrics, one test batch."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    cfg = load_config(None, [f"train.num_iters={num_iters}"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03)

    def step(engine, batch):
        one = torch.tensor(1.0)
        return {"loss": one, "loss_x": one, "loss_u": one, "mask_rate": one, "lr": optimizer.param_groups[0]["lr"]}

    ctx = Context(
        trainer=Engine(step), model=model, optimizer=optimizer, config=cfg, output_dir=tmp_path, logger=logging.getLogger("contracts"),
        loaders={"test": [(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))]}, device=torch.device("cpu"),
        data=SimpleNamespace(sources=SimpleNamespace(num_classes=2, mean=(0.5,) * 3, std=(0.25,) * 3)),
    )
    ctx.to_save.update(trainer=ctx.trainer, model=model)
    return ctx


def fired(engine: Engine, event: Events) -> list[str]:
    return [getattr(h, "__qualname__", type(h).__name__) for h, _, _ in engine._event_handlers[event]]


def test_handlers_fire_in_the_planned_order_and_register_nothing_late(tmp_path):
    """ema first, the checkpoint after every handler, the preemption check after the checkpoint: all of it
    registered at attach, nothing added while the run starts."""
    from ignite_fixmatch.preemption import PreemptionGuard

    ctx = real_ctx(tmp_path, 4)
    listed = specs_of(
        ("checkpoint", {"every": 2}), ("tensorboard", {"every": 1}), ("evaluation", {"every": 2}),
        ("progress", {"every": 2, "mode": "log"}), "terminate_on_nan", ("ema", {"decay": 0.9}),
    )
    planned = build_handlers(listed)
    attach_all(planned, ctx)
    guard = PreemptionGuard(ctx.logger, check_every=1)
    guard.attach(ctx.trainer, ctx.save_checkpoint, lambda: "")
    order = fired(ctx.trainer, Events.ITERATION_COMPLETED)
    positions = [next(i for i, q in enumerate(order) if key in q) for key in (
        "_update_ema_model", "StopOnNonFinite.record", "Evaluation.evaluate", "TensorBoard.attach", "Progress.attach",
        "Checkpointing._after_iteration", "PreemptionGuard._check",
    )]
    assert positions == sorted(positions), order
    started = fired(ctx.trainer, Events.STARTED)
    ctx.trainer.run([0] * 4, max_epochs=1)
    assert fired(ctx.trainer, Events.STARTED) == started  # no handler registered another one at STARTED
    completed = fired(ctx.trainer, Events.COMPLETED)
    assert completed.index("Evaluation.evaluate") < completed.index("Checkpointing._at_end")
    assert [r["iteration"] for r in planned[2].history] == [2, 4]  # ema, terminate_on_nan, evaluation, ...
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith("best")) == ["checkpoint_2.pt", "checkpoint_4.pt"]
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("test_ema/top1")] == [2, 4]  # listed before evaluation, still logs it


def test_guards_run_before_every_evaluation_and_every_checkpoint_write(tmp_path):
    ctx = real_ctx(tmp_path, 4)
    calls: list[tuple[str, int]] = []
    attach_all(build_handlers(specs_of("ema", ("evaluation", {"every": 2}), ("checkpoint", {"every": 2, "keep_best": 0}))), ctx)
    ctx.guards.append(lambda trainer: calls.append(("guard", trainer.state.iteration)))
    ctx.evaluators["ema"].add_event_handler(Events.STARTED, lambda _: calls.append(("evaluate", ctx.trainer.state.iteration)))
    ctx.trainer.run([0] * 4, max_epochs=1)
    # iteration 2 and 4: guard, evaluate (evaluation handler), guard, write (checkpoint handler)
    assert calls == [("guard", 2), ("evaluate", 2), ("guard", 2), ("guard", 4), ("evaluate", 4), ("guard", 4)]


def test_timer_writes_the_handler_time_table(tmp_path, caplog):
    ctx = real_ctx(tmp_path, 4)
    attach_all(build_handlers(specs_of("timer", ("progress", {"every": 2, "mode": "log"}), "terminate_on_nan")), ctx)
    with caplog.at_level(logging.INFO, logger="contracts"):
        ctx.trainer.run([0] * 4, max_epochs=1)
    assert any("Time in handlers" in r.getMessage() and "StopOnNonFinite.record" in r.getMessage() for r in caplog.records)
    rows = list(csv.DictReader((tmp_path / "handlers_time.csv").open()))
    by_handler = {(r["handler"], r["event"]): r for r in rows}
    assert float(by_handler[("StopOnNonFinite.check", "COMPLETED")]["total_s"]) >= 0
    assert {"Total", "Processing", "Dataflow"} <= {r["handler"] for r in rows}
    with pytest.raises(ConfigError, match="file must be a file name inside the output folder"):
        build_handler(HandlerSpec("timer", {"file": "../x.csv"}), 0)


# ---------------------------------------------------------------------- the command line


@pytest.mark.slow
def test_cli_refuses_a_missing_dependency_before_anything_starts(tmp_path):
    out = tmp_path / "run"
    handlers = "handlers=[{name: cosine_lr}, {name: terminate_on_nan}, {name: evaluation, params: {models: [ema]}}, {name: checkpoint}]"
    start = time.perf_counter()
    result = cli(["configs/quickstart.yaml", f"output_dir={out}", handlers], timeout=120)
    seconds = time.perf_counter() - start
    assert result.returncode == 2, result.stderr[-3000:]
    assert "handlers[2] (evaluation) needs 'ema_model'" in result.stderr and "add the 'ema' handler" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()  # refused before any process, data or model
    print(f"refused in {seconds:.2f} s")  # the time of importing torch and Ignite: see README, Handlers


@pytest.mark.slow
def test_cli_run_with_handlers_in_a_bad_order_logs_every_evaluation(folder, tmp_path):
    out = tmp_path / "run"
    handlers = (
        "handlers=[{name: timer}, {name: tensorboard, params: {every: 1}}, {name: checkpoint, params: {every: 2}}, "
        "{name: evaluation, params: {every: 2}}, {name: terminate_on_nan}, {name: cosine_lr}, {name: ema}]"
    )
    result = cli(["configs/quickstart.yaml", *tiny_overrides(folder, out), "train.num_iters=4", handlers])
    assert result.returncode == 0, result.stderr[-3000:]
    accumulator = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("test_ema/top1")] == [2, 4]
    assert [e.step for e in accumulator.Scalars("train/loss")] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("best")) == ["checkpoint_2.pt", "checkpoint_4.pt"]
    table = {row["handler"] for row in csv.DictReader((out / "handlers_time.csv").open())}
    assert "Checkpointing._at_end" in table and "Evaluation.evaluate" in table


class RecordsFailure:
    """A handler that records the run's failure through ctx.on_failure (optionally failing to)."""

    def __init__(self, seen: list, broken: bool = False) -> None:
        self.seen, self.broken = seen, broken

    def attach(self, ctx: Context) -> None:
        def record(error: BaseException) -> None:
            self.seen.append((self, error))
            if self.broken:
                raise OSError("tracker unreachable")

        ctx.on_failure.append(record)


def test_every_failure_callback_runs_once_and_the_error_reaches_the_caller(tmp_path, caplog):
    """Ignite fires EXCEPTION_RAISED twice for an error in a step and re-raises nothing once a handler exists:
    attach_all's handler calls each callback once, a callback that fails is logged, and the error goes on."""
    ctx = real_ctx(tmp_path, 4)

    def step(engine, batch):
        if engine.state.iteration == 2:
            raise RuntimeError("the step broke")
        return {"loss": torch.tensor(1.0)}

    ctx.trainer = Engine(step)
    seen: list = []
    first, broken, last = RecordsFailure(seen), RecordsFailure(seen, broken=True), RecordsFailure(seen)
    attach_all([first, broken, last], ctx)
    with caplog.at_level(logging.WARNING, logger="contracts"), pytest.raises(RuntimeError, match="the step broke") as raised:
        ctx.trainer.run([0] * 4, max_epochs=1)
    assert [h for h, _ in seen] == [first, broken, last]
    assert all(e is raised.value for _, e in seen)
    assert "a handler could not record the run's failure: OSError: tracker unreachable" in caplog.text
