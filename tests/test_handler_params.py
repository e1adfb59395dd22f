"""Every built-in handler's params are checked against their annotated types when the config is loaded
(plugins.build_handler), with an error naming the handler and the param; range checks stay the handlers'."""

from __future__ import annotations

import pytest

from ignite_fixmatch.config import ConfigError, HandlerSpec
from ignite_fixmatch.plugins import BUILTINS, build_handler, check_param, param_types, resolve

# A wrong value of each kind for each annotated type of the built-ins' params.
WRONG = {
    int: [True, 2.5, "abc", None, [1]],
    float: [True, "abc", None, float("nan"), [0.5]],
    bool: [1, "yes", None],
    str: [1, True, None, ["a"], ""],
}


def _cases():
    for name in BUILTINS:
        for param, kind in param_types(resolve(name)).items():
            for value in WRONG.get(kind, []):
                yield pytest.param(name, param, value, id=f"{name}.{param}={value!r}")


@pytest.mark.parametrize("name, param, value", list(_cases()))
def test_every_builtin_param_of_the_wrong_type_is_refused_naming_handler_and_param(name, param, value):
    with pytest.raises(ConfigError) as e:
        build_handler(HandlerSpec(name, {param: value}), 4)
    assert f"handlers[4] ({name})" in str(e.value) and repr(param) in str(e.value), str(e.value)


def test_every_builtin_param_is_annotated_with_a_checkable_type():
    for name in BUILTINS:
        factory = resolve(name)
        hints = param_types(factory)
        import inspect

        params = [p for p in inspect.signature(factory).parameters if p != "self"]
        assert set(params) <= set(hints), (name, set(params) - set(hints))


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("checkpoint", {"every": True}, "param 'every': got True, expected an integer"),
        ("checkpoint", {"every": 2.5}, "param 'every': got 2.5, expected an integer"),
        ("checkpoint", {"every": "abc"}, "param 'every': got 'abc', expected an integer"),
        ("evaluation", {"models": "ema"}, "param 'models': got 'ema', expected a list"),
        ("evaluation", {"models": ["ema", 3]}, "param 'models'"),
        ("clearml", {"offline": 1}, "param 'offline'"),
        ("clearml", {"task_name": 5}, "param 'task_name': got 5, expected a string or null"),
        ("timer", {"csv": "false"}, "param 'csv': got 'false', expected true or false"),
    ],
)
def test_wrong_types_are_named(name, params, message):
    with pytest.raises(ConfigError, match="handlers\\[0\\]") as e:
        build_handler(HandlerSpec(name, params), 0)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "name, params, attr, expected",
    [
        ("checkpoint", {"every": 10.0}, "every", 10),  # a whole float is the integer, as for config keys
        ("ema", {"decay": "1e-3"}, "decay", 0.001),  # PyYAML reads 1e-3 as a string
        ("cosine_lr", {"cycles": 0}, "cycles", None),  # an int is a float, then the range check refuses 0
        ("evaluation", {"models": ["raw"]}, "models", ["raw"]),
        ("clearml", {"offline": True, "task_name": None}, "offline", True),
        ("clearml", {"offline": "auto"}, "offline", "auto"),
        ("clearml", {"connect_timeout": 5}, "connect_timeout", 5.0),
    ],
)
def test_right_types_pass_converted_and_ranges_are_still_checked(name, params, attr, expected):
    if expected is None:
        with pytest.raises(ConfigError, match="cycles must be in"):
            build_handler(HandlerSpec(name, params), 0)
        return
    assert getattr(build_handler(HandlerSpec(name, params), 0), attr) == expected


def test_a_param_of_an_unknown_type_is_left_to_the_handler():
    class Thing:
        pass

    value = Thing()
    assert check_param("h", "p", value, Thing) is value


def test_a_users_handler_with_unresolvable_annotations_is_not_type_checked():
    def factory(x: NotDefinedAnywhere = 1):  # noqa: F821
        return None

    assert param_types(factory) == {}


def test_the_override_error_names_the_param_through_the_cli_loader():
    from ignite_fixmatch.config import load_config
    from ignite_fixmatch.plugins import build_handlers

    cfg = load_config(None, ["handlers.checkpoint.every=true"])
    with pytest.raises(ConfigError, match=r"\(checkpoint\): param 'every': got True, expected an integer"):
        build_handlers(cfg.handlers)
