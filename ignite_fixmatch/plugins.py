"""The handler plugin contract: how a name in ``handlers:`` becomes an object attached to the run.

A handler is any class (or function returning an object) that takes its YAML params as keyword
arguments, validates them in ``__init__`` and has ``attach(ctx: Context) -> None``. Built-ins live in
the top-level ``handlers`` package; a user's handler is named ``package.module:Name`` and imported
from the working directory. Handlers that keep state implement ``state_dict``/``load_state_dict`` and
put themselves in ``ctx.to_save``; the checkpoint then saves and restores them.

Order is declared, not implied by the list. A handler may set (class attributes, or in ``__init__``
when they depend on its params):

- ``provides``: capability names it puts in the context (``"ema_model"``, ``"evaluator:ema"``, ...);
- ``needs``: capabilities it cannot work without; none of the list providing one is a config error;
- ``uses``: capabilities it takes if present: it is attached after their providers;
- ``priority``: among handlers free to go, the lower attaches (and so fires) first: UPDATE, GUARD,
  MEASURE, DEFAULT (the default), REPORT, PERSIST.

:func:`plan_handlers` resolves the attach order once, when the config is loaded: providers before
consumers, otherwise by (priority, list index). Ignite fires the handlers of one event in the order
they were attached, so the plan is also the firing order: state changes first, the checkpoint last.
Names are ``kind`` or ``kind:which``; a handler that provides one ``kind:...`` can be given params
that provide the others (the error for a missing one uses this to say which handler to add).

Neither this module nor the built-in handler modules import torch or Ignite (handlers import them in
``attach`` and the methods it registers): a config's handler list is built and checked before torch
loads, so a bad one is refused in about a second.
"""

from __future__ import annotations

import heapq
import inspect
import logging
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

from ignite_fixmatch.config import Config, ConfigError, HandlerSpec, config_value, describe_type
from ignite_fixmatch.errors import error_line
from ignite_fixmatch.plugin_import import import_by_name

if TYPE_CHECKING:
    from ignite.engine import Engine
    from torch import nn
    from torch.optim import Optimizer

BUILTINS: Mapping[str, str] = MappingProxyType(
    {
        "ema": "handlers.ema:EMA",
        "cosine_lr": "handlers.cosine_lr:CosineLR",
        "evaluation": "handlers.evaluation:Evaluation",
        "checkpoint": "handlers.checkpoint:Checkpointing",
        "tensorboard": "handlers.tensorboard:TensorBoard",
        "clearml": "handlers.clearml:ClearML",
        "mlflow": "handlers.mlflow:MLflow",
        "wandb": "handlers.wandb:WandB",
        "progress": "handlers.progress:Progress",
        "terminate_on_nan": "handlers.terminate_on_nan:StopOnNonFinite",
        "timer": "handlers.timer:HandlersTimer",
    }
)

# Priorities: at one event, a lower one fires first (when no declared dependency says otherwise).
UPDATE = 10  # changes the training state (ema, cosine_lr): everything after sees the updated state
GUARD = 20  # checks the step before anything measures or saves it (terminate_on_nan)
MEASURE = 30  # evaluates the model (evaluation)
DEFAULT = 40  # a handler that declares none
REPORT = 50  # writes what happened (tensorboard, clearml, mlflow, wandb, progress, timer)
PERSIST = 60  # saves the complete state of the iteration (checkpoint): after everything else


@dataclass
class Context:
    """What a handler may use. Only ``to_save``, ``guards`` (and ``evaluators``/``ema_model``/
    ``save_checkpoint`` by their providers) are written by handlers; everything else is read-only by
    convention."""

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
    # Checks of the training state, each called with the trainer before anything reads that state for
    # keeps: by the evaluation handler before every evaluation, by the checkpoint handler before every
    # write (periodic, best, final, preemption), on every process at the same iteration. A guard raises
    # to refuse and stop the run (terminate_on_nan: the loss diverged since its last read).
    guards: list[Callable[[Engine], None]] = field(default_factory=list)
    # Called once with the error when the run fails (a step, a guard or a handler raised; Preempted too),
    # before the error reaches the command line: trackers mark their run failed and flush. A handler
    # appends here instead of adding its own EXCEPTION_RAISED handler: Ignite re-raises nothing once one
    # exists, and a handler that raises skips those after it. attach_all registers the one that calls
    # these callbacks and then raises the error.
    on_failure: list[Callable[[BaseException], None]] = field(default_factory=list)


@runtime_checkable
class Handler(Protocol):
    def attach(self, ctx: Context) -> None: ...


class Planned(NamedTuple):
    """One handler of a plan: its entry in ``handlers:``, its position there, and the built object."""

    spec: HandlerSpec
    index: int
    handler: Handler


def resolve(name: str) -> Any:
    """A built-in name or ``module.path:Attribute`` -> the class or factory it names (a ConfigError if none)."""
    return import_by_name(name, BUILTINS, what="handler")


