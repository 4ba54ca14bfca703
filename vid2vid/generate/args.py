"""``key=value`` arguments of the generation commands, parsed into small typed dataclasses.

The run config (:mod:`vid2vid.config`) describes training; these commands only read a checkpoint, so
their few options live in their own dataclasses. Values are converted from the raw text by the field's
type (no YAML guessing: ``style_class=7`` stays the string ``"7"`` for a ``str`` field), and an unknown
key is an error that names it and lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from vid2vid.config import ConfigError

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _convert(key: str, text: str, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in ("", "none", "null"):
            return None
        return _convert(key, text, args[0])
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"{key}: expected true or false, got {text!r}")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ConfigError(f"{key}: expected {tp.__name__}, got {text!r}") from None
    return text


def parse_args(cls: type, args: list[str]) -> Any:
    """Build ``cls`` (a dataclass) from ``["key=value", ...]``; fields without defaults are required."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form key=value")
        key, text = (s.strip() for s in arg.split("=", 1))
        if key not in fields:
            raise ConfigError(f"unknown key {key!r}; valid keys: {', '.join(fields)}")
        values[key] = _convert(key, text, hints[key])
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(missing)}")
    return cls(**values)
