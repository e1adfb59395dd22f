"""benchmarks.label_curve (the label-efficiency sweep) and charts.line_chart, its plot: the drawing pixel by
pixel, the table from per-run results, the command line, and one real tiny sweep through the real CLI."""

from __future__ import annotations

import io
import json
import math
import subprocess

import numpy as np
import pytest
import yaml
from PIL import Image

from benchmarks import label_curve
from benchmarks.label_curve import COLUMNS, METHODS, Method, Outcome, Spec
from ignite_fixmatch.charts import BAND_ALPHA, SERIES_COLOURS, line_chart
from ignite_fixmatch.config import dump_yaml, load_config

A, B = SERIES_COLOURS[0], SERIES_COLOURS[1]


def blended(colour, under=255) -> np.ndarray:
    """The series colour at BAND_ALPHA over ``under`` (white, or a gridline)."""
    a = BAND_ALPHA / 255
    return np.asarray(colour) * a + np.asarray(under, dtype=float) * (1 - a)


def chart(b_values, bands=True) -> np.ndarray:
    series = {"a": [80.0, 85.0, 90.0], "b": b_values}
    spread = {"a": [(78.0, 82.0), (83.0, 87.0), (88.0, 92.0)], "b": [(v - 2, v + 2) for v in b_values]} if bands else None
    image = line_chart(["20", "50", "100"], series, spread, title="t", x_title="labels", y_title="top-1", subtitle="s", footer="f")
    return np.asarray(image)


def pixels_of(image: np.ndarray, colour, tolerance: float = 1.5) -> np.ndarray:
    """(y, x) of the pixels of that colour."""
    return np.argwhere(np.abs(image.astype(float) - np.asarray(colour, dtype=float)).max(axis=2) <= tolerance)


def test_line_chart_shades_each_band_in_its_series_colour_over_white():
    with_bands, without = chart([40.0, 42.0, 45.0]), chart([40.0, 42.0, 45.0], bands=False)
    assert with_bands.shape == without.shape and with_bands.shape[0] > 300 and with_bands.shape[1] > 600
    changed = np.argwhere((with_bands != without).any(axis=2))
    assert len(changed) > 5000  # two bands of a few tens of pixels over the plot's width
    colours, under = with_bands[tuple(changed.T)].astype(float), without[tuple(changed.T)]
    is_a = np.abs(colours - blended(A, under)).max(axis=1) <= 1.5
    is_b = np.abs(colours - blended(B, under)).max(axis=1) <= 1.5
    assert (is_a | is_b).all()  # every shaded pixel is one series' colour over what lay there (white or a gridline)
    assert is_a.sum() > 1000 and is_b.sum() > 1000 and (under != 255).any()
    assert changed[is_a][:, 0].max() < changed[is_b][:, 0].min()  # a (80-92 %) above b (38-47 %)


def test_line_chart_skips_a_missing_value_instead_of_drawing_it_at_zero():
    def middle_has_b(image: np.ndarray) -> bool:
        a_x = pixels_of(image, blended(A))[:, 1]
        x0, x1 = a_x.min(), a_x.max()  # a's band spans the first to the last position (the legend, further right, has none)
        span = x1 - x0
        for colour in (B, blended(B)):
            xs = pixels_of(image, colour)[:, 1]
            if ((xs > x0 + span / 4) & (xs < x1 - span / 4)).any():
                return True
        return False

    missing = chart([40.0, math.nan, 45.0])
    assert middle_has_b(chart([40.0, 42.0, 45.0]))  # the check sees a drawn middle point
    assert not middle_has_b(missing)
    assert len(pixels_of(missing, B)) > 20  # its other points are drawn
    assert np.array_equal(missing, chart([40.0, math.nan, 45.0]))


def test_line_chart_png_is_deterministic_and_refuses_mismatched_series():
    def png() -> bytes:
        buf = io.BytesIO()
        line_chart(["20", "50"], {n: [50.0 + k, 60.0 + k] for k, n in enumerate("abcdefg")}, title="t", x_title="x", y_title="y").save(buf, "PNG")
        return buf.getvalue()

    first = png()
    assert first == png() and Image.open(io.BytesIO(first)).size[0] > 600
    with pytest.raises(ValueError, match="one value"):
        line_chart(["20", "50"], {"a": [1.0]}, title="t", x_title="x", y_title="y")


