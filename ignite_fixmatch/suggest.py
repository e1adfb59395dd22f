"""Command line: ``python -m ignite_fixmatch.suggest CHECKPOINT --n 100 --out to_label.csv``: what to label next.

Ranks unlabeled images by how much a label would likely help, and picks ``n`` of them that are not
near-duplicates of each other. Candidates: the run's unlabeled images that are not labeled (its training
images outside the labeled split, and its ``data.unlabeled_dir``), or every image under ``--unlabeled DIR``,
read exactly as evaluation reads a test image. Each candidate gets three scores in [0, 1]:

* ``uncertainty`` = 1 - margin, the margin being the model's top-1 minus top-2 probability on the image;
* ``disagreement`` = 1 - p_strong[argmax p_eval], averaged over ``--strong-draws`` draws of the run's own
  strong augmentation (its RandAugment variant, or CTAugment with the checkpoint's learned policy, seeded per
  image from ``--seed``): an image whose prediction
  does not survive the augmentation FixMatch trains with gets no useful pseudo-label;
* ``class_boost`` = max(0, 1 - K * share of its predicted class among the confident predictions): images of
  classes the pseudo-labels under-represent (share 0: 1; at least the uniform 1/K: 0).

``score`` = the weighted mean of the three (``--w-margin``, ``--w-disagreement``, ``--w-class``). The
selection is greedy over the top ``--pool-factor * n`` images by score: each step takes the image with the
largest score x distance to the nearest image already chosen, in the model's L2-normalised penultimate
features (a k-center rule), so copies of one image are not chosen together.

Writes a CSV (rank, path, index, predicted, confidence, margin, disagreement, class_boost, score) and a
contact sheet PNG of the chosen images with the model's guess; ``--labels-out`` (data sets without files,
e.g. digits, CIFAR) writes the run's labeled indices plus the chosen ones: the next run's ``data.labels_file``.

    python -m ignite_fixmatch.suggest runs/quickstart --n 50 --out to_label.csv --labels-out labels.txt
    python -m ignite_fixmatch.suggest runs/pets/checkpoints/checkpoint_20000.pt --n 100 --out to_label.csv --unlabeled new_photos/
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image

from ignite_fixmatch.augment import StrongView
from ignite_fixmatch.augment.ctaugment import CTAugmentViews
from ignite_fixmatch.charts import contact_sheet
from ignite_fixmatch.data import save_split, view_settings
from ignite_fixmatch.datasets import DataError
from ignite_fixmatch.datasets.folder import IMAGE_EXTENSIONS, is_image_name, scan_image_files
from ignite_fixmatch.errors import error_line
from ignite_fixmatch.eval import EXIT_USER_ERROR, MODEL_KEYS, USER_ERRORS, _non_negative, _positive, describe_data
from ignite_fixmatch.inference import InferenceModel, load_for_inference, run_data
from ignite_fixmatch.output_files import check_output, write_atomically

DUPLICATE = 1e-4  # normalised feature distance below which two images count as the same image
COLOUR_TOLERANCE = 8  # largest channel difference (0..255) of a pixel still taken as grey (JPEG noise)
COLOUR_SAMPLE = 16  # images of --unlabeled DIR looked at to tell colour from grey
COLUMNS = ("rank", "path", "index", "predicted", "confidence", "margin", "disagreement", "class_boost", "score")


class SuggestError(RuntimeError):
    """A request this command cannot carry out, with what to do instead."""


@dataclass(frozen=True)
class Candidate:
    """One image that could be labeled: where to read it, and how the user finds it."""

    source: Any  # ImageSource-like: load(i) -> PIL image in the model's mode and size
    i: int
    key: str  # seeds its strong-view draws: stable across runs of this command
    path: str | None  # its file (folder images)
    index: int | None  # its training-set index (the run's own training images)


@dataclass(frozen=True)
class Weights:
    margin: float = 1.0
    disagreement: float = 1.0
    classes: float = 0.5


@dataclass
class Scored:
    """Per readable candidate: the model's view of it and its scores."""

    candidates: list[Candidate]
    images: np.ndarray  # uint8 (N, H, W, C): the pixels the model saw (the contact sheet)
    features: np.ndarray  # (N, D) penultimate features
    predicted: np.ndarray
    confidence: np.ndarray
    margin: np.ndarray
    disagreement: np.ndarray
    class_boost: np.ndarray
    score: np.ndarray


