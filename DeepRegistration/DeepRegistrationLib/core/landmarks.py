"""Landmark files: Slicer `.fcsv`, markups `.json`, and CSV `x,y,z` (optional `label` column), all read as RAS mm.

A markups control point that is not placed (`positionStatus` "undefined" or "preview") is skipped with a warning,
and so is its partner in the other file when the two are matched (`match_landmarks`).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, warn
from .geometry import RAS_FROM_LPS
from .image import atomic_path
from .jsonio import read_json


@dataclass
class Landmarks:
    """Named points in RAS mm: `points` [N, 3], `labels` N strings (empty when the file has none).

    `skipped` lists (position in the file, label) of points the file holds but does not place; `order` the
    position in the file of each of `points` (default 0..N-1), so that matching by order stays right after a skip.
    """

    labels: list[str]
    points: np.ndarray
    source: str = "<memory>"
    skipped: list[tuple[int, str]] = field(default_factory=list)
    order: list[int] | None = None

    def positions(self) -> list[int]:
        return list(range(len(self.points))) if self.order is None else list(self.order)


FCSV_SYSTEMS = {"ras": False, "0": False, "lps": True, "1": True}
"""`# CoordinateSystem = ...` values of a Slicer .fcsv (any case) → whether the points are LPS."""


def _read_fcsv(path: Path) -> Landmarks:
    lps = False
    labels, points = [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0].startswith("#"):
                text = ",".join(row).replace(" ", "")
                if text.lower().startswith("#coordinatesystem="):
                    value = text.split("=", 1)[1].strip().lower()
                    if value not in FCSV_SYSTEMS:
                        raise InputError(f"{path}: unknown CoordinateSystem {value!r}; use RAS or LPS")
                    lps = FCSV_SYSTEMS[value]
                continue
            if len(row) < 4:
                raise InputError(f"{path}: fiducial row {row!r} has fewer than 4 columns")
            points.append([float(v) for v in row[1:4]])
            labels.append(row[11] if len(row) > 11 else "")
    pts = np.array(points, dtype=np.float64).reshape(-1, 3)
    return Landmarks(labels, pts @ RAS_FROM_LPS.T if lps else pts, str(path))


UNPLACED = ("undefined", "preview")
"""Markups `positionStatus` values of a control point that has no position."""


def _read_json(path: Path) -> Landmarks:
    doc = read_json(path, "markups JSON")
    if not isinstance(doc, dict) or not isinstance(doc.get("markups"), list):
        raise InputError(f"{path}: not a Slicer markups file (no \"markups\" list)")
    labels, points, skipped, order = [], [], [], []
    index = 0
    for markup in doc["markups"]:
        if not isinstance(markup, dict):
            raise InputError(f"{path}: a markup is not a JSON object")
        system = str(markup.get("coordinateSystem", "LPS")).upper()
        if system not in ("LPS", "RAS"):
            raise InputError(f"{path}: unknown coordinateSystem {system!r}; use LPS or RAS")
        for cp in markup.get("controlPoints", []):
            label = str(cp.get("label", "")) if isinstance(cp, dict) else ""
            if not isinstance(cp, dict) or cp.get("positionStatus", "defined") in UNPLACED or "position" not in cp:
                skipped.append((index, label))
                warn(f"{path}: control point {index + 1} ({label or 'no label'}) is not placed; skipped")
            else:
                p = np.array(cp["position"], dtype=np.float64)
                if p.shape != (3,):
                    raise InputError(f"{path}: control point {index + 1} has position {cp['position']!r}, "
                                     "not 3 numbers")
                points.append(RAS_FROM_LPS @ p if system == "LPS" else p)
                labels.append(label)
                order.append(index)
            index += 1
    return Landmarks(labels, np.array(points, dtype=np.float64).reshape(-1, 3), str(path), skipped, order)


def _read_csv(path: Path) -> Landmarks:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if {"x", "y", "z"} <= set(header):
        cols = [header.index(c) for c in ("x", "y", "z")]
        lab = header.index("label") if "label" in header else None
        rows = rows[1:]
    else:
        cols, lab = [0, 1, 2], None
    points = [[float(r[c]) for c in cols] for r in rows]
    labels = [r[lab] for r in rows] if lab is not None else [""] * len(rows)
    return Landmarks(labels, np.array(points, dtype=np.float64).reshape(-1, 3), str(path))


def read_landmarks(path: str | os.PathLike) -> Landmarks:
    """Read landmarks (RAS mm); InputError names the file for a missing, empty or malformed one."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    readers = {".fcsv": _read_fcsv, ".json": _read_json, ".csv": _read_csv, ".txt": _read_csv}
    if suffix not in readers:
        raise InputError(f"{path}: unsupported landmark format {suffix!r}; use .fcsv, .json or .csv")
    try:
        marks = readers[suffix](path)
    except InputError:
        raise
    except UnicodeDecodeError:
        raise InputError(f"{path}: cannot be read as landmarks (not text)") from None
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise InputError(f"{path}: cannot be read as landmarks ({exc})") from None
    if len(marks.points) == 0:
        raise InputError(f"{path}: contains no {'placed ' if marks.skipped else ''}landmarks")
    if not np.isfinite(marks.points).all():
        raise InputError(f"{path}: has non-finite coordinates")
    return marks


