"""The mlflow and wandb handlers, read back from what they wrote: MLflow's local store (with MlflowClient)
and the W&B offline run (its .wandb record log, parsed with wandb's own protobuf messages, and its files).

- one real CLI run with both handlers (and tensorboard, whose scalars the trackers' must equal), without
  W&B credentials: it must train exactly as the same run without them (``finished_run``);
- real Engines that fire the evaluation event with a hand-made record (class names a tracker cannot
  take as they are) and that fail or are preempted mid-run;
- the config check: a missing package named with the pip command, bad params, no import of the trackers.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ignite.engine import Engine, Events
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from handlers.mlflow import MLflow
from handlers.tracking import flat_config, metric_names
from handlers.wandb import WandB
from helpers import ROOT, final_state_matches, subprocess_env, tiny_overrides, with_handler
from ignite_fixmatch.config import ConfigError, HandlerSpec, load_config
from ignite_fixmatch.errors import NonFiniteLossError, Preempted
from ignite_fixmatch.evaluation import EvaluationEvents
from ignite_fixmatch.plugins import Context, attach_all, build_handler

EVERY = 2  # train scalars every 2 iterations; the tiny run evaluates at 10 and 20


def tracker_env(tmp: Path) -> dict[str, str]:
    """No W&B credentials and no tracker settings from the machine running the tests."""
    env = {k: v for k, v in subprocess_env().items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    (tmp / "home").mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(tmp / "home"), **{f"WANDB_{kind}_DIR": str(tmp / f"wandb_{kind.lower()}") for kind in ("CONFIG", "CACHE", "DATA")})
    return env


@pytest.fixture()
def clean_env(tmp_path, monkeypatch):
    """The same for the tests that run the handlers in this process (restored afterwards)."""
    for name in [k for k in os.environ if k.startswith(("WANDB_", "MLFLOW_"))]:
        monkeypatch.delenv(name)
    for name, value in tracker_env(tmp_path).items():
        if name.startswith(("HOME", "WANDB_")):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")  # the handler must set it for its file store


# ---------------------------------------------------------------------- reading the stores back


def mlflow_client(store: Path):
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # reading a file store needs it too (MLflow 3)
    return MlflowClient(store.as_uri())


def only_run(client, experiment: str = "ignite-fixmatch"):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, runs
    return runs[0]


def history(client, run, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def artifact_json(client, run, path: str):
    return json.loads(Path(client.download_artifacts(run.info.run_id, path)).read_text())


def wandb_records(run_folder: Path) -> list:
    """The records of an offline run's ``run-<id>.wandb``: W&B's leveldb-style log (a 7-byte header ``:W&B``
    + magic + version, then 32 KiB blocks of chunks, each with crc32, length and type: full, first,
    middle, last) of ``wandb_internal_pb2.Record`` messages. wandb 0.31 has no Python reader for it."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_folder.glob("run-*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    records, pos, chunks = [], 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # the zero-filled end of a block
            pos += left
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def wandb_read(run_folder: Path) -> dict:
    """The run record, its config, the history rows by step, the final summary and the exit code."""
    import wandb

    wandb.teardown()  # a finished run's last records reach the file when W&B's service stops (at exit in the CLI)
    out: dict = {"history": {}, "summary": {}, "files": []}
    for r in wandb_records(run_folder):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = r.run
            out["config"] = {u.key: json.loads(u.value_json) for u in r.run.config.update if u.key != "_wandb"}
        elif kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            out["history"].setdefault(row["_step"], {}).update(row)
        elif kind == "summary":
            out["summary"].update({u.key: json.loads(u.value_json) for u in r.summary.update if u.key})
        elif kind == "files":
            out["files"] += [f.path for f in r.files.files]
        elif kind == "exit":
            out["exit_code"] = r.exit.exit_code
    return out


def wandb_table(run_folder: Path, row: dict, key: str) -> dict:
    """A table logged under ``key``: the history holds its file's path under the run's files/."""
    assert row[f"{key}/_type"] == "table-file", row
    return json.loads((run_folder / "files" / row[f"{key}/path"]).read_text())


