"""Write scikit-learn's digits (the quick start's data) as PNG files, to try the after-training commands.

    python -m examples.digits_as_files digits_png          # digits_png/test/<digit>/test_<i>.png (360 files)
    python -m examples.digits_as_files digits_png --split both

The files are the quick start's own split (``ignite_fixmatch.datasets.digits``), 8 x 8 grayscale, so
``python -m ignite_fixmatch.predict runs/quickstart digits_png/test --out predictions.csv`` scores
exactly the images that evaluation scored: its top-1 over these files is the run's test top-1. The
``<split>/<digit>/`` layout is also an image-folder data set (``data.name=folder``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from ignite_fixmatch.datasets.digits import digits_split


def write_digits(out: Path, splits: tuple[str, ...]) -> int:
    """PNG files ``out/<split>/<digit>/<split>_<index>.png``; the index is the image's place in its split."""
    d = load_digits()
    images = np.rint(np.asarray(d.images, dtype=np.float64) * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
    train_idx, test_idx = digits_split(np.asarray(d.target))
    written = 0
    for split in splits:
        for i, k in enumerate(train_idx if split == "train" else test_idx):
            folder = out / split / str(int(d.target[k]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[k], "L").save(folder / f"{split}_{i:04d}.png")
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the digits data set as PNG files in <split>/<class>/ folders.")
    parser.add_argument("out", type=Path, help="output folder (created)")
    parser.add_argument("--split", choices=("test", "train", "both"), default="test")
    args = parser.parse_args()
    splits = ("train", "test") if args.split == "both" else (args.split,)
    print(f"wrote {write_digits(args.out, splits)} images under {args.out}")


if __name__ == "__main__":
    main()
