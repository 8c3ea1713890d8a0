"""Landmark files: Slicer `.fcsv`, markups `.json`, and CSV `x,y,z` (optional `label` column), all read as RAS mm."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .geometry import RAS_FROM_LPS
from .image import atomic_path


@dataclass
class Landmarks:
    """Named points in RAS mm: `points` [N, 3], `labels` N strings (empty when the file has none)."""

    labels: list[str]
    points: np.ndarray
    source: str = "<memory>"


def _read_fcsv(path: Path) -> Landmarks:
    lps = False
    labels, points = [], []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0].startswith("#"):
                text = ",".join(row).replace(" ", "")
                if text.startswith("#CoordinateSystem="):
                    lps = text.split("=", 1)[1] in ("LPS", "1")
                continue
            if len(row) < 4:
                raise InputError(f"{path}: fiducial row {row!r} has fewer than 4 columns")
            points.append([float(v) for v in row[1:4]])
            labels.append(row[11] if len(row) > 11 else "")
    pts = np.array(points, dtype=np.float64).reshape(-1, 3)
    return Landmarks(labels, pts @ RAS_FROM_LPS.T if lps else pts, str(path))


def _read_json(path: Path) -> Landmarks:
    doc = json.loads(path.read_text())
    labels, points = [], []
    for markup in doc.get("markups", []):
        lps = markup.get("coordinateSystem", "LPS") == "LPS"
        for cp in markup.get("controlPoints", []):
            p = np.array(cp["position"], dtype=np.float64)
            points.append(RAS_FROM_LPS @ p if lps else p)
            labels.append(cp.get("label", ""))
    return Landmarks(labels, np.array(points, dtype=np.float64).reshape(-1, 3), str(path))


def _read_csv(path: Path) -> Landmarks:
    with open(path, newline="") as f:
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
    except (ValueError, KeyError, IndexError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot be read as landmarks ({exc})") from exc
    if len(marks.points) == 0:
        raise InputError(f"{path}: contains no landmarks")
    if not np.isfinite(marks.points).all():
        raise InputError(f"{path}: has non-finite coordinates")
    return marks


def match_landmarks(fixed: Landmarks, moving: Landmarks) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Pair landmarks by label when both files label every point uniquely, else by order.

    Returns (names, fixed points, moving points); InputError lists unmatched labels or unequal counts.
    """
    def unique_labels(m: Landmarks) -> bool:
        return all(m.labels) and len(set(m.labels)) == len(m.labels)

    if unique_labels(fixed) and unique_labels(moving):
        missing = sorted(set(fixed.labels) ^ set(moving.labels))
        if missing:
            raise InputError(f"landmarks {missing} appear in only one of {fixed.source} and {moving.source}")
        order = [moving.labels.index(name) for name in fixed.labels]
        return list(fixed.labels), fixed.points, moving.points[order]
    if len(fixed.points) != len(moving.points):
        raise InputError(f"{fixed.source} has {len(fixed.points)} landmarks and {moving.source} "
                         f"{len(moving.points)}; without unique labels they are matched by order")
    names = fixed.labels if all(fixed.labels) else [str(i + 1) for i in range(len(fixed.points))]
    return list(names), fixed.points, moving.points


def write_fcsv(path: str | os.PathLike, landmarks: Landmarks) -> Path:
    """Write a Slicer fiducial CSV in RAS."""
    path = Path(path)
    lines = ["# Markups fiducial file version = 4.11", "# CoordinateSystem = RAS",
             "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"]
    for i, (name, p) in enumerate(zip(landmarks.labels, landmarks.points)):
        lines.append(f"{i + 1},{p[0]:.4f},{p[1]:.4f},{p[2]:.4f},0,0,0,1,1,1,0,{name},,")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path
