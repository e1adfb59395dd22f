"""The handler plugin contract: how a name in ``handlers:`` becomes an object attached to the run.

A handler is any class (or function returning an object) that takes its YAML params as keyword
arguments, validates them in ``__init__`` and has ``attach(ctx: Context) -> None``. Built-ins live in
the top-level ``handlers`` package; a user's handler is named ``package.module:Name`` and imported
from the working directory. Handlers that keep state implement ``state_dict``/``load_state_dict`` and
put themselves in ``ctx.to_save``; the checkpoint then saves and restores them.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Protocol, runtime_checkable

import torch
from ignite.engine import Engine, Events
from torch import nn
from torch.optim import Optimizer

from ignite_fixmatch.config import Config, ConfigError, HandlerSpec

BUILTINS: Mapping[str, str] = MappingProxyType(
    {
        "ema": "handlers.ema:EMA",
        "cosine_lr": "handlers.cosine_lr:CosineLR",
        "evaluation": "handlers.evaluation:Evaluation",
        "checkpoint": "handlers.checkpoint:Checkpointing",
        "tensorboard": "handlers.tensorboard:TensorBoard",
        "clearml": "handlers.clearml:ClearML",
        "progress": "handlers.progress:Progress",
        "terminate_on_nan": "handlers.terminate_on_nan:StopOnNonFinite",
        "timer": "handlers.timer:StepTimer",
    }
)


@dataclass
class Context:
    """What a handler may use. Only ``to_save`` (and ``evaluators``/``metrics`` by their owners) are
    written by handlers; everything else is read-only by convention."""

    trainer: Engine
    model: nn.Module
    optimizer: Optimizer
    config: Config
    output_dir: Path
    logger: logging.Logger
    loaders: dict[str, Iterable] = field(default_factory=dict)
    to_save: dict[str, Any] = field(default_factory=dict)
    evaluators: dict[str, Engine] = field(default_factory=dict)
    ema_model: nn.Module | None = None
    scaler: Any = None
    device: Any = None
    data: Any = None
    rank: int = 0
    world_size: int = 1
    # Set by the checkpoint handler: writes a resumable checkpoint now (used on preemption).
    save_checkpoint: Callable[[Engine], None] | None = None
    # Called with the trainer by the checkpoint handler before every write (periodic, best, final,
    # preemption), on every process at the same iteration. A guard raises to refuse the write and stop
    # the run (terminate_on_nan: the loss diverged since its last read).
    checkpoint_guards: list[Callable[[Engine], None]] = field(default_factory=list)


@runtime_checkable
class Handler(Protocol):
    def attach(self, ctx: Context) -> None: ...


def resolve(name: str) -> Any:
    """A built-in name or ``module.path:Attribute`` -> the class or factory it names."""
    target = BUILTINS.get(name, name)
    if ":" not in target:
        raise ConfigError(
            f"unknown handler {name!r}. Built-in handlers: {', '.join(BUILTINS)}; "
            "a handler of your own is named 'package.module:ClassName' (importable from the working directory)."
        )
    module_name, _, attr = target.partition(":")
    cwd = str(Path.cwd())
    if cwd not in sys.path:  # user handlers are found relative to where the run was started
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"handler {name!r}: cannot import module {module_name!r} ({e}). Is it on PYTHONPATH or in the working directory?") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"handler {name!r}: module {module_name!r} has no attribute {attr!r}.") from None


def build_handler(spec: HandlerSpec, index: int) -> Handler:
    """Build one handler from its params; a bad param becomes a ConfigError naming the handler."""
    factory = resolve(spec.name)
    where = f"handlers[{index}] ({spec.name})"
    try:
        inspect.signature(factory).bind(**spec.params)
    except TypeError as e:
        accepted = ", ".join(p for p in inspect.signature(factory).parameters if p != "self")
        raise ConfigError(f"{where}: {e}. Accepted params: {accepted or 'none'}.") from None
    try:
        handler = factory(**spec.params)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None
    if not isinstance(handler, Handler):
        raise ConfigError(f"{where}: {spec.name!r} built a {type(handler).__name__}, which has no attach(ctx) method.")
    return handler


def build_handlers(specs: Iterable[HandlerSpec]) -> list[Handler]:
    """Every handler, built and validated before anything heavy starts."""
    return [build_handler(spec, i) for i, spec in enumerate(specs)]


def attach_all(handlers: Iterable[Handler], ctx: Context) -> None:
    """Attach in list order (Ignite fires handlers of one event in registration order).

    Handlers marked ``rank_zero_only`` (loggers, savers) attach on rank 0 alone."""
    for h in handlers:
        if getattr(h, "rank_zero_only", False) and ctx.rank != 0:
            continue
        h.attach(ctx)


def every_iterations(engine: Engine, every: int, handler: Callable[[Engine], None]) -> None:
    """``handler(engine)`` at ITERATION_COMPLETED of every ``every``-th iteration: the same iterations as
    ``Events.ITERATION_COMPLETED(every=every)``, for about 0.1 us per iteration instead of 2 us (Ignite's
    event filter looks the filtered event up by its __eq__/__hash__ on every iteration; four periodic
    handlers made that the largest part of the default handlers' per-iteration overhead)."""

    def periodic(engine: Engine) -> None:
        if engine.state.iteration % every == 0:
            handler(engine)

    periodic.__qualname__ = f"every_iterations({every}, {getattr(handler, '__qualname__', handler)})"  # for profilers
    engine.add_event_handler(Events.ITERATION_COMPLETED, periodic)


def step_scalars(engine: Engine) -> dict[str, float]:
    """The step's output dict as floats, plus data and step time: called only where metrics are logged,
    so a GPU step never waits for the host otherwise."""
    out = engine.state.output
    tensors = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
    read = torch.stack([out[k].detach().double() for k in tensors]).tolist() if tensors else []  # one device read
    values = {k: float(v) for k, v in out.items() if k not in tensors} | dict(zip(tensors, read))
    for name in ("data_time", "step_time"):
        if hasattr(engine.state, name):
            values[name] = getattr(engine.state, name)
    return values