def scalars(event_dir: Path, tag: str) -> list[tuple[int, float]]:
    accumulator = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


# ---------------------------------------------------------------------- a real CLI run with both trackers


@pytest.fixture(scope="module")
def tracked_run(folder, tmp_path_factory):
    """The tiny run of ``finished_run`` (same data, same config) with the mlflow and wandb handlers added."""
    tmp = tmp_path_factory.mktemp("tracked")
    out = tmp / "run"
    args = with_handler(with_handler(tiny_overrides(folder, out), "mlflow", every=EVERY), "wandb", every=EVERY)
    result = subprocess.run(
        [sys.executable, "-m", "ignite_fixmatch.main", "configs/quickstart.yaml", *args],
        cwd=ROOT, env=tracker_env(tmp), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_trackers_leave_training_unchanged(tracked_run, finished_run):
    final_state_matches(finished_run[0], tracked_run[0])


@pytest.mark.slow
def test_mlflow_store_holds_the_config_scalars_per_class_results_and_artifacts(tracked_run):
    out, _ = tracked_run
    client = mlflow_client(out / "mlruns")
    run = only_run(client)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    saved = load_config(out / "config.yaml")
    assert run.data.params == {k: str(v) for k, v in flat_config(saved).items()}
    assert run.data.params["data.num_labels"] == "6" and "'name': 'mlflow'" in run.data.params["handlers"]
    assert yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml")).read_text()) == yaml.safe_load((out / "config.yaml").read_text())

    # train scalars every EVERY iterations, the values TensorBoard got (it logs every iteration)
    for name in ("loss", "mask_rate", "lr"):
        tensorboard = dict(scalars(out / "tensorboard", f"train/{name}"))
        got = history(client, run, f"train/{name}")
        assert [s for s, _ in got] == list(range(EVERY, 21, EVERY)), name
        assert all(v == pytest.approx(tensorboard[s], rel=1e-6) for s, v in got), name

    results = json.loads((out / "results.json").read_text())
    assert [s for s, _ in history(client, run, "test_ema/top1")] == [10, 20]
    for entry in results["history"]:
        i = entry["iteration"]
        assert dict(history(client, run, "test_ema/top1"))[i] == pytest.approx(entry["ema"]["top1"] / 100)
        assert dict(history(client, run, "test_ema/loss"))[i] == pytest.approx(entry["ema"]["loss"], rel=1e-6)

    # per-class results: the last evaluation's are results.json's, each evaluation's record is an artifact
    for row in results["per_class"]["ema"]:
        assert history(client, run, f"test_ema/top1_per_class/{row['class']}")[-1] == (20, pytest.approx(row["top1"] / 100))
    pseudo = results["pseudo_labels"]
    for name, count in zip(results["classes"], pseudo["counts"]):
        assert history(client, run, f"pseudo_labels/count/{name}")[-1] == (20, count)
    last = artifact_json(client, run, "evaluation/iteration_20.json")
    assert last["iteration"] == 20 and last["ema"]["confusion"] == results["confusion"]["ema"] and last["pseudo_labels"] == pseudo
    assert artifact_json(client, run, "evaluation/iteration_10.json")["iteration"] == 10
    assert artifact_json(client, run, "results.json") == results
    assert run.data.metrics["results/best_top1"] == pytest.approx(results["best_top1"])


@pytest.mark.slow
def test_wandb_offline_run_holds_the_config_scalars_and_per_class_tables(tracked_run):
    out, result = tracked_run
    (folder,) = (out / "wandb").glob("offline-run-*")
    assert f"To upload it to W&B: wandb sync {folder}" in result.stdout + result.stderr
    run = wandb_read(folder)
    assert run["run"].project == "ignite-fixmatch" and run["run"].display_name == "run"
    assert run["config"] == yaml.safe_load((out / "config.yaml").read_text())  # the resolved config, nested
    assert run["exit_code"] == 0

    rows = run["history"]
    for name in ("loss", "mask_rate", "lr"):
        tensorboard = dict(scalars(out / "tensorboard", f"train/{name}"))
        logged = {s: row[f"train/{name}"] for s, row in rows.items() if f"train/{name}" in row}
        assert sorted(logged) == list(range(EVERY, 21, EVERY)), name
        assert all(v == pytest.approx(tensorboard[s], rel=1e-6) for s, v in logged.items()), name

    results = json.loads((out / "results.json").read_text())
    for entry in results["history"]:
        assert rows[entry["iteration"]]["test_ema/top1"] == pytest.approx(entry["ema"]["top1"] / 100)
    last = rows[20]
    for row in results["per_class"]["ema"]:
        assert last[f"test_ema/top1_per_class/{row['class']}"] == pytest.approx(row["top1"] / 100)
    table = wandb_table(folder, last, "test_ema/per_class")
    assert table["columns"] == ["class", "images", "correct", "top1"]
    assert table["data"] == [[r["class"], r["images"], r["correct"], r["top1"]] for r in results["per_class"]["ema"]]
    cells = wandb_table(folder, last, "test_ema/confusion_matrix_table")
    classes, matrix = results["classes"], results["confusion"]["ema"]
    assert cells["data"] == [[classes[i], classes[j], matrix[i][j]] for i in range(len(classes)) for j in range(len(classes))]
    pseudo = wandb_table(folder, last, "pseudo_labels/per_class")
    assert [r[1] for r in pseudo["data"]] == results["pseudo_labels"]["counts"]
    assert "test_ema/per_class/_type" in rows[10]  # every evaluation, not just the last

    assert "results.json" in run["files"] and json.loads((folder / "files" / "results.json").read_text()) == results
    assert run["summary"]["results/top1"] == pytest.approx(results["top1"])


# ---------------------------------------------------------------------- real Engines, hand-made records

AWKWARD = ["tree frog", "a/b", "a_b", ".."]  # a space, a slash, a name the slash's replacement collides with, a path


def record(iteration: int) -> dict:
    rows = [{"class": c, "images": 4, "correct": k, "top1": 25.0 * k} for k, c in enumerate(AWKWARD[:3])]
    rows.append({"class": "..", "images": 0, "correct": 0, "top1": None})
    return {
        "iteration": iteration, "classes": AWKWARD,
        "ema": {"top1": 25.0, "top5": 100.0, "loss": 1.0, "per_class": rows, "confusion": [[4 - r["correct"], r["correct"], 0, 0] for r in rows]},
        "pseudo_labels": {"steps": 2, "counts": [1, 2, 3, 0], "correct": [1, 1, 0, 0], "known": [1, 2, 3, 0], "top1": [100.0, 50.0, 0.0, None]},
    }


def run_engine(tmp_path: Path, handlers: list, error: BaseException | None = None, iterations: int = 4) -> Path:
    """A trainer of ``iterations`` steps that evaluates (a stand-in evaluator, then EVALUATED with
    :func:`record`) every 2 and raises ``error`` in step 3 if given; ``handlers`` attached as the CLI does."""
    out = tmp_path / "out"
    out.mkdir()
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"output_dir={out}"])

    def step(engine, batch):
        if error is not None and engine.state.iteration == 3:
            raise error
        return {"loss": 1.0 / engine.state.iteration, "mask_rate": 0.5, "pseudo_acc": math.nan}

    trainer, evaluator = Engine(step), Engine(lambda engine, batch: None)
    trainer.register_events(*EvaluationEvents)
    evaluator.add_event_handler(Events.COMPLETED, lambda e: e.state.metrics.update(top1=0.25, top5=1.0, loss=1.0))

    def evaluate(engine):
        evaluator.run([0])
        engine.state.evaluation = record(engine.state.iteration)
        (out / "results.json").write_text(json.dumps({"iteration": engine.state.iteration, "top1": 25.0, "best_top1": 25.0}))
        engine.fire_event(EvaluationEvents.EVALUATED)

    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=2), evaluate)
    ctx = Context(trainer, None, None, cfg, out, logging.getLogger("test_trackers"), evaluators={"ema": evaluator})
    attach_all(handlers, ctx)
    trainer.run([0] * iterations, max_epochs=1)
    return out