def outcome(method: str, labels: int, seed: int, top1: float | None, ratio: int | None = None, error: str | None = None) -> Outcome:
    return Outcome(method, labels, ratio, seed, f"runs/{method}_{labels}_{seed}", top1=top1, error=error, wall_s=60.0)


def test_table_cells_are_mean_std_min_max_and_failures_are_named():
    ra, cta = METHODS[1], METHODS[2]
    outcomes = [outcome(ra.name, 20, s, v) for s, v in enumerate((90.0, 92.0, 94.0))]
    outcomes += [outcome(ra.name, 50, 0, 95.0), outcome(ra.name, 50, 1, None, error="DataError: boom")]
    outcomes += [outcome(cta.name, 20, s, None, error="ConfigError: data.randaugment") for s in range(3)]
    outcomes += [outcome(ra.name, 50, 0, 80.5, ratio=10)]
    text = label_curve.table(outcomes, [ra, cta], [COLUMNS[0], COLUMNS[1], COLUMNS[3]])
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["method"] == "| method | 20 labels | 50 labels | 50 labels, ratio 10 |"
    assert rows["FixMatch (RA)"] == "| FixMatch (RA) | 92.00 ± 2.00 (90.00–94.00) | 95.00, 1 failed | 80.50 |"
    assert rows["FixMatch (CTA)"] == "| FixMatch (CTA) | failed |  |  |"
    assert "- FixMatch (RA), 50 labels, seed 1: `DataError: boom`" in text
    assert text.count("ConfigError: data.randaugment") == 3


def test_command_line_subsets_and_output_names(capsys):
    quick = label_curve.parse_args(["--quick"])
    assert (quick.methods, [c.key for c in quick.labels], quick.seeds, quick.iters) == (list(METHODS), ["50", "50r10"], [0], label_curve.QUICK_ITERS)
    assert quick.stem == "label_curve_quick"
    full = label_curve.parse_args([])
    assert (full.stem, full.iters, full.seeds, full.jobs) == ("label_curve", None, [0, 1, 2], 2)
    part = label_curve.parse_args(["--methods", "labels-only,fixmatch-ra", "--labels", "20", "--seeds", "0", "--iters", "5"])
    assert ([m.slug for m in part.methods], [c.labels for c in part.labels], part.seeds, part.stem) == (
        ["labels-only", "fixmatch-ra"], [20], [0], "label_curve_partial")
    with pytest.raises(SystemExit) as e:
        label_curve.parse_args(["--methods", "fixmatch,flexmatch"])
    assert e.value.code == 2
    assert "--methods: unknown 'fixmatch'; choose from labels-only, fixmatch-ra" in capsys.readouterr().err


def test_a_config_the_tree_refuses_fails_the_run_without_starting_it(tmp_path):
    bad = Method("bad", "bad", ("algorithm.threshold=2",))
    result = label_curve.run(Spec(bad, COLUMNS[0], 0, 5), tmp_path)
    assert result.top1 is None and "algorithm.threshold" in result.error and result.wall_s is None
    assert not (tmp_path / "bad_20_s0").exists()


def test_sweep_writes_table_json_and_plot_from_each_runs_result(tmp_path, monkeypatch):
    def fake(spec: Spec, out_root):
        if spec.method.slug == "fixmatch-ra" and spec.seed == 1:
            return Outcome(spec.method.name, spec.column.labels, spec.column.imbalance_ratio, spec.seed, "x", error="RuntimeError: died")
        top1 = 50.0 + spec.column.labels / 4 + spec.seed + (5 if spec.method.slug == "fixmatch-ra" else 0)
        return Outcome(spec.method.name, spec.column.labels, spec.column.imbalance_ratio, spec.seed, "x", top1=top1, wall_s=30.0)

    monkeypatch.setattr(label_curve, "run", fake)
    args = ["--methods", "labels-only,fixmatch-ra", "--seeds", "0,1,2", "--iters", "7", "--results-dir", str(tmp_path), "--out-dir", str(tmp_path)]
    outcomes = label_curve.main(args)
    assert len(outcomes) == 2 * 4 * 3
    md = (tmp_path / "label_curve_partial.md").read_text()
    assert "| labels only | 56.00 ± 1.00 (55.00–57.00) | 63.50 ± 1.00 (62.50–64.50) | 76.00 ± 1.00 (75.00–77.00) | 63.50 ± 1.00 (62.50–64.50) |" in md
    assert "| FixMatch (RA) | 61.00 ± 1.41 (60.00–62.00), 1 failed |" in md and "Not the benchmark's numbers" in md and "7 iterations" in md
    raw = json.loads((tmp_path / "label_curve_partial.json").read_text())
    assert raw["iters"] == 7 and len(raw["runs"]) == 24 and sum(r["error"] == "RuntimeError: died" for r in raw["runs"]) == 4
    assert {(r["labels"], r["imbalance_ratio"]) for r in raw["runs"]} == {(20, None), (50, None), (100, None), (50, 10)}
    png = Image.open(tmp_path / "label_curve_partial.png")
    assert png.format == "PNG" and len(pixels_of(np.asarray(png.convert("RGB")), blended(A))) > 500  # labels only's band


