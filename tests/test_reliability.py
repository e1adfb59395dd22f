"""Never lose a run: preemption, kills inside checkpoint writes, divergence, full disk, hostile files.

Every failure is provoked for real on a real training subprocess.
"""

import os
import re
import resource
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import ROOT, cli, final_state_matches, load_state, popen, subprocess_env, tiny_overrides, wait_for_file
from ignite_fixmatch.main import EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_SAVE_FAILED, EXIT_USER_ERROR


def run_args(folder, out, *extra):
    return ["configs/quickstart.yaml", *tiny_overrides(folder, out, *extra)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.slow
def test_signal_saves_a_checkpoint_exits_75_and_resumes_bit_identical(sig, folder, finished_run, tmp_path):
    from helpers import HOLD_AFTER, held_marker, with_handler

    reference, _ = finished_run
    out = tmp_path / "run"
    held, release = held_marker(out, 5), tmp_path / "release"
    # Held after iteration 5 until the signal was sent: the run cannot finish before it gets the signal.
    proc = popen(with_handler(run_args(folder, out), HOLD_AFTER, iteration=5, marker=str(held), release=str(release)))
    try:
        wait_for_file(held, proc)
        os.kill(proc.pid, sig)
        release.touch()
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    assert "resume=auto" in output and "Traceback" not in output
    assert output.count("Continue with the same command and resume=auto") == 1  # the stop is reported once
    stopped = int(output.split("at iteration ")[-1].split(";")[0])
    assert stopped in (5, 6)  # the end of the iteration that got the signal, or of the next one
    assert (out / "checkpoints" / f"checkpoint_{stopped}.pt").is_file()  # saved where it stopped
    result = cli([*run_args(folder, out), "resume=auto"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at iteration {stopped}" in result.stderr
    final_state_matches(reference, out)


@pytest.mark.slow
def test_sigkill_inside_a_checkpoint_write_leaves_a_loadable_checkpoint(folder, finished_run, tmp_path):
    from helpers import HOLD_IN_SAVE, held_marker, with_handler

    reference, _ = finished_run
    out = tmp_path / "run"
    args = run_args(folder, out, "resume=auto")
    for iteration in (10, 15):  # killed inside the write of checkpoint_10, then the resumed run inside checkpoint_15's
        held = held_marker(out, iteration)
        proc = popen(with_handler(args, HOLD_IN_SAVE, iteration=iteration, marker=str(held)))
        try:
            wait_for_file(held, proc)  # half of the checkpoint's bytes are written, the process waits
        finally:
            proc.kill()
            proc.wait()
        ckpts = out / "checkpoints"
        assert [p for p in ckpts.iterdir() if p.name.startswith("tmp")], "the write was not an atomic (temporary file) write"
        assert not (ckpts / f"checkpoint_{iteration}.pt").exists()  # the half-written checkpoint has no final name
        for path in ckpts.glob("checkpoint_*.pt"):
            load_state(path)  # every complete-named file is loadable, even right after a kill mid-write
    result = cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list((out / "checkpoints").glob("tmp*"))  # leftovers of killed writes are cleaned
    final_state_matches(reference, out)


@pytest.mark.slow
def test_divergence_stops_with_the_iteration_and_keeps_the_last_good_checkpoint(folder, tmp_path):
    from helpers import with_handler

    out = tmp_path / "run"
    first = cli(run_args(folder, out, "train.num_iters=10"))
    assert first.returncode == 0, first.stderr[-3000:]
    good = load_state(out / "checkpoints" / "checkpoint_10.pt")
    # Resumed with a test handler that turns a weight into NaN after iteration 11: the loss of iteration 12 is NaN.
    result = cli(with_handler(run_args(folder, out, "train.num_iters=20", "resume=auto"), "tests.helpers:PoisonWeights", iteration=11))
    assert result.returncode == EXIT_DIVERGED, result.stderr[-3000:]
    assert "training diverged" in result.stderr and "checkpoint_10.pt" in result.stderr
    # The loss is read on the host every 50 iterations and before every checkpoint write: found at the
    # write of iteration 15, and the message still names the first bad iteration, after checkpoint_10.
    first_bad = int(re.search(r"loss is \S+ at iteration (\d+): training diverged", result.stderr).group(1))
    assert 10 < first_bad <= 15 and "detected at iteration 15" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.count("training diverged") == 1  # printed once, not again by Ignite's engine logger
    names = sorted(p.name for p in (out / "checkpoints").glob("checkpoint_*.pt"))
    assert names == ["checkpoint_10.pt", "checkpoint_5.pt"]  # nothing after the divergence was saved
    after = load_state(out / "checkpoints" / "checkpoint_10.pt")
    assert all(torch.equal(good["model"][k], after["model"][k]) for k in good["model"])


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write fails with EFBIG, like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


@pytest.mark.slow
def test_failed_checkpoint_write_is_a_clear_error_and_keeps_the_previous_one(folder, tmp_path):
    out = tmp_path / "run"
    first = cli(run_args(folder, out, "train.num_iters=5"))
    assert first.returncode == 0, first.stderr[-3000:]
    result = subprocess.run(
        [os.sys.executable, "-m", "ignite_fixmatch.main", *run_args(folder, out, "resume=auto", "handlers.tensorboard.every=100")],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size,
    )
    assert result.returncode == EXIT_SAVE_FAILED, result.stderr[-3000:]
    assert "could not write the checkpoint of iteration 10" in result.stderr and "checkpoint_5.pt" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best_checkpoint_5_top1=" + _score(out) + ".pt", "checkpoint_5.pt"]
    load_state(out / "checkpoints" / "checkpoint_5.pt")


def _score(out):
    return next((out / "checkpoints").glob("best_*")).stem.rsplit("=", 1)[-1]


class _WritesMarker:
    """A pickle payload that would create a file if it were ever unpickled with weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused(folder, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _WritesMarker(marker)}, evil)
    result = cli(run_args(folder, tmp_path / "run", f"resume={evil}"))
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-3000:]
    assert "refused" in result.stderr and "arbitrary code" in result.stderr
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is real: unsafe loading does run it
    assert marker.exists()


@pytest.mark.slow
def test_a_checkpoint_of_another_model_or_data_set_is_refused(folder, finished_run, tmp_path):
    reference, _ = finished_run
    ckpt = reference / "checkpoints" / "checkpoint_20.pt"
    wider = cli(run_args(folder, tmp_path / "a", f"resume={ckpt}", "model.widen_factor=2"))
    assert wider.returncode == EXIT_USER_ERROR and "cannot change on resume" in wider.stderr  # refused before any shape is compared
    assert "model.widen_factor 1 -> 2" in wider.stderr
    import shutil

    other = tmp_path / "other"
    shutil.copytree(folder, other)
    for split in ("train", "test"):
        (other / split / "frog").rename(other / split / "toad")
    renamed = cli(run_args(other, tmp_path / "b", f"resume={ckpt}"))
    assert renamed.returncode == EXIT_USER_ERROR, renamed.stderr[-3000:]
    assert "other classes" in renamed.stderr and "frog" in renamed.stderr and "toad" in renamed.stderr


@pytest.mark.slow
def test_a_corrupt_image_is_named_and_can_be_skipped(folder, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(folder, data)
    victim = sorted((data / "train" / "cat").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated png
    failed = cli(run_args(data, tmp_path / "a", "data.num_labels=-1", "data.batch_size=24"))
    assert failed.returncode == EXIT_USER_ERROR, failed.stderr[-3000:]
    assert victim.name in failed.stderr and "data.skip_corrupt" in failed.stderr
    skipped = cli(run_args(data, tmp_path / "b", "data.num_labels=-1", "data.batch_size=24", "data.skip_corrupt=true"))
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert victim.name in skipped.stderr  # warned


@pytest.mark.slow
def test_secrets_from_the_environment_never_reach_the_outputs(folder, tmp_path):
    secret = "s3cr3t-token-value-123"
    env = dict(subprocess_env(), CLEARML_API_SECRET_KEY=secret, CLEARML_API_ACCESS_KEY=secret, AWS_SECRET_ACCESS_KEY=secret)
    out = tmp_path / "run"
    result = subprocess.run(
        [os.sys.executable, "-m", "ignite_fixmatch.main", *run_args(folder, out, "train.num_iters=5")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert secret not in result.stderr + result.stdout
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
