"""Typed, frozen configs built from plain dicts (JSON/TOML), rejecting unknown keys.

Every config in the project is a frozen dataclass whose ``__post_init__`` validates values; this
module turns a dict into one, checking field names and types first so the error names the field
and the bad value instead of surfacing later as a silent no-op.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from shared.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 on JetPack 6
    import tomli as tomllib

T = TypeVar("T")


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(v, args[0]) for v in value)
        return len(args) == len(value) and all(_type_ok(v, a) for v, a in zip(value, args))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, (dict, tp))
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            if a is not type(None) and dataclasses.is_dataclass(a) and isinstance(value, dict):
                return from_dict(a, value, where)
        return value
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value, where)  # type: ignore[arg-type]
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    if tp is float and isinstance(value, int):
        return float(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys, wrong types and bad values raise ConfigError."""
    name = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a table/object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        tp = hints[key]
        if not _type_ok(value, tp):
            raise ConfigError(f"{name}.{key}: expected {_tp_name(tp)}, got {value!r}")
        kwargs[key] = _convert(value, tp, f"{name}.{key}")
    missing = [
        f.name
        for f in fields.values()
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise ConfigError(f"{name}: missing required key(s) {missing}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}: {e}") from e


def _tp_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def to_dict(obj: Any) -> dict[str, Any]:
    """The inverse of ``from_dict``: a JSON-ready dict."""
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def load_file(cls: type[T], path: str | Path) -> T:
    """Load a ``.json`` or ``.toml`` file into ``cls``."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e}") from e
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{p}: not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {e}") from e
    return from_dict(cls, data, where=p.name)


def require(cond: bool, msg: str) -> None:
    """Validation helper for ``__post_init__``: raise ConfigError with ``msg`` if ``cond`` is false."""
    if not cond:
        raise ConfigError(msg)
