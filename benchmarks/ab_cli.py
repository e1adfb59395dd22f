"""Before/after speed of the real CLI: this working tree against another git revision, in one run.

    python -m benchmarks.ab_cli --against 0cec89f [--rounds 3] [--iters 400] [--config configs/quickstart.yaml]

The other revision is checked out into a temporary git worktree. The two trees' CLIs run the same
config alternately (A B A B ...: a shared machine's load hits both alike), each in a fresh process
with one thread per core as the tests use; the rate is read from the progress handler's log lines
(iterations per second over each 100-iteration window), the first window (warm-up) left out. Prints
one table: median and range of it/s per tree, and the ratio.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import Table, fmt_rate

ROOT = Path(__file__).resolve().parent.parent
RATE = re.compile(r"iteration (\d+)/\d+ .* ([0-9.]+) it/s")


def rates(tree: Path, config: str, iters: int, out: Path) -> list[float]:
    """it/s of each progress window after the first, from one real CLI run in ``tree``."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "ignite_fixmatch.main", config, f"train.num_iters={iters}", f"output_dir={out}"]
    result = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"{tree}: exit {result.returncode}\n{result.stderr[-2000:]}")
    found = [(int(i), float(r)) for i, r in RATE.findall(result.stderr)]
    return [r for i, r in found if i > found[0][0]] if found else []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="git revision to compare with (e.g. the commit before a change)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=400)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "other"
        subprocess.run(["git", "worktree", "add", "--detach", str(other), args.against], cwd=ROOT, check=True, capture_output=True)
        try:
            trees = {"this tree": ROOT, args.against: other}
            got: dict[str, list[float]] = {name: [] for name in trees}
            for r in range(args.rounds):
                for name, tree in trees.items():
                    got[name] += rates(tree, args.config, args.iters, Path(tmp) / f"run-{r}-{len(got[name])}-{tree.name}")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, capture_output=True)
    section = f"{args.config}, {args.iters} iterations x {args.rounds} rounds, alternating"
    table = Table()
    for name, values in got.items():
        table.add(section, name, fmt_rate(values, "it/s", digits=2), f"{len(values)} windows of 100 iterations")
    base, new = (statistics.median(v) for v in (got[args.against], got["this tree"]))
    table.add(section, f"this tree / {args.against}", f"{new / base:.3f}")
    print(table.render())


if __name__ == "__main__":
    main()
