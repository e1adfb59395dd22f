"""clearml: the run as a ClearML task (config, scalars, sample augmentations, best model); offline without a server.

Without ClearML credentials, or with a server that does not answer within ``connect_timeout`` seconds,
the task is written to ClearML's local offline session folder instead (a warning says so once), and at
the end the log says where it is and how to upload it to a server later:
``clearml-task --import-offline-session PATH`` or ``from clearml import Task; Task.import_offline_session(PATH)``.
"""

from __future__ import annotations

import math
import random
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ignite_fixmatch.checkpoint_names import best_checkpoint
from ignite_fixmatch.config import ConfigError, dump_yaml, to_dict
from ignite_fixmatch.plugins import REPORT, Context, step_scalars

if TYPE_CHECKING:
    from ignite.engine import Engine

# torch, Ignite and ClearML are imported where used: handlers are imported and checked before torch loads, so a bad config is refused in about a second.

EVAL_METRICS = ("top1", "top5", "loss")
SAMPLE_MIN_SIDE = 96  # tiny images (16 or 32 px) are upscaled so the UI shows them at a readable size
MAX_SAMPLE_IMAGES = 64
# Nothing is captured implicitly: scalars and models are reported explicitly by this handler. Off in
# particular: pytorch (would patch torch.save/load), tensorboard (would duplicate the tensorboard
# handler's scalars), detect_repository (starts a thread that calls ClearML's update host, even offline).
FRAMEWORKS_OFF = {
    name: False
    for name in ("pytorch", "tensorboard", "tensorflow", "matplotlib", "hydra", "scikit", "joblib", "detect_repository")
}


