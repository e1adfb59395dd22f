"""The typed config: YAML + overrides, and a clear error for every kind of bad value."""

import pytest
import torch
import yaml

from ignite_fixmatch.config import Config, ConfigError, dump_yaml, from_dict, load_config, to_dict
from ignite_fixmatch.training import compile_enabled


def test_defaults_are_the_reference_hyper_parameters():
    cfg = load_config(None)
    assert (cfg.data.batch_size, cfg.data.mu, cfg.algorithm.params.threshold, cfg.algorithm.params.lambda_u) == (64, 7, 0.95, 1.0)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.weight_decay) == (0.03, 0.9, True, 5e-4)
    assert cfg.train.num_iters == 2**20 and cfg.model.bn_momentum == 0.001 and cfg.seed == 0
    assert [h.name for h in cfg.handlers][:2] == ["ema", "cosine_lr"]


def test_overrides_merge_with_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  name: cifar100\n  num_labels: 400\nmodel:\n  widen_factor: 8\n")
    cfg = load_config(path, ["data.num_labels=2500", "optim.lr=0.01", "output_dir=runs/x", "algorithm.hard_label=false", "optim.weight_decay=1e-3"])
    assert cfg.data.name == "cifar100" and cfg.data.num_labels == 2500 and cfg.model.widen_factor == 8
    assert cfg.optim.lr == 0.01 and cfg.output_dir == "runs/x" and cfg.optim.weight_decay == 1e-3
    assert cfg.algorithm.params.hard_label is False


@pytest.mark.parametrize("text,expected", [("false", False), ("False", False), ("true", True), ("no", False)])
def test_booleans_parse_as_booleans(text, expected):
    assert load_config(None, [f"amp={text}"]).amp is expected


def test_override_of_a_handler_param_by_name():
    cfg = load_config(None, ["handlers.evaluation.every=7", "handlers.checkpoint.params.keep=3"])
    assert cfg.handlers[3].name == "evaluation" and cfg.handlers[3].params == {"every": 7}
    assert cfg.handlers[4].name == "checkpoint" and cfg.handlers[4].params == {"keep": 3}
    added = load_config(None, ["handlers.timer.csv=false"])  # a name not in the list adds that handler
    assert added.handlers[-1].name == "timer" and added.handlers[-1].params == {"csv": False}


def test_override_of_a_handler_by_position_is_refused_with_the_named_form():
    with pytest.raises(ConfigError, match=r"by name, not by position.*Write handlers\.evaluation\.every=7\."):
        load_config(None, ["handlers.3.params.every=7"])
    with pytest.raises(ConfigError, match=r"2 handlers are named 'ema'"):
        load_config(None, ["handlers=[{name: ema}, {name: ema}]", "handlers.ema.decay=0.9"])


def test_a_config_extends_its_base_and_changes_handlers_by_name(tmp_path):
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "root.yaml").write_text(
        "seed: 3\ndata: {name: digits, num_labels: 50, batch_size: 16}\nmodel: {depth: 10}\n"
        "handlers: [{name: ema, params: {decay: 0.9}}, {name: evaluation, params: {every: 5}}, {name: progress}]\n"
    )
    (tmp_path / "bases" / "mid.yaml").write_text("base: root.yaml\ndata: {mu: 3}\noptim: {lr: 0.1}\n")
    (tmp_path / "run.yaml").write_text(
        "base: bases/mid.yaml\ndata: {num_labels: 100}\nhandlers:\n  evaluation: {params: {models: [ema, raw]}}\n"
        "  progress: null\n  checkpoint: {params: {every: 9}}\n"
    )
    cfg = load_config(tmp_path / "run.yaml", ["optim.lr=0.2"])
    assert (cfg.seed, cfg.data.name, cfg.data.num_labels, cfg.data.batch_size, cfg.data.mu, cfg.model.depth) == (3, "digits", 100, 16, 3, 10)
    assert cfg.optim.lr == 0.2  # the command line goes over every file
    assert [(h.name, h.params) for h in cfg.handlers] == [
        ("ema", {"decay": 0.9}), ("evaluation", {"every": 5, "models": ["ema", "raw"]}), ("checkpoint", {"every": 9}),
    ]
    assert "base" not in to_dict(cfg) and "num_labels: 100" in dump_yaml(cfg)  # saved in full, without the base


def test_a_handler_patch_changes_the_inherited_list_even_when_it_is_empty(tmp_path):
    (tmp_path / "none.yaml").write_text("handlers: []\n")
    (tmp_path / "child.yaml").write_text("base: none.yaml\nhandlers:\n  progress: {params: {every: 3}}\n")
    assert [(h.name, h.params) for h in load_config(tmp_path / "child.yaml").handlers] == [("progress", {"every": 3})]
    (tmp_path / "bad.yaml").write_text("handlers: oops\n")
    (tmp_path / "bad_child.yaml").write_text("base: bad.yaml\nhandlers:\n  progress: null\n")
    with pytest.raises(ConfigError, match="'handlers': got 'oops', expected a list"):
        load_config(tmp_path / "bad_child.yaml")


def test_base_files_that_loop_or_are_missing_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="form a cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml.*does not exist"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: 3\n")
    with pytest.raises(ConfigError, match="base"):
        load_config(tmp_path / "d.yaml")


def test_benchmark_configs_are_short_diffs_of_a_base():
    from pathlib import Path

    for path in Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"):
        if path.name != "quickstart.yaml":
            text = path.read_text()
            assert "base: base/" in text and len(text.splitlines()) <= 12, path


@pytest.mark.parametrize(
    "override,words",
    [
        ("foo=1", ["unknown config key 'foo'", "output_dir"]),
        ("data.bogus=1", ["unknown config key 'data.bogus'", "num_labels"]),
        ("optim.lr=-0.1", ["optim.lr", "-0.1", "> 0"]),
        ("optim.lr=fast", ["optim.lr", "'fast'", "number"]),
        ("algorithm.threshold=1.5", ["algorithm.threshold", "1.5", "[0, 1]"]),
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
    with pytest.raises(ConfigError, match="'configs' is a directory; give the path of a YAML file in it"):
        load_config("configs")


def test_resolved_config_round_trips():
    cfg = load_config(None, ["data.num_labels=250", "handlers.ema.decay=0.99"])
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
    assert load_config(Path("configs/cifar10_full_supervised.yaml")).algorithm.params.lambda_u == 0.0


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
