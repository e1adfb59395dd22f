"""How accuracy grows with labels, per algorithm of the FixMatch family: the digits quick start, 3 seeds.

    python -m benchmarks.label_curve [--quick] [--jobs 2] [--methods a,b] [--labels 20,50,100,50r10] [--seeds 0,1,2]

Every run is ``configs/quickstart.yaml`` (its budget: 1,000 iterations) with overrides only, through the real
command line in its own process on one torch thread: ``seed=S data.split_seed=S data.num_labels=L`` plus the
method's overrides (``METHODS``); the column ``50r10`` adds ``data.imbalance_ratio=10`` at 50 labels (the
labels stay balanced, the unlabeled set is long-tailed: the last class keeps a tenth of the first's). A cell of
the table is the final EMA top-1 on the 360 test digits (results.json "top1", model "ema", at the last
iteration) as mean ± sample std (min–max) over seeds; the plot draws the balanced columns (mean, shaded
min..max). A run that fails is reported (the last line of its error output) and the sweep goes on.

Run folders are kept (``--out-dir``): a finished run whose saved config is the one asked for is reused, an
unfinished one resumes from its last checkpoint, so an interrupted sweep continues where it stopped.
Outputs, in ``--results-dir``: ``label_curve.{md,json,png}`` for the full grid at the full budget,
``label_curve_quick.*`` for ``--quick`` (1 seed, 50 labels balanced and ratio 10, QUICK_ITERS iterations: its
numbers are not the table's), ``label_curve_partial.*`` for any other subset or budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from ignite_fixmatch.checkpoint_names import checkpoint_iteration, newest_checkpoint
from ignite_fixmatch.config import ConfigError, dump_yaml, load_config
from ignite_fixmatch.errors import error_line
from ignite_fixmatch.output_files import write_atomically

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results" / "cpu-epyc-2core-2026-12-03"
CONFIG = "configs/quickstart.yaml"
THREADS = "1"  # per run: on a shared 2-core machine, parallel 1-thread runs beat 2-thread runs one after another
QUICK_ITERS = 200  # --quick: 12 runs; their CPU time and wall on the 2-core EPYC are in the README
NOT_COMPARED = ("resume", "overwrite")  # how a run was started, not what it trains


@dataclass(frozen=True)
class Method:
    slug: str  # for --methods and run folder names
    name: str  # for the table and the plot
    overrides: tuple[str, ...]


METHODS = (
    Method("labels-only", "labels only", ("algorithm.lambda_u=0",)),
    Method("fixmatch-ra", "FixMatch (RA)", ()),
    Method("fixmatch-cta", "FixMatch (CTA)", ("data.randaugment=ctaugment",)),
    Method("flexmatch", "FlexMatch", ("algorithm.name=flexmatch",)),
    Method("freematch", "FreeMatch", ("algorithm.name=freematch",)),
    Method("fixmatch-da", "FixMatch+DA", ("algorithm.distribution_alignment=true",)),
)


@dataclass(frozen=True)
class Column:
    key: str  # for --labels and run folder names
    labels: int
    imbalance_ratio: int | None = None

    @property
    def title(self) -> str:
        return f"{self.labels} labels" + ("" if self.imbalance_ratio is None else f", ratio {self.imbalance_ratio}")


COLUMNS = (Column("20", 20), Column("50", 50), Column("100", 100), Column("50r10", 50, 10))


@dataclass(frozen=True)
class Spec:
    """One run of the sweep."""

    method: Method
    column: Column
    seed: int
    iters: int | None  # None: the quick start's own budget

    @property
    def name(self) -> str:
        return f"{self.method.slug}_{self.column.key}_s{self.seed}"

    def overrides(self, out: Path) -> list[str]:
        extra = [] if self.column.imbalance_ratio is None else [f"data.imbalance_ratio={self.column.imbalance_ratio}"]
        budget = [] if self.iters is None else [f"train.num_iters={self.iters}"]
        return [f"seed={self.seed}", f"data.split_seed={self.seed}", f"data.num_labels={self.column.labels}", *extra, *budget,
                *self.method.overrides, f"output_dir={out}"]


@dataclass
class Outcome:
    """What one run gave: its final EMA top-1 (%), or why it failed."""

    method: str
    labels: int
    imbalance_ratio: int | None
    seed: int
    output_dir: str
    top1: float | None = None
    best_top1: float | None = None
    median20_top1: float | None = None
    error: str | None = None
    wall_s: float | None = None  # of the training command (of its last part if it was resumed); None: failed before it, or unknown
    reused: bool = False  # trained by an earlier invocation


# ---------------------------------------------------------------- one run


def comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in NOT_COMPARED}


def final_results(out: Path, num_iters: int) -> dict | None:
    """results.json of a finished run (it is rewritten at every evaluation: only the last iteration's counts)."""
    path = out / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    return results if results["iteration"] == num_iters else None


def last_error_line(stderr: str, returncode: int) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"exited {returncode} with no error output"


def run(spec: Spec, out_root: Path) -> Outcome:
    """Train one run through the real command line, or reuse the finished run in its folder."""
    out = out_root / spec.name
    outcome = Outcome(spec.method.name, spec.column.labels, spec.column.imbalance_ratio, spec.seed, str(out))
    overrides = spec.overrides(out)
    try:
        cfg = load_config(ROOT / CONFIG, overrides)
    except ConfigError as e:  # a method whose keys do not exist (yet): no process to start
        outcome.error = error_line(e)
        return outcome
    saved, timing = out / "config.yaml", out_root / f"{spec.name}.timing.json"
    same = saved.is_file() and comparable(yaml.safe_load(saved.read_text())) == comparable(yaml.safe_load(dump_yaml(cfg)))
    results = final_results(out, cfg.train.num_iters) if same else None
    if results is None:
        newest = newest_checkpoint(out) if same else None  # an interrupted run goes on from its last checkpoint
        start = "resume=auto" if newest is not None and checkpoint_iteration(newest) < cfg.train.num_iters else "overwrite=true"
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "ignite_fixmatch.main", CONFIG, *overrides, start], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        outcome.wall_s = time.perf_counter() - t0
        if proc.returncode != 0:
            outcome.error = last_error_line(proc.stderr, proc.returncode)
            return outcome
        results = final_results(out, cfg.train.num_iters)
        if results is None:
            outcome.error = f"{out / 'results.json'} is missing or not of the last iteration ({cfg.train.num_iters})"
            return outcome
        timing.write_text(json.dumps({"wall_s": round(outcome.wall_s, 1), "resumed": start == "resume=auto"}))
    else:
        outcome.reused = True
        outcome.wall_s = json.loads(timing.read_text())["wall_s"] if timing.is_file() else None
    if results["model"] != "ema":
        outcome.error = f"results.json reports the {results['model']!r} model, not the EMA model"
        return outcome
    outcome.top1, outcome.best_top1, outcome.median20_top1 = results["top1"], results["best_top1"], results["median20_top1"]
    return outcome


