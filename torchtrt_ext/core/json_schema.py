"""Dataclasses as checked JSON: the engine file's header (file_layout.py) is read with from_json, which
checks every field against the dataclass's annotations (types, required and unknown keys) and names
the field at fault, and written with to_json."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Union

from .errors import EngineFileError


def field_error(where: str, what: str) -> EngineFileError:
    return EngineFileError(f"header field {where!r} {what}")


def _describe_type(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return f"a {tp.__name__} object"
    names = {int: "an integer", str: "a string", bool: "a boolean", type(None): "null", Any: "any value"}
    if tp in names:
        return names[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe_type(a) for a in args)
    if origin is list:
        return f"a list (each {_describe_type(args[0])})"
    if origin is tuple:
        return f"a list of {len(args)} ({', '.join(_describe_type(a) for a in args)})"
    if origin is dict:
        return "an object"
    return str(tp)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, (set, bytes)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_HINTS: dict[type, dict[str, Any]] = {}


def hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def from_json(tp: Any, value: Any, where: str) -> Any:
    """`value` (parsed JSON) as type `tp` (a schema dataclass or a field annotation), checked."""
    def bad() -> EngineFileError:
        got = "null" if value is None else f"{type(value).__name__} {_short(value)}"
        return field_error(where or "(the header)", f"must be {_describe_type(tp)}, got {got}")

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        fields = {f.name: f for f in dataclasses.fields(tp)}
        annotations = hints(tp)
        for key in value:
            if key not in fields:
                raise field_error(where or "(the header)", f"has an unknown key {key!r}")
        for name in fields:
            if name not in value:
                raise field_error(f"{where}.{name}" if where else name, "is missing")
        return tp(**{name: from_json(annotations[name], value[name], f"{where}.{name}" if where else name) for name in fields})
    if tp is Any:
        return value
    if tp in (int, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise bad()
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (arm,) = [a for a in args if a is not type(None)]  # the schema's unions are all "X | None"
        if value is None:
            raise bad()
        return from_json(arm, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        return [from_json(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list) or len(value) != len(args):
            raise bad()
        return tuple(from_json(a, item, f"{where}[{i}]") for i, (a, item) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad()
        return {k: from_json(args[1], v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"the header schema uses a type it cannot check: {tp}")


def to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value
