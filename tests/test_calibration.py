"""Calibration: ECE against hand-computed values, the metric under 2 processes, temperature scaling on
synthetic logits with a known temperature, the reliability PNG, ``eval``'s report on a real checkpoint,
and the ``data.val_labels`` hold-out through a real tiny run and back through ``calibration_logits``."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from datetime import timedelta
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import pytest
import torch
from ignite.exceptions import NotComputableError
from PIL import Image

from helpers import ROOT, cli, tiny_overrides
from ignite_fixmatch import eval as evaluate
from ignite_fixmatch.calibration import (
    CalibrationError,
    ReliabilityBins,
    calibration_logits,
    calibration_summary,
    expected_calibration_error,
    fit_temperature,
    reliability_diagram,
)
from ignite_fixmatch.config import load_config
from ignite_fixmatch.data import build_data, sources_from_config, split_labeled
from ignite_fixmatch.errors import ConfigError, DataError
from ignite_fixmatch.inference import load_for_inference
from ignite_fixmatch.resume_policy import may_change

CONFIG = ROOT / "configs" / "quickstart.yaml"

# Five images, 5 bins ((0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1]); float64 so that 0.6 is on its bin's edge.
PROBS = torch.tensor(
    [[0.90, 0.05, 0.05], [0.85, 0.10, 0.05], [0.50, 0.30, 0.20], [0.20, 0.45, 0.35], [0.60, 0.30, 0.10]], dtype=torch.float64
)
LABELS = torch.tensor([0, 1, 0, 2, 0])
# bin (.8, 1]: 2 images, confidences .9 and .85, 1 correct: |0.5 - 0.875| * 2/5 = 0.15
# bin (.4, .6]: 3 images, confidences .5, .45 and .6 (the upper edge belongs to the bin), 2 correct: |2/3 - 0.51667| * 3/5 = 0.09
HAND_ECE = 0.15 + 0.09


def test_ece_and_bins_match_hand_computed_values():
    assert expected_calibration_error(PROBS, LABELS, bins=5) == pytest.approx(HAND_ECE, abs=1e-12)
    bins = ReliabilityBins.from_predictions(PROBS, LABELS, bins=5)
    assert bins.counts == [0, 0, 3, 0, 2]
    assert bins.accuracy[2] == pytest.approx(2 / 3) and bins.accuracy[4] == pytest.approx(0.5)
    assert bins.confidence[2] == pytest.approx(1.55 / 3) and bins.confidence[4] == pytest.approx(0.875)
    assert bins.accuracy[0] is None and bins.confidence[3] is None
    # confident and right everywhere: calibrated; confident and wrong everywhere: ECE = confidence
    assert expected_calibration_error(torch.eye(3, dtype=torch.float64), torch.arange(3)) == 0.0
    assert expected_calibration_error(torch.eye(3) * 0.7 + 0.1, torch.tensor([1, 2, 0])) == pytest.approx(0.8)


def test_metric_equals_the_function_over_several_batches():
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(300, 4, generator=g) * 2, torch.randint(0, 4, (300,), generator=g)
    metric = CalibrationError()
    with pytest.raises(NotComputableError):
        metric.compute()
    for chunk in torch.split(torch.arange(300), 64):
        metric.update((logits[chunk], labels[chunk]))
    expected = expected_calibration_error(torch.softmax(logits, 1), labels)
    assert 0.01 < expected and metric.compute() == pytest.approx(expected, abs=1e-12)
    assert metric.reliability.counts == ReliabilityBins.from_predictions(torch.softmax(logits, 1), labels).counts
    metric.reset()
    metric.update((logits[:10], labels[:10]))
    assert metric.compute() == pytest.approx(expected_calibration_error(torch.softmax(logits[:10], 1), labels[:10]), abs=1e-12)


def ece_on_shards(local_rank: int, logits: torch.Tensor, labels: torch.Tensor, out: str) -> None:
    """Module level so that Ignite can spawn it: each rank updates the metric with every other image."""
    torch.set_num_threads(1)
    rank, world = idist.get_rank(), idist.get_world_size()
    metric = CalibrationError()
    metric.update((logits[rank::world], labels[rank::world]))
    value = metric.compute()
    if rank == 0:
        torch.save({"ece": value, "counts": metric.reliability.counts, "world": world}, out)


@pytest.mark.slow
def test_metric_under_two_processes_equals_one(tmp_path):
    from test_distributed import free_port

    g = torch.Generator().manual_seed(2)
    logits, labels = torch.randn(101, 3, generator=g) * 3, torch.randint(0, 3, (101,), generator=g)
    out = tmp_path / "ece.pt"
    with idist.Parallel(backend="gloo", nproc_per_node=2, master_port=free_port(), timeout=timedelta(seconds=60)) as parallel:
        parallel.run(ece_on_shards, logits, labels, str(out))
    got = torch.load(out, weights_only=True)
    single = ReliabilityBins.from_predictions(torch.softmax(logits, 1), labels)
    assert got["world"] == 2 and sum(got["counts"]) == 101 and got["counts"] == single.counts
    assert got["ece"] == pytest.approx(single.ece, abs=1e-12)


@pytest.mark.parametrize("t_true", [0.5, 2.0])
def test_fit_temperature_recovers_a_known_temperature(t_true):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4000, 5, generator=g) * 3
    labels = torch.multinomial(torch.softmax(z / t_true, 1), 1, generator=g).squeeze(1)  # calibrated at T = t_true
    t = fit_temperature(z, labels)
    assert t == pytest.approx(t_true, rel=0.06)
    assert fit_temperature(z, labels) == t  # deterministic
    assert fit_temperature(z / t_true, labels) == pytest.approx(1.0, abs=0.06)  # already calibrated: about 1
    s = calibration_summary(z, labels, t)
    assert s["nll_after"] < s["nll_before"] and s["ece_after"] < s["ece_before"] / 2


def test_fit_temperature_refuses_too_few_labels():
    with pytest.raises(DataError, match=r"at least 10 labeled images, got 9.*data\.val_labels"):
        fit_temperature(torch.randn(9, 3), torch.zeros(9, dtype=torch.long))


def test_reliability_diagram_is_a_real_png(tmp_path):
    g = torch.Generator().manual_seed(4)
    z = torch.randn(500, 4, generator=g) * 3
    labels = torch.multinomial(torch.softmax(z / 2, 1), 1, generator=g).squeeze(1)  # overconfident logits: visible gaps
    bins = ReliabilityBins.from_predictions(torch.softmax(z, 1), labels)
    path = tmp_path / "reliability.png"
    path.write_bytes(b"old")
    assert reliability_diagram(bins, path, "synthetic") == path
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= 400 and img.size[1] >= 400
        colours = {c for _, c in img.convert("RGB").getcolors(1 << 20)}
    assert (70, 130, 180) in colours  # accuracy bars
    assert any(r > 200 and g < 200 and b < 200 for r, g, b in colours)  # the red gap shading
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temp file, nothing left behind


def test_eval_reports_ece_and_writes_the_diagram(finished_run, folder, tmp_path, capsys):
    out, _ = finished_run
    checkpoint = out / "checkpoints" / "checkpoint_20.pt"
    png, report = tmp_path / "rel.png", tmp_path / "scores.json"
    assert evaluate.main([str(checkpoint), "--device", "cpu", "--json", str(report), "--reliability", str(png)]) == 0
    printed = capsys.readouterr().out
    shown = float(re.search(r"^ECE \(15 bins\): (\d+\.\d\d) %$", printed, re.M).group(1))
    scores = json.loads(report.read_text())
    assert scores["ece"] == pytest.approx(shown, abs=0.005) and sum(scores["reliability"]["counts"]) == 12
    # the same number from the model's probabilities on the test files, computed here without the evaluator
    model = load_for_inference(checkpoint, device="cpu")
    paths = sorted(str(p) for p in (folder / "test").rglob("*.png"))
    labels = torch.tensor([model.classes.index(Path(p).parent.name) for p in paths])
    images = torch.from_numpy(model.preprocessing.files(paths).uint8_batch(np.arange(len(paths)))).permute(0, 3, 1, 2)
    assert scores["ece"] == pytest.approx(100 * expected_calibration_error(model.probabilities(images), labels), abs=1e-4)
    with Image.open(png) as img:
        assert img.format == "PNG"


def test_eval_refuses_an_unwritable_diagram_before_evaluating(finished_run, tmp_path, capsys):
    out, _ = finished_run
    assert evaluate.main([str(out), "--reliability", str(tmp_path / "missing" / "rel.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --reliability: folder") and "does not exist" in err


# --------------------------------------------------------------------------- data.val_labels


def folder_config(folder: Path, *extra: str):
    return load_config(CONFIG, tiny_overrides(folder, ROOT / "runs" / "unused", *extra))


def pool(data) -> np.ndarray:
    (part,) = data.unlabeled.parts
    return part[1]


@pytest.mark.parametrize("includes_labeled", [True, False])
def test_val_labels_zero_leaves_the_split_and_streams_as_they_were(folder, includes_labeled):
    cfg = folder_config(folder, f"data.unlabeled_includes_labeled={str(includes_labeled).lower()}")
    assert cfg.data.val_labels == 0
    sources = sources_from_config(cfg)
    before = torch.get_rng_state(), np.random.get_state()[1].copy()
    data = build_data(cfg, sources)
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])
    labeled = split_labeled(sources.train.targets, 6, 3, cfg.seed, sources.classes)  # the split as computed before the key
    everything = np.arange(len(sources.train), dtype=np.int64)
    assert np.array_equal(data.labeled_indices, labeled) and data.labeled_indices.dtype == labeled.dtype
    expected_pool = everything if includes_labeled else np.setdiff1d(everything, labeled)
    assert np.array_equal(pool(data), expected_pool) and pool(data).dtype == expected_pool.dtype
    assert len(data.val_indices) == 0

    held = build_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_labels=2)), sources)
    assert np.array_equal(held.labeled_indices, labeled)  # drawn after the labeled split, from its own generator
    assert len(held.val_indices) == 6 and np.bincount(sources.train.targets[held.val_indices]).tolist() == [2, 2, 2]
    assert not set(held.val_indices) & set(labeled) and not set(held.val_indices) & set(pool(held))
    assert np.array_equal(pool(held), np.setdiff1d(expected_pool, held.val_indices))


def test_val_labels_beyond_a_class_is_refused(folder):
    cfg = folder_config(folder, "data.val_labels=7")  # 8 per class, 2 of them labeled
    with pytest.raises(ConfigError, match=r"data\.val_labels': got 7, but class 'cat' has only 6 .*lower data\.val_labels"):
        build_data(cfg, sources_from_config(cfg))
    with pytest.raises(ConfigError, match=r"data\.val_labels"):
        folder_config(folder, "data.val_labels=-1")
    assert not may_change("data.val_labels")


@pytest.fixture(scope="module")
def held_out_run(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "held_out"
    result = cli(["configs/quickstart.yaml", *tiny_overrides(folder, out, "data.val_labels=1", "train.num_iters=5")])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_a_run_with_val_labels_writes_them_and_calibration_reads_exactly_them(held_out_run, folder):
    out = held_out_run
    val = [int(v) for v in (out / "val_indices.txt").read_text().split()]
    labeled = [int(v) for v in (out / "labeled_indices.txt").read_text().split()]
    assert len(val) == 3 and len(labeled) == 6 and not set(val) & set(labeled)
    assert "Held out 3 labeled images (data.val_labels=1 per class)" in (out / "train.log").read_text()

    model = load_for_inference(out, device="cpu")
    logits, labels = calibration_logits(model, "val")
    train = sources_from_config(model.config).train
    paths = [str(Path(train.path(i))) for i in val]  # the files of val_indices.txt, read here as files
    assert labels.tolist() == [model.classes.index(Path(p).parent.name) for p in paths] == [0, 1, 2]
    images = torch.from_numpy(model.preprocessing.files(paths).uint8_batch(np.arange(3))).permute(0, 3, 1, 2)
    torch.testing.assert_close(logits, model.logits(images), rtol=0, atol=0)


def test_calibration_on_a_labeled_folder(finished_run, folder, tmp_path):
    model = load_for_inference(finished_run[0], device="cpu")
    calib = tmp_path / "calib"
    for name in ("cat", "frog"):  # a subset of the classes
        shutil.copytree(folder / "test" / name, calib / name)
    logits, labels = calibration_logits(model, str(calib))
    paths = sorted(str(p) for p in calib.rglob("*.png"))
    assert labels.tolist() == [model.classes.index(Path(p).parent.name) for p in paths] and len(paths) == 8
    images = torch.from_numpy(model.preprocessing.files(paths).uint8_batch(np.arange(len(paths)))).permute(0, 3, 1, 2)
    torch.testing.assert_close(logits, model.logits(images), rtol=0, atol=0)

    (calib / "horse").mkdir()
    with pytest.raises(DataError, match=r"sub-folders 'horse' are not classes of the model \(cat, dog, frog\)"):
        calibration_logits(model, str(calib))
    with pytest.raises(DataError, match="does not exist"):
        calibration_logits(model, str(tmp_path / "nowhere"))


def test_calibrating_on_val_without_a_hold_out_is_refused(finished_run):
    model = load_for_inference(finished_run[0], device="cpu")
    with pytest.raises(ConfigError, match=r"held out no labeled images \(data\.val_labels is 0\).*--calibrate-on DIR"):
        calibration_logits(model, "val")