def sweep(specs: Sequence[Spec], out_root: Path, jobs: int, trainer: Callable[[Spec, Path], Outcome] | None = None) -> list[Outcome]:
    """Every spec, ``jobs`` at a time; outcomes in the order of ``specs``, each reported on stderr as it ends."""
    trainer = trainer or run
    out_root.mkdir(parents=True, exist_ok=True)
    outcomes: dict[int, Outcome] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(trainer, spec, out_root): k for k, spec in enumerate(specs)}
        for done, future in enumerate(as_completed(futures), 1):
            k = futures[future]
            o = outcomes[k] = future.result()
            what = f"failed: {o.error}" if o.error else f"{o.top1:.2f} %" + (" (reused)" if o.reused else f" ({o.wall_s / 60:.1f} min)")
            print(f"[{done}/{len(specs)}] {specs[k].name}: {what}", file=sys.stderr, flush=True)
    return [outcomes[k] for k in range(len(specs))]


# ---------------------------------------------------------------- the table and the plot


def cell(values: Sequence[float], failed: int) -> str:
    """mean ± std (min–max) over seeds; one seed: its value; 'failed' when every run failed."""
    if not values:
        return "failed" if failed else ""
    if len(values) == 1:
        text = f"{values[0]:.2f}"
    else:
        text = f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} ({min(values):.2f}–{max(values):.2f})"
    return text + (f", {failed} failed" if failed else "")