class ClearML:
    """A ClearML task for the run (rank 0), fed through Ignite's ClearMLLogger.

    - Hyperparameters: the resolved config in section ``config``, nested keys joined by ``/``
      (``data/num_labels``, ``optim/lr``), and the same as YAML in the configuration object ``config.yaml``.
    - Scalars, one chart per quantity with one series per source: every ``every`` iterations the
      step's metrics (series ``train``: loss, loss_x, loss_u, mask_rate, pseudo_acc, lr, data_time,
      step_time), and after each evaluation top1/top5/loss of every evaluator (series ``test_ema``,
      ``test_raw``), all at the trainer's iteration. Accuracies are fractions, as in TensorBoard.
    - After each evaluation (the evaluation handler's EVALUATED event), plots at the trainer's iteration:
      ``confusion matrix`` (series ``test_<model>``, class names on both axes, rows true), the table
      ``per-class accuracy`` (series ``test_<model>``), and for the pseudo-labels since the previous
      evaluation the histogram ``pseudo-labels per class`` (series ``count``) and the table
      ``pseudo-labels per class`` (series ``table``: count, correct, known, top-1 %); for a CTAugment run,
      its learned policy: the table ``ctaugment policy`` (series ``probabilities``) and its heatmap (debug image).
    - ``sample_images`` debug images of unlabeled images, each as original | weak | strong.
    - At the end, the best checkpoint (``best_*.pt`` of the checkpoint handler) as the output model,
      if ``upload_best_model``; the file itself stays where it is.
    - ``offline``: "auto" (a server if one is configured and answers, else offline), true (always
      offline), false (a server is required: the run stops at once with an error if there is none).
    - Nothing from the environment or the command line is connected: no argparse capture, no
      environment variables, so credentials never end up in the task.

    Attached after the evaluation handler (``uses`` its evaluators) and the checkpoint handler (``uses``
    checkpoints: its COMPLETED handler, the final save, has run when this one registers the best model).
    """

    rank_zero_only = True
    uses = ("evaluators", "checkpoints")
    priority = REPORT

    def __init__(
        self,
        project: str = "ignite-fixmatch",
        task_name: str | None = None,
        offline: str | bool = "auto",
        upload_best_model: bool = True,
        sample_images: int = 8,
        every: int = 10,
        connect_timeout: float = 10.0,
    ) -> None:
        if not isinstance(project, str) or not project.strip():
            raise ValueError(f"project must be a non-empty string (the ClearML project), got {project!r}")
        if task_name is not None and (not isinstance(task_name, str) or not task_name.strip()):
            raise ValueError(f"task_name must be null (named after the output folder) or a non-empty string, got {task_name!r}")
        if offline != "auto" and not isinstance(offline, bool):
            raise ValueError(f"offline must be 'auto', true or false, got {offline!r}")
        if not isinstance(upload_best_model, bool):
            raise ValueError(f"upload_best_model must be true or false, got {upload_best_model!r}")
        if not _is_int(sample_images) or not 0 <= sample_images <= MAX_SAMPLE_IMAGES:
            raise ValueError(f"sample_images must be an integer in 0..{MAX_SAMPLE_IMAGES} (0: none), got {sample_images!r}")
        if not _is_int(every) or every < 1:
            raise ValueError(f"every must be an integer >= 1 (iterations between scalar reports), got {every!r}")
        if isinstance(connect_timeout, bool) or not isinstance(connect_timeout, (int, float)) or not 0 < connect_timeout <= 600:
            raise ValueError(f"connect_timeout must be a number of seconds in (0, 600], got {connect_timeout!r}")
        self.project, self.task_name, self.offline = project, task_name, offline
        self.upload_best_model, self.sample_images, self.every = upload_best_model, sample_images, every
        self.connect_timeout = float(connect_timeout)
        self._closed = False

    # ------------------------------------------------------------------ attach

    def attach(self, ctx: Context) -> None:
        from ignite.engine import Events
        from ignite.handlers.clearml_logger import ClearMLLogger

        from handlers.tracking import run_policy
        from ignite_fixmatch.evaluation import on_evaluated

        self.ctx = ctx
        self.policy = run_policy(ctx.data)
        self.task = self._open_task(ctx)
        self.offline_folder = Path(self.task.get_offline_mode_folder()) if self.task.is_offline() else None
        self.logger = ClearMLLogger()  # Ignite's logger reuses Task.current_task(), the task just opened
        self.task.connect(to_dict(ctx.config), name="config")
        self.task.set_configuration_object(
            name="config.yaml", config_text=dump_yaml(ctx.config), config_type="yaml", description="the resolved config of this run"
        )
        self._report_samples(ctx)
        trainer = ctx.trainer
        self.logger.attach(trainer, log_handler=_report_train_scalars, event_name=Events.ITERATION_COMPLETED(every=self.every))
        for name, evaluator in ctx.evaluators.items():
            self.logger.attach(evaluator, log_handler=_EvalScalars(trainer, f"test_{name}"), event_name=Events.COMPLETED)
        self.models = list(ctx.evaluators)
        on_evaluated(trainer, self._report_per_class)
        # After the evaluation's and the checkpoint's COMPLETED handlers (attached before this one): the
        # final evaluation and best checkpoint exist when _finish reads them.
        trainer.add_event_handler(Events.COMPLETED, self._finish)
        ctx.on_failure.append(self._on_failure)

    # ------------------------------------------------------------------ connection

    def _open_task(self, ctx: Context) -> Any:
        """Task.init online if possible (and asked), otherwise offline, never waiting for minutes."""
        from clearml import Task
        from clearml.backend_api.session.defs import MissingConfigError
        from clearml.backend_api.session.session import LoginError

        if self.offline is False and Task.is_offline():
            raise ConfigError("handler clearml: offline=false, but CLEARML_OFFLINE_MODE is set: unset it, or set offline: auto.")
        if self.offline is True or Task.is_offline():
            ctx.logger.info("ClearML: offline (%s)", "offline: true" if self.offline is True else "CLEARML_OFFLINE_MODE is set")
        else:
            why_offline = self._no_server_because()
            if why_offline is None:
                try:
                    return self._init_task(Task, ctx, offline=False)
                except (MissingConfigError, LoginError) as e:
                    why_offline = f"the ClearML server refused the connection ({str(e).strip().splitlines()[0]})"
            if self.offline is False:
                raise ConfigError(
                    f"handler clearml: offline=false needs a ClearML server, but {why_offline}. Configure one (clearml-init, or "
                    "CLEARML_API_HOST, CLEARML_API_ACCESS_KEY and CLEARML_API_SECRET_KEY), or set offline: auto."
                )
            ctx.logger.warning("ClearML: %s; logging to a local offline session instead (how to upload it: end of this log).", why_offline)
        Task.set_offline(True)
        return self._init_task(Task, ctx, offline=True)

    def _no_server_because(self) -> str | None:
        """Why this run cannot use a server (None: it can try)."""
        from clearml.backend_api import Session

        if not _has_credentials():
            return "no ClearML credentials are configured (no clearml.conf with api.credentials, no CLEARML_API_ACCESS_KEY/SECRET_KEY)"
        host = Session.get_api_server_host()
        problem = _unreachable(host, self.connect_timeout)
        return None if problem is None else f"the ClearML server {host} cannot be reached ({problem}; waited at most {self.connect_timeout:g} s)"

    def _init_task(self, task_cls: Any, ctx: Context, offline: bool) -> Any:
        frameworks = dict(FRAMEWORKS_OFF, detect_repository=not offline)  # git details are worth it online
        return task_cls.init(
            project_name=self.project,
            task_name=self.task_name or Path(ctx.output_dir).name,
            task_type=task_cls.TaskTypes.training,
            reuse_last_task_id=False,  # every run is a new task, never an overwrite of an earlier one
            auto_connect_arg_parser=False,  # argv is not connected wholesale; the resolved config is
            auto_connect_frameworks=frameworks,
        )

    # ------------------------------------------------------------------ reports

    def _report_samples(self, ctx: Context) -> None:
        if not self.sample_images or ctx.data is None:
            return
        for i, image in enumerate(augmentation_samples(ctx.data, self.sample_images, ctx.config.seed)):
            self.logger.clearml_logger.report_image(title="augmentations", series=f"sample_{i:02d}", iteration=0, image=image)

    def _report_per_class(self, trainer: Engine) -> None:
        """Tables are lists of rows (header first): ClearML takes those without pandas, which is not installed."""
        record, report = trainer.state.evaluation, self.logger.clearml_logger
        classes, step = record["classes"], record["iteration"]
        for model in (m for m in self.models if m in record):
            report.report_confusion_matrix(
                title="confusion matrix", series=f"test_{model}", matrix=np.asarray(record[model]["confusion"]), iteration=step,
                xaxis="predicted", yaxis="true", xlabels=classes, ylabels=classes, yaxis_reversed=True,
            )
            rows = [[r["class"], r["images"], r["correct"], _percent(r["top1"])] for r in record[model]["per_class"]]
            table = [["class", "images", "correct", "top-1 %"], *rows]
            report.report_table(title="per-class accuracy", series=f"test_{model}", iteration=step, table_plot=table)
        if self.policy is not None:
            self._report_policy(step)
        pseudo = record["pseudo_labels"]
        if not pseudo["steps"]:  # none when the trainer's step does not report them
            return
        report.report_histogram(
            title="pseudo-labels per class", series="count", values=pseudo["counts"], iteration=step, xlabels=classes, xaxis="class",
            yaxis=f"pseudo-labels used in {pseudo['steps']} iterations",
        )
        rows = [list(r) for r in zip(classes, pseudo["counts"], pseudo["correct"], pseudo["known"], map(_percent, pseudo["top1"]))]
        report.report_table(
            title="pseudo-labels per class", series="table", iteration=step, table_plot=[["class", "count", "correct", "known", "top-1 %"], *rows]
        )

    def _report_policy(self, step: int) -> None:
        """CTAugment's learned policy: the table ``ctaugment policy`` (rows: op parameters, columns: bins) and the
        heatmap as the debug image ``ctaugment policy``."""
        from handlers.tracking import policy_image, policy_table

        report = self.logger.clearml_logger
        report.report_table(title="ctaugment policy", series="probabilities", iteration=step, table_plot=policy_table(self.policy))
        report.report_image(title="ctaugment policy", series="heatmap", iteration=step, image=np.asarray(policy_image(self.policy, step)))

    def _finish(self, trainer: Engine) -> None:
        if self._closed:
            return
        if self.upload_best_model:
            self._register_best_model(trainer.state.iteration)
        self._close()

    def _on_failure(self, error: BaseException) -> None:
        """Flush and close the task so a crashed run's reports are kept. The error goes into the task's
        console log too (the command line prints it once, after the task is closed)."""
        if not self._closed:
            self.task.get_logger().report_text(f"error: {type(error).__name__}: {error}")
            self.task.mark_failed(status_reason=f"{type(error).__name__}: {error}")
            self._close()

    def _close(self) -> None:
        self._closed = True
        self.logger.close()
        if self.offline_folder is None:
            return
        zipped = self.offline_folder.with_name(self.offline_folder.name + ".zip")
        session = zipped if zipped.is_file() else self.offline_folder
        self.ctx.logger.info(
            "ClearML offline session written to %s. To upload it to a ClearML server: "
            "clearml-task --import-offline-session %s  (or in Python: from clearml import Task; Task.import_offline_session(%r))",
            session, session, str(session),
        )

    def _register_best_model(self, iteration: int) -> None:
        from clearml import OutputModel

        best = best_checkpoint(Path(self.ctx.output_dir))
        if best is None:
            self.ctx.logger.info("ClearML: no best checkpoint to register (the checkpoint handler with keep_best >= 1 writes one)")
            return
        model = OutputModel(task=self.task, name=f"{self.task.name} best", framework="PyTorch")
        try:
            model.update_weights(weights_filename=str(best), auto_delete_file=False, iteration=iteration)
        except AttributeError:
            # clearml 2.1.12 offline: update_weights asks the (absent) server model whether it is published
            # and fails; its own offline path then copies the file into the session and records it for import.
            if not self.task.is_offline() or not hasattr(model, "_update_weights_offline"):
                raise
            model._update_weights_offline(weights_filename=str(best), iteration=iteration)
        self.ctx.logger.info("ClearML: registered %s as the task's output model", best)