def test_an_unfinished_run_resumes_a_finished_one_is_reused_and_a_changed_one_starts_over(tmp_path, monkeypatch):
    """The decision on a run folder, against the real config loader (the training command itself is replaced)."""
    spec = Spec(METHODS[1], COLUMNS[0], 0, 4)
    out = tmp_path / spec.name
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint_2.pt").write_bytes(b"")
    saved = yaml.safe_load(dump_yaml(load_config(label_curve.ROOT / label_curve.CONFIG, spec.overrides(out))))
    (out / "config.yaml").write_text(yaml.safe_dump({**saved, "resume": "auto"}))  # how it was started does not count
    (out / "results.json").write_text(json.dumps({"iteration": 2, "model": "ema", "top1": 50.0}))  # of an evaluation before the end
    starts = []

    def training(cmd, **kwargs):
        starts.append(cmd[-1])
        final = {"iteration": 4, "model": "ema", "top1": 60.0, "best_top1": 61.0, "median20_top1": 60.5}
        (out / "results.json").write_text(json.dumps(final))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(label_curve.subprocess, "run", training)
    first = label_curve.run(spec, tmp_path)
    assert starts == ["resume=auto"] and (first.top1, first.best_top1, first.reused) == (60.0, 61.0, False)
    again = label_curve.run(spec, tmp_path)
    assert starts == ["resume=auto"] and again.reused and again.top1 == 60.0 and again.wall_s == round(first.wall_s, 1)
    (out / "config.yaml").write_text(yaml.safe_dump({**saved, "seed": 5}))
    assert label_curve.run(spec, tmp_path).top1 == 60.0 and starts == ["resume=auto", "overwrite=true"]


@pytest.mark.slow
def test_real_tiny_sweep_reports_failures_and_reuses_finished_runs(tmp_path, monkeypatch):
    """Two real 2-iteration quick-start runs: one trains, one fails at run time (a missing data folder); a second
    invocation reuses the finished run and starts no process for it."""
    broken = Method("broken", "broken", ("data.name=folder", f"data.root={tmp_path / 'no_such_folder'}"))
    monkeypatch.setattr(label_curve, "METHODS", (METHODS[0], broken))
    args = ["--methods", "labels-only,broken", "--labels", "20", "--seeds", "0", "--iters", "2",
            "--results-dir", str(tmp_path / "results"), "--out-dir", str(tmp_path / "runs")]
    first = label_curve.main(args)
    assert first[0].error is None and 0 <= first[0].top1 <= 100 and not first[0].reused and first[0].wall_s > 0
    assert first[1].top1 is None and "no_such_folder" in first[1].error and "\n" not in first[1].error
    results = json.loads((tmp_path / "runs" / "iters2" / "labels-only_20_s0" / "results.json").read_text())
    assert (results["iteration"], results["model"], results["top1"]) == (2, "ema", first[0].top1)
    md = (tmp_path / "results" / "label_curve_partial.md").read_text()
    assert f"| labels only | {first[0].top1:.2f} |" in md and "| broken | failed |" in md

    monkeypatch.setattr(label_curve.subprocess, "run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = label_curve.main(["--methods", "labels-only", *args[2:]])
    assert again[0].reused and again[0].top1 == first[0].top1 and again[0].wall_s == pytest.approx(first[0].wall_s, abs=0.1)
