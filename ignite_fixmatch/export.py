"""Command line: ``python -m ignite_fixmatch.export CHECKPOINT --format torchscript|onnx --out FILE``.

Writes one self-contained module: uint8 images (N, H, W, C) by default, or (N, C, H, W) with
``--layout nchw``, at the run's image size and colour mode -> float32 class probabilities (N, classes).
Inside: the preprocessing of evaluation (float, /255, the stored mean/std), the network in eval mode, and
softmax(logits / temperature). The batch size is free. Class names, layout, image size, mode, mean/std,
temperature and the source checkpoint travel with it as ``metadata.json`` (TorchScript: an extra file;
ONNX: a ``metadata_props`` entry), so a consumer needs neither this project nor the data set.

Before the file appears at --out it is loaded back (``torch.jit.load``; ONNX: onnxruntime, or only
``onnx.checker`` when onnxruntime is not installed) and run on random uint8 images against the eager model
(:meth:`InferenceModel.probabilities`): a difference above ``TOLERANCE`` refuses the export (exit 2).

    python -m ignite_fixmatch.export runs/quickstart --format onnx --out digits.onnx
    python -m ignite_fixmatch.export runs/cifar10_4000 --format torchscript --out cifar10.pt --calibrate-on val
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ignite_fixmatch.errors import error_line
from ignite_fixmatch.eval import MODEL_KEYS, USER_ERRORS
from ignite_fixmatch.inference import InferenceModel, load_for_inference
from ignite_fixmatch.output_files import check_output, write_atomically

EXIT_USER_ERROR = 2
FORMATS = ("torchscript", "onnx")
LAYOUTS = ("nhwc", "nchw")
OPSET = 18  # ai.onnx opset: what torch 2.14's exporter emits without a version conversion, run by onnxruntime >= 1.14
# Max |probability difference| between the exported file and the eager model on the same images. Probabilities lie
# in [0, 1]; float32 kernels of two runtimes differ by about 1e-7..1e-6 here; 1e-4 leaves a 100x margin for deeper
# networks and other CPUs, yet any real defect (a wrong normalisation, layout or temperature) moves them far more.
TOLERANCE = 1e-4
SAMPLE_BATCHES = (5, 1)  # verified batch sizes, neither the one the export traced (2): the batch size is really free
METADATA_FILE = "metadata.json"  # the TorchScript extra file and the ONNX metadata_props key


class ExportError(RuntimeError):
    """An export that cannot be made or failed its check; nothing was written at --out."""


class ExportedClassifier(nn.Module):
    """uint8 images -> class probabilities: evaluation's normalisation, the network, softmax(logits / T)."""

    def __init__(self, model: InferenceModel, layout: str) -> None:
        super().__init__()
        prep = model.preprocessing
        self.net = model.model
        self.nhwc = layout == "nhwc"
        self.temperature = float(model.temperature)
        self.register_buffer("mean", torch.tensor(prep.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(prep.std, dtype=torch.float32).view(1, -1, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        x = images.permute(0, 3, 1, 2) if self.nhwc else images
        x = x.contiguous().to(torch.float32).div(255).sub(self.mean).div(self.std)  # the ops of augment.ops.normalize
        return torch.softmax(self.net(x).float() / self.temperature, dim=1)


def input_shape(model: InferenceModel, layout: str) -> list[Any]:
    p = model.preprocessing
    return ["N", p.image_size, p.image_size, p.channels] if layout == "nhwc" else ["N", p.channels, p.image_size, p.image_size]


def metadata(model: InferenceModel, fmt: str, layout: str, calibration: dict[str, Any] | None) -> dict[str, Any]:
    """What a consumer needs to feed the module and read its output, and where it came from."""
    p = model.preprocessing
    return {
        "producer": "ignite-fixmatch export",
        "format": fmt,
        "opset": OPSET if fmt == "onnx" else None,
        "classes": list(model.classes),
        "input": {"name": "images", "dtype": "uint8", "layout": layout, "shape": input_shape(model, layout)},
        "output": {"name": "probabilities", "dtype": "float32", "shape": ["N", len(model.classes)]},
        "layout": layout,
        "image_size": p.image_size,
        "mode": p.mode,
        "channels": p.channels,
        "mean": list(p.mean),
        "std": list(p.std),
        "temperature": model.temperature,
        "calibration": calibration,
        "checkpoint": str(model.path),
        "iteration": model.iteration,
        "model": model.which,
        "torch": torch.__version__,
    }


def sample_images(model: InferenceModel, layout: str, batch: int, seed: int) -> Tensor:
    """Random uint8 images in the module's input layout (its own generator: the global RNG is left alone)."""
    shape = [batch if d == "N" else d for d in input_shape(model, layout)]
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- writers and loaders


def write_torchscript(module: nn.Module, sample: Tensor, path: Path, meta: dict[str, Any]) -> None:
    with warnings.catch_warnings(), torch.no_grad():  # the TorchScript format is asked for; its deprecation notice is not news
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=Warning)
        traced = torch.jit.trace(module, sample)
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(meta)})