def _report_train_scalars(engine: Engine, logger: Any, event_name: Any) -> None:
    """Non-finite values are left out: ClearML would draw them as 0, and pseudo_acc is NaN by design
    when no pseudo-label passes the threshold (a diverged loss stops the run in terminate_on_nan)."""
    for key, value in step_scalars(engine).items():
        if math.isfinite(value):
            logger.clearml_logger.report_scalar(title=key, series="train", value=value, iteration=engine.state.iteration)


class _EvalScalars:
    """After an evaluation: its metrics at the trainer's iteration, series ``test_<model>``."""

    def __init__(self, trainer: Engine, series: str) -> None:
        self.trainer, self.series = trainer, series

    def __call__(self, evaluator: Engine, logger: Any, event_name: Any) -> None:
        for key in EVAL_METRICS:
            if key in evaluator.state.metrics:
                value = float(evaluator.state.metrics[key])
                logger.clearml_logger.report_scalar(title=key, series=self.series, value=value, iteration=self.trainer.state.iteration)


# ---------------------------------------------------------------------- helpers


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _has_credentials() -> bool:
    """What clearml's Session checks before it raises MissingConfigError, without connecting."""
    from clearml.backend_api.session.defs import ENV_ACCESS_KEY, ENV_AUTH_TOKEN, ENV_SECRET_KEY
    from clearml.config import config_obj

    return bool(
        ENV_AUTH_TOKEN.get()
        or ENV_ACCESS_KEY.get()
        or ENV_SECRET_KEY.get()
        or config_obj.get("api.credentials.access_key", None)
        or config_obj.get("api.credentials.secret_key", None)
    )


