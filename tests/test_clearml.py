"""The clearml handler on real runs of the CLI without a ClearML server: the offline session read back from disk.

The runs start together (two cores) and share one module fixture:
- ``offline``: no credentials, no ~/clearml.conf; clearml + tensorboard handlers;
- ``baseline``: the same run without the clearml handler (training must be identical);
- ``hung``: credentials (fake secrets) for a server that accepts connections and never answers; this
  run also diverges at iteration 2 (huge lr), so its session must be flushed by the crash path;
- ``required``: offline=false without a server, which must stop with a clear error.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import zipfile
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from handlers.clearml import ClearML, augmentation_samples
from helpers import ROOT, make_folder, subprocess_env, tiny_overrides
from ignite_fixmatch.config import ConfigError, HandlerSpec, load_config
from ignite_fixmatch.data import build_data
from ignite_fixmatch.datasets import build_sources
from ignite_fixmatch.plugins import build_handler

CLEARML_CONF = Path(__file__).resolve().parent / "clearml.conf"  # report_use_subprocess: false (fast close)
FAKE_ACCESS_KEY = "AKTESTFAKE7Q2W9E"
FAKE_SECRET_KEY = "SKTESTFAKE-do-not-leak-4b8f1c"
OTHER_SECRET = "OTHER-SECRET-3e9d"  # an unrelated variable of the environment, which must not be captured either
SAMPLES = 3
EVERY = 2
LR = 0.02
BASE_HANDLERS = (
    "{name: ema}, {name: cosine_lr}, {name: terminate_on_nan}, {name: evaluation, params: {every: 10}}, "
    "{name: checkpoint, params: {every: 5, keep: 2}}"
)


def handlers(clearml_params: str | None) -> str:
    clearml = f", {{name: clearml, params: {clearml_params}}}" if clearml_params is not None else ""
    return f"handlers=[{BASE_HANDLERS}{clearml}, {{name: tensorboard, params: {{every: 1}}}}, {{name: progress, params: {{every: 5, mode: log}}}}]"


def clearml_env(tmp: Path, **extra: str) -> dict[str, str]:
    """No server, no credentials, no offline switch: the handler has to find out by itself."""
    env = subprocess_env()
    for name in list(env):
        if name.startswith(("CLEARML_", "TRAINS_")):
            del env[name]
    (tmp / "home").mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(tmp / "home"), CLEARML_CACHE_DIR=str(tmp / "cache"), CLEARML_CONFIG_FILE=str(CLEARML_CONF), FIXMATCH_OTHER_TOKEN=OTHER_SECRET)
    env.update(extra)
    return env


def start(folder: Path, out: Path, env: dict[str, str], clearml_params: str | None, lr: float = LR) -> subprocess.Popen:
    args = tiny_overrides(folder, out, f"optim.lr={lr}", handlers(clearml_params))
    return subprocess.Popen(
        [sys.executable, "-m", "ignite_fixmatch.main", "configs/quickstart.yaml", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


class Run:
    """A finished run: its output folder, ClearML cache folder, exit status and output."""

    def __init__(self, proc: subprocess.Popen, out: Path, cache: Path) -> None:
        self.out, self.cache = out, cache
        self.stdout, self.stderr = proc.communicate(timeout=300)
        self.returncode = proc.returncode

    def session(self) -> Path:
        folders = [p for p in (self.cache / "offline").iterdir() if p.is_dir()]
        assert len(folders) == 1, folders
        return folders[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clearml")
    folder = make_folder(tmp)
    hung_server = socket.socket()  # listens (the kernel completes connections) but never answers
    hung_server.bind(("127.0.0.1", 0))
    hung_server.listen(16)
    host = f"http://127.0.0.1:{hung_server.getsockname()[1]}"
    specs = {
        "offline": (clearml_env(tmp / "offline"), f"{{every: {EVERY}, sample_images: {SAMPLES}}}", LR),
        "baseline": (clearml_env(tmp / "baseline"), None, LR),
        "hung": (
            clearml_env(tmp / "hung", CLEARML_API_HOST=host, CLEARML_API_ACCESS_KEY=FAKE_ACCESS_KEY, CLEARML_API_SECRET_KEY=FAKE_SECRET_KEY),
            "{connect_timeout: 2, sample_images: 1, every: 1}",
            1e30,
        ),
        "required": (clearml_env(tmp / "required"), "{offline: false}", LR),
    }
    procs = {name: (start(folder, tmp / name / "run", env, params, lr), env) for name, (env, params, lr) in specs.items()}
    try:
        return {name: Run(proc, tmp / name / "run", Path(env["CLEARML_CACHE_DIR"])) for name, (proc, env) in procs.items()}
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:  # only after a failure above
                proc.kill()
        hung_server.close()


def seconds_before(log: str, marker: str) -> float:
    """Seconds from the timestamped log line before the first one holding ``marker`` to that line."""
    stamps = [(datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f"), line) for line in log.splitlines() if line[:2] == "20"]
    i = next(i for i, (_, line) in enumerate(stamps) if marker in line)
    return (stamps[i][0] - stamps[i - 1][0]).total_seconds()


def events(session: Path) -> list[dict]:
    return [e for line in (session / "metrics.jsonl").read_text().splitlines() if line.strip() for e in json.loads(line)]


def series(session: Path, event_type: str = "training_stats_scalar") -> dict[tuple[str, str], list[tuple[int, float]]]:
    found: dict[tuple[str, str], list] = defaultdict(list)
    for e in events(session):
        if e["type"] == event_type:
            found[(e["metric"], e["variant"])].append((e["iter"], e.get("value")))
    return {k: sorted(v) for k, v in found.items()}


@pytest.mark.slow
def test_runs_finish_offline_and_say_where_the_session_is(runs):
    run = runs["offline"]
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((run.out / "results.json").read_text())
    assert results["iteration"] == 20
    session = run.session()
    zipped = session.with_name(session.name + ".zip")
    assert zipped.is_file()
    log = (run.out / "train.log").read_text()
    assert log.count("ClearML: no ClearML credentials are configured") == 1
    assert "logging to a local offline session instead" in log
    assert f"ClearML offline session written to {zipped}" in log
    assert f"clearml-task --import-offline-session {zipped}" in log and "Task.import_offline_session(" in log
    with zipfile.ZipFile(zipped) as z:
        assert {"task.json", "metrics.jsonl"} <= set(z.namelist())


@pytest.mark.slow
def test_task_holds_the_resolved_config(runs):
    run = runs["offline"]
    task = json.loads((run.session() / "task.json").read_text())
    assert task["project_name"] == "ignite-fixmatch" and task["name"] == run.out.name
    params = {key: entry["value"] for key, entry in task["hyperparams"]["config"].items()}
    assert params["data/num_labels"] == "6" and params["data/name"] == "folder" and params["data/image_size"] == "16"
    assert float(params["optim/lr"]) == LR and params["train/num_iters"] == "20" and params["model/depth"] == "10"
    assert params["output_dir"] == str(run.out)
    assert "Args" not in task["hyperparams"]  # no argparse capture
    assert "optim:\n  lr: 0.02" in task["configuration"]["config.yaml"]["value"]


@pytest.mark.slow
def test_scalars_are_the_step_and_evaluation_metrics(runs):
    run = runs["offline"]
    found = series(run.session())
    expected_iters = list(range(EVERY, 21, EVERY))
    for key in ("loss", "loss_x", "loss_u", "mask_rate", "pseudo_acc", "lr", "data_time", "step_time"):
        assert [i for i, _ in found[(key, "train")]] == expected_iters, key
    # The same values as the tensorboard handler wrote for those iterations (both come from step_scalars).
    acc = EventAccumulator(str(run.out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    for key in ("loss", "mask_rate", "lr"):
        tb = {e.step: e.value for e in acc.Scalars(f"train/{key}")}
        for iteration, value in found[(key, "train")]:
            assert value == pytest.approx(tb[iteration], rel=1e-6, abs=1e-7), (key, iteration)
    assert found[("lr", "train")][0][1] <= LR
    history = json.loads((run.out / "results.json").read_text())["history"]
    assert [i for i, _ in found[("top1", "test_ema")]] == [r["iteration"] for r in history] == [10, 20]
    for (_iteration, value), record in zip(found[("top1", "test_ema")], history):
        assert 100.0 * value == pytest.approx(record["ema"]["top1"])
    assert [i for i, _ in found[("top5", "test_ema")]] == [10, 20] and [i for i, _ in found[("loss", "test_ema")]] == [10, 20]


@pytest.mark.slow
def test_sample_augmentations_are_debug_images(runs):
    session = runs["offline"].session()
    images = [e for e in events(session) if e["type"] == "training_debug_image"]
    assert sorted(e["variant"] for e in images) == [f"sample_{i:02d}" for i in range(SAMPLES)]
    for e in images:
        assert e["metric"] == "augmentations" and e["iter"] == 0
        path = Path(e["url"])
        assert path.is_file() and session in path.parents
        with Image.open(path) as img:  # 16 px images upscaled to 96, three side by side with 2 px gaps
            assert img.size == (3 * 96 + 2 * 2, 96)


@pytest.mark.slow
def test_best_checkpoint_is_the_output_model(runs):
    run = runs["offline"]
    task = json.loads((run.session() / "task.json").read_text())
    (model,) = task["offline_output_models"]
    best = sorted((run.out / "checkpoints").glob("best_*.pt"))
    assert len(best) == 1
    copied = Path(model["weights"]["weights_filename"])
    assert copied.name == best[0].name and run.session() in copied.parents
    assert copied.read_bytes() == best[0].read_bytes()  # the file itself stays in the run folder too
    assert model["weights"]["iteration"] == 20


@pytest.mark.slow
def test_training_is_unaffected_by_the_handler(runs):
    with_clearml, baseline = runs["offline"], runs["baseline"]
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    assert not (baseline.cache / "offline").exists()
    a = json.loads((with_clearml.out / "results.json").read_text())["history"]
    b = json.loads((baseline.out / "results.json").read_text())["history"]
    assert a == b
    losses = []
    for run in (with_clearml, baseline):
        acc = EventAccumulator(str(run.out / "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        losses.append([e.value for e in acc.Scalars("train/loss")])
    assert losses[0] == losses[1] and len(losses[0]) == 20


@pytest.mark.slow
def test_hung_server_falls_back_to_offline_in_bounded_time(runs):
    run = runs["hung"]
    log = (run.out / "train.log").read_text()
    assert log.count("cannot be reached (timed out; waited at most 2 s)") == 1
    # From the log line before (data summary) to the fallback warning: model, trainer, importing clearml,
    # the probe. Task.init against this server would retry with back-off for many minutes.
    assert seconds_before(log, "cannot be reached") < 30


@pytest.mark.slow
def test_a_crash_still_flushes_the_session_and_is_not_swallowed(runs):
    run = runs["hung"]
    assert run.returncode not in (0, 2) and "loss is nan at iteration 2" in run.stderr  # re-raised, not swallowed
    session = run.session()
    assert session.with_name(session.name + ".zip").is_file()
    assert "ClearML offline session written to" in (run.out / "train.log").read_text()
    found = series(session)
    assert [i for i, _ in found[("loss", "train")]] == [1]  # iteration 1 was reported before the crash
    assert len(series(session, "training_debug_image")) == 1
    log = " ".join(e["msg"] for line in (session / "log.jsonl").read_text().splitlines() for e in json.loads(line))
    assert "loss is nan at iteration 2" in log


@pytest.mark.slow
def test_secrets_are_in_no_file_of_the_sessions(runs):
    for name in ("offline", "hung"):
        run = runs[name]
        session = run.session()
        files = [p for p in session.rglob("*") if p.is_file()] + [p for p in run.out.rglob("*") if p.is_file()]
        assert any(p.name == "task.json" for p in files) and any(p.name == "log.jsonl" for p in files)
        zipped = session.with_name(session.name + ".zip")
        with zipfile.ZipFile(zipped) as z:
            blobs = [z.read(member) for member in z.namelist()]
        for blob in [p.read_bytes() for p in files] + blobs:
            for secret in (FAKE_ACCESS_KEY, FAKE_SECRET_KEY, OTHER_SECRET):
                assert secret.encode() not in blob
        assert FAKE_SECRET_KEY not in run.stderr + run.stdout


@pytest.mark.slow
def test_offline_false_without_a_server_is_a_clear_error(runs):
    run = runs["required"]
    assert run.returncode == 2, run.stderr[-3000:]
    assert "offline=false needs a ClearML server" in run.stderr and "no ClearML credentials" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (run.out / "results.json").exists()


@pytest.mark.parametrize(
    "params, named",
    [
        ({"every": 0}, "every"),
        ({"every": 2.5}, "every"),
        ({"sample_images": -1}, "sample_images"),
        ({"sample_images": True}, "sample_images"),
        ({"offline": "yes"}, "offline"),
        ({"offline": 1}, "offline"),
        ({"project": ""}, "project"),
        ({"task_name": " "}, "task_name"),
        ({"upload_best_model": "no"}, "upload_best_model"),
        ({"connect_timeout": 0}, "connect_timeout"),
    ],
)
def test_bad_params_are_refused(params, named):
    with pytest.raises(ValueError, match=named):
        ClearML(**params)
    with pytest.raises(ConfigError, match=rf"handlers\[3\] \(clearml\): (param ')?{named}"):
        build_handler(HandlerSpec("clearml", params), 3)


def test_good_params_are_kept():
    h = ClearML(project="p", task_name="t", offline=True, upload_best_model=False, sample_images=0, every=5, connect_timeout=1)
    assert (h.project, h.task_name, h.offline, h.upload_best_model, h.sample_images, h.every) == ("p", "t", True, False, 0, 5)
    assert ClearML.rank_zero_only is True


def test_samples_are_deterministic_and_leave_training_randomness_alone(tmp_path):
    folder = make_folder(tmp_path)
    cfg = load_config(None, tiny_overrides(folder, tmp_path / "run"))
    d = cfg.data
    data = build_data(cfg, build_sources(d.name, d.root, image_size=d.image_size, channels=d.channels))
    py_state, torch_state, np_state = random.getstate(), torch.get_rng_state(), np.random.get_state()
    first = augmentation_samples(data, 4, seed=0)
    assert random.getstate() == py_state and torch.equal(torch.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()
    again = augmentation_samples(data, 4, seed=0)
    assert len(first) == 4 and all(np.array_equal(a, b) for a, b in zip(first, again))
    assert all(row.shape == (96, 3 * 96 + 4, 3) and row.dtype == np.uint8 for row in first)
    views = [(row[:, :96], row[:, 98:194], row[:, 196:]) for row in first]  # original | weak | strong
    assert any(not np.array_equal(original, weak) for original, weak, _ in views)
    assert all(not np.array_equal(original, strong) for original, _, strong in views)
    assert len(augmentation_samples(data, 64, seed=0)) == len(data.unlabeled) == 24  # never more than there are
