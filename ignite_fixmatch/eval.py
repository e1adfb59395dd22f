"""Command line: ``python -m ignite_fixmatch.eval CHECKPOINT``: score a saved model on a test set.

Every checkpoint carries the resolved config of its run, so the model and the test data (with the
same normalisation) are rebuilt exactly as training built them, and no YAML file is needed. Prints
top-1, top-5, loss, expected calibration error (15 bins) and per-class accuracy; ``--json OUT.json``
writes them too, ``--reliability OUT.png`` draws the reliability diagram. For a run with
``data.randaugment: ctaugment`` it also prints the learned CTAugment policy (each op parameter's bin
probabilities, also in the JSON), and ``--policy OUT.png`` draws it as a heatmap. CPU or one GPU.

    python -m ignite_fixmatch.eval runs/cifar10_4000/checkpoints/checkpoint_1048576.pt
    python -m ignite_fixmatch.eval runs/cifar10_4000 --model raw --device cpu --json scores.json
    python -m ignite_fixmatch.eval run.pt --data-root /new/place/of/the/data

The checkpoint is read with ``torch.load(weights_only=True)``: a file whose unpickling would run code
is refused, never executed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ignite_fixmatch.augment.ctaugment import CTAPolicy
from ignite_fixmatch.calibration import BINS, CalibrationError, ReliabilityBins, reliability_diagram
from ignite_fixmatch.charts import policy_heatmap
from ignite_fixmatch.config import DATASETS, Config, ConfigError, from_dict
from ignite_fixmatch.data import build_eval_loader, sources_from_config
from ignite_fixmatch.datasets import DataError, DataSources, dataset_spec
from ignite_fixmatch.errors import error_line
from ignite_fixmatch.evaluation import create_evaluator, per_class_rows
from ignite_fixmatch.output_files import OutputError, check_output, write_atomically
from ignite_fixmatch.resume import CheckpointError, newest_checkpoint, read_checkpoint, shape_mismatches
from ignite_fixmatch.training import model_from_config

EXIT_USER_ERROR = 2  # bad checkpoint, data or option: nothing was evaluated
MODEL_KEYS = {"ema": "ema_model", "raw": "model"}  # --model -> key in the checkpoint


class EvalError(RuntimeError):
    """A request this command cannot carry out, with what to do instead."""


USER_ERRORS = (EvalError, CheckpointError, ConfigError, DataError, OutputError)


# --------------------------------------------------------------------------- checkpoint and config


def resolve_checkpoint(path: Path) -> Path:
    """A .pt file as given, or a run folder (or its checkpoints/ folder) -> its newest checkpoint."""
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist. Give a .pt file written by training, or a run folder.")
    run_dir = path.parent if path.name == "checkpoints" else path
    found = newest_checkpoint(run_dir)
    if found is None:
        raise CheckpointError(f"{str(path)!r} is a folder without checkpoints (no checkpoints/checkpoint_<iteration>.pt). Give a .pt file.")
    return found


def config_of(ckpt: Mapping[str, Any], path: Path) -> Config:
    """The run's config stored in the checkpoint (written by resume.ConfigRecord)."""
    stored = ckpt.get("config")
    if not isinstance(stored, Mapping):
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds no config (its keys: {', '.join(map(str, ckpt)) or 'none'}): it was not written by "
            "this project's checkpoint handler, so the model and data it needs are unknown."
        )
    try:
        return from_dict(dict(stored))
    except (ConfigError, TypeError, ValueError, KeyError) as e:  # a damaged file may hold anything
        raise CheckpointError(f"checkpoint {str(path)!r} holds a config this version cannot use: {e}") from None


def with_data_overrides(cfg: Config, name: str | None, root: str | None) -> Config:
    """Point the config at another data set name or location (e.g. the data moved).

    Not re-validated: training-only checks (labels per class, batch sizes) do not matter here.
    """
    changes = {k: v for k, v in (("name", name), ("root", root)) if v is not None}
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **changes)) if changes else cfg


def choose_model(ckpt: Mapping[str, Any], requested: str | None, path: Path) -> str:
    """``ema`` when the checkpoint has it and nothing else was asked, else ``raw``."""
    if requested is None:
        return "ema" if MODEL_KEYS["ema"] in ckpt else "raw"
    if MODEL_KEYS[requested] not in ckpt:
        hint = " (the run had no ema handler); use --model raw" if requested == "ema" else ""
        raise CheckpointError(f"checkpoint {str(path)!r} holds no {requested} model{hint}.")
    return requested