def match_landmarks(fixed: Landmarks, moving: Landmarks) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Pair landmarks by label when both files label every point uniquely, else by order (position in the file).

    A point one file skips (not placed) drops its partner in the other, with a warning. Returns (names, fixed
    points, moving points); InputError lists unmatched labels or unequal counts, or says that no pair is left.
    """
    def unique_labels(m: Landmarks) -> bool:
        names = m.labels + [label for _, label in m.skipped]
        return all(names) and len(set(names)) == len(names)

    if unique_labels(fixed) and unique_labels(moving):
        fixed_skipped = {label for _, label in fixed.skipped}
        moving_skipped = {label for _, label in moving.skipped}
        missing = sorted((set(fixed.labels) - set(moving.labels) - moving_skipped)
                         | (set(moving.labels) - set(fixed.labels) - fixed_skipped))
        if missing:
            raise InputError(f"landmarks {missing} appear in only one of {fixed.source} and {moving.source}")
        names = [name for name in fixed.labels if name not in moving_skipped]
        for name in sorted(set(fixed.labels) & moving_skipped):
            warn(f"landmark {name!r} of {fixed.source} left out: it is not placed in {moving.source}")
        for name in sorted(set(moving.labels) & fixed_skipped):
            warn(f"landmark {name!r} of {moving.source} left out: it is not placed in {fixed.source}")
        pairs = (names, fixed.points[[fixed.labels.index(n) for n in names]],
                 moving.points[[moving.labels.index(n) for n in names]])
    else:
        total_fixed, total_moving = len(fixed.points) + len(fixed.skipped), len(moving.points) + len(moving.skipped)
        if total_fixed != total_moving:
            raise InputError(f"{fixed.source} has {total_fixed} landmarks and {moving.source} "
                             f"{total_moving}; without unique labels they are matched by order")
        fixed_at = {p: i for i, p in enumerate(fixed.positions())}
        moving_at = {p: i for i, p in enumerate(moving.positions())}
        both = [p for p in range(total_fixed) if p in fixed_at and p in moving_at]
        for p in sorted(set(fixed_at) ^ set(moving_at)):
            warn(f"landmark {p + 1} left out: it is not placed in "
                 f"{moving.source if p in fixed_at else fixed.source}")
        names = [fixed.labels[fixed_at[p]] if all(fixed.labels) else str(p + 1) for p in both]
        pairs = (names, fixed.points[[fixed_at[p] for p in both]].reshape(-1, 3),
                 moving.points[[moving_at[p] for p in both]].reshape(-1, 3))
    if not pairs[0]:
        raise InputError(f"no landmark is placed in both {fixed.source} and {moving.source}")
    return pairs


def write_fcsv(path: str | os.PathLike, landmarks: Landmarks) -> Path:
    """Write a Slicer fiducial CSV in RAS."""
    path = Path(path)
    lines = ["# Markups fiducial file version = 4.11", "# CoordinateSystem = RAS",
             "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"]
    for i, (name, p) in enumerate(zip(landmarks.labels, landmarks.points)):
        lines.append(f"{i + 1},{p[0]:.4f},{p[1]:.4f},{p[2]:.4f},0,0,0,1,1,1,0,{name},,")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
