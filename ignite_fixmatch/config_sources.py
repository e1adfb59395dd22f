"""Where a config's mapping comes from, before it is typed: YAML files with their ``base:`` files,
``key=value`` overrides from the command line (handlers by name), and the keys of older configs.

Works on plain mappings; :mod:`ignite_fixmatch.config` builds and checks the typed config from the result.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from ignite_fixmatch.errors import ConfigError, fail_key


def default_handler_dicts() -> list[dict[str, Any]]:
    """The default ``handlers:`` list as mappings: what a handler override or patch starts from."""
    from ignite_fixmatch.config import default_handlers  # the schema imports this module: import at use

    return [dataclasses.asdict(h) for h in default_handlers()]


def handler_list(value: Any) -> list:
    """The ``handlers:`` list a patch or an override changes: the defaults where none is given (None),
    else the given list, copied item by item so the change does not reach the mapping it came from."""
    if value is None:
        return default_handler_dicts()
    if not isinstance(value, list):
        fail_key("handlers", value, "a list")
    return [dict(h) if isinstance(h, dict) else h for h in value]


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value), the value read as YAML ("false" is False, "1e-3" a number)."""
    if "=" not in text:
        raise ConfigError(f"command-line override {text!r} is not of the form key=value (e.g. optim.lr=0.01).")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"command-line override {text!r}: the key {key!r} is not a dotted name like optim.lr.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"command-line override {text!r}: the value is not valid YAML ({' '.join(str(e).split())}).") from None
    return parts, value


def _set_path(data: dict, parts: list[str], value: Any, text: str) -> None:
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict):
            raise ConfigError(f"command-line override {text!r}: '{'.'.join(parts[:i])}' is not a section.")
        nxt = node.setdefault(part, {})
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"command-line override {text!r}: '{'.'.join(parts[: i + 1])}' is not a section.")
        node = nxt
    node[parts[-1]] = value


# ----------------------------------------------------------- handlers by name, legacy keys, base files

LEGACY_FIXMATCH = "fixmatch"  # before the algorithm seam: fixmatch.{threshold,lambda_u,hard_label,T,interleave}


def _handler_override(handlers: list, parts: list[str], value: Any, text: str) -> None:
    """``handlers.<name>.<param>=v`` (or ``handlers.<name>.params.<param>=v``) sets a param of the
    handler called <name>; a name not in the list adds that handler. Positions are refused: they
    point at another handler as soon as the list changes."""
    name = parts[1]
    if name.isdigit():
        index = int(name)
        shown = handlers[index]["name"] if index < len(handlers) and isinstance(handlers[index], dict) else "<name>"
        rest = ".".join(p for p in parts[2:] if p != "params") or "<param>"
        raise ConfigError(
            f"command-line override {text!r}: handlers are overridden by name, not by position (a position points at another "
            f"handler as soon as the list changes). Write handlers.{shown}.{rest}={text.split('=', 1)[1]}."
        )
    params = parts[3:] if len(parts) > 2 and parts[2] == "params" else parts[2:]
    if not params:
        raise ConfigError(f"command-line override {text!r}: name a param, e.g. handlers.{name}.every=1000.")
    matches = [h for h in handlers if isinstance(h, dict) and h.get("name") == name]
    if len(matches) > 1:
        raise ConfigError(f"command-line override {text!r}: {len(matches)} handlers are named {name!r}; edit the YAML file instead.")
    if not matches:
        matches = [{"name": name, "params": {}}]
        handlers.append(matches[0])
    spec = matches[0]
    if spec.get("params") is None:
        spec["params"] = {}
    _set_path(spec["params"], params, value, text)


def _merge_handlers(inherited: list, patch: dict) -> list:
    """A ``handlers:`` mapping in a config with a base: {name: {params} | null} changes the inherited
    list by name (params merged, null removes, a new name is appended), keeping its order."""
    result = [dict(h, params=dict(h.get("params") or {})) if isinstance(h, dict) else h for h in inherited]
    for name, change in patch.items():
        matches = [h for h in result if isinstance(h, dict) and h.get("name") == name]
        if change is None:
            result = [h for h in result if not (isinstance(h, dict) and h.get("name") == name)]
            continue
        if not isinstance(change, dict) or set(change) - {"params"}:
            fail_key(f"handlers.{name}", change, "null (remove it) or a mapping {params: {...}}")
        if not matches:
            result.append({"name": name, "params": {}})
            matches = result[-1:]
        for spec in matches:
            spec["params"] = _deep_merge(spec["params"], change.get("params") or {})
    return result


