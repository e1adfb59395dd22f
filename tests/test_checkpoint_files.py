"""Files given as checkpoints that are not usable ones: random bytes, truncated or damaged checkpoints,
files of another program, files that would run code, folders. Every one is refused with a
CheckpointError (exit 2) that says why; ``resume=auto`` skips a damaged newest checkpoint for an intact
older one. The damaged files are real: bytes of a checkpoint holding the state dicts a run saves.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ignite.engine import Engine

from helpers import ROOT, cli, subprocess_env, tiny_overrides
from ignite_fixmatch import eval as evaluate
from ignite_fixmatch.checkpoint_names import CHECKPOINT_DIR, checkpoint_iteration, list_checkpoints
from ignite_fixmatch.config import load_config
from ignite_fixmatch.errors import CheckpointError
from ignite_fixmatch.resume import (
    NOT_OURS,
    ClassesRecord,
    ConfigRecord,
    RNGState,
    find_resume_checkpoint,
    load_into,
    read_checkpoint,
)
from ignite_fixmatch.training import model_from_config

CLASSES = ["ant", "bee", "cow"]
USABLE_OR_REFUSED = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _to_load(cfg) -> dict:
    """Fresh objects of a run, as training.py's to_save (the tiny model of the tests, 3 classes)."""
    model = model_from_config(cfg, len(CLASSES), 3)
    return {
        "trainer": Engine(lambda e, b: None), "model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "rng": RNGState(), "config": ConfigRecord(cfg), "classes": ClassesRecord(CLASSES),
    }


@pytest.fixture(scope="module")
def cfg(folder, tmp_path_factory):
    """The tiny run's config, on the generated image folder: its checkpoints can really be evaluated."""
    return load_config(ROOT / "configs" / "quickstart.yaml", tiny_overrides(folder, tmp_path_factory.mktemp("runs") / "run"))


@pytest.fixture(scope="module")
def good_bytes(cfg) -> bytes:
    """A checkpoint as the checkpoint handler writes it: the state dicts of the run's objects."""
    buffer = io.BytesIO()
    torch.save({key: obj.state_dict() for key, obj in _to_load(cfg).items()}, buffer)
    return buffer.getvalue()


