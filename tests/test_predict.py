"""``python -m ignite_fixmatch.predict`` on the checkpoint of a real tiny training run (``finished_run``) and real
image files: its probabilities are the evaluator's, bad files become error rows, bad requests exit 2 with
nothing written. One test starts the real command line; the rest call ``main`` in this process."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events

from helpers import ROOT, datagen, subprocess_env
from ignite_fixmatch import eval as evaluate
from ignite_fixmatch import predict
from ignite_fixmatch.data import build_eval_loader
from ignite_fixmatch.evaluation import create_evaluator

CLASSES = ["cat", "dog", "frog"]


@pytest.fixture(scope="module")
def checkpoint(finished_run) -> Path:
    return finished_run[0] / "checkpoints" / "checkpoint_20.pt"


def run_main(capsys, *args: object) -> tuple[int, str, str]:
    code = predict.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def probabilities_of(row: dict[str, str]) -> dict[str, float]:
    """Class name -> probability, from a CSV row's class_i / probability_i cells."""
    k = sum(1 for key in row if key.startswith("class_"))
    return {row[f"class_{i}"]: float(row[f"probability_{i}"]) for i in range(1, k + 1) if row[f"class_{i}"]}


def evaluator_probabilities(checkpoint: Path) -> tuple[dict[str, torch.Tensor], float]:
    """What ``eval`` computes for each test image (softmax of the evaluator's logits, by absolute path), and its top-1 %."""
    path, ckpt, cfg, which = evaluate.open_checkpoint(checkpoint, None, None, None)
    sources = evaluate.load_test_data(cfg, root_given=False)
    net = evaluate.build_loaded_model(cfg, sources.classes, sources.channels, ckpt[evaluate.MODEL_KEYS[which]], path, which)
    device = torch.device("cpu")
    evaluator = create_evaluator(
        net, device, num_classes=sources.num_classes, mean=sources.mean, std=sources.std, amp=cfg.amp, amp_dtype=cfg.amp_dtype,
        channels_last=cfg.model.channels_last,
    )
    seen: list[torch.Tensor] = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: seen.append(torch.softmax(engine.state.output[0], 1)))
    metrics = evaluator.run(build_eval_loader(sources, 5, 0)).metrics  # batches of 5: predict's batching differs on purpose
    probs = torch.cat(seen)
    return {os.path.abspath(sources.test.path(i)): probs[i] for i in range(len(probs))}, 100.0 * metrics["top1"]


def test_predictions_equal_the_evaluators_on_the_test_folder(checkpoint, folder, capsys, tmp_path):
    out = tmp_path / "predictions.csv"
    code, _, err = run_main(capsys, checkpoint, folder / "test", "--out", out, "--device", "cpu", "--batch-size", "7")
    assert code == 0, err
    rows = read_csv(out)
    assert list(rows[0]) == ["path", "class_1", "probability_1", "class_2", "probability_2", "class_3", "probability_3", "error"]  # k = min(5, 3)
    expected, top1 = evaluator_probabilities(checkpoint)
    assert sorted(os.path.abspath(r["path"]) for r in rows) == sorted(expected) and len(rows) == 12
    correct = 0
    for row in rows:
        assert row["error"] == ""
        got = probabilities_of(row)
        want = expected[os.path.abspath(row["path"])]
        assert sorted(got) == CLASSES
        for c, name in enumerate(CLASSES):
            assert got[name] == pytest.approx(float(want[c]), abs=1e-6), (row["path"], name)
        probs = [float(row[f"probability_{i}"]) for i in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True)
        correct += row["class_1"] == Path(row["path"]).parent.name
    assert 100.0 * correct / len(rows) == pytest.approx(top1, abs=1e-9)
    assert top1 == pytest.approx(evaluate.evaluate_checkpoint(checkpoint, device="cpu")["top1"], abs=1e-9)
    assert f"12 images, 0 could not be read -> {out}" in err and "\r" not in err  # no progress bar off a terminal


def test_a_corrupt_image_and_a_non_image_become_error_rows_and_exit_1(checkpoint, folder, capsys, tmp_path):
    images = tmp_path / "images"
    good = [datagen.save_image(np.full((20, 24, 3), 40 * i, np.uint8), images / f"good{i}.png") for i in range(2)]
    bad = datagen.corrupt_file(datagen.save_image(np.zeros((16, 16, 3), np.uint8), images / "broken.png"), "truncate")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    out = tmp_path / "predictions.jsonl"
    code, _, err = run_main(capsys, checkpoint, images, text, "--out", out, "--top-k", "2")
    assert code == 1, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in rows] == [str(bad), str(good[0]), str(good[1]), str(text)]
    for r in rows[1:3]:
        assert r["error"] is None and len(r["classes"]) == 2 and set(r["classes"]) <= set(CLASSES)
        assert 0 < r["probabilities"][1] <= r["probabilities"][0] <= 1
    for r in (rows[0], rows[3]):
        assert r["classes"] == [] and r["probabilities"] == [] and r["error"].startswith("cannot read image: ")
        assert f"warning: {r['path']}: cannot read image" in err
    assert "not an image file" in rows[3]["error"] and "skip_corrupt" not in err  # no advice meant for training
    assert "4 images, 2 could not be read" in err


