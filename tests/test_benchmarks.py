"""The benchmark command runs end to end and prints every row it promises (no speed is asserted here:
speeds belong in the benchmark's own table, not in tests)."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks import profile_step
from benchmarks.run import GFLOP_PER_IMAGE, main


@pytest.mark.slow
def test_quick_benchmark_prints_each_section(tmp_path, capsys):
    out = tmp_path / "rows.json"
    main(["--quick", "--rounds", "1", "--labeled", "1", "--skip", "model", "--json", str(out)])
    table = capsys.readouterr().out
    for heading in ("1. machine", "2. augmentation", "3b. the model step's convolutions", "4. full training step", "5. framework overhead"):
        assert heading in table
    rows = json.loads(out.read_text())
    values = {r["item"]: r["value"] for r in rows}
    assert "failed" not in values.values(), [r for r in rows if r["value"] == "failed"]
    assert any(item.startswith("ours:") for item in values) and any(item.startswith("reference style") for item in values)
    assert any("default handlers" in item for item in values)
    kernels = next(v for item, v in values.items() if item.startswith("device path (data.augment=device): kernels"))
    assert 0 < int(kernels.replace(",", "")) <= 520  # the meta-device count ran, and stayed within the tested bound
    assert any(r["note"].endswith("of matmul") or "of matmul," in r["note"] for r in rows)
    # 3b hooks the real model's convolutions: their work must add up to the 1.285 GFLOP per image counted for the step
    ceiling = next(r for r in rows if r["item"].startswith("all three passes"))
    assert f"{GFLOP_PER_IMAGE:.3f} GFLOP per image in convolutions" in ceiling["note"]


@pytest.mark.slow
def test_profile_step_reports_the_trainers_step_and_its_top_operators(capsys):
    profile_step.main(["--device", "cpu", "--compile-mode", "off", "--labeled", "1", "--steps", "1", "--rows", "5"])
    out = capsys.readouterr().out
    host, wall = map(float, re.search(r"host ([\d.]+) ms/step, wall ([\d.]+) ms/step", out).groups())
    assert 0 < host <= wall * 1.01
    assert "aten::convolution_backward" in out and "15 images per step" in out


def test_run_keeps_exporting_what_was_imported_from_it():
    """benchmarks.run is the entry point; the sections live in their own modules, and every name that
    tests, scripts and the recorded commands in benchmarks/results import from benchmarks.run stays there."""
    import benchmarks.run as run

    assert all(hasattr(run, name) for name in run.__all__)
    for name in ("augmentation_kernels", "make_trainer", "StepConfig", "bf16_supported", "fixmatch_batch", "sync", "GFLOP_PER_IMAGE"):
        assert name in run.__all__


def test_benchmark_modules_import_no_private_names():
    """Shared helpers are public: no benchmarks module reaches into another's underscore names."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "benchmarks"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks"):
                assert not [a.name for a in node.names if a.name.startswith("_")], path
