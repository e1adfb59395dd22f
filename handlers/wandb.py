"""wandb: the run as a Weights & Biases run (config, scalars, per-class tables, results.json); offline without credentials.

W&B is never asked to log in and never waits for a network it cannot reach: with mode "auto" a run
without credentials (``WANDB_API_KEY``, or a netrc entry for the W&B host, as ``wandb login`` writes) is
written offline under ``OUTPUT/wandb/offline-run-*``, and a server that does not answer within
``init_timeout`` seconds makes it offline too (a warning says so). The log's last W&B line gives the
command that uploads an offline run later: ``wandb sync OUTPUT/wandb/offline-run-...``.
"""

from __future__ import annotations

import netrc
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from handlers.tracking import (
    POLICY_TAG,
    check_every,
    check_name,
    eval_scalars,
    evaluated_models,
    finite,
    per_class_scalars,
    policy_image,
    policy_table,
    read_results,
    require_package,
    result_scalars,
    run_policy,
)
from ignite_fixmatch.config import to_dict
from ignite_fixmatch.errors import ConfigError, error_line, exit_code_of
from ignite_fixmatch.plugins import REPORT, Context, every_iterations, step_scalars

if TYPE_CHECKING:
    from ignite.engine import Engine

# torch, Ignite and wandb are imported in attach: handlers are imported and checked before torch loads, so a bad config is refused in about a second.

DEFAULT_HOST = "https://api.wandb.ai"


