"""Start-up time and memory with a huge unlabeled folder: ``python -m benchmarks.large_folder [--n 1000000]``.

Builds a folder data set whose unlabeled part has ``n`` images (hard links to one small PNG, so it
costs inodes, not disk), then runs the real command line for 2 iterations and reports the time to
the end of the run and the peak memory of the training process, next to the same run with a small
unlabeled folder. Start-up should be dominated by scanning the file names, and memory should grow
only by the compact file list (about name length + 8 bytes per file).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def make_dataset(root: Path, n_unlabeled: int, per_folder: int = 10_000) -> Path:
    """train/ and test/ with 2 classes of 4 images, and unlabeled/ with n images (hard links to a few PNGs)."""
    for split in ("train", "test"):
        for c, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (16, 16), colour).save(folder / f"{i}.png")
    png = (root / "train" / "a" / "0.png").read_bytes()
    for start in range(0, n_unlabeled, per_folder):
        folder = root / "unlabeled" / f"{start // per_folder:05d}"
        folder.mkdir(parents=True)
        source = folder / f"{start:07d}.png"  # one real file per folder: a file takes at most 65,000 links
        source.write_bytes(png)
        for i in range(start + 1, min(start + per_folder, n_unlabeled)):
            os.link(source, folder / f"{i:07d}.png")
    return root


def run_cli(data: Path, out: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of a 2-iteration run of the real command line."""
    args = [
        sys.executable, "-m", "ignite_fixmatch.main", "configs/quickstart.yaml", "data.name=folder", f"data.root={data}",
        "data.unlabeled_dir=unlabeled", "data.num_labels=-1", "data.batch_size=8", "data.mu=2", "data.eval_batch_size=8",
        "data.image_size=16", "data.num_workers=0", "train.num_iters=2", f"output_dir={out}", "handlers=[]",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, max(peak, before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="unlabeled images in the large folder")
    parser.add_argument("--small", type=int, default=10_000, help="unlabeled images in the comparison folder")
    args = parser.parse_args()
    print(f"# python -m benchmarks.large_folder --n {args.n}   ({os.cpu_count()} cores)")
    print(f"{'unlabeled images':>18}  {'make folder':>12}  {'2-iteration run':>16}  {'peak RSS':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.small, args.n):  # small first: the children's peak RSS only grows
            t0 = time.perf_counter()
            data = make_dataset(Path(tmp) / f"data{n}", n)
            made = time.perf_counter() - t0
            seconds, rss = run_cli(data, Path(tmp) / f"run{n}")
            print(f"{n:>18,}  {made:>10.1f} s  {seconds:>14.1f} s  {rss:>7.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