def test_class_names_become_valid_distinct_metric_names():
    assert metric_names(AWKWARD) == ["tree_frog", "a_b", "a_b_2", "_.."]
    assert metric_names(["", "_", "été/x", "ok.v2-1", "a:b"]) == ["_", "__2", "été_x", "ok.v2-1", "a_b"]


def test_mlflow_logs_awkward_class_names_and_the_evaluation_record(tmp_path, clean_env):
    out = run_engine(tmp_path, [MLflow(every=1, run_name="engine")])
    client = mlflow_client(out / "mlruns")
    run = only_run(client)
    assert run.info.status == "FINISHED" and run.info.run_name == "engine"
    per_class = {k: v for k, v in run.data.metrics.items() if "per_class" in k}
    assert per_class == {"test_ema/top1_per_class/tree_frog": 0.0, "test_ema/top1_per_class/a_b": 0.25, "test_ema/top1_per_class/a_b_2": 0.5}  # '..': no images
    assert history(client, run, "pseudo_labels/top1/a_b") == [(2, 0.5), (4, 0.5)]
    assert history(client, run, "pseudo_labels/count/_..") == [(2, 0.0), (4, 0.0)] and "pseudo_labels/top1/_.." not in run.data.metrics
    assert "train/pseudo_acc" not in run.data.metrics  # NaN is left out
    assert [s for s, _ in history(client, run, "train/loss")] == [1, 2, 3, 4]
    assert artifact_json(client, run, "evaluation/iteration_4.json") == record(4)  # the real names, in the artifact