def build_handler(spec: HandlerSpec, index: int) -> Handler:
    """Build one handler from its params; a bad param becomes a ConfigError naming the handler."""
    factory = resolve(spec.name)
    where = f"handlers[{index}] ({spec.name})"
    try:
        inspect.signature(factory).bind(**spec.params)
    except TypeError as e:
        accepted = ", ".join(p for p in inspect.signature(factory).parameters if p != "self")
        raise ConfigError(f"{where}: {e}. Accepted params: {accepted or 'none'}.") from None
    hints = param_types(factory)
    params = {name: check_param(where, name, value, hints.get(name, Any)) for name, value in spec.params.items()}
    try:
        handler = factory(**params)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None
    if not isinstance(handler, Handler):
        raise ConfigError(f"{where}: {spec.name!r} built a {type(handler).__name__}, which has no attach(ctx) method.")
    _check_declarations(handler, where)
    return handler


def param_types(factory: Callable[..., Any]) -> dict[str, Any]:
    """The annotated types of a handler's params (its ``__init__``'s, for a class): the one place every param's
    type is declared. Empty when they cannot be resolved (a user's handler annotating with names only
    imported for type checkers): its own checks then decide."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return {k: v for k, v in typing.get_type_hints(target).items() if k != "return"}
    except Exception:  # noqa: BLE001 - any failure to evaluate an annotation just skips the generic check
        return {}


def check_param(where: str, name: str, value: Any, kind: Any) -> Any:
    """``value`` as a param of annotated type ``kind`` (YAML's values: bool is not an int, an int is a float,
    a tuple is read as a list, Literal lists the allowed values), converted as config keys are
    (``1e-3`` is a number); a ConfigError naming the handler and the param otherwise. A type the schema
    does not know (a class) is left to the handler's own checks."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    # YAML has lists only: tuple[str, ...] reads like list[str]
    options = tuple(dict.fromkeys(list[typing.get_args(o)[0]] if typing.get_origin(o) is tuple else o for o in options))
    for option in options:
        if option is type(None):
            if value is None:
                return None
            continue
        try:
            return config_value(option, value, name)
        except ConfigError:
            continue
        except TypeError:  # a type the schema does not know
            return value
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    expected = " or ".join("null" if o is type(None) else describe_type(o) for o in options)
    raise ConfigError(f"{where}: param {name!r}: got {shown}, expected {expected}.")


def _check_declarations(handler: Handler, where: str) -> None:
    for attr in ("provides", "needs", "uses"):
        value = getattr(handler, attr, ())
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {attr} must be a tuple of capability names (strings), got {value!r}.")
    priority = getattr(handler, "priority", DEFAULT)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ConfigError(f"{where}: priority must be an integer, got {priority!r}.")


def _declared(handler: Handler, attr: str) -> tuple[str, ...]:
    return tuple(getattr(handler, attr, ()))


def _where(item: Planned) -> str:
    return f"handlers[{item.index}] ({item.spec.name})"