class WandB:
    """A W&B run for the training run (rank 0), through Ignite's WandBLogger, files under ``OUTPUT/wandb``.

    - Config: the resolved config, nested as in config.yaml.
    - At the trainer's iteration (the W&B step): every ``every`` iterations ``train/<name>`` (loss,
      loss_x, loss_u, mask_rate, pseudo_acc, lr, data_time, step_time); after each evaluation
      ``test_<model>/top1|top5|loss`` (fractions, as in TensorBoard) and the per-class results: scalars
      ``test_<model>/top1_per_class/<class>``, ``pseudo_labels/count/<class>``, ``pseudo_labels/top1/<class>``
      (class names reduced to letters, digits, ``_ - .``), tables ``test_<model>/per_class`` (class,
      images, correct, top1 %) and ``pseudo_labels/per_class`` (class, count, correct, known, top1 %), and
      ``test_<model>/confusion_matrix`` as W&B's confusion-matrix chart; for a CTAugment run, its learned
      policy as the image ``ctaugment/policy`` and the table ``ctaugment/policy_table`` (rows: op parameters,
      columns: bins). Non-finite values are left out.
    - At the end: ``results.json`` saved with the run and its scalars in the summary (``results/top1``,
      ``results/best_top1``...); the run's exit code is the command line's (0, 1, 3 diverged, 75 preempted).

    ``mode``: "auto" (online with credentials, else offline), "offline", or "online" (credentials and
    a reachable server are required: the run stops at once with an error otherwise). ``run_name``: null
    names the run after the output folder. Attached after the evaluation handler (``uses`` its evaluators).
    """

    rank_zero_only = True
    uses = ("evaluators",)
    priority = REPORT

    def __init__(
        self,
        project: str = "ignite-fixmatch",
        run_name: str | None = None,
        mode: Literal["auto", "offline", "online"] = "auto",
        every: int = 10,
        init_timeout: float = 60.0,
    ) -> None:
        require_package("wandb", "wandb", "wandb")
        check_name("project", project, "a non-empty string (the W&B project)")
        check_name("run_name", run_name, "null (named after the output folder) or a non-empty string")
        if mode not in ("auto", "offline", "online"):
            raise ValueError(f"mode must be 'auto', 'offline' or 'online', got {mode!r}")
        check_every(every)
        if isinstance(init_timeout, bool) or not isinstance(init_timeout, (int, float)) or not 0 < init_timeout <= 600:
            raise ValueError(f"init_timeout must be a number of seconds in (0, 600], got {init_timeout!r}")
        self.project, self.run_name, self.mode, self.every, self.init_timeout = project, run_name, mode, every, float(init_timeout)
        self._finished = False

    # ------------------------------------------------------------------ attach

    def attach(self, ctx: Context) -> None:
        import wandb
        from ignite.engine import Events

        from ignite_fixmatch.evaluation import on_evaluated

        self.ctx = ctx
        self.policy = run_policy(ctx.data)
        self.logger = self._open(ctx)
        self.run = wandb.run  # the run wandb.init just started (Ignite's logger keeps the module, not the run)
        if self.run.offline:
            ctx.logger.info("W&B: offline run in %s", Path(self.run.dir).parent)
        else:
            ctx.logger.info("W&B: run %s", self.run.url)
        trainer = ctx.trainer
        every_iterations(trainer, self.every, lambda engine: self.logger.log(finite(step_scalars(engine), "train/"), step=engine.state.iteration))
        for name, evaluator in ctx.evaluators.items():
            self.logger.attach(evaluator, log_handler=_EvalMetrics(trainer, f"test_{name}"), event_name=Events.COMPLETED)
        on_evaluated(trainer, self._log_evaluation)  # per-class results: only with the evaluation handler
        trainer.add_event_handler(Events.COMPLETED, lambda _: self._finish(0))
        ctx.on_failure.append(self._on_failure)  # the error then goes on to the command line

    def _open(self, ctx: Context) -> Any:
        """Ignite's WandBLogger (it calls wandb.init) online if possible and asked, otherwise offline."""
        import wandb
        from ignite.handlers.wandb_logger import WandBLogger

        why_offline = "mode: offline" if self.mode == "offline" else _offline_because()
        if why_offline is not None and self.mode == "online":
            raise ConfigError(f"handler wandb: mode=online, but {why_offline}. Run `wandb login` or set WANDB_API_KEY, or set mode: auto.")
        online = why_offline is None
        if not online:
            ctx.logger.info("W&B: offline (%s)", why_offline)
        settings = wandb.Settings(silent=True, console="off", init_timeout=self.init_timeout)
        kwargs = dict(
            project=self.project, name=self.run_name or Path(ctx.output_dir).name, dir=str(ctx.output_dir),
            config=to_dict(ctx.config), settings=settings,
        )
        if not online:
            return WandBLogger(mode="offline", **kwargs)
        try:
            return WandBLogger(mode="online", **kwargs)
        except wandb.Error as e:
            if self.mode == "online":
                raise ConfigError(
                    f"handler wandb: mode=online, but the W&B server cannot be used ({error_line(e)[:300]}). Check the network, or set mode: auto."
                ) from None
            ctx.logger.warning("W&B: the server cannot be used (%s); writing an offline run instead (how to upload it: end of this log).", error_line(e)[:300])
            return WandBLogger(mode="offline", **kwargs)

    # ------------------------------------------------------------------ reports

    def _log_evaluation(self, trainer: Engine) -> None:
        import wandb

        record = trainer.state.evaluation
        data: dict[str, Any] = dict(per_class_scalars(record))
        classes = record["classes"]
        for model in evaluated_models(record):
            rows = record[model]["per_class"]
            data[f"test_{model}/per_class"] = wandb.Table(
                columns=["class", "images", "correct", "top1"], data=[[r["class"], r["images"], r["correct"], r["top1"]] for r in rows]
            )
            cells = [[classes[i], classes[j], n] for i, row in enumerate(record[model]["confusion"]) for j, n in enumerate(row)]
            data[f"test_{model}/confusion_matrix"] = wandb.plot_table(
                "wandb/confusion_matrix/v1",  # the chart of wandb.plot.confusion_matrix, from counts instead of predictions
                wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=cells),
                {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
                {"title": f"test_{model}, iteration {record['iteration']}"},
            )
        pseudo = record.get("pseudo_labels")
        if pseudo is not None:
            data["pseudo_labels/per_class"] = wandb.Table(
                columns=["class", "count", "correct", "known", "top1"],
                data=[[c, n, k, m, t] for c, n, k, m, t in zip(classes, pseudo["counts"], pseudo["correct"], pseudo["known"], pseudo["top1"])],
            )
        if self.policy is not None:  # CTAugment's learned policy: its heatmap and its table
            header, *rows = policy_table(self.policy)
            data[POLICY_TAG] = wandb.Image(policy_image(self.policy, record["iteration"]))
            data[f"{POLICY_TAG}_table"] = wandb.Table(columns=header, data=rows)
        self.logger.log(data, step=record["iteration"])

    def _on_failure(self, error: BaseException) -> None:
        self._finish(exit_code_of(error) or 1)

    def _finish(self, exit_code: int) -> None:
        """results.json (also a failed run's last one) into the run and its scalars into the summary, then finish."""
        if self._finished:
            return
        self._finished = True
        out = Path(self.ctx.output_dir)
        results = read_results(out)
        if results is not None:
            self.run.summary.update(result_scalars(results))
            # a copy in the run folder: run.save of an outside file symlinks it, with a warning
            saved = shutil.copy2(out / "results.json", self.run.dir)
            self.run.save(str(saved), base_path=self.run.dir, policy="now")
        offline, folder = self.run.offline, Path(self.run.dir).parent
        self.run.finish(exit_code=exit_code)
        if offline:
            self.ctx.logger.info("W&B offline run written to %s. To upload it to W&B: wandb sync %s", folder, folder)


class _EvalMetrics:
    """After an evaluation: its metrics at the trainer's iteration, as ``test_<model>/<metric>``."""

    def __init__(self, trainer: Engine, tag: str) -> None:
        self.trainer, self.tag = trainer, tag

    def __call__(self, evaluator: Engine, logger: Any, event_name: Any) -> None:
        logger.log(eval_scalars(evaluator, self.tag), step=self.trainer.state.iteration)


def _offline_because() -> str | None:
    """Why this run cannot go online (None: it may try), without asking W&B to log in."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun"):
        return f"WANDB_MODE is {os.environ['WANDB_MODE']}"
    if os.environ.get("WANDB_API_KEY"):
        return None
    host = urlparse(os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST).hostname or ""
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        if path.is_file() and netrc.netrc(path).authenticators(host) is not None:
            return None
    except (OSError, netrc.NetrcParseError) as e:
        return f"no WANDB_API_KEY, and {path} cannot be read ({e})"
    return f"no W&B credentials (no WANDB_API_KEY, no entry for {host} in {path}; `wandb login` writes one)"
