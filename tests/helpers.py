"""Shared by the integration tests: a tiny real run on a generated image folder, through the real CLI."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from ignite.engine import Engine, Events

from ignite_fixmatch.checkpoint_names import checkpoint_iteration, is_best, list_checkpoints
from ignite_fixmatch.plugins import PERSIST

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import datagen  # noqa: E402


def tiny_overrides(data_root: Path, output_dir: Path, *extra: str) -> list[str]:
    """A real FixMatch run small enough for a test: WRN-10-1 on 16x16 images, 3 classes."""
    return [
        "data.name=folder",
        f"data.root={data_root}",
        "data.num_labels=6",
        "data.image_size=16",
        "data.batch_size=6",
        "data.mu=2",
        "data.eval_batch_size=12",
        "data.num_workers=0",
        "model.depth=10",
        "model.widen_factor=1",
        "algorithm.threshold=0.5",
        "train.num_iters=20",
        "train.epoch_length=5",
        f"output_dir={output_dir}",
        "handlers=[{name: ema}, {name: cosine_lr}, {name: terminate_on_nan}, {name: evaluation, params: {every: 10}}, "
        "{name: checkpoint, params: {every: 5, keep: 2}}, {name: tensorboard, params: {every: 1}}, {name: progress, params: {every: 5, mode: log}}]",
        *extra,
    ]


def make_folder(tmp_path: Path) -> Path:
    return datagen.make_image_folder(tmp_path / "images", n_train_per_class=8, n_test_per_class=4, size=(16, 16))


def cli(args: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ignite_fixmatch.main", *args], cwd=kwargs.pop("cwd", ROOT), env=subprocess_env(), capture_output=True,
        text=True, timeout=timeout, **kwargs,
    )


def popen(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ignite_fixmatch.main", *args], cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, **kwargs,
    )


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("CLEARML_API_ACCESS_KEY", None)
    return env


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, where: str = "") -> None:
    """Bit-identical nested state dicts."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until a running CLI process has written `path` (fails if the process ends first)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "timed out waiting for " + str(path)
        time.sleep(0.02)


def final_state_matches(reference: Path, run: Path, iteration: int = 20) -> None:
    """The two runs' checkpoints at `iteration` hold bit-identical weights, optimizer and schedule."""
    a = load_state(reference / "checkpoints" / f"checkpoint_{iteration}.pt")
    b = load_state(run / "checkpoints" / f"checkpoint_{iteration}.pt")
    for key in ("model", "ema_model", "optimizer", "lr_scheduler", "trainer"):
        assert_same_tensors(a[key], b[key], key)


def kill_after_checkpoint(args: list[str], output_dir: Path, iteration: int = 10) -> None:
    """Start a CLI run, hold it right after its checkpoint at ``iteration`` (``HoldAfterIteration``) and
    SIGKILL it there: the run cannot get past that iteration before the kill, however slow the test is."""
    marker = held_marker(output_dir, iteration)
    proc = popen(with_handler(args, HOLD_AFTER, iteration=iteration, marker=str(marker)))
    try:
        wait_for_file(marker, proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    written = [checkpoint_iteration(p) for p in list_checkpoints(output_dir) if not is_best(p)]
    assert iteration in written and max(written) == iteration, written  # killed at that iteration, after its checkpoint


# --------------------------------------------------------------------------- holding a real run at a known point
# Tests that interrupt a run (SIGKILL, SIGTERM) must not race it: a tiny run takes about 2 s, so "kill it
# when checkpoint_10.pt appears" may find it already finished on a loaded machine. These handlers, added
# to the run's config, hold the run at a known point and create a marker file there; the test waits for
# the marker (an event, with a deadline) and only then acts on the process.

HOLD_AFTER = "tests.helpers:HoldAfterIteration"
HOLD_IN_SAVE = "tests.helpers:HoldInsideSave"
HOLD_TIMEOUT = 300.0  # seconds a held run waits for the test before failing loudly


def with_handler(args: list[str], name: str, **params) -> list[str]:
    """``args`` with one more handler at the end of the list set by its last ``handlers=[...]`` override."""
    i = max(i for i, a in enumerate(args) if a.startswith("handlers="))
    specs = yaml.safe_load(args[i].split("=", 1)[1])
    return [*args[:i], "handlers=" + json.dumps([*specs, {"name": name, "params": params}]), *args[i + 1 :]]


def held_marker(output_dir: Path, iteration: int) -> Path:
    """Where a held run says it is held: next to its output folder, not in it."""
    return output_dir.parent / f"{output_dir.name}.held_at_{iteration}"


def _hold(marker: str | None, release: str | None) -> None:
    """Create ``marker``, then wait until ``release`` exists (without one: until the process is killed)."""
    if marker is not None:
        Path(marker).touch()
    deadline = time.monotonic() + HOLD_TIMEOUT
    while release is None or not Path(release).exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"held for {HOLD_TIMEOUT} s and never released or killed (marker {marker})")
        time.sleep(0.02)


