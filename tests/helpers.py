"""Shared by the integration tests: a tiny real run on a generated image folder, through the real CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

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
        "fixmatch.threshold=0.5",
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
    """Start a CLI run and SIGKILL it as soon as its checkpoint at ``iteration`` exists."""
    proc = popen(args)
    wait_for_file(output_dir / "checkpoints" / f"checkpoint_{iteration}.pt", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
