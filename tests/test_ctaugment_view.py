"""Showing CTAugment's learned policy: the heatmap, ``eval`` (table, ``--policy`` PNG, JSON), the trackers
(TensorBoard, ClearML offline, MLflow, W&B offline), results.json, and ``suggest``'s strong view.

One real tiny CTAugment run through the CLI (``cta_run``: 10 iterations, evaluated and checkpointed at 5 and
10, with all four trackers) is read back; the policy each place shows must be the one the checkpoint of that
iteration holds (the trainer updates the policy in its step, before the evaluation and the checkpoint of the
same iteration). RandAugment runs (``finished_run``) must show none.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_clearml import clearml_env, events
from test_trackers import mlflow_client, only_run, wandb_read, wandb_table

from handlers.tracking import POLICY_TAG, policy_image, policy_table
from helpers import ROOT, load_state, tiny_overrides
from ignite_fixmatch.augment.ctaugment import CTAPolicy, CTAugmentViews
from ignite_fixmatch.augment.ctaugment_table import CTA_OP_INDEX
from ignite_fixmatch.charts import HIGH, LOW, POLICY_CELL, policy_heatmap
from ignite_fixmatch.eval import main as eval_main
from ignite_fixmatch.inference import load_for_inference
from ignite_fixmatch.suggest import main as suggest_main
from ignite_fixmatch.suggest import strong_view

HANDLERS = (
    "handlers=[{name: ema}, {name: evaluation, params: {every: 5}}, {name: checkpoint, params: {every: 5, keep: 2}}, "
    "{name: tensorboard, params: {every: 5}}, {name: clearml, params: {every: 5, sample_images: 1, upload_best_model: false}}, "
    "{name: mlflow, params: {every: 5}}, {name: wandb, params: {every: 5}}]"
)


def policy_at(run: Path, iteration: int) -> CTAPolicy:
    """The policy saved in the run's checkpoint of ``iteration``."""
    policy = CTAPolicy()
    policy.load_state_dict(load_state(run / "checkpoints" / f"checkpoint_{iteration}.pt")["ctaugment"])
    return policy


def png_pixels(data: bytes | Path) -> np.ndarray:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        return np.asarray(img.convert("RGB"))


