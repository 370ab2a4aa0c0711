"""Check every field of a frozen config dataclass against its type hint and its metadata.

Configs arrive from Python, YAML files, presets and ``key=value`` overrides, so a value can have any
type. Each field is checked once, in ``__post_init__``, and a bad value gets one message naming the
field and what it accepts. Metadata keys: ``min`` / ``max`` (inclusive), ``above`` (exclusive lower
bound), ``choices`` (allowed strings for a plain ``str`` field).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


def check_fields(obj: Any, prefix: str = "") -> None:
    """Raise ``ValueError("<prefix><field> must be <what it accepts>, got <value>")``.

    The first bad field is named."""
    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if not conforms(value, hints[field.name], field.metadata):
            raise ValueError(
                f"{prefix}{field.name} must be {describe(hints[field.name], field.metadata)}, "
                f"got {value!r}"
            )


def unknown_keys(data: dict[str, Any], cls: type, what: str) -> None:
    """Raise naming the keys of ``data`` that are not fields of ``cls`` (and the valid ones)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {what} setting(s) {unknown}; valid: {sorted(known)}")


def coerce_numbers(data: dict[str, Any], cls: type) -> dict[str, Any]:
    """Numbers written as text for float fields (YAML reads ``5e-4`` as a string) become floats."""
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for key, value in data.items():
        if isinstance(value, str) and key in hints and float in _members(hints[key]):
            try:
                out[key] = float(value)
            except ValueError:
                pass  # reported as a type error by check_fields
    return out


def _members(hint: Any) -> tuple[Any, ...]:
    if get_origin(hint) in (Union, types.UnionType):
        return get_args(hint)
    return (hint,)


def conforms(value: Any, hint: Any, meta: typing.Mapping[str, Any]) -> bool:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(conforms(value, member, meta) for member in get_args(hint))
    if hint is type(None):
        return value is None
    if origin is Literal:
        return isinstance(value, str) and value in get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool) and _in_range(value, meta)
    if hint is float:
        return (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and _in_range(value, meta)
        )
    if hint is str:
        return isinstance(value, str) and ("choices" not in meta or value in meta["choices"])
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return True


def _in_range(value: float, meta: typing.Mapping[str, Any]) -> bool:
    if "min" in meta and value < meta["min"]:
        return False
    if "max" in meta and value > meta["max"]:
        return False
    return not ("above" in meta and value <= meta["above"])


def describe(hint: Any, meta: typing.Mapping[str, Any]) -> str:
    """What a field accepts, in words."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        parts = [describe(m, meta) for m in get_args(hint) if m is not type(None)]
        text = " or ".join(parts)
        return text + " or null" if type(None) in get_args(hint) else text
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in get_args(hint))
    if hint is bool:
        return "true or false"
    if hint in (int, float):
        kind = "an integer" if hint is int else "a number"
        bounds = []
        if "above" in meta:
            bounds.append(f"> {meta['above']}")
        if "min" in meta:
            bounds.append(f">= {meta['min']}")
        if "max" in meta:
            bounds.append(f"<= {meta['max']}")
        return kind + (" " + " and ".join(bounds) if bounds else "")
    if hint is str:
        return (
            "one of " + ", ".join(repr(c) for c in meta["choices"])
            if "choices" in meta
            else "a string"
        )
    if origin in (list, tuple):
        return "a list of non-empty strings"
    return getattr(hint, "__name__", str(hint))