def grouped(outcomes: Sequence[Outcome], method: Method, column: Column) -> tuple[list[float], int]:
    """The top-1 values of one cell's runs and how many of them failed."""
    runs = [o for o in outcomes if (o.method, o.labels, o.imbalance_ratio) == (method.name, column.labels, column.imbalance_ratio)]
    return [o.top1 for o in runs if o.top1 is not None], sum(o.error is not None for o in runs)


def table(outcomes: Sequence[Outcome], methods: Sequence[Method], columns: Sequence[Column]) -> str:
    lines = ["| method | " + " | ".join(c.title for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for m in methods:
        lines.append(f"| {m.name} | " + " | ".join(cell(*grouped(outcomes, m, c)) for c in columns) + " |")
    failures = [o for o in outcomes if o.error]
    if failures:
        lines += ["", "Failed runs (the last line of each one's error output):", ""]
        lines += [f"- {o.method}, {o.labels} labels{'' if o.imbalance_ratio is None else f' (ratio {o.imbalance_ratio})'}, "
                  f"seed {o.seed}: `{o.error}`" for o in failures]
    return "\n".join(lines)


def plot(outcomes: Sequence[Outcome], methods: Sequence[Method], columns: Sequence[Column], title: str, footer: str):
    """The balanced columns: mean top-1 per method, shaded min..max over seeds (a cell without results is skipped)."""
    from ignite_fixmatch.charts import line_chart

    balanced = [c for c in columns if c.imbalance_ratio is None]
    series, bands = {}, {}
    for m in methods:
        cells = [grouped(outcomes, m, c)[0] for c in balanced]
        series[m.name] = [statistics.mean(v) if v else math.nan for v in cells]
        bands[m.name] = [(min(v), max(v)) if v else (math.nan, math.nan) for v in cells]
    seeds = sorted({o.seed for o in outcomes})
    # ASCII only: PIL's bundled font has no en dash
    subtitle = f"mean over seeds {', '.join(map(str, seeds))}; shaded: lowest to highest seed" if len(seeds) > 1 else f"seed {seeds[0]}"
    return line_chart([str(c.labels) for c in balanced], series, bands, title=title, x_title="labeled images (balanced)",
                      y_title="EMA top-1 (%)", subtitle=subtitle, footer=footer)


# ---------------------------------------------------------------- the command


def machine() -> str:
    from importlib.metadata import version

    from benchmarks.sections.machine import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores, torch {version('torch')}, {time.strftime('%Y-%m-%d')}"


def pick(text: str | None, choices: dict[str, object], what: str, default: Sequence[object]) -> list:
    if text is None:
        return list(default)
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in choices]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(f"{what}: unknown {', '.join(map(repr, unknown)) or 'empty list'}; choose from {', '.join(choices)}")
    return [choices[k] for k in keys]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.label_curve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"seed 0, 50 labels (balanced and ratio 10), {QUICK_ITERS} iterations")
    parser.add_argument("--methods", help=f"comma-separated, of {','.join(m.slug for m in METHODS)} (default: all)")
    parser.add_argument("--labels", help=f"comma-separated columns, of {','.join(c.key for c in COLUMNS)} (default: all)")
    parser.add_argument("--seeds", help="comma-separated (default 0,1,2)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, each on one torch thread (default 2)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "label_curve", help="where the run folders are kept")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the table, raw JSON and plot go")
    parser.add_argument("--iters", type=int, help=argparse.SUPPRESS)  # development: a reduced budget, to check the mechanics
    args = parser.parse_args(argv)
    try:
        args.methods = pick(args.methods, {m.slug: m for m in METHODS}, "--methods", METHODS)
        columns = {c.key: c for c in COLUMNS}
        args.labels = pick(args.labels, columns, "--labels", [columns["50"], columns["50r10"]] if args.quick else COLUMNS)
        seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",") if s.strip()]
    except (argparse.ArgumentTypeError, ValueError) as e:
        parser.error(str(e))
    args.seeds = seeds or ([0] if args.quick else [0, 1, 2])
    if args.jobs < 1 or (args.iters is not None and args.iters < 1):
        parser.error("--jobs and --iters must be at least 1")
    args.iters = args.iters or (QUICK_ITERS if args.quick else None)
    full = (args.methods, args.labels, args.seeds, args.iters) == (list(METHODS), list(COLUMNS), [0, 1, 2], None)
    args.stem = "label_curve_quick" if args.quick else "label_curve" if full else "label_curve_partial"
    return args


