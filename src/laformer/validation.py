"""Checks for values read from files: JSON that may be anything, and config fields that may hold any JSON type.

A ``config.json`` someone else wrote can say ``"hidden_size": "12"`` or ``"r": [1]``; without these checks that
surfaces as a ``TypeError`` deep inside a layer constructor, far from the field that caused it.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

from laformer.errors import ConfigError, LaFormerError


def read_json(path: Path, error: type[LaFormerError], expect: type = dict) -> Any:
    """The JSON document in ``path`` (of type ``expect``), or ``error`` naming the file and what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc, error) from exc
    return parse_json(text, str(path), error, "fix or re-create it", expect)


def parse_json(text: str, where: str, error: type[LaFormerError], fix: str, expect: type = dict) -> Any:
    """``text`` parsed as JSON of type ``expect``, or ``error`` naming ``where`` it came from and the ``fix``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid JSON ({exc.msg}); {fix}") from exc
    except RecursionError as exc:
        raise error(f"{where}: JSON nested too deeply to read; {fix}") from exc
    if not isinstance(data, expect):
        raise error(f"{where}: expected a JSON {expect.__name__}, got {type(data).__name__}; {fix}")
    return data


def not_utf8(path: Path, exc: UnicodeDecodeError, error: type[LaFormerError]) -> LaFormerError:
    return error(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8")


def check_field_types(obj: Any) -> None:
    """Raise ``ConfigError`` naming the first field of dataclass ``obj`` whose value does not fit its annotation."""
    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if not _fits(value, hints[field.name]):
            raise ConfigError(f"{type(obj).__name__}.{field.name} must be {_describe(hints[field.name])}, got "
                              f"{value!r}; fix that field")


def check_positive(obj: Any, names: tuple[str, ...], limit: int = 2**31 - 1) -> None:
    """Integer sizes must be in 1..limit: a header may claim 10**12 heads, which nothing can allocate."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not 0 < value <= limit:
            raise ConfigError(f"{type(obj).__name__}.{name} must be between 1 and {limit}, got {value}; fix that field")


def check_finite(obj: Any, names: tuple[str, ...], positive: bool = True) -> None:
    for name in names:
        value = getattr(obj, name)
        if not math.isfinite(value) or (positive and value <= 0):
            raise ConfigError(f"{type(obj).__name__}.{name} must be a finite{' positive' if positive else ''} "
                              f"number, got {value}; fix that field")


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        return all(_fits(v, args[0] if args else Any) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, origin or hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (list, tuple, collections.abc.Sequence):
        return f"a list of {_describe(typing.get_args(hint)[0])}" if typing.get_args(hint) else "a list"
    return f"{getattr(origin or hint, '__name__', str(hint))}"
