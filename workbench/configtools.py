"""Dataclass configs <-> plain dicts (YAML/JSON), and help text from the docstring under each field."""
from __future__ import annotations

import ast
import dataclasses
import re
import inspect
import json
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

    Unknown keys raise ValueError naming the key, where it was and the valid keys.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping of field names to values, not {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        tp = hints.get(name)
        if dataclasses.is_dataclass(tp):
            value = from_dict(tp, value or {}, f"{where}.{name}")
        elif typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
        values[name] = value
    missing = sorted(n for n, f in fields.items() if n not in values
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f"{where}: missing required key(s) {missing}")
    return cls(**values)


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
