"""The real command line on a generated image folder: outputs, errors, and exact resume after SIGKILL."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import cli, final_state_matches, kill_after_checkpoint, tiny_overrides


def test_run_writes_its_outputs(finished_run):
    out, result = finished_run
    results = json.loads((out / "results.json").read_text())
    assert results["iteration"] == 20 and results["model"] == "ema"
    for key in ("top1", "top5", "best_top1", "median20_top1"):
        assert 0.0 <= results[key] <= 100.0
    assert [r["iteration"] for r in results["history"]] == [10, 20]
    assert "Finished: top-1" in result.stderr
    assert "data:\n  name: folder" in (out / "config.yaml").read_text()
    assert len((out / "labeled_indices.txt").read_text().split()) == 6
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "checkpoint_20.pt" in names and "checkpoint_15.pt" in names and "checkpoint_10.pt" not in names  # keep 2
    assert any(n.startswith("best_checkpoint_") for n in names)
    assert "iteration 5/20" in (out / "train.log").read_text()


def test_tensorboard_event_file_holds_step_and_eval_metrics(finished_run):
    out, _ = finished_run
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss", "loss_x", "loss_u", "mask_rate", "pseudo_acc", "lr", "data_time", "step_time"):
        assert f"train/{tag}" in tags
    assert {"test_ema/top1", "test_ema/top5", "test_ema/loss"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 21))
    assert [e.step for e in acc.Scalars("test_ema/top1")] == [10, 20]
    assert acc.Scalars("train/lr")[0].value == pytest.approx(0.03)


@pytest.mark.slow
def test_existing_output_folder_is_refused_and_kept(finished_run, folder):
    out, _ = finished_run
    before = sorted(p.name for p in out.rglob("*"))
    result = cli(["configs/quickstart.yaml", *tiny_overrides(folder, out)])
    assert result.returncode == 2
    assert "already holds a run" in result.stderr and "resume=auto" in result.stderr and "overwrite=true" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in out.rglob("*")) == before


@pytest.mark.slow
def test_config_errors_exit_before_anything_starts(tmp_path, folder):
    result = cli(["configs/quickstart.yaml", *tiny_overrides(folder, tmp_path / "r"), "optim.lr=-1"])
    assert result.returncode == 2 and "optim.lr" in result.stderr and "Traceback" not in result.stderr
    result = cli(["configs/quickstart.yaml", *tiny_overrides(folder, tmp_path / "r"), "handlers.tensorboard.evry=3"])
    assert result.returncode == 2 and "handlers[5] (tensorboard)" in result.stderr and "evry" in result.stderr
    assert not (tmp_path / "r").exists()  # refused before the output folder (or anything heavy) was made


@pytest.mark.slow
def test_missing_data_folder_is_a_clear_error(tmp_path):
    result = cli(["configs/quickstart.yaml", *tiny_overrides(tmp_path / "nope", tmp_path / "r")])
    assert result.returncode == 2 and str(tmp_path / "nope") in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(finished_run, folder, tmp_path):
    reference, _ = finished_run
    out = tmp_path / "killed"
    args = ["configs/quickstart.yaml", *tiny_overrides(folder, out, "train.num_iters=20")]
    kill_after_checkpoint(args, out)
    assert not (out / "checkpoints" / "checkpoint_20.pt").exists()
    result = cli([*args, "resume=auto"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed from" in result.stderr
    final_state_matches(reference, out)
    ra = json.loads((reference / "results.json").read_text())
    rb = json.loads((out / "results.json").read_text())
    assert ra["history"] == rb["history"]
