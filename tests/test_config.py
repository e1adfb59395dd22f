"""The typed config: YAML + overrides, and a clear error for every kind of bad value."""

import pytest
import torch
import yaml

from ignite_fixmatch.config import Config, ConfigError, dump_yaml, from_dict, load_config, to_dict
from ignite_fixmatch.training import compile_enabled


def test_defaults_are_the_reference_hyper_parameters():
    cfg = load_config(None)
    assert (cfg.data.batch_size, cfg.data.mu, cfg.fixmatch.threshold, cfg.fixmatch.lambda_u) == (64, 7, 0.95, 1.0)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.weight_decay) == (0.03, 0.9, True, 5e-4)
    assert cfg.train.num_iters == 2**20 and cfg.model.bn_momentum == 0.001 and cfg.seed == 0
    assert [h.name for h in cfg.handlers][:2] == ["ema", "cosine_lr"]


def test_overrides_merge_with_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  name: cifar100\n  num_labels: 400\nmodel:\n  widen_factor: 8\n")
    cfg = load_config(path, ["data.num_labels=2500", "optim.lr=0.01", "output_dir=runs/x", "fixmatch.hard_label=false", "optim.weight_decay=1e-3"])
    assert cfg.data.name == "cifar100" and cfg.data.num_labels == 2500 and cfg.model.widen_factor == 8
    assert cfg.optim.lr == 0.01 and cfg.output_dir == "runs/x" and cfg.optim.weight_decay == 1e-3
    assert cfg.fixmatch.hard_label is False


@pytest.mark.parametrize("text,expected", [("false", False), ("False", False), ("true", True), ("no", False)])
def test_booleans_parse_as_booleans(text, expected):
    assert load_config(None, [f"amp={text}"]).amp is expected


def test_override_of_a_handler_param_by_index():
    cfg = load_config(None, ["handlers.3.params.every=7"])
    assert cfg.handlers[3].name == "evaluation" and cfg.handlers[3].params == {"every": 7}


@pytest.mark.parametrize(
    "override,words",
    [
        ("foo=1", ["unknown config key 'foo'", "output_dir"]),
        ("data.bogus=1", ["unknown config key 'data.bogus'", "num_labels"]),
        ("optim.lr=-0.1", ["optim.lr", "-0.1", "> 0"]),
        ("optim.lr=fast", ["optim.lr", "'fast'", "number"]),
        ("fixmatch.threshold=1.5", ["fixmatch.threshold", "1.5", "[0, 1]"]),
        ("data.num_labels=45", ["data.num_labels", "45", "multiple of the 10 classes"]),
        ("data.batch_size=5000", ["data.batch_size", "5000", "at most data.num_labels"]),
        ("amp=maybe", ["amp", "'maybe'", "true or false"]),
        ("amp=1", ["amp", "true or false"]),
        ("seed=0.5", ["seed", "integer"]),
        ("data.name=imagenet", ["data.name", "'imagenet'", "'cifar10'"]),
        ("data=3", ["'data'", "mapping"]),
        ("model.depth=27", ["model.depth", "6n+4"]),
        ("train.num_iters=0", ["train.num_iters", "[1, 2^40]"]),
        ("seed=99999999999", ["seed", "2^32"]),
        ("handlers=5", ["handlers", "list"]),
        ("dist.nproc_per_node=3", ["data.batch_size", "multiple of the 3 processes"]),
        ("noequals", ["key=value"]),
    ],
)
def test_bad_values_are_refused_with_key_value_and_allowed(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("content,words", [("- a\n- b\n", ["mapping", "list"]), ("a: [\n", ["not valid YAML"]), ("", [])])
def test_yaml_files_that_are_not_mappings(tmp_path, content, words):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    if not words:  # an empty file is the defaults
        assert load_config(path) == Config()
        return
    with pytest.raises(ConfigError) as e:
        load_config(path)
    for w in words:
        assert w in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/file.yaml")


def test_resolved_config_round_trips():
    cfg = load_config(None, ["data.num_labels=250", "handlers.0.params.decay=0.99"])
    again = from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg and to_dict(again)["data"]["num_labels"] == 250


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
    assert len(configs) >= 15
    for path in configs:
        cfg = load_config(path)
        assert cfg.train.num_iters >= 1, path
    c100 = load_config(Path("configs/cifar100_400.yaml"))
    assert (c100.model.widen_factor, c100.optim.weight_decay) == (8, 1e-3)
    assert load_config(Path("configs/cifar10_full_supervised.yaml")).fixmatch.lambda_u == 0.0


@pytest.mark.parametrize("text, expected", [("off", "off"), ("on", "on"), ("auto", "auto"), ("false", "off"), ("true", "on")])
def test_on_off_settings_accept_yaml_booleans(text, expected, tmp_path):
    """YAML reads a bare on/off as a boolean: model.compile=off (command line or file) must still mean "off"."""
    assert load_config(None, [f"model.compile={text}"]).model.compile == expected
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  compile: {text}\n")
    assert load_config(path).model.compile == expected


def test_amp_is_auto_by_default_and_takes_booleans():
    assert load_config(None).amp is None
    assert load_config(None, ["amp=true"]).amp is True
    assert load_config(None, ["amp=null"]).amp is None


@pytest.mark.parametrize(
    "setting, device, iters, expected",
    [("auto", "cuda", 100, True), ("auto", "cpu", 9_999, False), ("auto", "cpu", 10_000, True), ("on", "cpu", 10, True), ("off", "cuda", 10**6, False)],
)
def test_compile_auto_is_on_for_gpus_and_long_cpu_runs(setting, device, iters, expected):
    """A short CPU run would spend longer compiling than compiling saves; a GPU run always gains."""
    cfg = load_config(None, [f"model.compile={setting}", f"train.num_iters={iters}"])
    assert compile_enabled(cfg, torch.device(device)) is expected