def test_folders_are_searched_recursively_skipping_hidden_files_and_link_loops(checkpoint, capsys, tmp_path):
    root = tmp_path / "photos"
    for rel in ("a.PNG", "sub/b.jpg", "sub/deeper/c.webp", ".hidden.png", ".cache/d.png", "sub/readme.md"):
        target = root / rel
        if rel.endswith("md"):
            target.write_text("x")
        else:
            datagen.save_image(np.full((16, 16, 3), 100, np.uint8), target)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    out = tmp_path / "p.csv"
    code, _, err = run_main(capsys, checkpoint, root, "--out", out)
    assert code == 0, err
    assert [r["path"] for r in read_csv(out)] == [str(root / "a.PNG"), str(root / "sub/b.jpg"), str(root / "sub/deeper/c.webp")]


@pytest.mark.slow
def test_stdin_list_to_csv_on_stdout_through_the_real_command_line(checkpoint, folder):
    """The real interpreter: paths from stdin (one with a space in its name), CSV on stdout, no bar when piped."""
    listed = sorted((folder / "test" / "cat").iterdir())[:2]
    spaced = listed[0].parent.parent / "with space.png"
    spaced.write_bytes(listed[0].read_bytes())
    try:
        result = subprocess.run(
            [sys.executable, "-m", "ignite_fixmatch.predict", str(checkpoint), "-", "--out", "-", "--top-k", "1"],
            input="".join(f"{p}\n" for p in [*listed, spaced]) + "\n", cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=180,
        )
    finally:
        spaced.unlink()
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["path"] for r in rows] == [str(p) for p in [*listed, spaced]]
    assert rows[0]["class_1"] == rows[2]["class_1"] and rows[0]["probability_1"] == rows[2]["probability_1"]  # same pixels
    assert "\r" not in result.stderr and result.stderr.strip().endswith("(ema model, iteration 20)")


def test_progress_bar_only_on_a_terminal(checkpoint, folder, capsys, tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert predict.main([str(checkpoint), str(folder / "test" / "dog"), "--out", str(tmp_path / "p.csv"), "--batch-size", "3"]) == 0
    assert "\rpredict: 3/4 images (75 %)" in terminal.getvalue() and "\rpredict: 4/4 images (100 %)\n" in terminal.getvalue()


def test_overwrite_replaces_only_when_asked(checkpoint, folder, capsys, tmp_path):
    out = tmp_path / "p.csv"
    out.write_text("precious\n")
    code, _, err = run_main(capsys, checkpoint, folder / "test" / "dog", "--out", out)
    assert code == 2 and "exists; pass --overwrite" in err and out.read_text() == "precious\n"
    code, _, err = run_main(capsys, checkpoint, folder / "test" / "dog", "--out", out, "--overwrite")
    assert code == 0, err
    assert len(read_csv(out)) == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]  # no temporary file left


@pytest.mark.parametrize(
    "case",
    ["missing checkpoint", "empty folder", "missing path", "out folder missing", "out is a directory", "bad extension", "top-k too large", "read-only folder"],
)
def test_usage_errors_exit_2_with_one_line_and_write_nothing(case, checkpoint, folder, capsys, tmp_path):
    images, out, extra = folder / "test" / "cat", tmp_path / "p.csv", []
    ckpt = checkpoint
    fragments: tuple[str, ...]
    if case == "missing checkpoint":
        ckpt, fragments = tmp_path / "nope.pt", ("nope.pt", "does not exist")
    elif case == "empty folder":
        images = tmp_path / "empty"
        (images / ".thumbs").mkdir(parents=True)
        (images / "a.txt").write_text("x")
        fragments = (f"no images found under folder {str(images)!r}", ".png, .jpg, .jpeg, .bmp, .webp")
    elif case == "missing path":
        images, fragments = tmp_path / "gone.png", ("gone.png", "does not exist")
    elif case == "out folder missing":
        out, fragments = tmp_path / "no" / "p.csv", ("does not exist; create it",)
    elif case == "out is a directory":
        out = tmp_path / "dir.csv"
        out.mkdir()
        fragments = ("is a directory",)
    elif case == "bad extension":
        out, fragments = tmp_path / "p.txt", ("use .csv or .jsonl",)
    elif case == "top-k too large":
        extra, fragments = ["--top-k", "4"], ("--top-k 4", "only 3 classes")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        tmp_path.chmod(0o555)
        fragments = ("cannot be written",)
    before = sorted(tmp_path.rglob("*"))
    try:
        code, stdout, err = run_main(capsys, ckpt, images, "--out", out, *extra)
    finally:
        tmp_path.chmod(0o755)
    assert code == 2 and stdout == "", err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, no temporary file


def test_help_shows_examples_and_exit_codes(capsys):
    with pytest.raises(SystemExit):
        predict.main(["--help"])
    text = capsys.readouterr().out
    assert "python -m ignite_fixmatch.predict runs/quickstart photos/ --out predictions.csv" in text and "exit codes: 0" in text
