"""Per-class results during training: the trainer's pseudo-label counts, the evaluation record and
results.json, TensorBoard and ClearML read back from real runs, and two processes."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from helpers import HOLD_AFTER, ROOT, cli, held_marker, popen, tiny_overrides, wait_for_file, with_handler
from ignite_fixmatch.algorithms.fixmatch import FixMatch
from ignite_fixmatch.charts import confusion_matrix_image
from ignite_fixmatch.config import HandlerSpec, load_config
from ignite_fixmatch.plugins import Context, attach_all, build_handlers, step_scalars
from ignite_fixmatch.trainer import PSEUDO_KEYS, create_trainer

CONFIG = "configs/quickstart.yaml"
N_U = 12  # unlabeled images per step in tiny_overrides: batch_size 6 x mu 2


class LogitsAreInputs(nn.Module):
    """The logits are the input's pixels (N, C, 1, 1) times one weight: the test chooses the pseudo-labels."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) * self.scale


def _batch(u_w: list[list[float]], u_y: list[int]) -> dict[str, torch.Tensor]:
    u = torch.tensor(u_w).reshape(len(u_w), 3, 1, 1)
    return {
        "x": torch.eye(3)[:2].reshape(2, 3, 1, 1), "y": torch.tensor([0, 1]),
        "u_w": u, "u_s": u.clone(), "u_y": torch.tensor(u_y), "u_idx": torch.arange(len(u_w)),
    }


# Weak-view logits and true labels of six unlabeled images (threshold 0.9), and what they must count:
#   [10,0,0] y=0 class 0 right | [10,0,0] y=1 class 0 wrong | [0,10,0] y=-1 class 1 unknown
#   [0,0,10] y=2 class 2 right | [0,0,0]  y=0 below the threshold | [0,0,10] y=-1 class 2 unknown
HAND = _batch([[10, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10], [0, 0, 0], [0, 0, 10]], [0, 1, -1, 2, 0, -1])


def _trainer(compile_model: bool = False) -> Engine:
    model = LogitsAreInputs()
    algorithm = FixMatch.create(num_classes=3, threshold=0.9)
    return create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"), algorithm, compile_model=compile_model)


def test_the_step_counts_pseudo_labels_per_class_by_hand():
    trainer = _trainer()
    trainer.run([HAND], max_epochs=1)
    out = trainer.state.output
    assert out["pseudo_counts"].tolist() == [2.0, 1.0, 2.0]
    assert out["pseudo_correct"].tolist() == [1.0, 0.0, 1.0]
    assert out["pseudo_known"].tolist() == [2.0, 0.0, 1.0]
    assert all(out[k].dtype == torch.float32 for k in PSEUDO_KEYS)
    # The scalars are the step's as before, and agree with the vectors.
    assert out["mask_rate"].item() == pytest.approx(5 / 6)
    assert out["pseudo_acc"].item() == pytest.approx(2 / 3) == out["pseudo_correct"].sum().item() / out["pseudo_known"].sum().item()


def test_step_scalars_leave_the_per_class_vectors_out():
    trainer = _trainer()
    trainer.run([HAND], max_epochs=1)
    assert set(step_scalars(trainer)) == {"loss", "loss_x", "loss_u", "mask_rate", "pseudo_acc", "lr"}


@pytest.mark.slow
def test_the_compiled_step_counts_the_same():
    import torch._dynamo

    torch._dynamo.reset()
    try:
        compiled, eager = _trainer(compile_model=True), _trainer()
        for t in (compiled, eager):
            t.run([HAND, HAND], max_epochs=1)
    finally:
        torch._dynamo.reset()
    for key in PSEUDO_KEYS:
        assert torch.equal(compiled.state.output[key], eager.state.output[key]), key


# --------------------------------------------------------------------------- the evaluation handler on a real Engine


