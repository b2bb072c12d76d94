"""Dataclass configs <-> plain dicts (YAML/JSON), and help text from the docstring under each field."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import numbers
import re
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any

import yaml


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field (own and inherited), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    return tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))


def describe(cls: type, prefix: str = "") -> list[str]:
    """Help lines for every field of a (nested) dataclass: ``name: type = default`` then its doc."""
    lines: list[str] = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name, f.type)
        if dataclasses.is_dataclass(tp):
            lines.append(f"{prefix}{f.name}:  {docs.get(f.name, '')}".rstrip())
            lines += describe(tp, prefix + "  ")
            continue
        if f.default is not dataclasses.MISSING:
            default = f" = {f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:
            default = f" = {f.default_factory()!r}"
        else:
            default = "  (required)"
        lines.append(f"{prefix}{f.name}: {_type_repr(tp)}{default}")
        if f.name in docs:
            lines += textwrap.wrap(docs[f.name], 96, initial_indent=prefix + "    ", subsequent_indent=prefix + "    ")
    return lines


def _type_repr(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return " | ".join(_type_repr(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{_type_name(origin)}[{', '.join(_type_repr(a) for a in typing.get_args(tp))}]"
    return "None" if tp is type(None) else _type_name(tp)


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a dict, recursing into nested dataclass fields.

    Unknown keys raise ValueError naming the key, where it was and the valid keys; a value of the
    wrong type, or a NaN/Inf number, raises one naming its full path (``config: train.lr='abc' must
    be a number``), before ``cls`` is built, so its own checks never meet a string for a number.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping of field names to values, not {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}")
    hints = _hints(cls)
    root, _, path = where.partition(".")
    values = {}
    for name, value in data.items():
        tp = hints.get(name)
        if dataclasses.is_dataclass(tp):
            value = from_dict(tp, value or {}, f"{where}.{name}")
        else:
            try:
                value = check_type(value, tp, f"{path}.{name}" if path else name)
            except ValueError as e:
                raise ValueError(f"{root}: {e}") from None
        values[name] = value
    missing = sorted(n for n, f in fields.items() if n not in values
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f"{where}: missing required key(s) {missing}")
    return cls(**values)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(obj: Any) -> None:
    """Check every field of dataclass instance ``obj`` against its type hint (:func:`check_type`);
    the configs' ``validate()`` call it first, so Python callers get the checks YAML gets."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name in hints:
            check_type(getattr(obj, f.name), hints[f.name], f.name)


_KINDS = {bool: ("true or false", "true or false values"), int: ("an integer", "integers"),
          float: ("a number", "finite numbers"), str: ("a string", "strings")}
"""What a value of each checked type must be, said of one value and of the items of a list."""


def check_type(value: Any, tp: Any, name: str) -> Any:
    """``value`` if it fits type hint ``tp``, else a one-line ValueError naming ``name`` and what it
    must be. Numbers must be finite; an int is a float, a bool is no number; a list passed for a
    tuple field comes back as a tuple. bool, int, float, str, ``X | None`` and lists/tuples of them
    are checked; anything else (dicts, Any, dataclasses) passes unchecked."""
    checked, must, hint = _check(value, tp)
    if must is not None:
        raise ValueError(f"{name}={value!r} must be {must}" + (f"; {hint}" if hint else ""))
    return checked


def _check(value: Any, tp: Any) -> tuple[Any, str | None, str | None]:
    """(value, None, None) if it fits ``tp``, else (value, what it must be, a hint or None)."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return value, None, None
        tried = [_check(value, arg) for arg in args if arg is not type(None)]
        if any(must is None for _, must, _ in tried):
            return next(t for t in tried if t[1] is None)
        must = " or ".join(must for _, must, _ in tried)
        hint = tried[0][2] if len(tried) == 1 else None
        return value, must + (" or None" if type(None) in args else ""), hint
    if origin in (tuple, list):
        return _check_sequence(value, origin, typing.get_args(tp))
    if tp not in _KINDS:
        return value, None, None
    if tp is bool:
        return value, None if isinstance(value, bool) else _KINDS[bool][0], None
    if tp is str:
        return value, None if isinstance(value, str) else _KINDS[str][0], None
    if isinstance(value, str) and _is_number_text(value):
        return value, _KINDS[tp][0], f"write {value.strip()} without quotes"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value, _KINDS[tp][0], None
    if tp is int and not isinstance(value, numbers.Integral):
        integral = math.isfinite(value) and float(value).is_integer()
        return value, _KINDS[int][0], f"write {int(value)}" if integral else None
    if not math.isfinite(value):
        return value, "a finite number", None
    return value, None, None


def _is_number_text(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _check_sequence(value: Any, origin: type, args: tuple) -> tuple[Any, str | None, str | None]:
    """A list or tuple whose items fit ``args`` (``tuple[float, float]``, ``tuple[int, ...]``,
    ``list[int]``); returned as ``origin``."""
    fixed = origin is tuple and bool(args) and args[-1] is not Ellipsis
    item_types = list(args) if fixed else [args[0] if args else Any]
    kind = _KINDS.get(item_types[0], (None, "items"))[1] if len(set(item_types)) == 1 else "items"
    must = f"a list of {len(args)} {kind}" if fixed else f"a list of {kind}"
    if not isinstance(value, (list, tuple)) or (fixed and len(value) != len(args)):
        return value, must, None
    items = [_check(item, item_types[i] if fixed else item_types[0]) for i, item in enumerate(value)]
    if any(item_must is not None for _, item_must, _ in items):
        return value, must, None
    return origin(item for item, _, _ in items), None, None


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``, which surprises people)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def read_config_file(path: str | Path) -> dict:
    """Parse a YAML or JSON config file into a dict, with a one-line error if it can't be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_Loader)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                         f"{' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping at the top level (keys: saes, train, data, run_dir)")
    return data