@pytest.fixture(scope="session")
def cta_run(folder, tmp_path_factory):
    """A real tiny CTAugment run (10 iterations) with tensorboard, clearml (offline), mlflow and wandb (offline):
    (output folder, ClearML cache folder)."""
    tmp = tmp_path_factory.mktemp("cta")
    env = {k: v for k, v in clearml_env(tmp).items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    env.update({f"WANDB_{kind}_DIR": str(tmp / f"wandb_{kind.lower()}") for kind in ("CONFIG", "CACHE", "DATA")})
    out = tmp / "run"
    args = tiny_overrides(folder, out, "data.randaugment=ctaugment", "train.num_iters=10", HANDLERS)
    result = subprocess.run(
        [sys.executable, "-m", "ignite_fixmatch.main", "configs/quickstart.yaml", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, Path(env["CLEARML_CACHE_DIR"])


# --------------------------------------------------------------------------- the heatmap


def learned_policy() -> CTAPolicy:
    """A policy whose bins differ: probes with low proximity on some bins of rotate and posterize."""
    policy = CTAPolicy()
    ids = torch.tensor([[CTA_OP_INDEX["rotate"], CTA_OP_INDEX["posterize"]]] * 40)
    args = torch.tensor([[[0.05, 0.0], [0.9, 0.0]]] * 40, dtype=torch.float64)
    policy.update(ids, args, torch.zeros(40))
    return policy


def changed_box(a: np.ndarray, b: np.ndarray) -> tuple[slice, slice]:
    ys, xs = np.nonzero((a != b).any(axis=2))
    return slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)


def test_heatmap_cells_are_shaded_by_the_rows_max_and_missing_bins_are_background():
    names, grid = learned_policy().grid()
    r = names.index("rotate")
    assert grid[r, 0] == 0.0 and grid[r, 5] == grid[r].max()  # bin 0 of rotate was pruned by the low-proximity probes
    never = policy_heatmap(names, grid)
    peaked = grid.copy()
    peaked[r, 0] = grid[r].max()
    drawn = policy_heatmap(names, peaked)
    rows, cols = changed_box(np.asarray(never), np.asarray(drawn))  # one cell (its number included) changed, nothing else
    assert rows.stop - rows.start <= POLICY_CELL[1] and cols.stop - cols.start <= POLICY_CELL[0]
    corner = (rows.start + 1, cols.start + 1)  # inside the cell's frame, away from its number
    assert tuple(np.asarray(never)[corner]) == tuple(LOW) and tuple(np.asarray(drawn)[corner]) == tuple(HIGH)

    # a parameter with fewer bins (rescale.method has 6): its row is background (white, no frame) past its last bin
    missing = grid.copy()
    missing[r, 6:] = np.nan
    image, cut = np.asarray(policy_heatmap(names, grid)), np.asarray(policy_heatmap(names, missing))
    rows, cols = changed_box(image, cut)
    assert (cut[rows, cols] == 255).all()  # background where rotate's bins 6..16 were
    assert cols.stop - cols.start >= 11 * POLICY_CELL[0] - 2 and rows.stop - rows.start <= POLICY_CELL[1]


def test_heatmap_is_deterministic_and_refuses_a_grid_of_the_wrong_shape():
    names, grid = learned_policy().grid()
    first, again = io.BytesIO(), io.BytesIO()
    policy_heatmap(names, grid, title="t").save(first, format="PNG")
    policy_heatmap(list(names), grid.copy(), title="t").save(again, format="PNG")
    assert first.getvalue() == again.getvalue()
    assert policy_heatmap(names[:5], grid[:5]).height < policy_heatmap(names, grid).height  # one row per parameter
    with pytest.raises(ValueError, match="5 parameter names"):
        policy_heatmap(names[:5], grid)
    with pytest.raises(ValueError, match="negative"):
        policy_heatmap(names, -grid)


def test_tracker_table_is_the_policy_by_bin():
    policy = learned_policy()
    header, *rows = policy_table(policy)
    assert header == ["parameter", *(f"bin {b}" for b in range(17))]
    summary = policy.summary()
    assert [row[0] for row in rows] == list(summary)
    for row in rows:
        values = summary[row[0]]
        assert row[1 : 1 + len(values)] == values and row[1 + len(values) :] == [None] * (17 - len(values))


# --------------------------------------------------------------------------- eval


@pytest.mark.slow
def test_eval_prints_the_policy_writes_its_heatmap_and_puts_it_in_the_json(cta_run, tmp_path, capsys):
    run, _ = cta_run
    png, scores = tmp_path / "policy.png", tmp_path / "scores.json"
    code = eval_main([str(run), "--device", "cpu", "--policy", str(png), "--json", str(scores)])
    out, err = capsys.readouterr()
    assert code == 0, err
    policy = policy_at(run, 10)
    metrics, table = out.split("CTAugment policy (")
    assert "per-class accuracy" in metrics
    assert [line.strip() for line in table.splitlines()[1 : 1 + len(policy.params)]] == [line.strip() for line in policy.table().splitlines()]
    expected = policy_heatmap(*policy.grid(), title="CTAugment policy: checkpoint_10.pt, iteration 10")
    assert np.array_equal(png_pixels(png), np.asarray(expected))
    assert json.loads(scores.read_text())["ctaugment"] == policy.summary()


@pytest.mark.slow
def test_eval_refuses_policy_for_a_randaugment_run_and_a_damaged_policy(finished_run, cta_run, tmp_path, capsys):
    run, _ = finished_run
    png = tmp_path / "policy.png"
    assert eval_main([str(run), "--device", "cpu", "--policy", str(png)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: --policy:")
    assert "data.randaugment=reference" in err and "Drop --policy" in err
    assert not png.exists()
    assert eval_main([str(run), "--device", "cpu"]) == 0
    assert "CTAugment" not in capsys.readouterr().out  # no policy to print

    ckpt = load_state(cta_run[0] / "checkpoints" / "checkpoint_10.pt")
    ckpt["ctaugment"] = {"weights": torch.ones(7, dtype=torch.float64)}
    damaged = tmp_path / "damaged.pt"
    torch.save(ckpt, damaged)
    assert eval_main([str(damaged), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "CTAugment policy ('ctaugment' entry) is damaged" in err and "found a tensor of shape (7,)" in err


# --------------------------------------------------------------------------- during training: results.json and the trackers


@pytest.mark.slow
def test_results_json_holds_the_policy_of_the_last_evaluation(cta_run, finished_run):
    run, _ = cta_run
    results = json.loads((run / "results.json").read_text())
    assert results["ctaugment"] == policy_at(run, 10).summary()
    assert policy_at(run, 5).summary() != policy_at(run, 10).summary()  # it learns: evaluation 5 saw another policy
    assert "ctaugment" not in json.loads((finished_run[0] / "results.json").read_text())  # RandAugment: unchanged


@pytest.mark.slow
def test_tensorboard_holds_the_policy_image_at_each_evaluation(cta_run, finished_run):
    run, _ = cta_run
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    images = acc.Images(POLICY_TAG)
    assert [e.step for e in images] == [5, 10]
    for event in images:
        assert np.array_equal(png_pixels(event.encoded_image_string), np.asarray(policy_image(policy_at(run, event.step), event.step)))
    plain = EventAccumulator(str(finished_run[0] / "tensorboard"), size_guidance={"images": 0})
    plain.Reload()
    assert POLICY_TAG not in plain.Tags()["images"]


@pytest.mark.slow
def test_clearml_offline_session_holds_the_policy_table_and_heatmap(cta_run):
    run, cache = cta_run
    (session,) = [p for p in (cache / "offline").iterdir() if p.is_dir()]
    found = events(session)
    plots = {(e["metric"], e["variant"], e["iter"]): json.loads(e["plot_str"]) for e in found if e["type"] == "plot"}
    for step in (5, 10):
        table = plots[("ctaugment policy", "probabilities", step)]["data"][0]
        header, *rows = policy_table(policy_at(run, step))
        assert table["header"]["values"] == header
        assert table["cells"]["values"] == [list(column) for column in zip(*rows)]  # ClearML stores the columns
    images = {e["iter"]: Path(e["url"]) for e in found if e["type"] == "training_debug_image" and e["metric"] == "ctaugment policy"}
    assert sorted(images) == [5, 10]
    # ClearML stores debug images in its metrics.images.format (JPEG by default): the heatmap, up to compression
    sent, drawn = png_pixels(images[10]).astype(np.int16), np.asarray(policy_image(policy_at(run, 10), 10)).astype(np.int16)
    assert sent.shape == drawn.shape and np.abs(sent - drawn).mean() < 10  # vs 108 for a blank image


@pytest.mark.slow
def test_mlflow_and_wandb_hold_the_policy_heatmap(cta_run):
    run, _ = cta_run
    client = mlflow_client(run / "mlruns")
    mlrun = only_run(client)
    for step in (5, 10):
        png = Path(client.download_artifacts(mlrun.info.run_id, f"ctaugment/policy_iteration_{step}.png"))
        assert np.array_equal(png_pixels(png), np.asarray(policy_image(policy_at(run, step), step)))
        saved = json.loads(Path(client.download_artifacts(mlrun.info.run_id, f"ctaugment/policy_iteration_{step}.json")).read_text())
        assert saved == policy_at(run, step).summary()

    (folder,) = (run / "wandb").glob("offline-run-*")
    rows = wandb_read(folder)["history"]
    for step in (5, 10):
        row = rows[step]
        assert row[f"{POLICY_TAG}/_type"] == "image-file"
        assert np.array_equal(png_pixels(folder / "files" / row[f"{POLICY_TAG}/path"]), np.asarray(policy_image(policy_at(run, step), step)))
        header, *expected = policy_table(policy_at(run, step))
        table = wandb_table(folder, row, f"{POLICY_TAG}_table")
        assert table["columns"] == header and table["data"] == expected


# --------------------------------------------------------------------------- suggest


@pytest.mark.slow
def test_suggest_draws_ctaugment_views_with_the_checkpoints_policy(cta_run, folder, tmp_path, capsys):
    run, _ = cta_run
    out = tmp_path / "to_label.csv"
    assert suggest_main([str(run), "--n", "3", "--out", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("rank,path,index")

    model = load_for_inference(run, device="cpu")
    view = strong_view(model)
    assert isinstance(view, CTAugmentViews) and torch.equal(view.policy.weights, policy_at(run, 10).weights)
    img = model.preprocessing.files([str(next((folder / "train" / "cat").iterdir()))]).load(0)
    first, again = (np.asarray(view.augment(img, random.Random("s"))) for _ in range(2))
    assert np.array_equal(first, again) and first.shape == np.asarray(img).shape

    # the policy decides the views: one that allows only the strongest magnitude of every op draws other pixels
    strongest = CTAPolicy()
    strongest.weights.zero_()
    strongest.weights[[start + bins - 1 for _, _, start, bins in strongest.params]] = 1.0
    other = CTAugmentViews(strongest, view.pad, view.pad_mode, view.weak.flip, view.mean, view.std)
    assert any(not np.array_equal(np.asarray(view.augment(img, random.Random(s))), np.asarray(other.augment(img, random.Random(s)))) for s in "abcd")


@pytest.mark.slow
def test_suggest_refuses_a_ctaugment_checkpoint_without_its_policy(cta_run, tmp_path, capsys):
    ckpt = load_state(cta_run[0] / "checkpoints" / "checkpoint_10.pt")
    del ckpt["ctaugment"]
    path = tmp_path / "no_policy.pt"
    torch.save(ckpt, path)
    assert suggest_main([str(path), "--n", "2", "--out", str(tmp_path / "x.csv"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "holds no learned policy" in err and "--strong-draws 0" in err and not (tmp_path / "x.csv").exists()
    assert suggest_main([str(path), "--n", "2", "--out", str(tmp_path / "x.csv"), "--device", "cpu", "--strong-draws", "0"]) == 0
    assert os.path.getsize(tmp_path / "x.csv") > 0
