"""mlflow: the run as an MLflow run (config, scalars, per-class results, results.json), in a local store by default.

The default store is MLflow's file store in the run folder, ``file:OUTPUT/mlruns``: it needs nothing
but ``mlflow-skinny`` (MLflow's sqlite store needs SQLAlchemy and Alembic, which only the full
``mlflow`` package brings). MLflow 3 refuses a file store unless ``MLFLOW_ALLOW_FILE_STORE`` is true
("maintenance mode"); the handler sets it for the file store it is given or chooses, and only then.
To browse it (needs the full ``mlflow`` package):
``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri file:OUTPUT/mlruns``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from handlers.tracking import (
    check_every,
    check_name,
    eval_scalars,
    finite,
    flat_config,
    per_class_scalars,
    policy_image,
    read_results,
    require_package,
    result_scalars,
    run_policy,
)
from ignite_fixmatch.config import dump_yaml
from ignite_fixmatch.errors import ConfigError, Preempted, error_line
from ignite_fixmatch.plugins import REPORT, Context, every_iterations, step_scalars

if TYPE_CHECKING:
    from ignite.engine import Engine

# torch, Ignite and MLflow are imported in attach: handlers are imported and checked before torch loads, so a bad config is refused in about a second.


class MLflow:
    """An MLflow run for the training run (rank 0), through Ignite's MLflowLogger.

    - Params: the resolved config as dotted keys (``data.num_labels``, ``optim.lr``); the same as YAML in
      the artifact ``config.yaml``.
    - Metrics at the trainer's iteration: every ``every`` iterations ``train/<name>`` (loss, loss_x,
      loss_u, mask_rate, pseudo_acc, lr, data_time, step_time), after each evaluation
      ``test_<model>/top1|top5|loss`` (fractions, as in TensorBoard), and the per-class results
      ``test_<model>/top1_per_class/<class>``, ``pseudo_labels/count/<class>``, ``pseudo_labels/top1/<class>``
      (class names reduced to letters, digits, ``_ - .``). Non-finite values are left out.
    - Artifacts: ``evaluation/iteration_<it>.json`` after each evaluation (class names, per-class rows,
      confusion matrices with rows = true class, pseudo-label counts), ``results.json`` at the end; for a
      CTAugment run, its learned policy after each evaluation: ``ctaugment/policy_iteration_<it>.png`` (the
      heatmap) and ``.json`` (each op parameter's bin probabilities).
    - Status FINISHED, FAILED on an error, KILLED when preempted (the error goes on to the command line).

    ``tracking_uri``: null uses ``$MLFLOW_TRACKING_URI`` if set, else a file store in the run folder.
    ``run_name``: null names the run after the output folder. Attached after the evaluation handler
    (``uses`` its evaluators), so its final evaluation and results.json exist when the run ends.
    """

    rank_zero_only = True
    uses = ("evaluators",)
    priority = REPORT

    def __init__(self, tracking_uri: str | None = None, experiment: str = "ignite-fixmatch", run_name: str | None = None, every: int = 10) -> None:
        require_package("mlflow", "mlflow", "mlflow-skinny (or mlflow)")
        check_name("tracking_uri", tracking_uri, "null (a store in the run folder) or a tracking URI")
        check_name("experiment", experiment, "a non-empty string (the MLflow experiment)")
        check_name("run_name", run_name, "null (named after the output folder) or a non-empty string")
        check_every(every)
        self.tracking_uri, self.experiment, self.run_name, self.every = tracking_uri, experiment, run_name, every
        self._ended = False

    def attach(self, ctx: Context) -> None:
        import mlflow
        from ignite.engine import Events
        from ignite.handlers.mlflow_logger import MLflowLogger

        from ignite_fixmatch.evaluation import on_evaluated

        self.ctx = ctx
        self.policy = run_policy(ctx.data)
        uri = self.uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (Path(ctx.output_dir) / "mlruns").as_uri()
        if _is_file_store(uri):
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # see the module's docstring
        try:
            mlflow.set_tracking_uri(uri)
            client = mlflow.MlflowClient()
            found = client.get_experiment_by_name(self.experiment)
            experiment_id = found.experiment_id if found is not None else client.create_experiment(self.experiment)
            run = mlflow.start_run(experiment_id=experiment_id, run_name=self.run_name or Path(ctx.output_dir).name)
        except mlflow.exceptions.MlflowException as e:
            raise ConfigError(
                f"handler mlflow: the tracking store {uri!r} cannot be used ({error_line(e)[:300]}). "
                "Check tracking_uri, or set it to null for a store in the run folder."
            ) from None
        self.logger = MLflowLogger()  # Ignite's logger takes the run just started (mlflow.active_run())
        self.logger.log_params(flat_config(ctx.config))
        self.logger.log_text(dump_yaml(ctx.config), "config.yaml")
        self.run_id = run.info.run_id
        ctx.logger.info("MLflow: run %s in experiment %r at %s", self.run_id, self.experiment, uri)

        trainer = ctx.trainer
        every_iterations(trainer, self.every, lambda engine: self.logger.log_metrics(finite(step_scalars(engine), "train/"), step=engine.state.iteration))
        for name, evaluator in ctx.evaluators.items():
            self.logger.attach(evaluator, log_handler=_EvalMetrics(trainer, f"test_{name}"), event_name=Events.COMPLETED)
        on_evaluated(trainer, self._log_evaluation)  # per-class results: only with the evaluation handler
        trainer.add_event_handler(Events.COMPLETED, lambda _: self._end("FINISHED"))
        ctx.on_failure.append(self._on_failure)  # the error then goes on to the command line

    def _log_evaluation(self, trainer: Engine) -> None:
        record = trainer.state.evaluation
        self.logger.log_metrics(per_class_scalars(record), step=record["iteration"])
        self.logger.log_dict(record, f"evaluation/iteration_{record['iteration']}.json")
        if self.policy is not None:  # CTAugment's learned policy: its heatmap and its probabilities
            self.logger.log_image(policy_image(self.policy, record["iteration"]), artifact_file=f"ctaugment/policy_iteration_{record['iteration']}.png")
            self.logger.log_dict(self.policy.summary(), f"ctaugment/policy_iteration_{record['iteration']}.json")

    def _on_failure(self, error: BaseException) -> None:
        self._end("KILLED" if isinstance(error, Preempted) else "FAILED")

    def _end(self, status: str) -> None:
        """results.json (also a failed run's last one) as an artifact and its scalars as ``results/...``, then the status."""
        if self._ended:
            return
        self._ended = True
        import mlflow

        results = read_results(self.ctx.output_dir)
        if results is not None:
            self.logger.log_metrics(result_scalars(results), step=results["iteration"])
            self.logger.log_artifact(str(Path(self.ctx.output_dir) / "results.json"))
        mlflow.end_run(status=status)
        browse = f"; to browse it: MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {self.uri}" if _is_file_store(self.uri) else ""
        self.ctx.logger.info("MLflow: run %s ended %s%s", self.run_id, status, browse)


class _EvalMetrics:
    """After an evaluation: its metrics at the trainer's iteration, as ``test_<model>/<metric>``."""

    def __init__(self, trainer: Engine, tag: str) -> None:
        self.trainer, self.tag = trainer, tag

    def __call__(self, evaluator: Engine, logger: Any, event_name: Any) -> None:
        logger.log_metrics(eval_scalars(evaluator, self.tag), step=self.trainer.state.iteration)


def _is_file_store(uri: str) -> bool:
    return urlparse(uri).scheme in ("", "file")