def _evaluation_ctx(tmp_path: Path) -> Context:
    """The real trainer step on HAND (lr 0: every step the same), the evaluation handler (raw model, every 2)
    on a real test batch."""
    tmp_path.mkdir(exist_ok=True)
    model = LogitsAreInputs()
    algorithm = FixMatch.create(num_classes=3, threshold=0.9)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), torch.device("cpu"), algorithm)
    test_images = torch.tensor([[200, 0, 0], [0, 200, 0], [0, 0, 200], [200, 0, 0]], dtype=torch.uint8).reshape(4, 3, 1, 1)
    ctx = Context(
        trainer=trainer, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=load_config(None, []),
        output_dir=tmp_path, logger=logging.getLogger("per_class"), device=torch.device("cpu"),
        loaders={"test": [(test_images, torch.tensor([0, 1, 1, 2]))]},
        data=SimpleNamespace(sources=SimpleNamespace(num_classes=3, classes=("cat", "dog", "frog"), mean=(0.0,) * 3, std=(1.0,) * 3)),
    )
    attach_all(build_handlers([HandlerSpec("evaluation", {"every": 2, "models": ["raw"]})]), ctx)
    return ctx


def test_the_evaluation_record_results_json_and_event(tmp_path):
    from handlers.evaluation import EvaluationEvents

    ctx = _evaluation_ctx(tmp_path)
    seen = []
    ctx.trainer.add_event_handler(EvaluationEvents.EVALUATED, lambda t: seen.append(t.state.evaluation))
    ctx.trainer.run([HAND] * 5, max_epochs=1)  # evaluated at 2, 4 and 5 (the end)
    assert [r["iteration"] for r in seen] == [2, 4, 5]
    last = seen[-1]
    assert last["classes"] == ["cat", "dog", "frog"]
    # Predictions: argmax of the normalised pixels: cat, dog, frog, cat for true cat, dog, dog, frog.
    assert last["raw"]["confusion"] == [[1, 0, 0], [0, 1, 1], [1, 0, 0]]
    assert [r["top1"] for r in last["raw"]["per_class"]] == [100.0, 50.0, 0.0] and last["raw"]["top1"] == 50.0
    # Pseudo-labels: 2 steps since the evaluation at 2 and 4, 1 after 4.
    assert [r["pseudo_labels"]["steps"] for r in seen] == [2, 2, 1]
    assert seen[0]["pseudo_labels"] == {"steps": 2, "counts": [4, 2, 4], "correct": [2, 0, 2], "known": [4, 0, 2], "top1": [50.0, None, 100.0]}
    assert last["pseudo_labels"]["counts"] == [2, 1, 2]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["per_class"] == {"raw": last["raw"]["per_class"]} and results["confusion"] == {"raw": last["raw"]["confusion"]}
    assert results["pseudo_labels"] == last["pseudo_labels"] and results["classes"] == last["classes"]
    assert [set(h) for h in results["history"]] == [{"iteration", "raw"}] * 3  # history: scalars only
    assert all(set(h["raw"]) == {"top1", "top5", "loss"} for h in results["history"])


def test_the_unreported_pseudo_labels_survive_a_checkpoint(tmp_path):
    """The handler's state after iteration 3 (one step since the evaluation at 2), saved and loaded as a
    checkpoint is, into a fresh run that goes on from there: its evaluation at 4 reports what the
    uninterrupted run's did."""
    from ignite.engine import Events

    straight = _evaluation_ctx(tmp_path / "a")
    saved = tmp_path / "evaluation.pt"

    def save_at_3(trainer: Engine) -> None:
        if trainer.state.iteration == 3:
            torch.save(straight.to_save["evaluation"].state_dict(), saved)

    straight.trainer.add_event_handler(Events.ITERATION_COMPLETED, save_at_3)
    straight.trainer.run([HAND] * 4, max_epochs=1)
    reference = straight.trainer.state.evaluation
    assert reference["iteration"] == 4 and reference["pseudo_labels"]["steps"] == 2

    state = torch.load(saved, weights_only=True)
    assert state["pseudo_steps"] == 1 and state["pseudo_window"][0].tolist() == [2.0, 1.0, 2.0]
    assert state["last_record"]["iteration"] == 2  # the last record only: the state does not grow per evaluation
    resumed = _evaluation_ctx(tmp_path / "b")
    resumed.to_save["evaluation"].load_state_dict(state)
    resumed.trainer.load_state_dict({"iteration": 3, "epoch_length": 4, "max_epochs": 1})
    resumed.trainer.run([HAND] * 4)
    assert resumed.trainer.state.evaluation == reference