def test_a_failed_run_is_marked_failed_and_the_error_goes_on(tmp_path, clean_env):
    error = NonFiniteLossError("loss is nan at iteration 3")
    handlers = [MLflow(every=1), WandB(every=1, mode="offline")]
    with pytest.raises(NonFiniteLossError):
        run_engine(tmp_path, handlers, error=error)
    out = tmp_path / "out"
    client = mlflow_client(out / "mlruns")
    run = only_run(client)
    assert run.info.status == "FAILED"
    assert artifact_json(client, run, "results.json")["iteration"] == 2  # the last results before the failure are kept
    (folder,) = (out / "wandb").glob("offline-run-*")
    wandb = wandb_read(folder)
    assert wandb["exit_code"] == 3  # the command line's code for a diverged run
    assert sorted(s for s, row in wandb["history"].items() if "train/loss" in row) == [1, 2]


class LaterListener:
    """A user's handler attached after the trackers that records failures in its own EXCEPTION_RAISED handler
    (without raising: attach_all's handler, attached last, raises the error)."""

    def __init__(self) -> None:
        self.seen: list[BaseException] = []

    def attach(self, ctx) -> None:
        ctx.trainer.add_event_handler(Events.EXCEPTION_RAISED, lambda engine, error: self.seen.append(error))


def test_a_preempted_run_is_marked_killed_and_a_later_exception_handler_still_runs(tmp_path, clean_env):
    later, error = LaterListener(), Preempted("SIGTERM")
    with pytest.raises(Preempted):
        run_engine(tmp_path, [MLflow(every=1), later], error=error)
    assert only_run(mlflow_client(tmp_path / "out" / "mlruns")).info.status == "KILLED"
    assert later.seen and all(e is error for e in later.seen)


def test_without_the_evaluation_event_no_per_class_results_are_logged(tmp_path, clean_env):
    out = tmp_path / "out"
    out.mkdir()
    trainer = Engine(lambda engine, batch: {"loss": 0.5})
    ctx = Context(trainer=trainer, model=None, optimizer=None, config=load_config(ROOT / "configs" / "quickstart.yaml", [f"output_dir={out}"]),
                  output_dir=out, logger=logging.getLogger("test_trackers"))
    attach_all([MLflow(every=1)], ctx)
    trainer.run([0, 0], max_epochs=1)
    run = only_run(mlflow_client(out / "mlruns"))
    assert run.info.status == "FINISHED" and set(run.data.metrics) == {"train/loss"}