class HoldAfterIteration:
    """Test handler: at the end of iteration ``iteration``, after every other handler (the checkpoint is
    written), create ``marker`` and wait for ``release`` (or to be killed). Under several processes every
    rank is held; rank 0 alone creates the marker. Not saved: it does not change the run's state."""

    def __init__(self, iteration: int, marker: str, release: str | None = None) -> None:
        self.iteration, self.marker, self.release = iteration, marker, release

    priority = PERSIST + 10  # attached, and so fired, after the checkpoint handler (the last built-in)

    def attach(self, ctx) -> None:
        marker = self.marker if ctx.rank == 0 else None

        def hold(engine: Engine) -> None:
            if engine.state.iteration == self.iteration:
                _hold(marker, self.release)

        ctx.trainer.add_event_handler(Events.ITERATION_COMPLETED, hold)


class PoisonWeights:
    """Test handler: after iteration ``iteration``, the first weight tensor of the model becomes NaN, so the next
    step's loss is NaN: a real divergence, at a known iteration, whatever the data."""

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def attach(self, ctx) -> None:
        weight = next(ctx.model.parameters())

        def poison(engine: Engine) -> None:
            if engine.state.iteration == self.iteration:
                with torch.no_grad():
                    weight.fill_(float("nan"))

        ctx.trainer.add_event_handler(Events.ITERATION_COMPLETED, poison)


class HoldInsideSave:
    """Test handler: the first ``torch.save`` of iteration ``iteration`` (the checkpoint write) writes half
    of its bytes to its destination, creates ``marker`` and waits to be killed: a SIGKILL in the middle
    of a checkpoint write, every time."""

    def __init__(self, iteration: int, marker: str) -> None:
        self.iteration, self.marker = iteration, marker

    def attach(self, ctx) -> None:
        trainer, real_save = ctx.trainer, torch.save

        def save(obj, f, *args, **kwargs):
            if trainer.state.iteration != self.iteration:
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
            if hasattr(f, "write"):
                f.write(data)
                f.flush()
            else:
                Path(f).write_bytes(data)
            _hold(self.marker, None)

        torch.save = save


class DumpState:
    """Test handler: at the end of the run, every process writes ``to_save[key]``'s state dict to
    ``<prefix>.rank<r>.pt``, so a test can compare what the processes hold."""

    def __init__(self, prefix: str, key: str) -> None:
        self.prefix, self.key = prefix, key

    def attach(self, ctx) -> None:
        item, rank = ctx.to_save[self.key], ctx.rank
        ctx.trainer.add_event_handler(Events.COMPLETED, lambda _: torch.save(item.state_dict(), f"{self.prefix}.rank{rank}.pt"))


def kill_two_processes_after_checkpoint(args: list[str], output_dir: Path, iteration: int = 10) -> None:
    """:func:`kill_after_checkpoint` for a job of 2 gloo processes: hold it right after its checkpoint at
    ``iteration``, SIGKILL its whole process group and wait until every process is gone."""
    from test_distributed import LAUNCH_TIMEOUT, spawn_args, wait_group_gone

    held = held_marker(output_dir, iteration)
    proc = popen([*with_handler(args, HOLD_AFTER, iteration=iteration, marker=str(held)), *spawn_args()], start_new_session=True)
    try:
        wait_for_file(held, proc, timeout=LAUNCH_TIMEOUT)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    wait_group_gone(proc.pid)