def plan_handlers(specs: Sequence[HandlerSpec]) -> list[Planned]:
    """Build every handler and order them for attaching, or raise a ConfigError that says what to fix.

    A stable topological sort: a handler comes after every provider of what it ``needs`` or ``uses``;
    of the handlers free to go, the lowest (priority, list index) goes first. Refused: a need nobody
    provides, a need of a handler running on every process that only a ``rank_zero_only`` handler
    provides (the other processes would lack it), and a cycle."""
    items = [Planned(spec, i, build_handler(spec, i)) for i, spec in enumerate(specs)]
    providers: dict[str, list[int]] = {}
    for item in items:
        for capability in _declared(item.handler, "provides"):
            providers.setdefault(capability, []).append(item.index)
    for item in items:
        for capability in _declared(item.handler, "needs"):
            found = providers.get(capability, [])
            if not found:
                raise ConfigError(_missing(item, capability, items))
            if not getattr(item.handler, "rank_zero_only", False) and all(
                getattr(items[j].handler, "rank_zero_only", False) for j in found
            ):
                raise ConfigError(
                    f"{_where(item)} runs on every process and needs {capability!r}, which {_where(items[found[0]])} "
                    "provides on process 0 only (rank_zero_only)."
                )
    after: dict[int, set[int]] = {item.index: set() for item in items}  # index -> the handlers it must follow
    for item in items:
        for capability in _declared(item.handler, "needs") + _declared(item.handler, "uses"):
            after[item.index].update(j for j in providers.get(capability, ()) if j != item.index)
    waiting = {i: len(before) for i, before in after.items()}
    followers: dict[int, list[int]] = {i: [] for i in after}
    for i, before in after.items():
        for j in before:
            followers[j].append(i)

    def key(i: int) -> tuple[int, int]:
        return getattr(items[i].handler, "priority", DEFAULT), i

    ready = [key(i) for i, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order: list[Planned] = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(items[i])
        for k in followers[i]:
            waiting[k] -= 1
            if waiting[k] == 0:
                heapq.heappush(ready, key(k))
    if len(order) < len(items):
        cycle = _a_cycle({i for i, n in waiting.items() if n > 0}, after)
        names = " -> ".join(_where(items[i]) for i in cycle + cycle[:1])
        raise ConfigError(
            f"handlers that need or use each other cannot be ordered, a cycle: {names} (each needs or uses what the "
            "next one provides). Remove one of them from the list, or change its params."
        )
    return order


def _a_cycle(stuck: set[int], after: Mapping[int, set[int]]) -> list[int]:
    """One cycle among the handlers the sort could not place (each of them waits on another stuck one)."""
    path: list[int] = []
    i = min(stuck)
    while i not in path:
        path.append(i)
        i = min(j for j in after[i] if j in stuck)
    return path[path.index(i) :]


def _missing(item: Planned, capability: str, items: list[Planned]) -> str:
    """The error for a need no handler of the list provides: who needs it, which built-in provides it."""
    fixes = []
    builtin = _builtin_provider(capability)
    if builtin is not None:
        present = next((other for other in items if other.spec.name == builtin), None)
        if present is None:
            fixes.append(f"add the {builtin!r} handler")
        else:
            fixes.append(f"give {_where(present)} params that provide it")
    alternative = getattr(item.handler, "alternatives", {}).get(capability)
    if alternative:
        fixes.append(alternative)
    fix = ", or ".join(fixes) or "add a handler that provides it"
    return f"{_where(item)} needs {capability!r}, which no handler in the list provides: {fix}."


def _builtin_provider(capability: str) -> str | None:
    """The built-in handler that provides ``capability`` (or, built with other params, could: same kind)."""
    kind = capability.partition(":")[0]
    fallback = None
    for name in BUILTINS:
        try:
            provides = _declared(build_handler(HandlerSpec(name), 0), "provides")
        except ConfigError:
            continue
        if capability in provides:
            return name
        if fallback is None and any(p.partition(":")[0] == kind and ":" in p for p in provides):
            fallback = name
    return fallback


def build_handlers(specs: Iterable[HandlerSpec]) -> list[Handler]:
    """Every handler, built and validated before anything heavy starts, in attach order (see plan_handlers)."""
    return [item.handler for item in plan_handlers(list(specs))]


def attach_all(handlers: Iterable[Handler], ctx: Context) -> None:
    """Attach in the given order, a plan's (Ignite fires the handlers of one event in attach order).

    Handlers marked ``rank_zero_only`` (loggers, savers) attach on rank 0 alone. Last, the handler that
    reports a failure to ``ctx.on_failure`` and re-raises it."""
    from ignite.engine import Events

    for h in handlers:
        if getattr(h, "rank_zero_only", False) and ctx.rank != 0:
            continue
        h.attach(ctx)
    if ctx.on_failure:
        ctx.trainer.add_event_handler(Events.EXCEPTION_RAISED, _report_failure(ctx.on_failure, ctx.logger))


def _report_failure(callbacks: list[Callable[[BaseException], None]], logger: logging.Logger) -> Callable[[Engine, BaseException], None]:
    """An EXCEPTION_RAISED handler: every callback once per error (Ignite fires the event twice for an
    error in a step: from the epoch, then from the run), then the error goes on to the command line."""
    reported: list[BaseException] = []

    def failed(engine: Engine, error: BaseException) -> None:
        if not reported or reported[-1] is not error:
            reported.append(error)
            for callback in callbacks:
                try:
                    callback(error)
                except Exception as e:  # noqa: BLE001 - a handler that cannot record the failure must not hide the run's error
                    logger.warning("a handler could not record the run's failure: %s: %s", type(e).__name__, error_line(e))
        raise error

    return failed


def every_iterations(engine: Engine, every: int, handler: Callable[[Engine], None]) -> None:
    """``handler(engine)`` at ITERATION_COMPLETED of every ``every``-th iteration: the same iterations as
    ``Events.ITERATION_COMPLETED(every=every)``, for about 0.1 us per iteration instead of 2 us (Ignite's
    event filter looks the filtered event up by its __eq__/__hash__ on every iteration; four periodic
    handlers made that the largest part of the default handlers' per-iteration overhead)."""
    from ignite.engine import Events

    def periodic(engine: Engine) -> None:
        if engine.state.iteration % every == 0:
            handler(engine)

    periodic.__qualname__ = f"every_iterations({every}, {getattr(handler, '__qualname__', handler)})"  # for profilers
    engine.add_event_handler(Events.ITERATION_COMPLETED, periodic)


def step_scalars(engine: Engine) -> dict[str, float]:
    """The step's scalars (0-d tensors and numbers) as floats, plus data and step time: called only where
    metrics are logged, so a GPU step never waits for the host otherwise. Vectors (the per-class
    pseudo-label counts) are left out: the evaluation handler reports them per class."""
    import torch

    out = engine.state.output
    tensors = [k for k, v in out.items() if isinstance(v, torch.Tensor) and v.dim() == 0]
    read = torch.stack([out[k].detach().double() for k in tensors]).tolist() if tensors else []  # one device read
    values = {k: float(v) for k, v in out.items() if not isinstance(v, torch.Tensor)} | dict(zip(tensors, read))
    for name in ("data_time", "step_time"):
        if hasattr(engine.state, name):
            values[name] = getattr(engine.state, name)
    return values
