"""``python -m ignite_fixmatch.suggest`` on a real checkpoint (the ``finished_run`` fixture), and the two config keys
of the labeling loop: ``data.labels_file`` and ``model.init_from``, through real command-line runs."""

from __future__ import annotations

import csv
import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the training CLI imports this module for SaveStartWeights
from datagen import class_image, corrupt_file, save_image  # noqa: E402
from helpers import cli, load_state, tiny_overrides, with_handler  # noqa: E402
from ignite_fixmatch.config import ConfigError  # noqa: E402
from ignite_fixmatch.data import read_labels_file  # noqa: E402
from ignite_fixmatch.inference import load_for_inference  # noqa: E402
from ignite_fixmatch.suggest import Weights, folder_candidates, main, score_candidates  # noqa: E402


class SaveStartWeights:
    """Test handler: when the trainer starts (after any checkpoint was loaded, before the first step), save the
    model's and the EMA model's weights to ``path``."""

    uses = ("ema_model",)

    def __init__(self, path: str) -> None:
        self.path = path

    def attach(self, ctx) -> None:
        from ignite.engine import Events

        def save(engine) -> None:
            torch.save({"model": ctx.model.state_dict(), "ema_model": ctx.ema_model.state_dict(), "iteration": engine.state.iteration}, self.path)

        ctx.trainer.add_event_handler(Events.STARTED, save)


