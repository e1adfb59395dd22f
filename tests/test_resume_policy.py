"""What may change on resume: the policy tables (unit) and real resumed runs through the CLI (slow)."""

from __future__ import annotations

import pytest
import yaml

from helpers import cli, tiny_overrides
from ignite_fixmatch.config import Config, ConfigError, load_config, to_dict
from ignite_fixmatch.resume_policy import CHANGEABLE, FIXED, check_resume, flatten, may_change


def test_every_key_of_the_schema_is_decided_explicitly():
    """A new config key must be put in FIXED or CHANGEABLE (unknown keys are refused on resume)."""
    for key, _ in flatten(to_dict(Config())):
        fixed = any(key == p or key.startswith(p + ".") for p in FIXED)
        changeable = any(key == p or key.startswith(p + ".") for p in CHANGEABLE)
        assert fixed != changeable, key


def test_unknown_keys_are_fixed_and_the_tables_do_not_overlap():
    assert not may_change("some.new_key")
    assert not set(FIXED) & set(CHANGEABLE)


def test_a_changed_hyper_parameter_is_refused_listing_every_difference():
    saved = to_dict(load_config(None))
    current = to_dict(load_config(None, ["optim.lr=0.3", "optim.weight_decay=0.01", "train.num_iters=2000000"]))
    with pytest.raises(ConfigError) as e:
        check_resume(saved, current, iteration=10)
    message = str(e.value)
    assert "cannot change on resume: optim.lr 0.03 -> 0.3, optim.weight_decay 0.0005 -> 0.01;" in message
    assert "train.num_iters" not in message and "another output_dir" in message


def test_allowed_changes_are_returned_and_resume_itself_is_not_one():
    saved = to_dict(load_config(None))
    current = to_dict(load_config(None, ["train.num_iters=2000000", "data.num_workers=0", "resume=auto", "handlers.checkpoint.every=7"]))
    changes = check_resume(saved, current, iteration=10)
    assert [c[0] for c in changes] == ["data.num_workers", "handlers", "train.num_iters"]


def test_stopping_before_the_checkpoint_is_refused():
    saved = to_dict(load_config(None, ["train.num_iters=100"]))
    with pytest.raises(ConfigError, match="below the checkpoint's iteration 50"):
        check_resume(saved, to_dict(load_config(None, ["train.num_iters=20"])), iteration=50)


def test_algorithm_and_model_keys_are_refused():
    saved = to_dict(load_config(None))
    for override in ("algorithm.threshold=0.5", "model.widen_factor=4", "data.num_labels=250", "seed=1", "train.epoch_length=10"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            check_resume(saved, to_dict(load_config(None, [override])), iteration=0)


def _files(out):
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and ("checkpoints" in p.parts or p.name in KEPT)}


KEPT = ("config.yaml", "labeled_indices.txt", "results.json")


@pytest.mark.slow
def test_resume_with_a_changed_lr_is_refused_and_writes_nothing(finished_run, folder, tmp_path):
    reference, _ = finished_run
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = _files(out)
    result = cli(["configs/quickstart.yaml", *tiny_overrides(folder, out, "resume=auto", "optim.lr=0.3", "optim.weight_decay=0.01")])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "cannot change on resume: optim.lr 0.03 -> 0.3, optim.weight_decay 0.0005 -> 0.01" in result.stderr
    assert "Traceback" not in result.stderr
    assert _files(out) == before


@pytest.mark.slow
def test_resume_with_more_iterations_runs_on_logs_the_change_and_records_it(finished_run, folder, tmp_path):
    reference, _ = finished_run
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    result = cli(["configs/quickstart.yaml", *tiny_overrides(folder, out, "resume=auto", "train.num_iters=25")])
    assert result.returncode == 0, result.stderr[-3000:]
    changed = next(line for line in result.stderr.splitlines() if "resume: changed since the checkpoint:" in line)
    assert "train.num_iters 20 -> 25" in changed and "optim" not in changed  # output_dir differs too: a copy of the run
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["num_iters"] == 25
    assert (out / "checkpoints" / "checkpoint_25.pt").is_file()
