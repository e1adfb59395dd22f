"""Any YAML document gives a valid config or a ConfigError: never another exception."""

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ignite_fixmatch.config import Config, ConfigError, load_config, to_dict

KEYS = list(to_dict(Config()).keys()) + ["data", "model", "optim", "fixmatch", "algorithm", "handlers", "bogus"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["auto", "cifar10", "folder", "1e-3", "true", "reference", "-1", "nan"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS + ["name", "params", "lr", "every", "base"]), inner, max_size=4)),
    max_leaves=12,
)
sections = {
    "data": st.dictionaries(st.sampled_from(list(to_dict(Config())["data"]) + ["oops"]), values, max_size=4),
    "optim": st.dictionaries(st.sampled_from(list(to_dict(Config())["optim"])), values, max_size=3),
    "handlers": st.lists(st.fixed_dictionaries({"name": values}, optional={"params": values}), max_size=3),
}
documents = st.one_of(
    values,
    st.dictionaries(st.sampled_from(KEYS), values, max_size=6),
    st.fixed_dictionaries({}, optional={k: s for k, s in sections.items()}),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
@pytest.mark.slow
def test_any_document_is_a_config_or_a_clear_error(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        cfg = load_config(path)
    except ConfigError as e:
        message = str(e)
        assert message and "\n" not in message.strip() and len(message) < 1000
        return
    assert isinstance(cfg, Config)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_any_text_file_is_a_config_or_a_clear_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_override_is_a_config_or_a_clear_error(text):
    try:
        load_config(None, [text])
    except ConfigError as e:
        assert str(e)
