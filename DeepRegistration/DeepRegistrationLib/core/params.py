"""Declared parameters: dataclass fields that carry their meaning, unit, range and choices.

Method configs (`methods.networks.base.MethodConfig`) and the registration options
(`engine.options.RegistrationOptions`) declare every field with `param`; front ends build their flags, widgets and
checks from this metadata instead of repeating it.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def param(default: Any, help: str, *, low: float | None = None, high: float | None = None,
          choices: tuple | None = None, paper: bool = True) -> Any:
    """A dataclass field with metadata for front ends and docs.

    `help` states the meaning and unit; `low`/`high` bound numbers, `choices` lists allowed values;
    `paper` is False where the paper is silent and the value is our documented choice (docs/METHODS.md).
    """
    meta = {"help": help, "low": low, "high": high, "choices": choices, "paper": paper}
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)