def suggest(*args: str, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def image_folder(root: Path, n: int, seed: int = 1) -> Path:
    """``n`` distinct 16x16 RGB images of the three fixture classes, loose in ``root``."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        save_image(class_image(i % 3, 3, 16, 16, rng), root / f"img{i:03d}.png")
    return root


# --------------------------------------------------------------------------- suggest


def test_suggests_unlabeled_training_images_with_csv_sheet_and_labels_file(finished_run, tmp_path, capsys):
    run, _ = finished_run
    out, labels = tmp_path / "to_label.csv", tmp_path / "labels.txt"
    code, stdout, err = suggest(run, "--n", 5, "--out", out, "--labels-out", labels, capsys=capsys)
    assert code == 0, err
    rows = read_rows(out)
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4", "5"]
    labeled = set(np.loadtxt(run / "labeled_indices.txt", dtype=np.int64).tolist())
    chosen = [int(r["index"]) for r in rows]
    assert len(set(chosen)) == 5 and not set(chosen) & labeled  # never an image that is already labeled
    for r in rows:
        assert Path(r["path"]).is_file() and Path(r["path"]).parent.parent.name == "train"
        assert r["predicted"] in ("cat", "dog", "frog")
        assert 0 <= float(r["score"]) <= 1 and 0 <= float(r["disagreement"]) <= 1 and 0 <= float(r["class_boost"]) <= 1
        assert 0 <= float(r["margin"]) <= float(r["confidence"]) <= 1
    assert sorted(np.loadtxt(labels, dtype=np.int64).tolist()) == sorted(labeled | set(chosen))
    sheet = Image.open(out.with_suffix(".png"))
    assert sheet.format == "PNG" and sheet.width >= 5 * 96 and sheet.height >= 96
    assert "suggested 5 of 18 images" in stdout


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "python -m ignite_fixmatch.suggest runs/quickstart --n 50" in text and "--labels-out" in text


def test_same_seed_same_csv_and_existing_output_is_kept(finished_run, tmp_path, capsys):
    run, _ = finished_run
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert suggest(run, "--n", 4, "--out", a, capsys=capsys)[0] == 0
    assert suggest(run, "--n", 4, "--out", b, capsys=capsys)[0] == 0
    assert a.read_text() == b.read_text()
    before = digest(a)
    code, _, err = suggest(run, "--n", 2, "--out", a, capsys=capsys)
    assert code == 2 and "exists; pass --overwrite" in err and digest(a) == before
    assert suggest(run, "--n", 2, "--out", a, "--overwrite", capsys=capsys)[0] == 0
    assert len(read_rows(a)) == 2


def test_copies_of_one_uncertain_image_are_chosen_at_most_once(finished_run, tmp_path, capsys):
    run, _ = finished_run
    folder = image_folder(tmp_path / "new", 12)
    model = load_for_inference(run, device="cpu")
    scored = score_candidates(
        model, folder_candidates(model, folder, True), seed=0, strong_draws=2, weights=Weights(), confident=0.95,
        batch_size=64, warn=print, progress=lambda *_: None,
    )
    top = scored.candidates[int(np.argmax(scored.score))].path
    for k in range(20):
        shutil.copy(top, folder / f"copy{k:02d}.png")
    out = tmp_path / "picks.csv"
    code, _, err = suggest(run, "--n", 8, "--out", out, "--unlabeled", folder, capsys=capsys)
    assert code == 0, err
    picked = [r["path"] for r in read_rows(out)]
    assert len(picked) == 8
    assert sum(digest(p) == digest(top) for p in picked) == 1
    # Ranked by score alone, the copies would fill the list: what the diversity rule prevents.
    again = score_candidates(
        model, folder_candidates(model, folder, True), seed=0, strong_draws=2, weights=Weights(), confident=0.95,
        batch_size=64, warn=print, progress=lambda *_: None,
    )
    by_score = [again.candidates[k].path for k in np.argsort(-again.score, kind="stable")[:8]]
    assert sum(digest(p) == digest(top) for p in by_score) == 8


def test_corrupt_image_is_skipped_with_a_warning_and_the_others_ranked(finished_run, tmp_path, capsys):
    run, _ = finished_run
    folder = image_folder(tmp_path / "new", 6)
    bad = corrupt_file(folder / "img002.png", "garbage")
    out = tmp_path / "picks.csv"
    code, _, err = suggest(run, "--n", 10, "--out", out, "--unlabeled", folder, capsys=capsys)
    assert code == 0, err
    assert "warning: skipped an unreadable image" in err and str(bad) in err
    paths = [r["path"] for r in read_rows(out)]
    assert len(paths) == 5 and str(bad) not in paths and all(r == "" for r in (row["index"] for row in read_rows(out)))


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing checkpoint", "does not exist"),
        ("empty folder", "holds no images"),
        ("other data set", "looks like another data set"),
        ("out folder missing", "does not exist; create it"),
        ("unwritable out", "cannot be written"),
        ("labels-out with folder", "--labels-out writes training-set indices"),
    ],
)
def test_bad_inputs_are_refused_with_one_line_and_nothing_written(finished_run, tmp_path, capsys, case, expected):
    run, _ = finished_run
    out = tmp_path / "picks.csv"
    args = [run, "--n", 3, "--out", out]
    if case == "missing checkpoint":
        args[0] = tmp_path / "nope.pt"
    elif case == "empty folder":
        (tmp_path / "empty" / "sub").mkdir(parents=True)
        args += ["--unlabeled", tmp_path / "empty"]
    elif case == "other data set":
        for name in ("airplane", "ship"):
            image_folder(tmp_path / "other" / name, 2)
        args += ["--unlabeled", tmp_path / "other"]
    elif case == "out folder missing":
        args[4] = tmp_path / "no" / "picks.csv"
    elif case == "unwritable out":
        args[4] = Path("/proc/picks.csv")  # no file can be created there, not even by root
    elif case == "labels-out with folder":
        args += ["--unlabeled", image_folder(tmp_path / "new", 3), "--labels-out", tmp_path / "labels.txt"]
    code, _, err = suggest(*args, capsys=capsys)
    assert code == 2 and expected in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not out.exists() and not out.with_suffix(".png").exists()


def test_class_folders_of_the_checkpoints_classes_are_accepted(finished_run, folder, tmp_path, capsys):
    run, _ = finished_run
    out = tmp_path / "picks.csv"
    code, _, err = suggest(run, "--n", 3, "--out", out, "--unlabeled", folder / "test", capsys=capsys)
    assert code == 0, err
    assert all(Path(r["path"]).parent.name in ("cat", "dog", "frog") for r in read_rows(out))


# --------------------------------------------------------------------------- data.labels_file


@pytest.mark.slow  # a real CLI run
def test_labels_file_gives_exactly_those_labeled_images(folder, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("17\n0\n\n9\n3\n22\n12\n")  # unsorted, a blank line
    out = tmp_path / "run"
    result = cli(["configs/quickstart.yaml", *tiny_overrides(folder, out, f"data.labels_file={labels}", "train.num_iters=2")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "labeled_indices.txt").read_text().split() == ["0", "3", "9", "12", "17", "22"]


@pytest.mark.slow  # a real CLI run
def test_bad_labels_file_is_refused_by_the_cli(folder, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("1\n2\n2\n")
    out = tmp_path / "run"
    result = cli(["configs/quickstart.yaml", *tiny_overrides(folder, out, f"data.labels_file={labels}", "train.num_iters=2")])
    assert result.returncode == 2 and "index 2 is repeated (lines 2 and 3)" in result.stderr


@pytest.mark.parametrize(
    "text, expected",
    [(None, "cannot be read"), ("1\nx\n", "line 2 is 'x', not an integer"), ("1\n24\n", "index 24 is outside the training set (0..23)"),
     ("-1\n", "index -1 is outside"), ("\n\n", "holds no index"), ("4\n4\n", "index 4 is repeated")],
)
def test_read_labels_file_refuses_bad_files(tmp_path, text, expected):
    path = tmp_path / "labels.txt"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match="data.labels_file") as e:
        read_labels_file(str(path), 24)
    assert expected in str(e.value)


# --------------------------------------------------------------------------- model.init_from


@pytest.mark.slow  # a real CLI run
def test_init_from_starts_a_new_run_from_the_checkpoints_ema_weights(finished_run, folder, tmp_path):
    run, _ = finished_run
    out, seen = tmp_path / "warm", tmp_path / "start.pt"
    args = with_handler(tiny_overrides(folder, out, f"model.init_from={run}", "train.num_iters=2"), "tests.test_suggest:SaveStartWeights", path=str(seen))
    result = cli(["configs/quickstart.yaml", *args])
    assert result.returncode == 0, result.stderr[-2000:]
    source = load_state(run / "checkpoints" / "checkpoint_20.pt")["ema_model"]
    start = load_state(seen)
    assert start["iteration"] == 0
    for key in ("model", "ema_model"):
        assert set(start[key]) == set(source)
        assert all(torch.equal(start[key][k], source[k]) for k in source), key
    assert "Warm start: weights of" in (out / "train.log").read_text()
    assert load_state(out / "checkpoints" / "checkpoint_2.pt")["trainer"]["iteration"] == 2  # its own count, from 0
    # Resumed, the run continues from its own checkpoint: init_from is not applied again.
    resumed = cli(["configs/quickstart.yaml", *[a.replace("train.num_iters=2", "train.num_iters=3") for a in args], "resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    own = load_state(out / "checkpoints" / "checkpoint_2.pt")["model"]
    start = load_state(seen)
    assert start["iteration"] == 2 and all(torch.equal(start["model"][k], own[k]) for k in own)
    assert not all(torch.equal(start["model"][k], source[k]) for k in source)
    assert (out / "train.log").read_text().count("Warm start: weights of") == 1


@pytest.mark.slow  # a real CLI run
def test_init_from_of_another_shape_is_refused(finished_run, folder, tmp_path):
    run, _ = finished_run
    out = tmp_path / "warm"
    result = cli(["configs/quickstart.yaml", *tiny_overrides(folder, out, f"model.init_from={run}", "model.widen_factor=2", "train.num_iters=2")])
    assert result.returncode == 2
    assert "model.init_from: checkpoint" in result.stderr and "does not fit this run's model" in result.stderr and "conv" in result.stderr