def checkpoint_policy(state: Any, path: Path) -> CTAPolicy | None:
    """The learned CTAugment policy of a checkpoint's ``"ctaugment"`` entry (its state dict: ``{"weights": tensor}``),
    in a fresh :class:`CTAPolicy`; None when there is none (a RandAugment run)."""
    if state is None:
        return None
    policy = CTAPolicy()
    weights = state.get("weights") if isinstance(state, Mapping) else None
    expected = tuple(policy.weights.shape)
    if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != expected or not bool(torch.isfinite(weights).all()):
        found = f"a tensor of shape {tuple(weights.shape)}" if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r}: its CTAugment policy ('ctaugment' entry) is damaged: expected {expected[0]} finite bin weights, "
            f"found {found}. Use another checkpoint of the run."
        )
    policy.load_state_dict({"weights": weights.to(torch.float64)})
    return policy


def format_policy(policy: CTAPolicy) -> str:
    """The learned policy after the metrics: CTAPolicy.table(), indented, under a line that says how to read it."""
    table = "\n".join("  " + line for line in policy.table().splitlines())
    return "CTAugment policy (probability of drawing each magnitude bin, low to high, per op parameter):\n" + table


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda: no CUDA device is available here. Use --device cpu (or auto).")
    return torch.device(name)


# --------------------------------------------------------------------------- model


def classes_in_state(model: torch.nn.Module, state: Mapping[str, Any], num_classes: int) -> int | None:
    """The number of classes the checkpoint's classifier predicts, when it differs from ``num_classes``:
    read from a tensor whose first dimension is the class count in this model but not in the checkpoint."""
    for key, own in model.state_dict().items():
        theirs = state.get(key)
        if (
            isinstance(theirs, torch.Tensor) and theirs.ndim == own.ndim and own.ndim >= 1
            and own.shape[0] == num_classes and theirs.shape[0] != num_classes and theirs.shape[1:] == own.shape[1:]
        ):
            return int(theirs.shape[0])
    return None


def build_loaded_model(cfg: Config, classes: Sequence[str], channels: int, state: Any, path: Path, which: str) -> torch.nn.Module:
    """The run's network for ``classes`` and ``channels``, with the checkpoint's weights; refuses any mismatch."""
    num_classes = len(classes)
    try:
        model = model_from_config(cfg, num_classes, channels)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: the model of its config ({cfg.model.name!r}) cannot be built here: {e}") from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {str(path)!r}: its {which} model is a {type(state).__name__}, not a state dict.")
    trained_for = classes_in_state(model, state, num_classes)
    if trained_for is not None:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was trained on {trained_for} classes but the test data ({describe_data(cfg)}) has "
            f"{num_classes}: {', '.join(classes)}. Evaluate it on the data set it was trained on "
            "(--data/--data-root), with the same class folders."
        )
    problems = shape_mismatches(model, state, shown=3)
    if problems:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit the model its config describes for {describe_data(cfg)} "
            f"({channels} channels, {num_classes} classes): {problems}."
        )
    try:
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - a damaged state dict (values of other types) fails in any way
        raise CheckpointError(f"checkpoint {str(path)!r}: its {which} model cannot be loaded, the file is damaged ({type(e).__name__}).") from None
    return model


# --------------------------------------------------------------------------- evaluation


def describe_data(cfg: Config) -> str:
    spec = dataset_spec(cfg.data.name)
    return f"{cfg.data.name} at {cfg.data.root!r}" if spec.needs_root else f"{cfg.data.name} ({spec.origin})"


def load_test_data(cfg: Config, root_given: bool) -> DataSources:
    try:
        return sources_from_config(cfg, with_unlabeled=False)
    except DataError as e:
        where = "as given by --data-root" if root_given else "from the checkpoint's config; if it moved, give --data-root PATH"
        raise DataError(f"{e} (data set: {describe_data(cfg)}, {where})") from None


