"""The one loader for every dataclass config: model, curation, training, serving.

A config is a (possibly nested) dataclass. ``config_from_dict`` builds it from plain
data (JSON/TOML), following the field type hints: nested dataclasses are built
recursively, lists become tuples where a field is a tuple, and an unknown key is an
error that names its full path, so a typo never silently falls back to a default.
``load_config`` reads a TOML or JSON file from any URI; ``config_to_dict`` is the
inverse of ``config_from_dict``.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or dict does not fit its dataclass."""


def config_to_dict(obj: Any) -> dict[str, Any]:
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"expected a dataclass instance, got {type(obj).__name__}")
    return dataclasses.asdict(obj)


def config_from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; nested fields by their type hints."""
    where = path or cls.__name__
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table/object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(fields)}")
    kwargs = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from err
    return obj


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        if len(options) == 1:
            return _convert(options[0], value, path)
        return value
    if dataclasses.is_dataclass(hint):
        return config_from_dict(hint, value, path)
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    if origin is list and isinstance(value, (list, tuple)):
        (arg,) = typing.get_args(hint) or (Any,)
        return [_convert(arg, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{path}: expected {hint.__name__}, got {value!r}")
    return value


def parse_config_text(text: str, name: str = "config") -> dict[str, Any]:
    """TOML or JSON text (by the name's extension; JSON when it starts with '{')."""
    stripped = text.lstrip()
    try:
        if name.endswith(".json") or stripped.startswith("{"):
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{name}: not valid TOML/JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: the top level must be a table/object")
    return data


def load_config(cls: type[T], uri: str, section: str | None = None) -> T:
    """Read a TOML/JSON config from any URI; ``section`` picks a top-level table."""
    from core import storage

    data = parse_config_text(storage.read_bytes(uri).decode("utf-8"), uri)
    if section is not None:
        data = data.get(section, {})
    return config_from_dict(cls, data, path=section or cls.__name__)
