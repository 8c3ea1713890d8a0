"""Strict JSON input: files that users and tools hand us (model descriptions, markups, job files).

Python's `json` accepts the non-standard constants NaN, Infinity and -Infinity and lets a repeated key silently win;
neither is valid JSON, and either hides a broken writer. `read_json` refuses both and names the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import InputError


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (write null or a number)")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def loads_strict(text: str) -> Any:
    """`json.loads` without NaN/Infinity and repeated keys (ValueError)."""
    return json.loads(text, parse_constant=_constant, object_pairs_hook=_unique)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The strict JSON content of `path`; InputError naming the file (and `what` it should be) otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a {what} (not UTF-8 text)") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        return loads_strict(text)
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise InputError(f"{path}: not valid JSON ({exc})") from None