def write_onnx(module: nn.Module, sample: Tensor, path: Path, meta: dict[str, Any]) -> None:
    """torch.export (``dynamo=True``, the exporter torch 2.14 maintains) with a free batch dimension, weights
    inside the file, then the metadata added with onnx."""
    import onnx

    with torch.no_grad():
        torch.onnx.export(
            module, (sample,), str(path), dynamo=True, opset_version=OPSET, input_names=["images"], output_names=["probabilities"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, external_data=False, verbose=False,
        )
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {METADATA_FILE: json.dumps(meta)})
    onnx.save(proto, str(path))


def load_torchscript(path: Path) -> tuple[Callable[[Tensor], Tensor], dict[str, Any], str]:
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=Warning)
        loaded = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)

    def run(images: Tensor) -> Tensor:
        with torch.no_grad():
            return loaded(images)

    return run, json.loads(extra[METADATA_FILE]), "torch.jit.load"


def load_onnx(path: Path) -> tuple[Callable[[Tensor], Tensor] | None, dict[str, Any], str]:
    """onnxruntime's session when it is installed; else the checker's verdict alone (``run`` is None)."""
    import onnx

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    meta = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_FILE])
    if importlib.util.find_spec("onnxruntime") is None:
        return None, meta, "onnx.checker only: onnxruntime is not installed, so the file was not run (pip install onnxruntime to verify it)"
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(images: Tensor) -> Tensor:
        return torch.from_numpy(session.run(["probabilities"], {"images": images.numpy()})[0])

    return run, meta, f"onnxruntime {onnxruntime.__version__}"


def require_onnx() -> None:
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(
            f"--format onnx needs the optional packages {' and '.join(missing)}: pip install onnx onnxscript onnxruntime "
            "(the versions of requirements-dev.txt), or use --format torchscript."
        )


# --------------------------------------------------------------------------- export


def verify(path: Path, fmt: str, model: InferenceModel, layout: str, meta: dict[str, Any]) -> tuple[float | None, str]:
    """Load ``path`` back and run it on random images of batch sizes SAMPLE_BATCHES against the eager model:
    (max |difference|, None when the file could not be run, and how it was loaded)."""
    run, stored, how = load_torchscript(path) if fmt == "torchscript" else load_onnx(path)
    if stored != json.loads(json.dumps(meta)):
        raise ExportError(f"the metadata read back from {str(path)!r} differs from what was written; nothing was exported.")
    if run is None:
        return None, how
    worst = 0.0
    for seed, batch in enumerate(SAMPLE_BATCHES):
        images = sample_images(model, layout, batch, seed + 1)
        got = run(images)
        want = model.probabilities(images.permute(0, 3, 1, 2) if layout == "nhwc" else images).cpu()
        if got.shape != want.shape:
            raise ExportError(f"the exported module gives shape {tuple(got.shape)} for a batch of {batch}, expected {tuple(want.shape)}.")
        worst = max(worst, float((got - want).abs().max()))
    return worst, how


def calibrate(model: InferenceModel, where: str, data_root: str | None) -> dict[str, Any]:
    """Fit the temperature on ``where`` ("val" or a labeled folder), set it on ``model``, print what it changes."""
    from ignite_fixmatch.calibration import calibration_logits, calibration_summary, fit_temperature, format_summary

    logits, labels = calibration_logits(model, where, data_root)
    temperature = fit_temperature(logits, labels)
    summary = calibration_summary(logits, labels, temperature)
    print(format_summary(summary))
    model.temperature = temperature
    return {"on": where, **summary}


