"""The output folder (issue 15): overwrite only ever removes a run of ours, a failed start does not block the
corrected rerun, and two runs cannot share one folder. Real folders, real CLI runs, a real second process."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import HOLD_AFTER, ROOT, cli, held_marker, popen, tiny_overrides, wait_for_file, with_handler
from ignite_fixmatch import run_folder
from ignite_fixmatch.config import Config, load_config
from ignite_fixmatch.errors import OutputDirError
from ignite_fixmatch.training import prepare_output_dir

QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


@pytest.fixture(autouse=True)
def release_locks():
    """Each test starts and ends without run folders locked by this process."""
    yield
    for out in list(run_folder._held):
        run_folder.release_run_folder(out)


def config(out: Path, *extra: str, data_root: Path | None = None) -> Config:
    return load_config(None, [f"output_dir={out}", f"data.root={data_root or out.parent / 'no_data'}", *extra])


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def old_run_folder(out: Path, checkpoint: bool = True) -> Path:
    """What a run of the previous version left (no marker): config.yaml, train.log, checkpoints/."""
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.yaml").write_text("seed: 0\n")
    (out / "train.log").write_text("log\n")
    if checkpoint:
        (out / "checkpoints" / "checkpoint_5.pt").write_bytes(b"x")
        (out / "results.json").write_text("{}")
    return out


def test_overwrite_refuses_a_git_repository_and_keeps_it(tmp_path, monkeypatch):
    """`output_dir=. overwrite=true` in a clone used to delete the repository, .git included."""
    repo = tmp_path / "clone"
    (repo / ".git" / "objects").mkdir(parents=True)
    (repo / "README.md").write_text("mine")
    before = tree(repo)
    monkeypatch.chdir(repo)
    with pytest.raises(OutputDirError, match=r"no ignite-fixmatch run wrote \(\.git/, README\.md\)"):
        prepare_output_dir(config(Path("."), "overwrite=true"))
    assert tree(repo) == before


def test_overwrite_refuses_unrelated_files_naming_a_few_and_the_count(tmp_path):
    out = tmp_path / "stuff"
    out.mkdir()
    for i in range(7):
        (out / f"f{i}.txt").write_text("keep")
    with pytest.raises(OutputDirError, match=r"f0\.txt, f1\.txt, f2\.txt, f3\.txt, f4\.txt, \.\.\. \(7 entries in all\)"):
        prepare_output_dir(config(out, "overwrite=true"))
    assert len(list(out.iterdir())) == 7


def test_overwrite_refuses_the_data_set_folder(tmp_path):
    data = tmp_path / "data"
    (data / "train" / "cat").mkdir(parents=True)
    (data / "train" / "cat" / "0.png").write_bytes(b"png")
    with pytest.raises(OutputDirError, match="no ignite-fixmatch run wrote"):
        prepare_output_dir(config(data, "overwrite=true", data_root=data))
    assert (data / "train" / "cat" / "0.png").exists()


def test_even_a_run_folder_is_never_emptied_when_it_holds_the_data_or_is_the_working_directory(tmp_path, monkeypatch):
    out = old_run_folder(tmp_path / "run")
    (out / "data").mkdir()
    with pytest.raises(OutputDirError, match="a folder containing the data folder"):
        prepare_output_dir(config(out, "overwrite=true", data_root=out / "data"))
    monkeypatch.chdir(out)
    with pytest.raises(OutputDirError, match="the working directory"):
        prepare_output_dir(config(Path("."), "overwrite=true"))
    assert (out / "checkpoints" / "checkpoint_5.pt").exists() and (out / "data").is_dir()


def test_overwrite_replaces_a_run_of_ours_and_says_what_it_removed(tmp_path, caplog):
    out = old_run_folder(tmp_path / "run")  # an old run folder, recognised by its files
    with pytest.raises(OutputDirError, match="already holds a run"):
        prepare_output_dir(config(out))
    with caplog.at_level(logging.INFO, logger="ignite_fixmatch"):
        assert prepare_output_dir(config(out, "overwrite=true")) == out.resolve()
    assert sorted(p.name for p in out.iterdir()) == [run_folder.MARKER, "checkpoints"]
    assert not any((out / "checkpoints").iterdir())
    assert "checkpoints/, config.yaml, results.json, train.log" in caplog.text


def test_a_run_folder_without_checkpoint_or_results_is_free(tmp_path):
    """What a failed start leaves (config.yaml, train.log, an empty checkpoints/) does not block the next run."""
    out = old_run_folder(tmp_path / "run", checkpoint=False)
    assert prepare_output_dir(config(out)) == out.resolve()
    assert sorted(p.name for p in out.iterdir()) == [run_folder.MARKER, "checkpoints"]


def test_a_folder_locked_by_another_process_is_refused_naming_it(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ignite_fixmatch.run_folder import take_run_folder as t; "
         f"t({str(out)!r}, None, False, []); print('locked', flush=True); time.sleep(300)"],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirError, match=rf"is in use by the run of process {holder.pid} on .* \(started .*\)\. Wait for it"):
            prepare_output_dir(config(out, "resume=auto"))
    finally:
        holder.kill()
        holder.wait()
    assert prepare_output_dir(config(out, "resume=auto")) == out.resolve()  # the kernel dropped the dead process's lock


@pytest.mark.slow
def test_cli_overwrite_in_a_clone_exits_2_and_keeps_the_repository(tmp_path, folder):
    repo = tmp_path / "clone"
    (repo / ".git").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    result = cli([QUICKSTART, *tiny_overrides(folder, Path(".")), "overwrite=true"], cwd=repo)
    assert result.returncode == 2 and ".git/" in result.stderr and "Traceback" not in result.stderr
    assert (repo / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"


@pytest.mark.slow
def test_cli_run_refused_for_bad_data_then_corrected_rerun_succeeds(tmp_path, folder):
    out = tmp_path / "run"
    bad = cli([QUICKSTART, *tiny_overrides(tmp_path / "nope", out)])
    assert bad.returncode == 2 and str(tmp_path / "nope") in bad.stderr
    good = cli([QUICKSTART, *tiny_overrides(folder, out)])
    assert good.returncode == 0, good.stderr[-3000:]
    assert "what an earlier run left: checkpoints/, config.yaml, train.log" in good.stderr
    assert (out / "results.json").is_file() and str(tmp_path / "nope") not in (out / "train.log").read_text()


@pytest.mark.slow
def test_cli_second_run_on_a_folder_in_use_exits_2_naming_the_first(tmp_path, folder):
    out = tmp_path / "run"
    args = [QUICKSTART, *tiny_overrides(folder, out, "resume=auto")]
    marker = held_marker(out, 5)
    first = popen(with_handler(args, HOLD_AFTER, iteration=5, marker=str(marker)))
    try:
        wait_for_file(marker, first)
        second = cli(args)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by the run of process {first.pid} on" in second.stderr and "Traceback" not in second.stderr
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    log = (out / "train.log").read_text()
    assert log.count("Resolved config") == 1  # the second run wrote nothing into the first's log