def open_checkpoint(
    checkpoint: str | Path, data: str | None, data_root: str | None, model: str | None
) -> tuple[Path, dict[str, Any], Config, str]:
    """The checkpoint file, its content, its config (with the data overrides) and which model to score:
    everything taken from the file, before any data is read; any unusable file is a CheckpointError."""
    path = resolve_checkpoint(Path(checkpoint))
    ckpt = read_checkpoint(path)
    cfg = with_data_overrides(config_of(ckpt, path), data, data_root)
    return path, ckpt, cfg, choose_model(ckpt, model, path)


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data: str | None = None,
    data_root: str | None = None,
    model: str | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Score one checkpoint on its data set's test split. Accuracies in percent, as in results.json."""
    path, ckpt, cfg, which = open_checkpoint(checkpoint, data, data_root, model)
    policy = checkpoint_policy(ckpt.get("ctaugment"), path)
    return score_checkpoint(
        path, ckpt, cfg, which, policy, batch_size=batch_size, device=device, num_workers=num_workers, root_given=data_root is not None
    )


def score_checkpoint(
    path: Path, ckpt: Mapping[str, Any], cfg: Config, which: str, policy: CTAPolicy | None, *,
    batch_size: int | None = None, device: str = "auto", num_workers: int | None = None, root_given: bool = False,
) -> dict[str, Any]:
    """evaluate_checkpoint on a checkpoint already opened (open_checkpoint). A CTAugment run's report also holds
    its learned policy (``policy``, from :func:`checkpoint_policy`: each op parameter's bin probabilities, as in results.json)."""
    dev = resolve_device(device)
    sources = load_test_data(cfg, root_given=root_given)
    net = build_loaded_model(cfg, sources.classes, sources.channels, ckpt[MODEL_KEYS[which]], path, which).to(dev)

    loader = build_eval_loader(
        sources,
        batch_size or cfg.data.eval_batch_size,
        min(cfg.data.num_workers, 2) if num_workers is None else num_workers,
        pin_memory=dev.type == "cuda",
    )
    evaluator = create_evaluator(
        net, dev, num_classes=sources.num_classes, mean=sources.mean, std=sources.std, amp=cfg.amp, amp_dtype=cfg.amp_dtype,
        channels_last=cfg.model.channels_last, per_class=True,
    )
    calibration = CalibrationError(BINS, device=dev)
    calibration.attach(evaluator, "ece")
    metrics = evaluator.run(loader).metrics
    trainer_state = ckpt.get("trainer")
    report = {
        "checkpoint": str(path),
        "iteration": trainer_state.get("iteration") if isinstance(trainer_state, Mapping) else None,
        "model": which,
        "device": str(dev),
        "data": {"name": cfg.data.name, "root": cfg.data.root, "split": "test", "images": len(sources.test), "classes": list(sources.classes)},
        "top1": 100.0 * metrics["top1"],
        "top5": 100.0 * metrics["top5"],
        "top5_k": min(5, sources.num_classes),
        "loss": float(metrics["loss"]),
        "ece": 100.0 * metrics["ece"],  # percent, BINS equal-width confidence bins
        "reliability": calibration.reliability.to_dict(),
        "per_class": per_class_rows(metrics["confusion"].cpu(), sources.classes),
    }
    if policy is not None:
        report["ctaugment"] = policy.summary()
    return report