@pytest.fixture
def keep_rng():
    """load_into restores the saved random state into this process: put ours back afterwards."""
    state = RNGState().state_dict()
    yield
    RNGState().load_state_dict(state)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder for every generated file (hypothesis runs many examples in one test)."""
    return tmp_path_factory.mktemp("files")


def _write(folder: Path, data: bytes) -> Path:
    path = folder / "checkpoint_5.pt"
    path.write_bytes(data)
    return path


def _every_reader_refuses_or_loads(path: Path, cfg) -> None:
    """read_checkpoint, load_into (resume) and eval's loading: a result or a CheckpointError, nothing else;
    a file that cannot be read says it is not a checkpoint of this project (or names the code it would run)."""
    try:
        read_checkpoint(path)
    except CheckpointError as e:
        assert NOT_OURS in str(e) or "refused: it would call" in str(e), str(e)
    for attempt in (lambda: load_into(_to_load(cfg), path), lambda: _eval_load(path)):
        try:
            attempt()
        except CheckpointError as e:
            assert "weights_only=False" not in str(e), str(e)


def _eval_load(path: Path) -> None:
    """What ``python -m ignite_fixmatch.eval`` does with the file before it reads any image."""
    _, ckpt, cfg, which = evaluate.open_checkpoint(path, None, None, None)
    sources = SimpleNamespace(num_classes=len(CLASSES), channels=3, classes=CLASSES)
    evaluate.build_loaded_model(cfg, sources.classes, sources.channels, ckpt[evaluate.MODEL_KEYS[which]], path, which)


# --------------------------------------------------------------------------- any file, damaged or not ours


def test_the_intact_checkpoint_loads_everywhere(scratch, cfg, good_bytes, keep_rng):
    path = _write(scratch, good_bytes)
    assert set(read_checkpoint(path)) == {"trainer", "model", "optimizer", "rng", "config", "classes"}
    load_into(_to_load(cfg), path)
    _eval_load(path)


@USABLE_OR_REFUSED
@given(data=st.binary(max_size=400))
def test_random_bytes_are_refused_as_not_a_checkpoint(scratch, data, cfg, keep_rng):
    _every_reader_refuses_or_loads(_write(scratch, data), cfg)


@USABLE_OR_REFUSED
@given(fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_a_truncated_checkpoint_is_refused(scratch, fraction, cfg, good_bytes, keep_rng):
    path = _write(scratch, good_bytes[: int(len(good_bytes) * fraction)])
    with pytest.raises(CheckpointError, match=NOT_OURS):
        read_checkpoint(path)
    _every_reader_refuses_or_loads(path, cfg)


@USABLE_OR_REFUSED
@given(changes=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6))
def test_a_checkpoint_with_damaged_bytes_loads_or_is_refused(scratch, changes, cfg, good_bytes, keep_rng):
    data = bytearray(good_bytes)
    for where, value in changes:
        data[int(where * len(data))] = value
    _every_reader_refuses_or_loads(_write(scratch, bytes(data)), cfg)


def test_a_text_file_is_not_a_checkpoint_of_this_project(tmp_path, cfg, keep_rng):
    path = tmp_path / "x.pt"
    path.write_text("hello\n")  # today's torch: a raw KeyError from its legacy reader
    with pytest.raises(CheckpointError, match=NOT_OURS) as e:
        read_checkpoint(path)
    assert str(path) in str(e.value)
    _every_reader_refuses_or_loads(path, cfg)


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ([1, 2], "holds a list"),
        ({"weights": torch.zeros(2)}, "holds no model, config, trainer (its keys: weights)"),
        ({"model": {}, "config": {}}, "holds no trainer"),
        ({"model": torch.zeros(2), "config": {}, "trainer": {}}, "its model is a Tensor, not a state dict"),
        ({"model": {}, "config": "cifar10", "trainer": {}}, "its config is a str, not a state dict"),
    ],
)
def test_an_unpicklable_file_of_another_structure_is_not_ours(tmp_path, cfg, content, named, keep_rng):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=NOT_OURS) as e:
        read_checkpoint(path)
    assert named in str(e.value)
    _every_reader_refuses_or_loads(path, cfg)


class CallsSystem:
    """Pickles as ``os.system("true")`` (posix.system): what a malicious checkpoint holds. Never unpickled here."""

    def __reduce__(self):
        return (os.system, ("true",))


def test_a_file_that_would_run_code_names_the_call_and_not_the_unsafe_advice(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": CallsSystem(), "config": {}, "trainer": {}}, evil)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(evil)
    text = str(e.value)
    assert "refused" in text and f"call {os.system.__module__}.system" in text, text
    assert "weights_only" not in text, text  # torch's advice (weights_only=False) would run the payload


# --------------------------------------------------------------------------- resume: which file


def _run_folder(tmp_path: Path, files: dict[str, bytes]) -> Path:
    (tmp_path / CHECKPOINT_DIR).mkdir(parents=True)
    for name, data in files.items():
        (tmp_path / CHECKPOINT_DIR / name).write_bytes(data)
    return tmp_path


def test_resume_auto_skips_a_truncated_newest_checkpoint_saying_why(tmp_path, good_bytes):
    run = _run_folder(tmp_path, {"checkpoint_5.pt": good_bytes, "checkpoint_10.pt": good_bytes[: len(good_bytes) // 2]})
    warnings: list[str] = []
    assert find_resume_checkpoint("auto", run, warnings.append) == run / CHECKPOINT_DIR / "checkpoint_5.pt"
    assert len(warnings) == 1 and "checkpoint_10.pt" in warnings[0] and "truncated" in warnings[0], warnings


def test_resume_auto_with_only_damaged_checkpoints_is_an_error(tmp_path, good_bytes):
    run = _run_folder(tmp_path, {"checkpoint_5.pt": b"hello\n", "checkpoint_10.pt": good_bytes[:100]})
    with pytest.raises(CheckpointError, match="no checkpoint .* can be used") as e:
        find_resume_checkpoint("auto", run, lambda message: None)
    assert "checkpoint_5.pt" in str(e.value) and "checkpoint_10.pt" in str(e.value)


def test_resume_from_a_folder_says_it_is_one_and_what_to_give(tmp_path, good_bytes):
    run = _run_folder(tmp_path / "run", {"checkpoint_5.pt": good_bytes})
    for folder in (run, run / CHECKPOINT_DIR):
        with pytest.raises(CheckpointError, match="is a directory") as e:
            find_resume_checkpoint(str(folder), tmp_path / "out")
        assert str(run / CHECKPOINT_DIR / "checkpoint_5.pt") in str(e.value) and "does not exist" not in str(e.value)


# --------------------------------------------------------------------------- eval --json


def test_eval_json_to_a_folder_is_refused_before_evaluating(scratch, tmp_path, capsys, good_bytes):
    target = tmp_path / "scores"
    target.mkdir()
    code = evaluate.main([str(_write(scratch, good_bytes)), "--device", "cpu", "--json", str(target)])
    captured = capsys.readouterr()
    assert code == 2 and "is a directory" in captured.err and str(target) in captured.err, captured.err
    assert captured.out == ""  # refused before the evaluation, not after it


def test_eval_json_check_leaves_an_existing_file_and_the_folder_as_they_were(scratch, tmp_path, capsys, good_bytes):
    target = tmp_path / "scores.json"
    target.write_text("old")
    assert evaluate.main([str(_write(scratch, good_bytes)), "--device", "cpu", "--json", str(target)]) == 0, capsys.readouterr().err
    assert json.loads(target.read_text())["top5_k"] == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc: a folder where no file can be created, even by root")
def test_eval_json_where_no_file_can_be_created_is_refused_before_evaluating(scratch, capsys, good_bytes):
    code = evaluate.main([str(_write(scratch, good_bytes)), "--device", "cpu", "--json", "/proc/scores.json"])
    captured = capsys.readouterr()
    assert code == 2 and "cannot be written" in captured.err and "/proc/scores.json" in captured.err, captured.err
    assert captured.out == ""


# --------------------------------------------------------------------------- the real command lines


def _eval_cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ignite_fixmatch.eval", *map(str, args)], cwd=ROOT, env=subprocess_env(),
        capture_output=True, text=True, timeout=180,
    )


def _assert_exit_2(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr[-3000:])


@pytest.mark.slow
def test_cli_resume_from_a_text_file_or_a_folder_exits_2(folder, finished_run, tmp_path):
    text = tmp_path / "x.pt"
    text.write_text("hello\n")
    result = cli(["configs/quickstart.yaml", *tiny_overrides(folder, tmp_path / "a", f"resume={text}")])
    _assert_exit_2(result, NOT_OURS, str(text))
    reference, _ = finished_run
    result = cli(["configs/quickstart.yaml", *tiny_overrides(folder, tmp_path / "b", f"resume={reference}")])
    _assert_exit_2(result, "is a directory", "resume=auto")


@pytest.mark.slow
def test_cli_eval_of_a_text_file_and_of_a_truncated_checkpoint_exits_2(finished_run, tmp_path):
    text = tmp_path / "x.pt"
    text.write_text("hello\n")
    _assert_exit_2(_eval_cli(text, "--device", "cpu"), NOT_OURS, str(text))
    reference, _ = finished_run
    cut = tmp_path / "cut.pt"
    whole = (reference / CHECKPOINT_DIR / "checkpoint_20.pt").read_bytes()
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    _assert_exit_2(_eval_cli(cut, "--device", "cpu"), NOT_OURS, "truncated")


@pytest.mark.slow
def test_cli_resume_auto_falls_back_to_the_newest_intact_checkpoint(folder, finished_run, tmp_path):
    reference, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    newest = max(checkpoint_iteration(p) for p in list_checkpoints(run))
    for path in list_checkpoints(run):
        if checkpoint_iteration(path) == newest:
            path.write_bytes(path.read_bytes()[:1000])  # cut short, as by a full disk or a copy stopped midway
    fallback = [p for p in list_checkpoints(run) if checkpoint_iteration(p) < newest][-1]
    result = cli(["configs/quickstart.yaml", *tiny_overrides(folder, run, "resume=auto")])
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert f"skipping checkpoint_{newest}.pt" in log and "truncated" in log, log[-3000:]
    assert f"Resumed from {fallback.resolve()}" in log, log[-3000:]


@pytest.mark.slow
def test_cli_resume_of_an_explicit_damaged_checkpoint_stays_an_error(folder, finished_run, tmp_path):
    reference, _ = finished_run
    cut = tmp_path / "cut.pt"
    whole = (reference / CHECKPOINT_DIR / "checkpoint_20.pt").read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    result = cli(["configs/quickstart.yaml", *tiny_overrides(folder, tmp_path / "run", f"resume={cut}")])
    _assert_exit_2(result, NOT_OURS, str(cut))
