"""``python -m ignite_fixmatch.eval`` on checkpoints written by a real (tiny) training run through the real CLI.

One test starts the command in a fresh interpreter (output, exit code); the rest call its ``main`` in
this process (the same code path, without paying 5-10 s of imports per call).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from helpers import ROOT, cli, datagen, load_state, make_folder, tiny_overrides
from helpers import subprocess_env as subprocess_env
from ignite_fixmatch import eval as evaluate

# 6 iterations; both models evaluated (and results.json written) at 3 and 6; checkpoints at 3 and 6.
TRAIN = (
    "train.num_iters=6",
    "handlers=[{name: ema, params: {decay: 0.9}}, {name: evaluation, params: {every: 3, models: [ema, raw]}}, "
    "{name: checkpoint, params: {every: 3, keep: 2}}]",
)


@dataclass
class Run:
    data: Path
    out: Path
    results: dict

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoints" / "checkpoint_6.pt"

    def scores(self, model: str, iteration: int = 6) -> dict:
        (record,) = [r for r in self.results["history"] if r["iteration"] == iteration]
        return record[model]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    data = make_folder(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("runs") / "run"
    result = cli(["configs/quickstart.yaml", *tiny_overrides(data, out, *TRAIN)])
    assert result.returncode == 0, result.stderr[-3000:]
    return Run(data, out, json.loads((out / "results.json").read_text()))


def eval_cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ignite_fixmatch.eval", *map(str, args)], cwd=ROOT, env=subprocess_env(),
        capture_output=True, text=True, timeout=180,
    )


def eval_main(capsys, *args: object) -> tuple[int, str, str]:
    code = evaluate.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def eval_json(capsys, tmp_path: Path, *args: object) -> dict:
    out = tmp_path / f"scores_{len(list(tmp_path.glob('scores_*')))}.json"
    code, _, err = eval_main(capsys, *args, "--json", out)
    assert code == 0, err
    return json.loads(out.read_text())


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    """Exit code 2, one line on stderr, no traceback, and the line says what is wrong."""
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def save_modified(run: Run, path: Path, **changes) -> Path:
    """A copy of the run's checkpoint with some entries replaced (None: removed)."""
    ckpt = load_state(run.checkpoint)
    for key, value in changes.items():
        if value is None:
            del ckpt[key]
        else:
            ckpt[key] = value
    torch.save(ckpt, path)
    return path


# --------------------------------------------------------------------------- a real command line