def format_report(report: dict[str, Any]) -> str:
    d = report["data"]
    k = report["top5_k"]
    iteration = f" (iteration {report['iteration']})" if report["iteration"] is not None else ""
    lines = [
        f"checkpoint: {report['checkpoint']}{iteration}, model: {report['model']}, device: {report['device']}",
        f"data: {d['name']} at {d['root']}, test split: {d['images']} images, {len(d['classes'])} classes",
        f"top-1: {report['top1']:.2f} %",
        f"top-5: {report['top5']:.2f} %" + (f" (top-{k}: only {k} classes)" if k < 5 else ""),
        f"loss: {report['loss']:.4f}",
        f"ECE ({report['reliability']['bins']} bins): {report['ece']:.2f} %",
        "per-class accuracy:",
    ]
    width = max([len("class")] + [len(r["class"]) for r in report["per_class"]])
    lines.append(f"  {'class':<{width}}  {'images':>7}  {'correct':>7}  {'top-1 %':>7}")
    for r in report["per_class"]:
        acc = f"{r['top1']:.2f}" if r["top1"] is not None else "n/a"
        lines.append(f"  {r['class']:<{width}}  {r['images']:>7}  {r['correct']:>7}  {acc:>7}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ignite_fixmatch.eval",
        description="Evaluate a checkpoint on its data set's test split: top-1, top-5, loss, per-class accuracy and "
        "expected calibration error. Model and data are rebuilt from the config stored in the checkpoint.",
        epilog="examples:\n"
        "  python -m ignite_fixmatch.eval runs/quickstart --reliability reliability.png\n"
        "  python -m ignite_fixmatch.eval runs/cta --policy policy.png   (a run with data.randaugment=ctaugment)\n"
        "  python -m ignite_fixmatch.eval runs/x/checkpoints/checkpoint_1000.pt --model raw --data-root /new/place --json scores.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a .pt file written by training, or a run folder (its newest checkpoint)")
    parser.add_argument("--data-root", help="where the data set is now (default: data.root of the checkpoint's config)")
    parser.add_argument("--data", choices=DATASETS, help="data set name (default: data.name of the checkpoint's config)")
    parser.add_argument("--model", choices=tuple(MODEL_KEYS), help="which weights: ema (default when saved) or raw")
    parser.add_argument("--batch-size", type=_positive, help="images per batch (default: data.eval_batch_size)")
    parser.add_argument("--num-workers", type=_non_negative, help="data-loading processes (default: as in training)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available, else cpu")
    parser.add_argument("--json", type=Path, help="also write the scores to this JSON file")
    parser.add_argument("--reliability", type=Path, metavar="OUT.png", help="also draw the reliability diagram (accuracy per confidence bin) as a PNG")
    parser.add_argument(
        "--policy", type=Path, metavar="OUT.png", help="also draw the learned CTAugment policy as a heatmap (runs with data.randaugment=ctaugment)"
    )
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.json is not None:
            check_output(args.json, "--json", overwrite=True)
        if args.reliability is not None:
            check_output(args.reliability, "--reliability", overwrite=True)
        if args.policy is not None:
            check_output(args.policy, "--policy", overwrite=True)
        path, ckpt, cfg, which = open_checkpoint(args.checkpoint, args.data, args.data_root, args.model)
        policy = checkpoint_policy(ckpt.get("ctaugment"), path)
        if args.policy is not None and policy is None:
            raise EvalError(
                f"--policy: checkpoint {str(path)!r} has no learned augmentation policy: its run used RandAugment "
                f"(data.randaugment={cfg.data.randaugment}); only data.randaugment=ctaugment learns one. Drop --policy."
            )
        report = score_checkpoint(
            path, ckpt, cfg, which, policy, batch_size=args.batch_size, device=args.device, num_workers=args.num_workers, root_given=args.data_root is not None
        )
    except USER_ERRORS as e:
        print("error: " + error_line(e), file=sys.stderr)
        return EXIT_USER_ERROR
    print(format_report(report))
    if policy is not None:
        print(format_policy(policy))
    if args.json is not None:
        try:
            write_atomically(args.json, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
        except OSError as e:  # became unwritable during the evaluation
            print(f"error: --json: cannot write {str(args.json)!r}: {e.strerror or e}", file=sys.stderr)
            return EXIT_USER_ERROR
    if args.reliability is not None:
        bins = ReliabilityBins.from_dict(report["reliability"], report["ece"] / 100)
        try:
            reliability_diagram(bins, args.reliability, f"{Path(report['checkpoint']).name}, {report['model']} model, test split")
        except OSError as e:
            print(f"error: --reliability: cannot write {str(args.reliability)!r}: {e.strerror or e}", file=sys.stderr)
            return EXIT_USER_ERROR
        print(f"reliability diagram: {args.reliability}")
    if args.policy is not None:
        iteration = f", iteration {report['iteration']}" if report["iteration"] is not None else ""
        image = policy_heatmap(*policy.grid(), title=f"CTAugment policy: {Path(report['checkpoint']).name}{iteration}")
        try:
            write_atomically(args.policy, lambda tmp: image.save(tmp, format="PNG"))
        except OSError as e:
            print(f"error: --policy: cannot write {str(args.policy)!r}: {e.strerror or e}", file=sys.stderr)
            return EXIT_USER_ERROR
        print(f"CTAugment policy heatmap: {args.policy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
