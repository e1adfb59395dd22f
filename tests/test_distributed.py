"""Distributed training on CPU with the gloo backend and real processes.

Every way a user starts a job runs the real CLI on a generated image folder: processes spawned by
Ignite (``dist.nproc_per_node``), two "nodes" on localhost (``dist.nnodes=2``) and ``torchrun``. Two
processes on 2 ranks must give bit-identical runs whatever started them, and a SIGKILLed 2-process job
resumed with ``resume=auto`` must end exactly where the uninterrupted one did. The equivalence of
1 and 2 processes is checked on the real trainer step, sampler shards and evaluator. Every launch
uses a free port and a timeout, so a broken launch fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import ignite.distributed as idist
import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

import datagen
import helpers
from helpers import ROOT, assert_same_tensors, cli, load_state, make_folder, popen, tiny_overrides, wait_for_file
from ignite_fixmatch.algorithms import build_algorithm
from ignite_fixmatch.config import Config, ConfigError, load_config
from ignite_fixmatch.data import FixMatchStream, build_data, build_eval_loader, sources_from_config
from ignite_fixmatch.evaluation import create_evaluator
from ignite_fixmatch.main import parallel_kwargs
from ignite_fixmatch.trainer import create_trainer
from ignite_fixmatch.training import build_optimizer, check_sync_bn, model_from_config

CONFIG = "configs/quickstart.yaml"
LAUNCH_TIMEOUT = 240  # seconds for one job: a spawn costs 4-16 s here, the tiny run about 2 s
COMPARED = ("model", "ema_model", "optimizer", "lr_scheduler", "trainer", "evaluation")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_args(nproc: int = 2, timeout_s: int = 60) -> list[str]:
    """Overrides for Ignite to spawn ``nproc`` gloo processes on a free port, failing fast if a rank is missing."""
    return ["dist.backend=gloo", f"dist.nproc_per_node={nproc}", f"dist.master_port={free_port()}", f"dist.timeout_s={timeout_s}"]


def torchrun(args: list[str], timeout: float = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "torchrun"
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return subprocess.run(
        [*launcher, "--standalone", "--nproc_per_node=2", "-m", "ignite_fixmatch.main", *args],
        cwd=ROOT, env=helpers.subprocess_env(), capture_output=True, text=True, timeout=timeout,
    )


def finish(procs: list[subprocess.Popen], timeout: float = LAUNCH_TIMEOUT) -> list[str]:
    """Outputs of processes started with ``popen``; whatever still runs at the deadline is killed."""
    deadline = time.monotonic() + timeout
    try:
        return [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def wait_group_gone(pgid: int, timeout: float = 30) -> None:
    """True once no process of the job (launcher, its spawned workers) is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes of job {pgid} are still running {timeout} s after it ended")


def assert_same_final_state(reference: Path, other: Path) -> None:
    a = load_state(reference / "checkpoints" / "checkpoint_20.pt")
    b = load_state(other / "checkpoints" / "checkpoint_20.pt")
    for key in COMPARED:
        assert_same_tensors(a[key], b[key], key)


def assert_one_set_of_outputs(out: Path) -> None:
    results = json.loads((out / "results.json").read_text())
    assert results["iteration"] == 20 and [r["iteration"] for r in results["history"]] == [10, 20]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == sorted(["checkpoint_15.pt", "checkpoint_20.pt", names[0]]) and names[0].startswith("best_checkpoint_"), names
    assert len(list((out / "tensorboard").iterdir())) == 1  # one event file: only rank 0 logs
    expected = [".ignite-fixmatch-run", "checkpoints", "config.yaml", "labeled_indices.txt", "results.json", "tensorboard", "train.log"]
    assert sorted(p.name for p in out.iterdir()) == expected  # the marker (and lock) of a run folder, then rank 0's outputs
    log = (out / "train.log").read_text()
    assert log.count("Evaluation at iteration 10") == 1 and log.count("iteration 5/20") == 1
    assert "processes: 2" in log


