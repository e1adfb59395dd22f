"""What the experiment trackers (mlflow, wandb) log, in one place, under the names TensorBoard uses.

No torch, Ignite or tracker import here: the handlers' ``__init__`` (which checks that the tracker's
package is installed) runs when the config is checked, before torch loads.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ignite_fixmatch.config import Config, to_dict
from ignite_fixmatch.resume_policy import flatten

if TYPE_CHECKING:
    from ignite.engine import Engine
    from PIL import Image

EVAL_METRICS = ("top1", "top5", "loss")
RESULT_SCALARS = ("top1", "top5", "loss", "best_top1", "median20_top1")  # results.json's scalars, as logged at the end


def require_package(module: str, handler: str, install: str) -> None:
    """Refuse the handler when the config is checked (a ValueError becomes a ConfigError naming it), not
    after the data and model are built: ``find_spec`` tells without importing the package."""
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"handler {handler} needs the {module} package, which is not installed: pip install {install}")


def check_name(param: str, value: str | None, what: str) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{param} must be {what}, got {value!r}")


def check_every(every: int) -> None:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an integer >= 1 (iterations between train scalar reports), got {every!r}")


def flat_config(cfg: Config) -> dict[str, Any]:
    """The resolved config as dotted keys (``data.num_labels``, ``optim.lr``); lists (``handlers``) are one value."""
    return dict(flatten(to_dict(cfg)))


def finite(values: Mapping[str, float], prefix: str = "") -> dict[str, float]:
    """Non-finite values are left out, as ClearML does: pseudo_acc is NaN by design when no pseudo-label
    passes the threshold (a diverged loss stops the run in terminate_on_nan)."""
    return {f"{prefix}{k}": float(v) for k, v in values.items() if math.isfinite(float(v))}


def eval_scalars(evaluator: Engine, tag: str) -> dict[str, float]:
    """An evaluator's top1/top5 (fractions, as in TensorBoard) and loss as ``<tag>/<metric>``."""
    return finite({k: evaluator.state.metrics[k] for k in EVAL_METRICS if k in evaluator.state.metrics}, f"{tag}/")


def metric_names(classes: Sequence[str]) -> list[str]:
    """Class names usable as one component of a metric name in every tracker: characters other than
    letters (any script), digits, ``_``, ``-`` and ``.`` become ``_`` (a ``/`` would nest, and MLflow
    refuses a name that resolves to another path, such as ``..``); names made equal by that get ``_2``, ``_3``..."""
    names: list[str] = []
    for cls in classes:
        base = re.sub(r"[^\w.-]", "_", str(cls)) or "_"
        if set(base) == {"."}:
            base = "_" + base
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return names


def evaluated_models(record: Mapping[str, Any]) -> list[str]:
    """The models of an evaluation record (``trainer.state.evaluation``): its entries with per-class rows."""
    return [k for k, v in record.items() if isinstance(v, Mapping) and "per_class" in v]


def per_class_scalars(record: Mapping[str, Any], names: Sequence[str] | None = None) -> dict[str, float]:
    """One evaluation record as scalars, for every tracker (TensorBoard included): ``test_<model>/top1_per_class/<class>``
    (a fraction; a class without test images has none), ``pseudo_labels/count/<class>`` and ``pseudo_labels/top1/<class>``
    (where the true labels of the unlabeled images are known; none for a window of no steps). ``names``: the
    class names in the tags (default: :func:`metric_names`, which every tracker accepts; TensorBoard takes them as they are)."""
    names = metric_names(record["classes"]) if names is None else names
    out: dict[str, float] = {}
    for model in evaluated_models(record):
        for name, row in zip(names, record[model]["per_class"]):
            if row["top1"] is not None:
                out[f"test_{model}/top1_per_class/{name}"] = row["top1"] / 100.0
    pseudo = record.get("pseudo_labels")
    if pseudo is not None and pseudo["steps"]:  # no steps: the trainer's step did not report them
        for name, count, top1 in zip(names, pseudo["counts"], pseudo["top1"]):
            out[f"pseudo_labels/count/{name}"] = float(count)
            if top1 is not None:
                out[f"pseudo_labels/top1/{name}"] = top1 / 100.0
    return out


def read_results(output_dir: Path) -> dict[str, Any] | None:
    """results.json of the run (written by the evaluation handler), or None when there is none."""
    path = Path(output_dir) / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def result_scalars(results: Mapping[str, Any]) -> dict[str, float]:
    return finite({f"results/{k}": results[k] for k in RESULT_SCALARS if isinstance(results.get(k), (int, float))})


# --------------------------------------------------------------------------- CTAugment's learned policy, for every tracker

POLICY_TAG = "ctaugment/policy"  # TensorBoard's image tag; the other trackers' name for it too


def run_policy(data: Any) -> Any | None:
    """The run's CTAugment policy (``CTAPolicy``), or None for a RandAugment run (or data stand-ins in tests).
    Imported here, at attach time: the ctaugment module imports torch."""
    from ignite_fixmatch.augment.ctaugment import policy_of

    return policy_of(data)


def policy_image(policy: Any, iteration: int) -> Image.Image:
    """The policy as a heatmap (charts.policy_heatmap): one row per op parameter, one cell per bin."""
    from ignite_fixmatch.charts import policy_heatmap

    names, grid = policy.grid()
    return policy_heatmap(names, grid, title=f"CTAugment policy, iteration {iteration}")


def policy_table(policy: Any) -> list[list[Any]]:
    """The policy as a table (header first): one row per op parameter, its name then each bin's probability
    (6 digits, as in results.json; None past the parameter's bins)."""
    names, grid = policy.grid()
    header = ["parameter", *(f"bin {b}" for b in range(grid.shape[1]))]
    return [header, *([name, *(None if math.isnan(v) else round(float(v), 6) for v in row)] for name, row in zip(names, grid))]
