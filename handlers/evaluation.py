"""evaluation: periodic test-set evaluation of the EMA (and optionally the raw) model, results.json.

After each evaluation the trainer's ``state.evaluation`` holds the record below and the trainer fires
``EvaluationEvents.EVALUATED`` (on every process; loggers, on process 0, attach to it):

    {"iteration": int, "classes": [names],
     "<model>" for each evaluated model ("ema", "raw"): {"top1": %, "top5": %, "loss": float,
         "per_class": [{"class", "images", "correct", "top1" (% or None)}], "confusion": [[int]] (rows true, columns predicted)},
     "pseudo_labels": {"steps": iterations counted since the last evaluation, "counts": [int per class],
         "correct": [int], "known": [int], "top1": [% or None per class: correct / known]}}

``pseudo_labels`` are the pseudo-labels that passed the mask on the unlabeled stream, by the class they
were trained toward (mask-weighted), and how many of them were right where the true label is known
(benchmark data): confirmation bias toward a few classes shows there.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ignite_fixmatch.plugins import MEASURE, Context, every_iterations

if TYPE_CHECKING:
    import torch
    from ignite.engine import Engine

# torch and Ignite are imported in attach: handlers are imported and checked before torch loads, so a bad config is refused in about a second.

MODELS = ("ema", "raw")


def __getattr__(name: str) -> Any:
    """``EvaluationEvents`` (an Ignite EventEnum, so defined in ignite_fixmatch.evaluation) on first use:
    importing this module must not import Ignite."""
    if name == "EvaluationEvents":
        from ignite_fixmatch.evaluation import EvaluationEvents

        return EvaluationEvents
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Evaluation:
    """Every ``every`` iterations and at the end: top-1/top-5/loss, per-class accuracy and the confusion
    matrix of each model in ``models``, and the per-class pseudo-label counts since the last evaluation.

    Keeps the best top-1 (the reference's report) and the median of the last ``median_of`` evaluations
    (the official code's report) of the first model, and writes ``results.json`` after each evaluation:
    scalars for every evaluation (``history``), per-class results for the last one only, so it stays
    small with 100 classes and long runs (a CTAugment run adds ``ctaugment``: its learned policy, each op
    parameter's bin probabilities). Accuracies are in percent. Checkpointed (history, the last
    record and the pseudo-label counts not yet reported), so a resumed run reports what an uninterrupted
    one would.

    Provides ``ctx.evaluators`` (``evaluator:<model>`` for each of ``models``), for the loggers and the
    checkpoint's best score. Before each evaluation it calls ``ctx.guards``, so diverged weights are
    never evaluated (nor logged as a result).
    """

    priority = MEASURE
    uses = ("guards",)

    def __init__(self, every: int = 10000, models: list[str] | tuple[str, ...] = ("ema",), median_of: int = 20) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1 iterations, got {every!r}")
        models = list(models)
        if not models or any(m not in MODELS for m in models) or len(set(models)) != len(models):
            raise ValueError(f"models must be a non-empty list of distinct names from {MODELS}, got {models!r}")
        if median_of < 1:
            raise ValueError(f"median_of must be >= 1, got {median_of!r}")
        self.every, self.models, self.median_of = every, models, median_of
        self.provides = ("evaluators", *(f"evaluator:{m}" for m in models))
        self.needs = ("ema_model",) if "ema" in models else ()
        self.alternatives = {"ema_model": "set evaluation's models to [raw]"}
        self.history: list[dict[str, Any]] = []
        self.last_iteration = -1
        self.last_record: dict[str, Any] | None = None
        # Pseudo-label counts of this process since the last evaluation: counts, correct, known (float64 on
        # the device, summed every iteration without a host read), and the iterations they cover.
        self.pseudo_window: list[torch.Tensor] | None = None
        self.pseudo_steps = 0
        self.policy: Any = None  # CTAPolicy of a CTAugment run, set at attach

    def attach(self, ctx: Context) -> None:
        import torch
        from ignite.engine import Events

        from handlers.tracking import run_policy
        from ignite_fixmatch.evaluation import EvaluationEvents, create_evaluator
        from ignite_fixmatch.trainer import PSEUDO_KEYS

        if "ema" in self.models and ctx.ema_model is None:  # plan_handlers refuses such a list: attached by hand
            raise ValueError("evaluation: models includes 'ema' but the ema handler is not attached before it")
        cfg = ctx.config
        self.ctx = ctx
        self.policy = run_policy(ctx.data)  # CTAugment's learned policy (None: RandAugment), in results.json
        sources = ctx.data.sources
        # Stand-ins for the data in tests may have no class names: their indices name them.
        self.classes = [str(c) for c in getattr(sources, "classes", range(sources.num_classes))]
        nets = {"ema": ctx.ema_model, "raw": ctx.model}
        self.evaluators: dict[str, Engine] = {}
        for name in self.models:
            self.evaluators[name] = create_evaluator(
                nets[name], ctx.device, num_classes=sources.num_classes, mean=sources.mean, std=sources.std,
                amp=cfg.amp, amp_dtype=cfg.amp_dtype,
                channels_last=cfg.model.channels_last, per_class=True,
            )
            ctx.evaluators[name] = self.evaluators[name]
        self.pseudo_window = [torch.zeros(sources.num_classes, dtype=torch.float64, device=ctx.device) for _ in range(3)]
        self._pseudo_keys, self._add = PSEUDO_KEYS, torch._foreach_add_
        trainer = ctx.trainer
        trainer.register_events(*EvaluationEvents)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self.count_pseudo_labels)  # before the evaluation of the same iteration
        every_iterations(trainer, self.every, self.evaluate)
        trainer.add_event_handler(Events.COMPLETED, self.evaluate)
        ctx.to_save["evaluation"] = self

    def count_pseudo_labels(self, trainer: Engine) -> None:
        """Add the step's per-class pseudo-label vectors to the window: one fused add on the device, every
        iteration (names bound at attach). A step that does not report them (not create_trainer's) adds nothing."""
        out = trainer.state.output
        if isinstance(out, dict) and self._pseudo_keys[0] in out:
            self._add(self.pseudo_window, [out[k] for k in self._pseudo_keys])
            self.pseudo_steps += 1

    def evaluate(self, trainer: Engine) -> None:
        from ignite_fixmatch.evaluation import EvaluationEvents, per_class_rows

        iteration = trainer.state.iteration
        if iteration == self.last_iteration:  # COMPLETED right after a periodic evaluation
            return
        self.last_iteration = iteration
        for guard in self.ctx.guards:
            guard(trainer)
        record: dict[str, Any] = {"iteration": iteration, "classes": self.classes}
        for name, evaluator in self.evaluators.items():
            metrics = evaluator.run(self.ctx.loaders["test"]).metrics
            confusion = metrics["confusion"].tolist()  # all-reduced over processes by Ignite
            record[name] = {
                "top1": 100.0 * metrics["top1"], "top5": 100.0 * metrics["top5"], "loss": metrics["loss"],
                "per_class": per_class_rows(confusion, self.classes), "confusion": confusion,
            }
        record["pseudo_labels"] = pseudo_label_record(self._window_totals().tolist(), self.pseudo_steps)
        for t in self.pseudo_window:
            t.zero_()
        self.pseudo_steps = 0
        self.history.append({"iteration": iteration, **{m: {k: record[m][k] for k in ("top1", "top5", "loss")} for m in self.models}})
        self.last_record = record
        trainer.state.evaluated_iteration = iteration
        trainer.state.evaluation = record
        if self.ctx.rank == 0:
            self.ctx.logger.info(
                "Evaluation at iteration %d: %s", iteration,
                ", ".join(f"{n} top-1 {record[n]['top1']:.2f} % top-5 {record[n]['top5']:.2f} %" for n in self.models),
            )
            self.write_results()
        trainer.fire_event(EvaluationEvents.EVALUATED)

    def _window_totals(self) -> torch.Tensor:
        """(3, num_classes) on the CPU: the window summed over processes (a collective: every process calls it)."""
        import ignite.distributed as idist
        import torch

        totals = torch.stack(self.pseudo_window)
        if idist.get_world_size() > 1:
            totals = idist.all_reduce(totals)
        return totals.cpu()

    def results(self) -> dict[str, Any]:
        main = self.models[0]
        top1s = [r[main]["top1"] for r in self.history]
        last = self.history[-1]
        results = {
            "model": main,
            "iteration": last["iteration"],
            "top1": last[main]["top1"],
            "top5": last[main]["top5"],
            "loss": last[main]["loss"],
            "best_top1": max(top1s),
            "median20_top1": statistics.median(top1s[-self.median_of :]),
            "history": self.history,
        }
        if self.last_record is not None:  # per-class results of the last evaluation only
            r = self.last_record
            results["classes"] = r["classes"]
            results["per_class"] = {m: r[m]["per_class"] for m in self.models}
            results["confusion"] = {m: r[m]["confusion"] for m in self.models}
            results["pseudo_labels"] = r["pseudo_labels"]
        if self.policy is not None:  # CTAugment: each op parameter's bin probabilities now
            results["ctaugment"] = self.policy.summary()
        return results

    def write_results(self) -> None:
        path = self.ctx.output_dir / "results.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results(), indent=2))
        os.replace(tmp, path)

    def state_dict(self) -> dict[str, Any]:
        """Every process calls it (Ignite's Checkpoint does, at the same iteration): the pseudo-label window
        is summed over processes here, and on loading process 0 takes the sum (see load_state_dict)."""
        window = None if self.pseudo_window is None else self._window_totals()
        return {
            "history": self.history, "last_iteration": self.last_iteration, "last_record": self.last_record,
            "pseudo_window": window, "pseudo_steps": self.pseudo_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load after attach (training does). A checkpoint written before per-class results has no window:
        the first evaluation after the resume then counts the pseudo-labels since the resume."""
        self.history = list(state["history"])
        self.last_iteration = int(state["last_iteration"])
        if "pseudo_window" not in state:  # an older checkpoint
            return
        self.last_record = state["last_record"]
        self.pseudo_steps = int(state["pseudo_steps"])
        window = state["pseudo_window"]
        if window is None or self.pseudo_window is None:
            return
        import ignite.distributed as idist

        for mine, saved in zip(self.pseudo_window, window):
            if idist.get_rank() == 0:  # the sum of all processes, counted once at the next all-reduce
                mine.copy_(saved)
            else:
                mine.zero_()


def pseudo_label_record(window: Sequence[Sequence[float]], steps: int) -> dict[str, Any]:
    """The ``pseudo_labels`` entry of a record from the window's (counts, correct, known) per class.
    Counts are whole numbers for FixMatch's 0/1 mask (rounded for a soft one); top-1 is correct / known."""
    counts, correct, known = window
    return {
        "steps": steps,
        "counts": [round(v) for v in counts],
        "correct": [round(v) for v in correct],
        "known": [round(v) for v in known],
        "top1": [100.0 * c / k if k else None for c, k in zip(correct, known)],
    }