def _other_algorithm(current: Any, new: Any) -> bool:
    """Whether ``new`` names another algorithm than ``current`` (both ``algorithm:`` sections)."""
    current_name = current.get("name", "fixmatch") if isinstance(current, dict) else "fixmatch"
    return isinstance(new, dict) and "name" in new and new["name"] != current_name


def _deep_merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``: mappings merge key by key, anything else (lists included) is replaced;
    ``handlers:`` written as a mapping changes the inherited list by name."""
    merged = dict(base)
    for key, value in top.items():
        if key == "algorithm" and _other_algorithm(merged.get(key), value):
            merged[key] = value  # another algorithm: the base's keys were the old one's
        elif key == "handlers" and isinstance(value, dict):
            merged[key] = _merge_handlers(handler_list(merged.get(key)), value)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_mapping(path: Path) -> dict:
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; give the path of a YAML file in it, e.g. configs/quickstart.yaml.")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist (give the path of a YAML file, e.g. configs/quickstart.yaml).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        detail = " ".join(str(e).split())  # one paragraph
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {detail}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values (like 'seed: 0'), not {type(data).__name__}.")
    return data


def read_config_file(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A YAML config with its ``base:`` files applied: ``base: other.yaml`` (or a list, applied in
    order), relative to the file that names it; the file's own keys go over its bases'."""
    path = Path(path)
    if path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise ConfigError(f"config file {str(path)!r}: its base: files form a cycle ({cycle}).")
    data = upgrade_legacy(_read_mapping(path), str(path))
    bases = data.pop("base", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        fail_key(f"base (in {path})", bases, "a YAML file name or a list of them, relative to this file")
    merged: dict = {}
    for base in bases:
        merged = _deep_merge(merged, read_config_file(path.parent / base, (*chain, path.resolve())))
    return _deep_merge(merged, data)


def upgrade_legacy(data: dict, where: str) -> dict:
    """The ``fixmatch:`` section of configs (and checkpoints) written before the algorithm seam is read as
    ``algorithm:`` (name fixmatch) and ``train.interleave``."""
    if LEGACY_FIXMATCH not in data:
        return data
    data = dict(data)
    legacy = data.pop(LEGACY_FIXMATCH)
    if legacy is None:
        legacy = {}
    if not isinstance(legacy, dict):
        fail_key(LEGACY_FIXMATCH, legacy, "a mapping (now written as algorithm:)")
    if "algorithm" in data:
        raise ConfigError(f"{where}: both 'fixmatch:' and 'algorithm:' are given; 'fixmatch:' is the old name of 'algorithm:', keep one.")
    legacy = dict(legacy)
    if "interleave" in legacy:
        train = data.get("train") or {}
        data["train"] = {**train, "interleave": legacy.pop("interleave")} if isinstance(train, dict) else train
    data["algorithm"] = {"name": "fixmatch", **legacy}
    return data


def apply_overrides(data: dict, overrides: typing.Sequence[str]) -> dict:
    """``a.b=value`` overrides over a config mapping; ``fixmatch.<key>`` is read as ``algorithm.<key>``
    (``train.interleave`` for interleave), ``handlers.<name>.<param>`` by handler name. An
    ``algorithm.name`` that changes the algorithm drops the file's ``algorithm:`` keys (they were the
    old algorithm's): the new one starts from its defaults and the other ``algorithm.*`` overrides."""
    data = dict(data)
    parsed = [(text, *parse_override(text)) for text in overrides]
    names = [value for _, parts, value in parsed if parts == ["algorithm", "name"]]
    if names and _other_algorithm(data.get("algorithm"), {"name": names[-1]}):
        data["algorithm"] = {"name": names[-1]}  # another algorithm: the file's keys were the old one's
    for text, parts, value in parsed:
        if parts[0] == LEGACY_FIXMATCH and len(parts) > 1:
            parts = ["train", "interleave"] if parts[1:] == ["interleave"] else ["algorithm", *parts[1:]]
        if parts[0] == "handlers" and len(parts) > 1:
            data["handlers"] = handler_list(data.get("handlers"))
            _handler_override(data["handlers"], parts, value, text)
            continue
        _set_path(data, parts, value, text)
    return data


