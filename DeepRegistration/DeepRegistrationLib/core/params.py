"""Declared parameters: dataclass fields that carry their meaning, unit, range and choices, and their one check.

Method configs (`methods.networks.base.MethodConfig`) and the registration options
(`engine.options.RegistrationOptions`) declare every field with `param`; front ends build their flags, widgets and
checks from this metadata instead of repeating it. `check_fields` is the one validation of values against these
declarations (type from the annotation, `low`/`high`, `choices`): the command line, the job runner and the engine
all use it, and its InputError names the field and what it allows.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import Field, field, fields
from typing import Any

from .errors import InputError


def param(default: Any, help: str, *, low: float | None = None, high: float | None = None,
          choices: tuple | None = None, paper: bool = True) -> Any:
    """A dataclass field with metadata for front ends and docs.

    `help` states the meaning and unit; `low`/`high` bound numbers (inclusive; for a tuple, each element),
    `choices` lists allowed values; `paper` is False where the paper is silent and the value is our documented
    choice (docs/METHODS.md).
    """
    meta = {"help": help, "low": low, "high": high, "choices": choices, "paper": paper}
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _scalar_kind(hint: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(hint, str(hint))


def allowed(hint: Any, meta: dict[str, Any]) -> str:
    """What a field declared with `hint` and `param` metadata `meta` accepts, in words."""
    if meta.get("choices") is not None:
        return "one of " + ", ".join(json.dumps(c) for c in meta["choices"])
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return f"{allowed(inner[0], meta)} or none" if len(inner) == 1 else " or ".join(map(str, inner))
    if origin is tuple:
        element = args[0] if args else Any
        count = "a list of" if len(args) == 2 and args[1] is Ellipsis else f"a list of {len(args)}"
        return f"{count} {_plural(_range_words(element, meta))}"
    if origin is dict or hint is dict:
        return "a JSON object"
    return _range_words(hint, meta)


def _plural(words: str) -> str:
    return words.replace("an integer", "integers").replace("a number", "numbers")


def _range_words(hint: Any, meta: dict[str, Any]) -> str:
    words = _scalar_kind(hint)
    low, high = meta.get("low"), meta.get("high")
    if hint in (int, float):
        if low is not None and high is not None:
            words += f" in [{_number(low)}, {_number(high)}]"
        elif low is not None:
            words += f" ≥ {_number(low)}"
        elif high is not None:
            words += f" ≤ {_number(high)}"
    return words


class _Bad(Exception):
    """A value does not fit its declaration (turned into an InputError naming the field)."""


def _scalar(value: Any, hint: Any, meta: dict[str, Any]) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise _Bad
        return value
    if hint is int:
        if isinstance(value, bool):
            raise _Bad
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise _Bad
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _Bad
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise _Bad
    elif hint is not Any and isinstance(hint, type) and not isinstance(value, hint):
        raise _Bad
    if hint in (int, float):
        low, high = meta.get("low"), meta.get("high")
        if (low is not None and value < low) or (high is not None and value > high):
            raise _Bad
    return value


def _convert(value: Any, hint: Any, meta: dict[str, Any]) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, meta)
            except _Bad:
                continue
        raise _Bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Bad
        if args and not (len(args) == 2 and args[1] is Ellipsis) and len(value) != len(args):
            raise _Bad
        element_meta = {**meta, "choices": None}
        out = tuple(_convert(v, args[0] if len(args) == 2 and args[1] is Ellipsis else args[i], element_meta)
                    for i, v in enumerate(value))
        if not out:
            raise _Bad
        return out
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _Bad
        return dict(value)
    if origin is list or hint is list:
        if not isinstance(value, (list, tuple)):
            raise _Bad
        return list(value)
    value = _scalar(value, hint, meta)
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise _Bad
    return value


def check_value(owner: str, f: Field, hint: Any, value: Any, label: str | None = None) -> Any:
    """`value` converted to field `f`'s declared type (int for an integral float, float for an int, tuple for a
    list) and checked against its range and choices; InputError "`owner` `label` = value: expected ..." otherwise
    (`label` defaults to the field's name; an empty `owner` is left out)."""
    meta = dict(f.metadata)
    if meta.get("choices") is not None and isinstance(value, str) and value not in meta["choices"]:
        lowered = {str(c).lower(): c for c in meta["choices"]}
        value = lowered.get(value.lower(), value)  # "MR" for "mr"
    try:
        return _convert(value, hint, meta)
    except _Bad:
        help_text = meta.get("help", "")
        shown = json.dumps(value) if _jsonable(value) else repr(value)
        name = f"{owner} {label or f.name}".strip()
        raise InputError(f"{name} = {shown}: expected {allowed(hint, meta)}"
                         + (f" ({help_text})" if help_text else "")) from None


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def check_fields(cls: type, values: dict[str, Any], owner: str) -> dict[str, Any]:
    """`values` (field name → value, any subset of dataclass `cls`'s fields) converted and checked against the
    declarations; an unknown name is an InputError listing the known ones."""
    declared = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise InputError(f"{owner}: no field(s) {', '.join(unknown)}; known: {', '.join(sorted(declared))}")
    hints = typing.get_type_hints(cls)
    return {name: check_value(owner, declared[name], hints[name], value) for name, value in values.items()}


def check_instance(obj: Any, owner: str) -> None:
    """Every field of dataclass instance `obj` against its declaration (InputError naming the first bad one)."""
    check_fields(type(obj), {f.name: getattr(obj, f.name) for f in fields(obj)}, owner)


def parse_text(text: str) -> Any:
    """A value typed on a command line: JSON when it parses as strict JSON (numbers, true/false, null, lists,
    objects), else the text itself (so `cpu` and `"cpu"` are both the string)."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError):
        return text


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")
