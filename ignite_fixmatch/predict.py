"""Command line: ``python -m ignite_fixmatch.predict CHECKPOINT PATH [PATH ...] --out predictions.csv``.

Classifies image files with a trained checkpoint: one row per image with its path, the top-k class names
and their probabilities, and an ``error`` column. Images are read and normalised exactly as evaluation
reads a test folder (:class:`~ignite_fixmatch.preprocessing.Preprocessing`), so a test image gets the
probabilities the evaluator computes for it.

    python -m ignite_fixmatch.predict runs/quickstart photos/ --out predictions.csv
    find photos -name '*.png' | python -m ignite_fixmatch.predict run.pt - --out predictions.jsonl --top-k 3

Exit codes: 0 every image was classified; 1 some images could not be read (each is named on stderr and
in its row's ``error`` column, the others are classified); 2 usage error, nothing was predicted (missing
checkpoint, a path without images, an unwritable or existing --out).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import UnidentifiedImageError

from ignite_fixmatch.datasets.folder import IMAGE_EXTENSIONS, scan_image_files
from ignite_fixmatch.datasets.source import ImageSource
from ignite_fixmatch.errors import DataError, error_line
from ignite_fixmatch.eval import MODEL_KEYS, USER_ERRORS, EvalError, _positive
from ignite_fixmatch.inference import InferenceModel, load_for_inference
from ignite_fixmatch.output_files import check_output, write_atomically

EXIT_OK, EXIT_SOME_FAILED, EXIT_USER_ERROR = 0, 1, 2
FORMATS = {".csv": "csv", ".jsonl": "jsonl"}  # --out extension -> format; "-" is CSV on stdout


# --------------------------------------------------------------------------- inputs


def read_path_list(stream: IO[str]) -> list[str]:
    """``-``: one path per line (spaces kept, blank lines skipped)."""
    return [line.rstrip("\r\n") for line in stream if line.strip()]


def collect_images(args: Sequence[str], stdin: IO[str] | None = None) -> list[str]:
    """Image paths in order: a file as given (whatever its extension: a non-image becomes an error row), a
    folder's images searched recursively as the folder data set is (sorted, hidden entries skipped, link
    loops ended), ``-`` the paths listed on stdin. A missing path or a folder without images is a DataError."""
    paths: list[str] = []
    for arg in args:
        if arg == "-":
            listed = read_path_list(stdin if stdin is not None else sys.stdin)
            if not listed:
                raise DataError("'-' was given but stdin listed no paths; pipe one image path per line, e.g. find photos -name '*.png' | ...")
            paths.extend(collect_images(listed))
        elif os.path.isdir(arg):
            found = scan_image_files(arg)
            if len(found) == 0:
                raise DataError(
                    f"no images found under folder {arg!r} (searched recursively for {', '.join(IMAGE_EXTENSIONS)}, any case; "
                    "hidden files skipped); give a folder of images or image files"
                )
            paths.extend(os.path.join(arg, rel) for rel in found)
        elif os.path.exists(arg):
            paths.append(arg)
        else:
            raise DataError(f"{arg!r} does not exist; give image files, folders of images, or - to read paths from stdin")
    return paths


# --------------------------------------------------------------------------- prediction


@dataclass
class Row:
    path: str
    classes: list[str]
    probabilities: list[float]
    error: str | None = None


def read_images(source: ImageSource, indices: Sequence[int]) -> tuple[list[int], list[np.ndarray], dict[int, str]]:
    """The readable images among ``indices`` as (1, H, W, C) uint8 arrays, and an error line for each unreadable one."""
    good, arrays, errors = [], [], {}
    for i in indices:
        try:
            arrays.append(source.uint8_batch([i]))
            good.append(i)
        except DataError as e:  # the cause is the decoder's own message; the DataError adds training's skip_corrupt hint
            errors[i] = unreadable(e)
    return good, arrays, errors


def unreadable(e: DataError) -> str:
    """The decoder's reason, without the DataError's advice about training's data.skip_corrupt."""
    cause = e.__cause__
    if isinstance(cause, UnidentifiedImageError):
        return "cannot read image: not an image file, or a format PIL cannot decode"
    return f"cannot read image: {type(cause).__name__}: {error_line(cause)}" if cause is not None else error_line(e)


def predict_rows(model: InferenceModel, paths: Sequence[str], top_k: int, batch_size: int) -> Iterator[Row]:
    """One Row per path, in order, ``batch_size`` images a forward pass."""
    source = model.preprocessing.files(paths)
    for start in range(0, len(paths), batch_size):
        indices = range(start, min(start + batch_size, len(paths)))
        good, arrays, errors = read_images(source, indices)
        top: dict[int, tuple[list[str], list[float]]] = {}
        if good:
            images = torch.from_numpy(np.concatenate(arrays)).permute(0, 3, 1, 2)  # NCHW seen through NHWC strides, as evaluation's loader
            probs, idx = model.probabilities(images).topk(top_k, dim=1)
            for i, p, c in zip(good, probs.cpu().tolist(), idx.cpu().tolist()):
                top[i] = ([model.classes[j] for j in c], p)
        for i in indices:
            classes, probabilities = top.get(i, ([], []))
            yield Row(paths[i], classes, probabilities, errors.get(i))


def number(p: float) -> float:
    """float32 precision (7 significant digits), not float64 noise."""
    return float(f"{p:.7g}")