@pytest.fixture(scope="module")
def ddp_run(folder, tmp_path_factory):
    """The reference: a 2-process job spawned by Ignite, run to the end."""
    out = tmp_path_factory.mktemp("runs") / "ddp"
    result = cli([CONFIG, *tiny_overrides(folder, out), *spawn_args()], timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


# --------------------------------------------------------------------------- one node, processes spawned by Ignite


@pytest.mark.slow
def test_two_processes_write_one_set_of_outputs(ddp_run):
    out, result = ddp_run
    assert_one_set_of_outputs(out)
    assert result.stderr.count("Evaluation at iteration 20") == 1  # rank 1 logs nothing
    assert result.stderr.count("Resolved config") == 1
    assert "Apply torch DistributedDataParallel" in result.stderr


def _evaluate_saved_ema(cfg: Config, checkpoint: Path, rank: int, world_size: int) -> dict:
    """Top-1/top-5/loss of the checkpoint's EMA weights on shard ``rank`` of ``world_size`` (one process)."""
    data = build_data(cfg, sources_from_config(cfg))
    model = model_from_config(cfg, data.sources.num_classes, data.sources.channels)
    model.load_state_dict(load_state(checkpoint)["ema_model"])
    evaluator = create_evaluator(
        model, torch.device("cpu"), num_classes=data.sources.num_classes, mean=data.sources.mean, std=data.sources.std,
        channels_last=cfg.model.channels_last,
    )
    metrics = evaluator.run(build_eval_loader(data.sources, cfg.data.eval_batch_size, 0, rank, world_size)).metrics
    return {"top1": 100.0 * metrics["top1"], "top5": 100.0 * metrics["top5"], "loss": metrics["loss"]}


@pytest.mark.slow
def test_two_process_metrics_are_reduced_over_both_shards(ddp_run, folder):
    out, _ = ddp_run
    cfg = load_config(ROOT / CONFIG, tiny_overrides(folder, out))
    reported = json.loads((out / "results.json").read_text())
    whole = _evaluate_saved_ema(cfg, out / "checkpoints" / "checkpoint_20.pt", 0, 1)
    shards = [_evaluate_saved_ema(cfg, out / "checkpoints" / "checkpoint_20.pt", r, 2) for r in (0, 1)]
    # The shards really differ, so a result from one shard alone would not pass.
    assert all(abs(s["loss"] - whole["loss"]) > 1e-3 for s in shards), (shards, whole)
    assert reported["top1"] == pytest.approx(whole["top1"]) and reported["top5"] == pytest.approx(whole["top5"])
    assert reported["loss"] == pytest.approx(whole["loss"], rel=1e-5)


# --------------------------------------------------------------------------- 1 process = 2 processes on the same global batch


class NoBatchNormNet(nn.Module):
    """Each sample's output depends on that sample only, so sharding the batch cannot change the gradient."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4), 1))


def train_and_evaluate(local_rank: int, cfg: Config, out: str, steps: int) -> None:
    """Module level so that Ignite can spawn it: a few real FixMatch steps of a BN-free model under DDP on
    this rank's shard of the real data stream, then the real evaluator on this rank's test shard."""
    torch.set_num_threads(1)
    rank, world_size, device = idist.get_rank(), idist.get_world_size(), idist.device()
    data = build_data(cfg, sources_from_config(cfg))
    torch.manual_seed(cfg.seed)
    net = NoBatchNormNet(data.sources.num_classes)
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    model = idist.auto_model(net)
    optimizer = idist.auto_optim(build_optimizer(model, cfg))
    algorithm = build_algorithm(cfg.algorithm.name, cfg.algorithm.params, num_classes=data.sources.num_classes, num_unlabeled=len(data.unlabeled))
    trainer = create_trainer(
        model, optimizer, device, algorithm,
        batch_transform=data.batched,  # the views of data.augment=batched (auto on a CPU); None for pil
    )
    masks: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: masks.append(float(e.state.output["mask_rate"])))
    stream = FixMatchStream(data, cfg, rank, world_size, start_iteration=lambda: trainer.state.iteration)
    trainer.run(stream, max_iters=steps, epoch_length=steps)

    evaluator = create_evaluator(model, device, num_classes=data.sources.num_classes, mean=data.sources.mean, std=data.sources.std)
    seen = torch.zeros(1, dtype=torch.long)

    def count(engine: Engine) -> None:
        seen.add_(engine.state.output[1].numel())

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, count)
    metrics = evaluator.run(build_eval_loader(data.sources, cfg.data.eval_batch_size, 0, rank, world_size)).metrics
    seen_per_rank = idist.all_gather(seen)
    if rank == 0:
        weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
        torch.save({"initial": initial, "weights": weights, "metrics": metrics, "seen": seen_per_rank.tolist(), "masks": masks}, out)


@pytest.mark.slow
def test_two_processes_take_the_same_steps_as_one_on_the_same_global_batch(folder, tmp_path):
    steps = 3
    cfg = load_config(ROOT / CONFIG, tiny_overrides(folder, tmp_path / "unused", "algorithm.threshold=0.35", "data.batch_size=6", "data.mu=2"))
    single, double = tmp_path / "single.pt", tmp_path / "double.pt"
    train_and_evaluate(0, cfg, str(single), steps)  # this process: no distributed context, world size 1
    with idist.Parallel(backend="gloo", nproc_per_node=2, master_port=free_port(), timeout=timedelta(seconds=60)) as parallel:
        parallel.run(train_and_evaluate, cfg, str(double), steps)
    a, b = torch.load(single, weights_only=True), torch.load(double, weights_only=True)
    assert 0.0 < sum(a["masks"]) / steps < 1.0, a["masks"]  # the masked unlabeled loss takes part, partly
    moved = max(float((a["weights"][k] - a["initial"][k]).abs().max()) for k in a["weights"])
    assert moved > 1e-3  # far above the tolerance below: the steps changed the weights
    for k in a["weights"]:
        torch.testing.assert_close(b["initial"][k], a["initial"][k], rtol=0, atol=0)
        torch.testing.assert_close(b["weights"][k], a["weights"][k], rtol=1e-5, atol=1e-6, msg=k)
    # Each process evaluated its half of the test set once; the metrics were reduced over both halves.
    assert a["seen"] == [12] and b["seen"] == [6, 6]
    assert b["metrics"]["top1"] == pytest.approx(a["metrics"]["top1"])
    assert b["metrics"]["loss"] == pytest.approx(a["metrics"]["loss"], rel=1e-5)


@pytest.mark.slow
def test_two_processes_train_with_the_compiled_step(ddp_run, folder, tmp_path):
    """torch.compile of the forward + losses around the DDP-wrapped model (what a long CPU run gets by
    default): both ranks compile, nothing falls back, and the weights match the eager job's closely."""
    reference, _ = ddp_run
    out = tmp_path / "compiled"
    result = cli([CONFIG, *tiny_overrides(folder, out), *spawn_args(), "model.compile=on"], timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compile on (reduce-overhead)" in result.stderr and "torch.compile failed" not in result.stderr
    # The same steps: the first 5 iterations' mean losses agree to float rounding. Later, the rounding
    # differences of fused kernels grow through training (about 2 % of a weight after 20 steps).
    first = [re.search(r"iteration 5/20  loss ([\d.]+)  loss_x ([\d.]+)", (d / "train.log").read_text()).groups() for d in (reference, out)]
    assert [float(v) for v in first[1]] == pytest.approx([float(v) for v in first[0]], abs=2e-4)
    eager, compiled = (load_state(d / "checkpoints" / "checkpoint_20.pt")["model"] for d in (reference, out))
    keys = [k for k in eager if eager[k].is_floating_point()]
    a, b = (torch.cat([state[k].flatten() for k in keys]) for state in (eager, compiled))
    assert float((b - a).norm() / a.norm()) < 0.02  # 0.3 % measured


# --------------------------------------------------------------------------- other launchers


@pytest.mark.slow
def test_two_nodes_on_localhost_finish_with_the_same_result(ddp_run, folder, tmp_path):
    reference, _ = ddp_run
    out = tmp_path / "nodes"
    common = [
        CONFIG, *tiny_overrides(folder, out), "dist.backend=gloo", "dist.nnodes=2", "dist.nproc_per_node=1",
        "dist.master_addr=127.0.0.1", f"dist.master_port={free_port()}", "dist.timeout_s=60",
    ]
    procs = [popen([*common, f"dist.node_rank={r}"], start_new_session=True) for r in (0, 1)]
    outputs = finish(procs)
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    assert "Finished: top-1" in outputs[0] and "Finished: top-1" not in outputs[1]  # node 1 holds rank 1 only
    assert_one_set_of_outputs(out)
    assert_same_final_state(reference, out)


@pytest.mark.slow
def test_torchrun_picks_gloo_from_the_environment(ddp_run, folder, tmp_path):
    reference, _ = ddp_run
    out = tmp_path / "torchrun"
    result = torchrun([CONFIG, *tiny_overrides(folder, out)])  # no dist.* keys at all
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backend: 'gloo'" in result.stderr
    assert_one_set_of_outputs(out)
    assert_same_final_state(reference, out)


@pytest.mark.slow
def test_batch_that_does_not_split_over_the_processes_is_refused(folder, tmp_path):
    out = tmp_path / "r"
    t0 = time.monotonic()
    result = cli([CONFIG, *tiny_overrides(folder, out, "data.batch_size=5"), *spawn_args()], timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "data.batch_size" in result.stderr and "multiple of the 2 processes" in result.stderr
    assert time.monotonic() - t0 < 60 and not out.exists()  # refused before any process was spawned


def test_sync_batchnorm_on_cpu_is_refused_with_the_fix(folder, tmp_path):
    cfg = load_config(ROOT / CONFIG, tiny_overrides(folder, tmp_path / "r", "model.sync_bn=true"))
    with pytest.raises(ConfigError, match=r"model\.sync_bn.*model\.sync_bn=false"):
        check_sync_bn(cfg, 2, torch.device("cpu"))
    check_sync_bn(cfg, 1, torch.device("cpu"))  # one process: nothing to synchronise, nothing refused


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPUs")
def test_nccl_without_gpus_is_refused_before_spawning(folder, tmp_path):
    cfg = load_config(ROOT / CONFIG, tiny_overrides(folder, tmp_path / "r", "dist.backend=nccl", "dist.nproc_per_node=2"))
    with pytest.raises(ConfigError, match=r"needs CUDA GPUs.*dist\.backend=gloo"):
        parallel_kwargs(cfg)


# --------------------------------------------------------------------------- failures


@pytest.mark.slow
def test_resume_under_two_processes_after_sigkill_ends_where_the_uninterrupted_run_did(ddp_run, folder, tmp_path):
    """Killed after iteration 15 (its checkpoint written; each process then holds 5 steps of its own
    pseudo-label counts, not yet reported) and resumed: the weights, the history, the per-class results and
    the pseudo-label window are those of the uninterrupted job, whose two shards count each test image once."""
    import numpy as np

    from helpers import kill_two_processes_after_checkpoint

    reference, _ = ddp_run
    results = json.loads((reference / "results.json").read_text())
    confusion = np.array(results["confusion"]["ema"])
    assert confusion.sum(axis=1).tolist() == [4, 4, 4]  # 12 test images split over 2 shards, each counted once
    assert 100.0 * np.trace(confusion) / 12 == pytest.approx(results["top1"], abs=1e-9)
    pseudo = results["pseudo_labels"]  # 12 unlabeled images per step (tiny_overrides: batch 6 x mu 2)
    assert pseudo["steps"] == 10 and pseudo["known"] == pseudo["counts"] and 0 < sum(pseudo["counts"]) <= 10 * 12

    out = tmp_path / "killed"
    args = [CONFIG, *tiny_overrides(folder, out)]
    kill_two_processes_after_checkpoint(args, out, iteration=15)  # the whole job at once, as a scheduler does
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint_*.pt")) == ["checkpoint_10.pt", "checkpoint_15.pt"]
    result = cli([*args, *spawn_args(), "resume=auto"], timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from" in result.stderr
    assert_same_final_state(reference, out)
    again = json.loads((out / "results.json").read_text())
    for key in ("history", "pseudo_labels", "per_class", "confusion"):
        assert again[key] == results[key], key


@pytest.mark.slow
def test_a_crash_in_one_process_ends_the_whole_job_with_its_error(tmp_path):
    images = make_folder(tmp_path)
    out = tmp_path / "crash"
    args = [CONFIG, *tiny_overrides(images, out)]
    cfg = load_config(ROOT / CONFIG, args[1:])
    broken = sources_from_config(cfg).test.path(1)  # test image 1 is in rank 1's shard only
    datagen.corrupt_file(broken, "garbage")
    # Rank 0 waits in a collective for rank 1: the job must end long before that collective's timeout.
    proc = popen([*args, *spawn_args(timeout_s=600)], start_new_session=True)
    (output,) = finish([proc], timeout=LAUNCH_TIMEOUT)  # kills a hung job, which then fails below
    assert proc.returncode == 2, output[-3000:]
    assert "error (process 1 of 2): cannot read image file" in output and broken in output
    assert "Traceback" not in output
    wait_group_gone(proc.pid)  # rank 0 did not stay behind
    # It failed at the first evaluation (iteration 10), mid-run, not at start-up.
    assert (out / "checkpoints" / "checkpoint_5.pt").exists() and not (out / "results.json").exists()


def _spawned_workers(launcher_pid: int) -> list[int]:
    """PIDs of the training processes Ignite spawned under the launcher (not multiprocessing's tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher_pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


@pytest.mark.slow
def test_a_killed_process_ends_the_whole_job_quickly(folder, tmp_path):
    out = tmp_path / "killed-rank"
    proc = popen([CONFIG, *tiny_overrides(folder, out, "train.num_iters=2000"), *spawn_args(timeout_s=600)], start_new_session=True)
    try:
        wait_for_file(out / "checkpoints" / "checkpoint_5.pt", proc, timeout=LAUNCH_TIMEOUT)
        workers = _spawned_workers(proc.pid)
        assert len(workers) == 2, workers
        killed_at = time.monotonic()
        os.kill(workers[-1], signal.SIGKILL)  # as the kernel's OOM killer would
        (output,) = finish([proc], timeout=120)  # far below the 600 s collective timeout
        assert time.monotonic() - killed_at < 120
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 5, output[-3000:]
    assert "was killed by SIGKILL" in output and "resume=auto" in output
    wait_group_gone(proc.pid)
    load_state(sorted((out / "checkpoints").glob("checkpoint_*.pt"))[-1])  # what was saved is usable