# --------------------------------------------------------------------------- candidates


def run_candidates(model: InferenceModel) -> tuple[list[Candidate], np.ndarray]:
    """The run's unlabeled images that are not labeled, and its labeled indices: the split rebuilt as training
    built it (labeled images are left out even when data.unlabeled_includes_labeled puts them in the stream)."""
    # Unreadable files raise (and are skipped with a warning) instead of being replaced by a neighbour.
    data = run_data(model, skip_corrupt=False)
    sources = data.sources
    labeled = set(int(i) for i in data.labeled_indices)
    found = []
    for source, indices in data.unlabeled.parts:
        is_train = source is sources.train
        for i in map(int, indices):
            if is_train and i in labeled:
                continue
            path = source.path(i) if source.paths is not None else None
            found.append(Candidate(source, i, f"{'train' if is_train else 'unlabeled'}/{i}", path, i if is_train else None))
    if not found:
        raise SuggestError(
            f"every training image of the run {str(model.path)!r} is labeled and it has no data.unlabeled_dir: nothing to suggest. "
            "Give a folder of new images with --unlabeled DIR."
        )
    return found, data.labeled_indices


def folder_candidates(model: InferenceModel, folder: Path, check_layout: bool) -> list[Candidate]:
    """Every image under ``folder`` (recursive, the folder data set's rules), read with evaluation's preprocessing."""
    if not folder.is_dir():
        raise DataError(f"--unlabeled: folder {str(folder)!r} does not exist (or is not a folder); give the folder of images to rank.")
    relative = list(scan_image_files(str(folder)))
    if not relative:
        raise DataError(
            f"--unlabeled: folder {str(folder)!r} holds no images (searched recursively for {', '.join(IMAGE_EXTENSIONS)}, any case); "
            "give a folder of images."
        )
    paths = [str(folder / r) for r in relative]
    if check_layout:
        check_same_data(model, folder, paths)
    source = model.preprocessing.files(paths)
    return [Candidate(source, k, f"file/{r}", p, None) for k, (r, p) in enumerate(zip(relative, paths))]


def check_same_data(model: InferenceModel, folder: Path, paths: Sequence[str]) -> None:
    """Refuse a folder that is plainly another data set: laid out as class folders (sub-folders only, no loose
    images) with names that are not the checkpoint's classes, or colour images for a model trained on grey ones."""
    entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
    folders = sorted(e.name for e in entries if e.is_dir())
    loose = [e.name for e in entries if e.is_file() and is_image_name(e.name)]
    unknown = [name for name in folders if name not in model.classes]
    if folders and not loose and unknown:
        raise SuggestError(
            f"--unlabeled: {str(folder)!r} is laid out as class folders ({', '.join(folders[:8])}) but {', '.join(unknown[:8])} "
            f"{'is' if len(unknown) == 1 else 'are'} not among the checkpoint's classes ({', '.join(model.classes[:10])}): it looks like "
            "another data set. Give images of this model's data, or --allow-mismatch if the sub-folders are not classes."
        )
    if model.preprocessing.mode != "L":
        return
    for path in paths[:COLOUR_SAMPLE]:
        try:
            with Image.open(path) as img:
                rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
        except Exception:  # noqa: BLE001 - an unreadable file is reported (and skipped) when it is read for scoring
            continue
        if int((rgb.max(axis=2) - rgb.min(axis=2)).max()) > COLOUR_TOLERANCE:
            raise SuggestError(
                f"--unlabeled: {path!r} is a colour image but the checkpoint's model was trained on grayscale images "
                f"({describe_data(model.config)}): it looks like another data set. Give images of this model's data, or "
                "--allow-mismatch to rank them as grey images anyway."
            )


# --------------------------------------------------------------------------- scores


