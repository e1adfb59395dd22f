"""Do the labels ``suggest`` picks help more than as many random ones? The digits quick start, per seed:

    python -m benchmarks.suggest_vs_random [--seeds 0 1 2] [--out-dir runs/suggest_vs_random] [--quick]

1. base: ``configs/quickstart.yaml`` with ``seed=S data.split_seed=S`` (50 labels, 5 per class, 1000 iterations);
2. +50 suggest: ``python -m ignite_fixmatch.suggest`` on the base run's checkpoint, ``--n 50 --labels-out``;
   +50 random: 50 of the base run's not-labeled training images, drawn by ``numpy.random.default_rng(S)``;
3. both trained from scratch (same seed, same 1000 iterations) with their 100 labels as ``data.labels_file``.

Every run is the real command line in its own process. The table gives the EMA model's final top-1 on the
360 test images (results.json "top1") per seed, and mean +- std (sample) over seeds; it is printed and,
unless ``--quick``, written to benchmarks/results/cpu-epyc-2core-2026-12-03/suggest_vs_random.md.
``--quick`` (30 iterations, seed 0, results not written) checks that the pipeline runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "cpu-epyc-2core-2026-12-03" / "suggest_vs_random.md"
CONFIG = "configs/quickstart.yaml"
EXTRA = 50
ARMS = ("base (50 labels)", "+50 random", "+50 suggest")


THREADS = "1"  # per run: a shared 2-core machine slows a 2-thread run several times over (threads wait on each other)


def run(args: list[str]) -> None:
    """One real command line, in this tree, on THREADS threads; its error output on failure."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=THREADS)
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} exited {result.returncode}:\n{result.stderr[-3000:]}")


def train(out: Path, seed: int, iters: int, *extra: str) -> float:
    """A quick-start run; its final EMA top-1. A finished run is reused, so an interrupted benchmark can go on
    (results.json is written at every evaluation: only one at the last iteration counts)."""
    results = out / "results.json"
    if not results.is_file() or json.loads(results.read_text())["iteration"] != iters:
        run(["ignite_fixmatch.main", CONFIG, f"seed={seed}", f"data.split_seed={seed}", f"train.num_iters={iters}",
             f"output_dir={out}", "overwrite=true", *extra])
    final = json.loads(results.read_text())
    if final["iteration"] != iters:
        raise RuntimeError(f"{out}: results.json is of iteration {final['iteration']}, not the last ({iters})")
    return float(final["top1"])


def random_labels(base: Path, seed: int, path: Path, num_train: int) -> None:
    """The base run's labeled indices plus EXTRA drawn at random from the rest of the training set."""
    labeled = np.loadtxt(base / "labeled_indices.txt", dtype=np.int64)
    rest = np.setdiff1d(np.arange(num_train), labeled)
    extra = np.random.default_rng(seed).choice(rest, EXTRA, replace=False)
    path.write_text("\n".join(str(int(i)) for i in np.union1d(labeled, extra)) + "\n")


def one_seed(seed: int, out_dir: Path, iters: int) -> dict[str, float]:
    from ignite_fixmatch.config import load_config
    from ignite_fixmatch.data import sources_from_config

    num_train = len(sources_from_config(load_config(CONFIG)).train)
    base = out_dir / f"base_s{seed}"
    scores = {ARMS[0]: train(base, seed, iters)}
    suggested, picked = out_dir / f"labels_suggest_s{seed}.txt", out_dir / f"labels_random_s{seed}.txt"
    if not suggested.is_file():
        run(["ignite_fixmatch.suggest", str(base), "--n", str(EXTRA), "--out", str(out_dir / f"suggest_s{seed}.csv"),
             "--labels-out", str(suggested), "--seed", str(seed), "--overwrite"])
    if not picked.is_file():
        random_labels(base, seed, picked, num_train)
    scores[ARMS[1]] = train(out_dir / f"random_s{seed}", seed, iters, f"data.labels_file={picked}")
    scores[ARMS[2]] = train(out_dir / f"suggest_s{seed}", seed, iters, f"data.labels_file={suggested}")
    print(f"seed {seed}: " + ", ".join(f"{k} {v:.2f} %" for k, v in scores.items()), file=sys.stderr, flush=True)
    return scores


def table(per_seed: dict[int, dict[str, float]]) -> str:
    seeds = list(per_seed)
    lines = ["| labels | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |", "|---|" + "---:|" * (len(seeds) + 1)]
    for arm in ARMS:
        values = [per_seed[s][arm] for s in seeds]
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        lines.append(f"| {arm} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {statistics.mean(values):.2f}{spread} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "suggest_vs_random")
    parser.add_argument("--quick", action="store_true", help="30 iterations, seed 0, nothing written to benchmarks/results")
    args = parser.parse_args(argv)
    iters, seeds = (30, [0]) if args.quick else (1000, args.seeds)
    out_dir = args.out_dir / ("quick" if args.quick else "full")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    per_seed = {s: one_seed(s, out_dir, iters) for s in seeds}
    wall = time.perf_counter() - start
    text = "\n".join([
        f"# python -m benchmarks.suggest_vs_random{' --quick' if args.quick else ''} --seeds {' '.join(map(str, seeds))}",
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}, {THREADS} thread per run, wall {wall / 60:.1f} min for {3 * len(seeds)} runs of {iters} iterations "
        f"(+ {len(seeds)} suggest)",
        "# digits quick start: EMA top-1 (%) on the 360 test images after training from scratch with each labeled set",
        "",
        table(per_seed),
        "",
    ])
    print(text)
    if not args.quick:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(text)


if __name__ == "__main__":
    main()