class RowWriter:
    """CSV (path, class_1, probability_1, ..., class_k, probability_k, error) or JSON Lines
    ({"path", "classes", "probabilities", "error"})."""

    def __init__(self, stream: IO[str], fmt: str, top_k: int) -> None:
        self.stream, self.fmt = stream, fmt
        if fmt == "csv":
            self.csv = csv.writer(stream)
            self.csv.writerow(["path", *[f"{w}_{r}" for r in range(1, top_k + 1) for w in ("class", "probability")], "error"])
            self.width = 2 * top_k

    def write(self, row: Row) -> None:
        if self.fmt == "jsonl":
            record: dict[str, Any] = {"path": row.path, "classes": row.classes, "probabilities": [number(p) for p in row.probabilities], "error": row.error}
            self.stream.write(json.dumps(record) + "\n")
            return
        cells: list[Any] = [v for c, p in zip(row.classes, row.probabilities) for v in (c, number(p))]
        self.csv.writerow([row.path, *cells, *[""] * (self.width - len(cells)), row.error or ""])


class Progress:
    """``images done/total`` redrawn on one stderr line, only when stderr is a terminal (nothing when piped)."""

    def __init__(self, total: int, stream: IO[str]) -> None:
        self.total, self.stream, self.done = total, stream, 0
        self.on = stream.isatty()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.on:
            self.stream.write(f"\rpredict: {self.done}/{self.total} images ({100 * self.done // self.total} %)")
            self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own, without breaking the bar."""
        self.stream.write(("\r\033[K" if self.on else "") + text + "\n")
        self.advance(0)

    def close(self) -> None:
        if self.on:
            self.stream.write("\n")


# --------------------------------------------------------------------------- output


def write_predictions(rows: Iterator[Row], out: str, top_k: int, progress: Progress, overwrite: bool) -> tuple[int, int]:
    """Write every row to ``out`` (``-``: stdout) through a temporary file moved into place at the end, so an
    existing file is only ever replaced by a complete one; (images, failed)."""
    fmt = FORMATS.get(Path(out).suffix.lower(), "csv")
    if out == "-":
        return _write_rows(rows, RowWriter(sys.stdout, "csv", top_k), progress)
    counts: list[tuple[int, int]] = []

    def write(tmp: Path) -> None:
        with open(tmp, "x", newline="" if fmt == "csv" else None, encoding="utf-8") as f:
            counts.append(_write_rows(rows, RowWriter(f, fmt, top_k), progress))

    write_atomically(Path(out), write, "--out", overwrite)
    return counts[0]


def _write_rows(rows: Iterator[Row], writer: RowWriter, progress: Progress) -> tuple[int, int]:
    images = failed = 0
    for row in rows:
        writer.write(row)
        images += 1
        if row.error is not None:
            failed += 1
            progress.message(f"warning: {row.path}: {row.error}")
        progress.advance()
    return images, failed


# --------------------------------------------------------------------------- command line

EXAMPLES = """examples:
  python -m ignite_fixmatch.predict runs/quickstart photos/ --out predictions.csv
  python -m ignite_fixmatch.predict runs/quickstart/checkpoints/checkpoint_1000.pt a.png b.jpg --out - --top-k 1
  find photos -name '*.png' | python -m ignite_fixmatch.predict runs/quickstart - --out predictions.jsonl

exit codes: 0 all images classified; 1 some images could not be read (named on stderr and in the error
column; the others are classified); 2 usage error, nothing predicted."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ignite_fixmatch.predict",
        description="Classify image files with a checkpoint: one row per image with its top-k classes and probabilities. "
        "Images are preprocessed exactly as evaluation does.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a .pt file written by training, or a run folder (its newest checkpoint)")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (searched recursively), or - to read paths from stdin")
    parser.add_argument("--out", required=True, help="predictions file: .csv or .jsonl, or - for CSV on stdout")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    parser.add_argument("--top-k", type=_positive, help="classes per image (default: 5, or the number of classes if fewer)")
    parser.add_argument("--model", choices=tuple(MODEL_KEYS), help="which weights: ema (default when saved) or raw")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available, else cpu")
    parser.add_argument("--batch-size", type=_positive, help="images per forward pass (default: the run's data.eval_batch_size)")
    parser.add_argument("--data-root", help="only for checkpoints written before they stored their classes: where the run's data set is now")
    return parser.parse_args(argv)


def check_out_name(out: str, overwrite: bool) -> None:
    if out == "-":
        return
    if Path(out).suffix.lower() not in FORMATS:
        raise EvalError(f"--out {out!r}: the extension chooses the format; use .csv or .jsonl (or - for CSV on stdout).")
    check_output(Path(out), "--out", overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_out_name(args.out, args.overwrite)
        paths = collect_images(args.paths)
        model = load_for_inference(args.checkpoint, model=args.model, device=args.device, data_root=args.data_root)
        top_k = min(5, len(model.classes)) if args.top_k is None else args.top_k
        if top_k > len(model.classes):
            raise EvalError(f"--top-k {top_k}: the model has only {len(model.classes)} classes; give at most {len(model.classes)}.")
        rows = predict_rows(model, paths, top_k, args.batch_size or model.config.data.eval_batch_size)
        progress = Progress(len(paths), sys.stderr)
        try:
            images, failed = write_predictions(rows, args.out, top_k, progress, args.overwrite)
        finally:
            progress.close()
    except USER_ERRORS as e:
        print("error: " + error_line(e), file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # --out - read by a command that stopped early (| head): the rest is not wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that Python's exit flush does not fail again
        return EXIT_SOME_FAILED
    except OSError as e:  # the output became unwritable (disk full) while predicting
        print(f"error: --out: cannot write {args.out!r}: {e.strerror or e}; nothing was written.", file=sys.stderr)
        return EXIT_USER_ERROR
    where = "stdout" if args.out == "-" else args.out
    print(f"{images} images, {failed} could not be read -> {where} ({model.which} model, iteration {model.iteration})", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