# ---------------------------------------------------------------------- the config check


@pytest.mark.parametrize("name, package, install", [("mlflow", "mlflow", "pip install mlflow-skinny (or mlflow)"), ("wandb", "wandb", "pip install wandb")])
def test_a_missing_package_is_refused_naming_what_to_install(name, package, install, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda module, *a: None if module == package else real(module, *a))
    with pytest.raises(ConfigError) as e:
        build_handler(HandlerSpec(name), 3)
    assert str(e.value) == f"handlers[3] ({name}): handler {name} needs the {package} package, which is not installed: {install}"


HIDDEN = """
import sys
sys.modules["wandb"] = None  # as if not installed: importlib.util.find_spec gives None
from ignite_fixmatch.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_command_line_refuses_a_missing_package_before_training(folder, tmp_path):
    out = tmp_path / "run"
    args = with_handler(tiny_overrides(folder, out), "wandb")
    command = [sys.executable, "-c", HIDDEN, "configs/quickstart.yaml", *args]
    result = subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == "error: handlers[7] (wandb): handler wandb needs the wandb package, which is not installed: pip install wandb"
    assert not out.exists()


PLAN = """
import sys
from ignite_fixmatch.config import HandlerSpec
from ignite_fixmatch.plugins import plan_handlers
plan_handlers([HandlerSpec("mlflow", {"tracking_uri": "http://localhost:5000"}), HandlerSpec("wandb", {"mode": "offline"})])
heavy = sorted({m.partition(".")[0] for m in sys.modules} & {"torch", "ignite", "mlflow", "wandb"})
assert not heavy, heavy
"""


def test_the_handlers_are_checked_without_importing_torch_or_the_trackers():
    result = subprocess.run([sys.executable, "-c", PLAN], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("wandb", {"mode": "sometimes"}, "param 'mode': got 'sometimes', expected one of"),
        ("wandb", {"every": 0}, "every must be an integer >= 1"),
        ("wandb", {"init_timeout": 0}, "init_timeout must be a number of seconds in (0, 600]"),
        ("wandb", {"project": " "}, "project must be a non-empty string"),
        ("mlflow", {"every": 0}, "every must be an integer >= 1"),
        ("mlflow", {"experiment": ""}, "param 'experiment': got ''"),
        ("mlflow", {"tracking_uri": 5}, "param 'tracking_uri': got 5, expected a string or null"),
        ("mlflow", {"uri": "x"}, "Accepted params: tracking_uri, experiment, run_name, every"),
    ],
)
def test_bad_params_are_refused_naming_the_param(name, params, message):
    with pytest.raises(ConfigError) as e:
        build_handler(HandlerSpec(name, params), 0)
    assert f"handlers[0] ({name})" in str(e.value) and message in str(e.value), str(e.value)


def test_wandb_online_without_credentials_stops_at_once(tmp_path, clean_env):
    with pytest.raises(ConfigError, match=r"mode=online, but no W&B credentials .*Run `wandb login` or set WANDB_API_KEY, or set mode: auto"):
        run_engine(tmp_path, [WandB(mode="online")])
    assert not (tmp_path / "out" / "wandb").exists()


def test_wandb_auto_falls_back_to_offline_when_the_server_does_not_answer(tmp_path, clean_env, monkeypatch, caplog):
    """Credentials for a server that accepts connections and never answers: offline after init_timeout, not a hang."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        with caplog.at_level(logging.WARNING, logger="test_trackers"):
            out = run_engine(tmp_path, [WandB(every=1, init_timeout=2)])
    assert "W&B: the server cannot be used (Timed out initializing run" in caplog.text and "writing an offline run instead" in caplog.text
    (folder,) = (out / "wandb").glob("offline-run-*")
    run = wandb_read(folder)
    assert run["exit_code"] == 0 and sorted(s for s, row in run["history"].items() if "train/loss" in row) == [1, 2, 3, 4]