@pytest.fixture(scope="module")
def cli_result(run, tmp_path_factory):
    json_path = tmp_path_factory.mktemp("eval") / "scores.json"
    result = eval_cli(run.checkpoint, "--device", "cpu", "--json", json_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads(json_path.read_text())


@pytest.mark.slow
def test_prints_top1_top5_and_a_per_class_table(cli_result):
    result, scores = cli_result
    out = result.stdout
    assert re.search(r"^top-1: \d+\.\d\d %$", out, re.M), out
    assert re.search(r"^top-5: \d+\.\d\d %", out, re.M), out
    assert f"top-1: {scores['top1']:.2f} %" in out and "(iteration 6), model: ema, device: cpu" in out
    table = out.split("per-class accuracy:\n", 1)[1].splitlines()
    assert table[0].split() == ["class", "images", "correct", "top-1", "%"]
    rows = [line.split() for line in table[1:]]
    assert [r[0] for r in rows] == ["cat", "dog", "frog"] and all(r[1] == "4" for r in rows)
    for row, entry in zip(rows, scores["per_class"]):
        assert int(row[2]) == entry["correct"] and row[3] == f"{entry['top1']:.2f}"


@pytest.mark.slow
def test_json_scores_equal_the_training_evaluation_at_that_iteration(cli_result, run):
    _, scores = cli_result
    trained = run.scores("ema")
    assert scores["model"] == "ema" and scores["iteration"] == 6 and scores["data"]["images"] == 12
    assert scores["top1"] == pytest.approx(trained["top1"], abs=1e-6)
    assert scores["top5"] == pytest.approx(trained["top5"], abs=1e-6)
    assert scores["loss"] == pytest.approx(trained["loss"], rel=1e-5)
    per_class = scores["per_class"]
    assert sum(r["images"] for r in per_class) == 12
    assert 100.0 * sum(r["correct"] for r in per_class) / 12 == pytest.approx(scores["top1"], abs=1e-9)


# --------------------------------------------------------------------------- the same main, in this process


def test_raw_model_matches_its_training_evaluation_and_differs_from_ema(run, capsys, tmp_path):
    raw = eval_json(capsys, tmp_path, run.checkpoint, "--model", "raw", "--batch-size", "5")
    assert raw["model"] == "raw"
    assert raw["top1"] == pytest.approx(run.scores("raw")["top1"], abs=1e-6)
    assert raw["loss"] == pytest.approx(run.scores("raw")["loss"], rel=1e-5)
    assert raw["loss"] != pytest.approx(run.scores("ema")["loss"], rel=1e-3)  # another model


def test_run_folder_means_its_newest_checkpoint(run, capsys, tmp_path):
    scores = eval_json(capsys, tmp_path, run.out)
    assert Path(scores["checkpoint"]) == run.checkpoint and scores["model"] == "ema"
    older = eval_json(capsys, tmp_path, run.out / "checkpoints" / "checkpoint_3.pt")
    assert older["iteration"] == 3 and older["top1"] == pytest.approx(run.scores("ema", 3)["top1"], abs=1e-6)


def test_data_root_override_reads_the_data_from_there(run, capsys, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(run.data, copy)
    scores = eval_json(capsys, tmp_path, run.checkpoint, "--data-root", copy)
    assert scores["data"]["root"] == str(copy) and scores["data"]["images"] == 12
    assert scores["top1"] == pytest.approx(run.scores("ema")["top1"], abs=1e-6)
    (copy / "test" / "dog" / "0000.png").unlink()  # only the copy loses an image
    fewer = eval_json(capsys, tmp_path, run.checkpoint, "--data-root", copy)
    assert fewer["data"]["images"] == 11 and [r["images"] for r in fewer["per_class"]] == [4, 3, 4]


def test_missing_file_and_missing_json_folder(run, capsys, tmp_path):
    code, out, err = eval_main(capsys, tmp_path / "nope.pt")
    assert_user_error(code, err, "does not exist", str(tmp_path / "nope.pt"))
    code, _, err = eval_main(capsys, run.checkpoint, "--json", tmp_path / "no_dir" / "s.json")
    assert_user_error(code, err, "--json", "does not exist")


def test_truncated_checkpoint_is_refused(run, capsys, tmp_path):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(run.checkpoint.read_bytes()[: run.checkpoint.stat().st_size // 2])
    code, out, err = eval_main(capsys, cut)
    assert_user_error(code, err, "cannot be read", "truncated", str(cut))
    assert out == ""


def test_checkpoint_without_config_is_refused(run, capsys, tmp_path):
    code, _, err = eval_main(capsys, save_modified(run, tmp_path / "bare.pt", config=None))
    assert_user_error(code, err, "holds no config", "ema_model")


def test_without_ema_the_raw_model_is_the_default(run, capsys, tmp_path):
    no_ema = save_modified(run, tmp_path / "no_ema.pt", ema_model=None)
    assert eval_json(capsys, tmp_path, no_ema)["model"] == "raw"
    code, _, err = eval_main(capsys, no_ema, "--model", "ema")
    assert_user_error(code, err, "no ema model", "--model raw")


@pytest.mark.parametrize("classes", [("ant", "bee"), ("ant", "bee", "cow", "doe")])
def test_data_with_other_classes_is_refused_saying_what_differs(run, capsys, tmp_path, classes):
    other = datagen.make_image_folder(tmp_path / "other", classes=classes, n_train_per_class=1, n_test_per_class=1, size=(16, 16))
    code, out, err = eval_main(capsys, run.checkpoint, "--data-root", other)
    assert_user_error(code, err, "trained on 3 classes", f"has {len(classes)}: {', '.join(classes)}", str(other))
    assert out == ""


def test_missing_data_folder_is_named(run, capsys, tmp_path):
    code, _, err = eval_main(capsys, run.checkpoint, "--data-root", tmp_path / "gone")
    assert_user_error(code, err, str(tmp_path / "gone"), "--data-root")


def test_checkpoint_that_would_run_code_is_refused_and_not_run(run, capsys, tmp_path):
    marker = tmp_path / "payload_ran"
    evil = save_modified(run, tmp_path / "evil.pt", extra=RunsCode(str(marker)))
    code, out, err = eval_main(capsys, evil)
    assert_user_error(code, err, "refused", "could run arbitrary code", "_make_marker")
    assert out == "" and not marker.exists()
    # The file is a live attack: unpickling it unsafely does run its code (here: only writes the marker).
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "ran"


def _make_marker(path: str) -> None:
    Path(path).write_text("ran")


class RunsCode:
    """Pickles as a call to _make_marker: what a malicious checkpoint would do with os.system."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (_make_marker, (self.path,))