def strong_view(model: InferenceModel) -> StrongView | CTAugmentViews:
    """The run's strong augmentation, with the settings training used (data.view_settings), from the stored
    preprocessing (side, mean, std) instead of the data set. A CTAugment run's: CTAugment with the policy the
    checkpoint learned (its ``ctaugment`` entry), as training drew its strong views at that iteration."""
    prep = model.preprocessing
    shape = SimpleNamespace(default_image_size=prep.image_size, mean=prep.mean, std=prep.std)
    settings = view_settings(model.config, shape)  # type: ignore[arg-type]
    if model.config.data.randaugment == "ctaugment":
        if model.ctaugment is None:
            raise SuggestError(
                f"checkpoint {str(model.path)!r} is of a CTAugment run but holds no learned policy (no 'ctaugment' entry), so its "
                "strong view cannot be drawn: use another checkpoint of the run, or --strong-draws 0 to rank without the disagreement."
            )
        return CTAugmentViews(model.ctaugment, **settings)
    return StrongView(model.config.data.randaugment, **settings)


def as_uint8(img: Image.Image) -> np.ndarray:
    array = np.asarray(img, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def readable(candidates: Sequence[Candidate], warn) -> Iterator[tuple[Candidate, Image.Image]]:
    """(candidate, image) for every candidate whose file can be read; the others are named by ``warn`` and skipped."""
    for c in candidates:
        try:
            yield c, c.source.load(c.i)
        except DataError as e:
            warn(f"skipped an unreadable image: {error_line(e)}")


def nchw(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def class_boost(probs: np.ndarray, confident: float) -> np.ndarray:
    """Per class: max(0, 1 - K * share) of the confident predictions (Laplace-smoothed: none confident -> 0 for all)."""
    k = probs.shape[1]
    sure = probs.max(axis=1) >= confident
    counts = np.bincount(probs[sure].argmax(axis=1), minlength=k).astype(np.float64)
    share = (counts + 1.0) / (counts.sum() + k)
    return np.clip(1.0 - k * share, 0.0, 1.0)


def score_candidates(
    model: InferenceModel, candidates: Sequence[Candidate], *, seed: int, strong_draws: int, weights: Weights,
    confident: float, batch_size: int, warn, progress,
) -> Scored:
    """Run the model on every readable candidate (evaluation view and ``strong_draws`` strong views) and score it."""
    strong = strong_view(model) if strong_draws else None
    kept, images, feats, probs, disagree = [], [], [], [], []
    batch: list[tuple[Candidate, Image.Image]] = []

    def flush() -> None:
        arrays = [as_uint8(img) for _, img in batch]
        logits, features = model.logits_and_features(nchw(arrays))
        p = torch.softmax(logits / model.temperature, dim=1)
        guess = p.argmax(dim=1, keepdim=True)
        d = torch.zeros(len(batch), device=p.device)
        for draw in range(strong_draws):
            views = [as_uint8(strong.augment(img, random.Random(f"suggest/{seed}/{c.key}/{draw}"))) for c, img in batch]
            d += 1.0 - model.probabilities(nchw(views)).gather(1, guess).squeeze(1)
        kept.extend(c for c, _ in batch)
        images.extend(arrays)
        feats.append(features.cpu().numpy())
        probs.append(p.cpu().numpy())
        disagree.append((d / max(strong_draws, 1)).cpu().numpy())
        progress(len(kept), len(candidates))
        batch.clear()

    for item in readable(candidates, warn):
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not kept:
        raise DataError(f"none of the {len(candidates)} candidate images could be read; replace the corrupt files.")
    p = np.concatenate(probs).astype(np.float64)
    top2 = np.sort(p, axis=1)[:, ::-1][:, :2] if p.shape[1] > 1 else np.concatenate([p, np.zeros_like(p)], axis=1)
    margin = top2[:, 0] - top2[:, 1]
    predicted = p.argmax(axis=1)
    boost = class_boost(p, confident)[predicted]
    dis = np.clip(np.concatenate(disagree).astype(np.float64), 0.0, 1.0)
    w = weights
    score = (w.margin * (1.0 - margin) + w.disagreement * dis + w.classes * boost) / (w.margin + w.disagreement + w.classes)
    return Scored(kept, np.stack(images), np.concatenate(feats), predicted, top2[:, 0], margin, dis, boost, score)


def select_diverse(score: np.ndarray, features: np.ndarray, n: int, pool_factor: int) -> np.ndarray:
    """Greedy k-center over the top ``pool_factor * n`` by score: each pick maximises score x (normalised feature
    distance to the nearest pick, in [0, 1]). Stops early when only duplicates of picks are left in the pool."""
    order = np.argsort(-score, kind="stable")
    pool = order[: min(len(order), pool_factor * n)]
    f = torch.nn.functional.normalize(torch.from_numpy(features[pool]).double(), dim=1)
    s = torch.from_numpy(score[pool]).double()
    chosen = [0]
    nearest = torch.linalg.vector_norm(f - f[0], dim=1) / 2
    while len(chosen) < min(n, len(pool)):
        gain = s * nearest
        gain[chosen] = -1.0
        j = int(gain.argmax())
        if float(nearest[j]) <= DUPLICATE:
            break
        chosen.append(j)
        nearest = torch.minimum(nearest, torch.linalg.vector_norm(f - f[j], dim=1) / 2)
    return pool[chosen]


# --------------------------------------------------------------------------- outputs


def csv_rows(scored: Scored, picks: np.ndarray, classes: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for rank, k in enumerate(picks, 1):
        c = scored.candidates[k]
        rows.append({
            "rank": rank, "path": c.path or "", "index": "" if c.index is None else c.index,
            "predicted": classes[int(scored.predicted[k])], "confidence": f"{scored.confidence[k]:.4f}",
            "margin": f"{scored.margin[k]:.4f}", "disagreement": f"{scored.disagreement[k]:.4f}",
            "class_boost": f"{scored.class_boost[k]:.4f}", "score": f"{scored.score[k]:.4f}",
        })
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(path, write)


def write_sheet(path: Path, scored: Scored, picks: np.ndarray, classes: Sequence[str]) -> None:
    captions = [f"#{r}: {classes[int(scored.predicted[k])]}\n{100 * scored.confidence[k]:.0f}% score {scored.score[k]:.2f}" for r, k in enumerate(picks, 1)]
    sheet = contact_sheet([scored.images[k] for k in picks], captions)
    write_atomically(path, lambda tmp: sheet.save(tmp, format="PNG"))


def write_labels(path: Path, labeled: np.ndarray, chosen: Sequence[int]) -> np.ndarray:
    indices = np.union1d(np.asarray(labeled, dtype=np.int64), np.asarray(chosen, dtype=np.int64))
    write_atomically(path, lambda tmp: save_split(tmp, indices))
    return indices


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    doc = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        prog="python -m ignite_fixmatch.suggest",
        description="Rank unlabeled images by how much a label would help (uncertain, unstable under the strong "
        "augmentation, of under-represented classes) and pick N diverse ones to label next.",
        epilog="examples:\n" + doc[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a .pt file written by training, or a run folder (its newest checkpoint)")
    parser.add_argument("--n", type=_positive, default=100, help="images to suggest (default 100)")
    parser.add_argument("--out", type=Path, required=True, help="the CSV to write (refused if it exists, unless --overwrite)")
    parser.add_argument("--sheet", type=Path, help="contact sheet PNG of the chosen images (default: --out with .png)")
    parser.add_argument("--labels-out", type=Path, help="write the run's labeled indices plus the chosen ones (the next run's data.labels_file)")
    parser.add_argument("--unlabeled", type=Path, help="rank every image under this folder instead of the run's unlabeled images")
    parser.add_argument("--allow-mismatch", action="store_true", help="--unlabeled: skip the checks that the folder looks like this model's data")
    parser.add_argument("--data-root", help="where the run's data set is now (default: data.root of the checkpoint's config)")
    parser.add_argument("--model", choices=tuple(MODEL_KEYS), help="which weights: ema (default when saved) or raw")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available, else cpu")
    parser.add_argument("--seed", type=_non_negative, default=0, help="seed of the strong-view draws (default 0)")
    parser.add_argument("--strong-draws", type=_non_negative, default=2, help="strong views per image for the disagreement (default 2; 0: off)")
    parser.add_argument("--w-margin", type=_weight, default=Weights.margin, help=f"weight of 1 - margin (default {Weights.margin})")
    parser.add_argument("--w-disagreement", type=_weight, default=Weights.disagreement, help=f"weight of the disagreement (default {Weights.disagreement})")
    parser.add_argument("--w-class", type=_weight, default=Weights.classes, help=f"weight of the rare-class boost (default {Weights.classes})")
    parser.add_argument("--confident", type=_fraction, default=0.95, help="probability a prediction needs to count in the class shares (default 0.95)")
    parser.add_argument("--pool-factor", type=_positive, default=5, help="the diverse picks come from the top pool-factor x n by score (default 5)")
    parser.add_argument("--batch-size", type=_positive, default=256, help="images per forward pass (default 256)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser.parse_args(argv)


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not np.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _weight(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return value


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def progress(done: int, total: int) -> None:
    if sys.stderr.isatty():
        print(f"\rscored {done}/{total} images", end="\n" if done >= total else "", file=sys.stderr, flush=True)


def suggest(args: argparse.Namespace) -> str:
    """Everything after the option parsing; returns the summary line. Raises the USER_ERRORS and SuggestError."""
    weights = Weights(args.w_margin, args.w_disagreement, args.w_class)
    if weights.margin + weights.disagreement + weights.classes == 0:
        raise SuggestError("--w-margin, --w-disagreement and --w-class are all 0: give at least one a positive weight.")
    if args.labels_out is not None and args.unlabeled is not None:
        raise SuggestError("--labels-out writes training-set indices, which images of --unlabeled DIR have none: move the chosen files "
                           "into train/<class>/ instead, or drop --unlabeled.")
    sheet = args.sheet if args.sheet is not None else args.out.with_suffix(".png")
    outputs = {"--out": args.out, "--sheet": sheet, **({"--labels-out": args.labels_out} if args.labels_out is not None else {})}
    if len({p.resolve() for p in outputs.values()}) < len(outputs):
        raise SuggestError(f"two outputs are the same file ({', '.join(f'{k} {str(v)!r}' for k, v in outputs.items())}); give each its own name.")
    for option, path in outputs.items():
        check_output(path, option, args.overwrite)

    model = load_for_inference(args.checkpoint, model=args.model, device=args.device, data_root=args.data_root)
    if args.unlabeled is not None:
        candidates, labeled = folder_candidates(model, args.unlabeled, not args.allow_mismatch), None
    else:
        candidates, labeled = run_candidates(model)
    scored = score_candidates(
        model, candidates, seed=args.seed, strong_draws=args.strong_draws, weights=weights, confident=args.confident,
        batch_size=args.batch_size, warn=warn, progress=progress,
    )
    picks = select_diverse(scored.score, scored.features, args.n, args.pool_factor)
    if len(picks) < min(args.n, len(scored.candidates)):
        warn(f"only {len(picks)} of the top {args.pool_factor * args.n} images are not duplicates of each other; raise --pool-factor for more.")
    write_csv(args.out, csv_rows(scored, picks, model.classes))
    write_sheet(sheet, scored, picks, model.classes)
    summary = (f"suggested {len(picks)} of {len(scored.candidates)} images ({model.which} model of {str(model.path)!r}): "
               f"{args.out} and {sheet}")
    if args.labels_out is not None:
        chosen = [scored.candidates[k].index for k in picks if scored.candidates[k].index is not None]
        if len(chosen) < len(picks):
            warn(f"{len(picks) - len(chosen)} chosen images are from data.unlabeled_dir and have no training-set index: they are "
                 f"not in {str(args.labels_out)!r}; label them by moving the files into train/<class>/.")
        total = write_labels(args.labels_out, labeled, chosen)
        summary += f"; {args.labels_out}: {len(total)} labeled indices (use it as data.labels_file)"
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        print(suggest(args))
    except (*USER_ERRORS, SuggestError) as e:
        print("error: " + error_line(e), file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
