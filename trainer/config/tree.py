"""Typed dataclass trees from YAML plus dotted overrides, resolved once with strict checking.

Generic machinery only; the trainer's tree itself lives in trainer/config/schema.py.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config problem found before any work starts; the message names the offending key."""


def doc_field(default: Any, doc: str):
    """A dataclass field carrying its one-line docstring (shown by `rectok config --docs`)."""
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        factory = (lambda d=default: type(d)(d)) if not dataclasses.is_dataclass(default) else type(default)
        return dataclasses.field(default_factory=factory, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + "|".join(str(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _parse_scalar(raw: str):
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def coerce(value: Any, tp, key: str):
    """Check `value` against the annotation `tp`; strings are parsed for non-string targets."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} does not fit {tp}")
    if origin is Literal:
        if isinstance(value, str) and not any(isinstance(a, str) for a in args):
            value = _parse_scalar(value)
        if value not in args or type(value) is bool and not any(a is value for a in args):
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = _parse_scalar(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if tp is str:
        if isinstance(value, (dict, list, bool)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if isinstance(value, str):
        value = _parse_scalar(value)
        if tp is float and isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" as a string
                value = float(value)
            except ValueError:
                pass
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value if value is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(value, tp, f"{prefix}{name}")
    obj = cls(**kwargs)
    for name in fields.keys() - kwargs.keys():
        # Defaults take the canonical form of given values (a float field's default 40 is 40.0), so a
        # config dumped and read back is the same text (a submitted job compares the two).
        tp = hints[name]
        setattr(obj, name, from_dict(tp, {}, f"{prefix}{name}.") if dataclasses.is_dataclass(tp)
                else coerce(getattr(obj, name), tp, f"{prefix}{name}"))
    return obj


def to_dict(obj) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
    return out


def field_docs(cls, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, doc) for every leaf field."""
    rows, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += field_docs(tp, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{prefix}{f.name}", _type_name(tp), default, f.metadata.get("doc", "")))
    return rows


def read_yaml(path: str, _seen: tuple = ()) -> dict:
    """Read a recipe; a `_base_: other.yaml` key (relative to the file) is merged underneath."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"{path}: _base_ cycle")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping")
    base = data.pop("_base_", None)
    if base is None:
        return data
    return deep_merge(read_yaml(os.path.join(os.path.dirname(path), base), _seen + (path,)), data)


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b.c=value` strings into the nested dict; values stay raw strings, typed later by `coerce`."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        node, parts = data, key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = raw
    return data