def write_outputs(stem: Path, text: str, raw: dict, image) -> None:
    """Each file whole (a temporary file renamed into place): an interrupted write leaves the previous one."""
    write_atomically(stem.with_suffix(".md"), lambda p: p.write_text(text, encoding="utf-8"))
    write_atomically(stem.with_suffix(".json"), lambda p: p.write_text(json.dumps(raw, indent=2, ensure_ascii=False), encoding="utf-8"))
    if image is not None:
        write_atomically(stem.with_suffix(".png"), lambda p: image.save(p, format="PNG"))


def summary(outcomes: Sequence[Outcome], wall: float, jobs: int) -> tuple[str, str]:
    """The machine and the time, long (the table) and short (the plot's footer): this invocation's wall, and the
    finished runs' own walls (reused ones as they were measured when trained)."""
    trained = sum(not o.reused and o.wall_s is not None for o in outcomes)
    walls = [o.wall_s for o in outcomes if o.top1 is not None and o.wall_s is not None]
    finished = sum(o.top1 is not None for o in outcomes)
    long = (f"{machine()}; {jobs} runs at a time, {THREADS} thread each; {finished} runs finished, {sum(walls) / 60:.1f} min of run time "
            f"({len(walls)} timed); this invocation: wall {wall / 60:.1f} min, {trained} runs trained, {len(outcomes) - trained} reused or failed early")
    short = f"{machine()}; {jobs} runs at a time x {THREADS} thread; wall {wall / 60:.1f} min, {trained} of {len(outcomes)} runs trained"
    return long, short


def main(argv: Sequence[str] | None = None) -> list[Outcome]:
    args = parse_args(argv)
    command = " ".join(["python -m benchmarks.label_curve", *(sys.argv[1:] if argv is None else argv)])
    args.results_dir.mkdir(parents=True, exist_ok=True)
    specs = [Spec(m, c, s, args.iters) for c in args.labels for m in args.methods for s in args.seeds]
    out_root = args.out_dir.resolve() / ("full" if args.iters is None else f"iters{args.iters}")
    start = time.perf_counter()
    outcomes = sweep(specs, out_root, args.jobs)
    footer, short = summary(outcomes, time.perf_counter() - start, args.jobs)
    iters = args.iters or load_config(ROOT / CONFIG).train.num_iters
    budget = f"{iters:,} iterations" + ("" if args.iters else " (the quick start's budget)")
    lines = [
        f"# Label efficiency on the digits quick start: `{command}`",
        "",
        f"{footer}.",
        "",
        f"Each run: `{CONFIG}` with {budget}, `seed=S data.split_seed=S`, `data.num_labels` as the column (ratio 10: "
        "`data.imbalance_ratio=10`, a long-tailed unlabeled set) and the method's overrides. A cell is the EMA model's top-1 (%) on the "
        "360 test digits at the last iteration: "
        + (f"mean ± sample std (min–max) over seeds {', '.join(map(str, args.seeds))}." if len(args.seeds) > 1 else f"seed {args.seeds[0]}."),
    ]
    if args.iters is not None:
        lines += ["", f"**Not the benchmark's numbers**: a shortened check ({budget}). The table is `python -m benchmarks.label_curve`."]
    text = "\n".join([*lines, "", table(outcomes, args.methods, args.labels), ""])
    raw = {"command": command, "footer": footer, "config": CONFIG, "iters": iters, "jobs": args.jobs,
           "threads_per_run": int(THREADS), "runs": [asdict(o) for o in outcomes]}
    balanced = any(c.imbalance_ratio is None for c in args.labels)
    image = plot(outcomes, args.methods, args.labels, "Digits quick start: EMA top-1 against labels", short) if balanced else None
    stem = args.results_dir / args.stem
    write_outputs(stem, text, raw, image)
    print(text)
    print(f"wrote {stem}.md, .json{', .png' if image else ''}", file=sys.stderr)
    return outcomes


if __name__ == "__main__":
    main()