def _unreachable(host: str, timeout: float) -> str | None:
    """None if the API server answers at all (any HTTP status, or a TLS handshake), else why not.

    Task.init itself retries a dead server with back-off for many minutes; this probe bounds the wait."""
    try:
        urllib.request.urlopen(f"{host}/debug.ping", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as e:
        return None if isinstance(e.reason, ssl.SSLError) else str(e.reason)
    except (OSError, ValueError) as e:  # a timeout while reading, or a malformed host
        return str(e) or type(e).__name__
    return None


def augmentation_samples(data: Any, n: int, seed: int) -> list[np.ndarray]:
    """``n`` unlabeled images spread over the set, each as one RGB array: original | weak | strong.

    Draws from their own ``random.Random``, so training randomness is untouched."""
    from ignite_fixmatch.augment import pad_crop_flip

    total = len(data.unlabeled)
    m = min(n, total)
    indices = sorted({round(k * (total - 1) / max(m - 1, 1)) for k in range(m)})
    weak = data.weak
    rows = []
    for i in indices:
        img = data.unlabeled.load(i)
        rng = random.Random(f"clearml-samples/{seed}/{i}")
        views = [img, pad_crop_flip(img, rng, weak.pad, weak.pad_mode, weak.flip), data.strong.augment(img, rng)]
        rows.append(np.asarray(_side_by_side(views)))
    return rows


def _side_by_side(images: list[Image.Image], gap: int = 2) -> Image.Image:
    w, h = images[0].size
    scale = max(1, math.ceil(SAMPLE_MIN_SIDE / h))
    w, h = w * scale, h * scale
    canvas = Image.new("RGB", (len(images) * w + (len(images) - 1) * gap, h), (255, 255, 255))
    for k, img in enumerate(images):
        canvas.paste(img.convert("RGB").resize((w, h), Image.Resampling.NEAREST), (k * (w + gap), 0))
    return canvas
