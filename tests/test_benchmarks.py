"""The benchmark command runs end to end and prints every row it promises (no speed is asserted here:
speeds belong in the benchmark's own table, not in tests)."""

from __future__ import annotations

import json

from benchmarks.run import main


def test_quick_benchmark_prints_each_section(tmp_path, capsys):
    out = tmp_path / "rows.json"
    main(["--quick", "--rounds", "1", "--labeled", "1", "--skip", "model", "--json", str(out)])
    table = capsys.readouterr().out
    for heading in ("1. machine", "2. augmentation", "4. full training step", "5. framework overhead"):
        assert heading in table
    rows = json.loads(out.read_text())
    values = {r["item"]: r["value"] for r in rows}
    assert "failed" not in values.values(), [r for r in rows if r["value"] == "failed"]
    assert any(item.startswith("ours:") for item in values) and any(item.startswith("reference style") for item in values)
    assert any("default handlers" in item for item in values)
    assert any(r["note"].endswith("of matmul") or "of matmul," in r["note"] for r in rows)