def export_checkpoint(
    checkpoint: str | Path, fmt: str, out: Path, *, which: str | None = None, layout: str = "nhwc",
    calibrate_on: str | None = None, data_root: str | None = None, overwrite: bool = False,
) -> dict[str, Any]:
    """Export, verify, and move the file into place at ``out``; the report printed by the command line."""
    if fmt == "onnx":
        require_onnx()
    check_output(out, "--out", overwrite)
    model = load_for_inference(checkpoint, model=which, device="cpu", data_root=data_root)
    calibration = calibrate(model, calibrate_on, data_root) if calibrate_on is not None else None
    meta = metadata(model, fmt, layout, calibration)
    module = ExportedClassifier(model, layout)
    checked: dict[str, Any] = {}

    def write_and_verify(tmp: Path) -> None:
        """Only a file that gives the model's probabilities is renamed into place."""
        (write_torchscript if fmt == "torchscript" else write_onnx)(module, sample_images(model, layout, 2, 0), tmp, meta)
        difference, how = verify(tmp, fmt, model, layout, meta)
        if difference is not None and difference > TOLERANCE:
            raise ExportError(
                f"the exported file's probabilities differ from the model's by up to {difference:.2e} (tolerance {TOLERANCE:.0e}) "
                f"when run with {how}; nothing was exported. Report this with the checkpoint's config."
            )
        checked.update(difference=difference, verified_with=how, bytes=tmp.stat().st_size)

    write_atomically(out, write_and_verify, "--out", overwrite)
    return {"model": model, "metadata": meta, **checked, "out": out}


def format_report(r: dict[str, Any]) -> str:
    model, meta = r["model"], r["metadata"]
    shape = ", ".join(map(str, meta["input"]["shape"]))
    kind = f"ONNX opset {OPSET}" if meta["format"] == "onnx" else "TorchScript"
    batches = " and ".join(map(str, SAMPLE_BATCHES))
    check = (
        f"verified with {r['verified_with']} on random uint8 images (batches of {batches}): max |difference| to the eager model "
        f"{r['difference']:.1e} (tolerance {TOLERANCE:.0e})"
        if r["difference"] is not None else f"checked with {r['verified_with']}"
    )
    return "\n".join([
        f"exported {model.path} ({model.which} model, iteration {model.iteration}) -> {r['out']} ({kind}, {r['bytes'] / 1e6:.1f} MB)",
        f"input 'images': uint8 ({shape}), {meta['layout']}, {meta['mode']} pixels 0..255; output 'probabilities': float32 "
        f"(N, {len(meta['classes'])}), softmax(logits / {meta['temperature']:.4g})",
        check,
    ])


# --------------------------------------------------------------------------- command line

EXAMPLES = """examples:
  python -m ignite_fixmatch.export runs/quickstart --format onnx --out digits.onnx
  python -m ignite_fixmatch.export runs/quickstart/checkpoints/checkpoint_1000.pt --format torchscript --out digits.pt --layout nchw
  python -m ignite_fixmatch.export runs/cifar10_4000 --format onnx --out cifar10.onnx --calibrate-on val

The module takes uint8 images (N, H, W, C) (--layout nchw: (N, C, H, W)) at the run's image size and colour
mode, and returns float32 probabilities (N, classes); metadata.json inside it names the classes."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ignite_fixmatch.export",
        description="Export a checkpoint as one TorchScript or ONNX module: uint8 images -> class probabilities, "
        "with evaluation's preprocessing inside and the class names as metadata. Verified before it is written.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a .pt file written by training, or a run folder (its newest checkpoint)")
    parser.add_argument("--format", required=True, choices=FORMATS, help=f"torchscript (torch.jit.load) or onnx (opset {OPSET})")
    parser.add_argument("--out", required=True, type=Path, help="the file to write (refused if it exists, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--model", choices=tuple(MODEL_KEYS), help="which weights: ema (default when saved) or raw")
    parser.add_argument("--layout", choices=LAYOUTS, default="nhwc", help="input layout: nhwc (default, as images are stored) or nchw")
    parser.add_argument("--calibrate-on", metavar="DIR|val", help="fit a temperature on the run's held-out labels (val) or a labeled folder DIR/<class>/")
    parser.add_argument("--data-root", help="where the run's data set is now (for --calibrate-on val, and checkpoints that predate stored classes)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = export_checkpoint(
            args.checkpoint, args.format, args.out, which=args.model, layout=args.layout,
            calibrate_on=args.calibrate_on, data_root=args.data_root, overwrite=args.overwrite,
        )
    except (*USER_ERRORS, ExportError) as e:
        print("error: " + error_line(e), file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:  # the folder became unwritable or the disk filled while exporting
        print(f"error: --out: cannot write {str(args.out)!r}: {e.strerror or e}; nothing was exported.", file=sys.stderr)
        return EXIT_USER_ERROR
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
