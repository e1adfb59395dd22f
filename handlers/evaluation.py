"""evaluation: periodic test-set evaluation of the EMA (and optionally the raw) model, results.json."""

from __future__ import annotations

import json
import os
import statistics
from typing import TYPE_CHECKING, Any

from ignite_fixmatch.plugins import MEASURE, Context, every_iterations

if TYPE_CHECKING:
    from ignite.engine import Engine

# torch and Ignite are imported in attach: handlers are imported and checked before torch loads, so a bad config is refused in about a second.

MODELS = ("ema", "raw")


class Evaluation:
    """Every ``every`` iterations and at the end: top-1/top-5/loss of each model in ``models``.

    Keeps the best top-1 (the reference's report) and the median of the last ``median_of`` evaluations
    (the official code's report) of the first model, and writes ``results.json`` after each evaluation.
    Accuracies are in percent. Checkpointed, so best and median survive a resume.

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

    def attach(self, ctx: Context) -> None:
        from ignite.engine import Events

        from ignite_fixmatch.evaluation import create_evaluator

        if "ema" in self.models and ctx.ema_model is None:  # plan_handlers refuses such a list: attached by hand
            raise ValueError("evaluation: models includes 'ema' but the ema handler is not attached before it")
        cfg = ctx.config
        self.ctx = ctx
        sources = ctx.data.sources
        nets = {"ema": ctx.ema_model, "raw": ctx.model}
        self.evaluators: dict[str, Engine] = {}
        for name in self.models:
            self.evaluators[name] = create_evaluator(
                nets[name], ctx.device, num_classes=sources.num_classes, mean=sources.mean, std=sources.std,
                amp=cfg.amp, amp_dtype=cfg.amp_dtype,
                channels_last=cfg.model.channels_last,
            )
            ctx.evaluators[name] = self.evaluators[name]
        trainer = ctx.trainer
        every_iterations(trainer, self.every, self.evaluate)
        trainer.add_event_handler(Events.COMPLETED, self.evaluate)
        ctx.to_save["evaluation"] = self

    def evaluate(self, trainer: Engine) -> None:
        iteration = trainer.state.iteration
        if iteration == self.last_iteration:  # COMPLETED right after a periodic evaluation
            return
        self.last_iteration = iteration
        for guard in self.ctx.guards:
            guard(trainer)
        record: dict[str, Any] = {"iteration": iteration}
        for name, evaluator in self.evaluators.items():
            metrics = evaluator.run(self.ctx.loaders["test"]).metrics
            record[name] = {"top1": 100.0 * metrics["top1"], "top5": 100.0 * metrics["top5"], "loss": metrics["loss"]}
        self.history.append(record)
        trainer.state.evaluated_iteration = iteration
        if self.ctx.rank == 0:
            self.ctx.logger.info(
                "Evaluation at iteration %d: %s", iteration,
                ", ".join(f"{n} top-1 {r['top1']:.2f} % top-5 {r['top5']:.2f} %" for n, r in record.items() if n != "iteration"),
            )
            self.write_results()

    def results(self) -> dict[str, Any]:
        main = self.models[0]
        top1s = [r[main]["top1"] for r in self.history]
        last = self.history[-1]
        return {
            "model": main,
            "iteration": last["iteration"],
            "top1": last[main]["top1"],
            "top5": last[main]["top5"],
            "loss": last[main]["loss"],
            "best_top1": max(top1s),
            "median20_top1": statistics.median(top1s[-self.median_of :]),
            "history": self.history,
        }

    def write_results(self) -> None:
        path = self.ctx.output_dir / "results.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results(), indent=2))
        os.replace(tmp, path)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "last_iteration": self.last_iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        self.last_iteration = int(state["last_iteration"])