# --------------------------------------------------------------------------- the chart


def test_confusion_image_is_shaded_by_row_and_shows_counts():
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    matrix = np.eye(10, dtype=int) * 9 + 1
    matrix[3] = 0  # a class without test images
    image = confusion_matrix_image(matrix, names)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    side = image.shape[0]
    assert 300 <= side <= 1000 and image.shape[1] == side
    blank = confusion_matrix_image(np.zeros((10, 10), dtype=int), names)
    assert not np.array_equal(image, blank)
    # The bottom-right cell (truck, truck: 9 of 18... here 10 of 19) is darker than its neighbour (1 of 19).
    cell = 40
    corner = image[side - 6 - cell : side - 6, side - 6 - cell : side - 6]
    left = image[side - 6 - cell : side - 6, side - 6 - 2 * cell : side - 6 - cell]
    assert corner.mean() < left.mean() - 50
    assert len({tuple(p) for p in left.reshape(-1, 3)}) > 2  # a count is written in it (not one flat colour)


def test_confusion_image_for_100_classes_has_no_text_in_cells():
    rng = np.random.default_rng(0)
    matrix = rng.integers(0, 5, (100, 100)) + np.eye(100, dtype=int) * 50
    image = confusion_matrix_image(matrix, [f"class_{i}" for i in range(100)])
    assert image.shape[0] <= 1000
    cell = 8
    bottom_right = image[-6 - cell : -6, -6 - cell : -6]
    assert len({tuple(p) for p in bottom_right.reshape(-1, 3)}) == 1  # a flat cell: no count drawn
    with pytest.raises(ValueError, match="expected"):
        confusion_matrix_image(matrix, ["a", "b"])


# --------------------------------------------------------------------------- a real tiny run: results.json and TensorBoard


@pytest.mark.slow
def test_results_json_holds_per_class_results_consistent_with_top1(finished_run):
    out, _ = finished_run
    results = json.loads((out / "results.json").read_text())
    assert results["classes"] == ["cat", "dog", "frog"]
    confusion = np.array(results["confusion"]["ema"])
    assert confusion.sum() == 12 and confusion.sum(axis=1).tolist() == [4, 4, 4]  # every test image once
    assert 100.0 * np.trace(confusion) / confusion.sum() == pytest.approx(results["top1"], abs=1e-9)
    rows = results["per_class"]["ema"]
    assert [r["images"] for r in rows] == [4, 4, 4] and [r["correct"] for r in rows] == np.diag(confusion).tolist()
    assert all(set(h) == {"iteration", "ema"} and set(h["ema"]) == {"top1", "top5", "loss"} for h in results["history"])
    pseudo = results["pseudo_labels"]
    assert pseudo["steps"] == 10  # iterations 11..20
    assert pseudo["known"] == pseudo["counts"]  # the folder's unlabeled images are its training images: labels known
    assert all(c <= k for c, k in zip(pseudo["correct"], pseudo["known"]))


