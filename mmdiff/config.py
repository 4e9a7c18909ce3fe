"""Typed configuration: dataclasses, YAML files and ``key=value`` overrides.

Every recipe in mmdiff is a dataclass.  ``load_config(Cls, path, overrides)`` reads a YAML
file, applies dotted ``key=value`` overrides from the command line and builds the dataclass
*recursively*, checking every value against its annotation.  Nothing is silently dropped:

* an unknown key                     -> ``ConfigError("... unknown key 'model.hiden' ...")``
* a value of the wrong type          -> ``ConfigError("... key 'train.lr': expected float ...")``
* an impossible value                -> each dataclass may define ``validate()`` which raises
  ``ValueError``; the loader re-raises it as ``ConfigError`` naming the file.

All of this happens before any work starts, so a typo never costs a training run.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")

__all__ = ["ConfigError", "load_config", "from_dict", "to_dict", "parse_overrides", "save_config"]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the source."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to annotation ``tp``; raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"key '{key}': expected one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"key '{key}': expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"key '{key}': expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"key '{key}': expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, f"{key}.<key>"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"key '{key}': expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"key '{key}': expected bool, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"key '{key}': expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"key '{key}': expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"key '{key}': expected str, got {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"key '{key}': expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key '{prefix}{unknown[0]}' (valid keys here: {', '.join(sorted(fields))})"
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            msg = str(e)  # a nested validate() may already name its section: "remask.ratio ..."
            raise ConfigError(msg if not prefix or msg.startswith(prefix) else prefix + msg) from None
    return obj


def from_dict(cls: type[T], data: dict | None) -> T:
    """Build dataclass ``cls`` from a plain mapping with full validation."""
    return _build(cls, dict(data or {}))


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain YAML/JSON-able structure."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _parse_scalar(text: str) -> Any:
    """``key=value`` values are parsed as YAML scalars/flow collections (``lr=3e-4``, ``x=[1,2]``)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads '3e-4' as a string; accept it as a float.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") and value.strip() else value
        except ValueError:
            return value
    return value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict:
    """``["train.lr=1e-3", "model.size=debug"]`` -> nested dict."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override")
        node[parts[-1]] = _parse_scalar(text)
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _fix_floats(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _fix_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_floats(v) for v in node]
    if isinstance(node, str):
        try:
            if any(c in node for c in "eE") and node[0] in "0123456789.-+":
                return float(node)
        except ValueError:
            pass
    return node


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return _fix_floats(data)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read YAML ``path`` (optional), apply ``key=value`` overrides, build and validate ``cls``.

    Errors name the key and the source (file or command line).
    """
    data = load_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    try:
        ov = parse_overrides(overrides or [])
    except ConfigError as e:
        raise ConfigError(f"command line: {e}") from None
    try:
        return from_dict(cls, _merge(data, ov))
    except ConfigError as e:
        where = f"{source} (+ command-line overrides)" if overrides else source
        raise ConfigError(f"{where}: {e}") from None


def save_config(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


def write_json_atomic(path: str | Path, obj: Any, allow_nan: bool = True) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str, allow_nan=allow_nan) + "\n")
    tmp.replace(path)