@pytest.mark.slow
def test_tensorboard_holds_per_class_scalars_and_the_confusion_image(finished_run):
    out, _ = finished_run
    results = json.loads((out / "results.json").read_text())
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    for row in results["per_class"]["ema"]:
        events = acc.Scalars(f"test_ema/top1_per_class/{row['class']}")
        assert [e.step for e in events] == [10, 20] and events[-1].value == pytest.approx(row["top1"] / 100.0)
    images = acc.Images("test_ema/confusion_matrix")
    assert [e.step for e in images] == [10, 20]
    drawn = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    assert np.array_equal(drawn, confusion_matrix_image(results["confusion"]["ema"], results["classes"]))
    # The pseudo-label counts are the steps' own: mask_rate x 12 unlabeled images, summed over each window.
    mask_rate = {e.step: e.value for e in acc.Scalars("train/mask_rate")}
    for step, window in ((10, range(1, 11)), (20, range(11, 21))):
        counted = sum(acc.Scalars(f"pseudo_labels/count/{c}")[step // 10 - 1].value for c in results["classes"])
        assert counted == round(sum(mask_rate[i] * N_U for i in window)), step
    for name, count, top1 in zip(results["classes"], results["pseudo_labels"]["counts"], results["pseudo_labels"]["top1"]):
        assert acc.Scalars(f"pseudo_labels/count/{name}")[-1].value == count
        assert acc.Scalars(f"pseudo_labels/top1/{name}")[-1].value == pytest.approx(top1 / 100.0)
    assert not any("pseudo_counts" in tag for tag in acc.Tags()["scalars"])  # vectors are not train scalars


@pytest.mark.slow
def test_a_resumed_run_reports_the_same_per_class_results(finished_run, folder, tmp_path):
    """Killed after iteration 15 (5 steps of pseudo-labels not yet reported): resumed, its last record is
    the uninterrupted run's."""
    reference, _ = finished_run
    out = tmp_path / "killed"
    args = [CONFIG, *tiny_overrides(folder, out)]
    marker = held_marker(out, 15)
    proc = popen(with_handler(args, HOLD_AFTER, iteration=15, marker=str(marker)))
    try:
        wait_for_file(marker, proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    result = cli([*args, "resume=auto"])
    assert result.returncode == 0 and "Resumed from" in result.stderr, result.stderr[-3000:]
    a, b = (json.loads((d / "results.json").read_text()) for d in (reference, out))
    for key in ("pseudo_labels", "per_class", "confusion", "history"):
        assert a[key] == b[key], key


# --------------------------------------------------------------------------- ClearML offline


@pytest.mark.slow
def test_clearml_offline_session_holds_the_confusion_matrix_and_tables(folder, tmp_path):
    import subprocess
    import sys

    from test_clearml import clearml_env, events

    env = clearml_env(tmp_path)
    out = tmp_path / "run"
    handlers = (
        "handlers=[{name: ema}, {name: cosine_lr}, {name: evaluation, params: {every: 10, models: [ema, raw]}}, "
        "{name: checkpoint, params: {every: 20, keep_best: 0}}, {name: clearml, params: {sample_images: 0, upload_best_model: false}}]"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "ignite_fixmatch.main", CONFIG, *tiny_overrides(folder, out, handlers)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    (session,) = [p for p in (Path(env["CLEARML_CACHE_DIR"]) / "offline").iterdir() if p.is_dir()]
    plots = {(e["metric"], e["variant"], e["iter"]): json.loads(e["plot_str"]) for e in events(session) if e["type"] == "plot"}
    for model in ("ema", "raw"):
        for step in (10, 20):
            assert ("confusion matrix", f"test_{model}", step) in plots and ("per-class accuracy", f"test_{model}", step) in plots
        heatmap = plots[("confusion matrix", f"test_{model}", 20)]["data"][0]
        assert heatmap["type"] == "heatmap" and list(heatmap["x"]) == list(heatmap["y"]) == results["classes"]
        assert np.array(heatmap["z"]).tolist() == results["confusion"][model]
        table = plots[("per-class accuracy", f"test_{model}", 20)]["data"][0]
        assert table["header"]["values"] == ["class", "images", "correct", "top-1 %"]
        columns = table["cells"]["values"]
        assert columns[0] == results["classes"] and columns[2] == [r["correct"] for r in results["per_class"][model]]
    counts = plots[("pseudo-labels per class", "count", 20)]["data"][0]
    assert list(counts["y"]) == results["pseudo_labels"]["counts"]
    pseudo_table = plots[("pseudo-labels per class", "table", 20)]["data"][0]["cells"]["values"]
    assert pseudo_table[1] == results["pseudo_labels"]["counts"] and pseudo_table[3] == results["pseudo_labels"]["known"]


# Two processes (each test image counted once, the pseudo-label window resumed after a SIGKILL):
# tests/test_distributed.py::test_resume_under_two_processes_after_sigkill_ends_where_the_uninterrupted_run_did
