"""The bad-input matrix of the command line, and docs/ROBUSTNESS.md generated from it.

Every case runs `deepregistration` (in this process, or as a real process where signals are the point) and
asserts its exit code, its one-line message, that no traceback is printed, that nothing is left in or beside the
output directory on failure and that every input is unchanged. `python Testing/test_robustness.py` rewrites
docs/ROBUSTNESS.md from the cases' actual messages; `test_robustness_md_is_up_to_date` fails when it is stale.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import typing
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepRegistrationLib.core import warp
from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.core.geometry import Grid
from DeepRegistrationLib.core.image import Image, write_image
from DeepRegistrationLib.core.landmarks import Landmarks, write_fcsv
from DeepRegistrationLib.core.params import check_fields
from DeepRegistrationLib.engine.options import RegistrationOptions
from DeepRegistrationLib.frontends import cli, failures, outdir, outputs
from DeepRegistrationLib.methods import models, registry

from conftest import ellipsoid_labels, phantom_image, smooth_field, write_dicom_series

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ROBUSTNESS.md"
WRITE_DOC = "DEEPREGISTRATION_WRITE_ROBUSTNESS"
SHAPE = (20, 22, 18)
SPACING = (2.0, 1.9, 2.1)


# ------------------------------------------------------------------------------------------------ the pair


class Env:
    """The shared good inputs (a small oblique pair, labels, landmarks, a small lapirn model) and a folder per
    case. The root is world-readable so that the read-only cases can run as an unprivileged user under root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        direction = np.array([[0.97, -0.24, 0.0], [0.24, 0.97, 0.0], [0.0, 0.0, 1.0]])
        direction /= np.linalg.norm(direction, axis=0)
        self.grid = Grid.from_spacing(SHAPE, SPACING, (-19.0, -20.0, -18.0), direction)
        labels = ellipsoid_labels(SHAPE)
        fixed = phantom_image(labels)
        inverse = warp.integrate_velocity(-smooth_field(SHAPE, 1.2, seed=3))
        self.fixed_data = (fixed[0, 0].numpy() * 1000).astype(np.float32)
        base = root / "inputs"
        self.fixed = write_image(Image(self.fixed_data, self.grid), base / "fixed.nii.gz")
        self.moving = write_image(Image((warp.warp_image(fixed, inverse)[0, 0].numpy() * 1000).astype(np.float32),
                                        self.grid), base / "moving.nii.gz")
        self.labels_data = labels[0, 0].numpy().astype(np.int16)
        self.fixed_labels = write_image(Image(self.labels_data, self.grid), base / "fixed_labels.nii.gz")
        self.moving_labels = write_image(
            Image(warp.warp_labels(labels, inverse)[0, 0].numpy().astype(np.int16), self.grid),
            base / "moving_labels.nii.gz")
        self.points = self.grid.voxel_to_world(np.array([[10, 11, 9], [6, 8, 6], [13, 14, 12]], float))
        self.fixed_landmarks = write_fcsv(base / "fixed.fcsv", Landmarks(["a", "b", "c"], self.points))
        self.moving_landmarks = write_fcsv(base / "moving.fcsv", Landmarks(["c", "a", "b"],
                                                                            self.points[[2, 0, 1]] + 1.0))
        spec = registry.get_method("lapirn")
        torch.manual_seed(1)
        self.config = spec.config_class(working_spacing=3.0, start_channels=2, num_res_blocks=1)
        self.weights = models.save_model(spec.build(self.config), "lapirn", base / "lapirn.safetensors")
        self.case_dir: Path = root
        self.out: Path = root / "out"

    def start(self, slug: str) -> None:
        self.case_dir = self.root / slug
        if self.case_dir.exists():
            _make_writable(self.case_dir)
            shutil.rmtree(self.case_dir)
        self.case_dir.mkdir(parents=True)
        self.out = self.case_dir / "out"

    def path(self, name: str) -> Path:
        return self.case_dir / name

    def register(self, flags: dict[str, Any] | None = None, *extra: Any, command: str = "register") -> list[str]:
        """The register command with the good inputs, `flags` replacing (None: dropping) some, `extra` added."""
        base: dict[str, Any] = {"--fixed": self.fixed, "--moving": self.moving, "--weights": self.weights,
                                "--output-dir": self.out}
        if command == "evaluate":
            base.pop("--weights")
        base.update(flags or {})
        args = [command, "--quiet"]
        for flag, value in base.items():
            if value is not None:
                args += [flag, str(value)]
        return args + [str(a) for a in extra]

    # ---------------------------------------------------------------------------------------- bad files

    def image(self, name: str, data: np.ndarray, grid: Grid | None = None) -> Path:
        return write_image(Image(data, grid or Grid((data.shape), np.eye(4))), self.path(name))

    def nifti(self, name: str, data: np.ndarray) -> Path:
        """A NIfTI of any dimensionality (nibabel), for images the library would not write."""
        import nibabel as nib

        nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), str(self.path(name)))
        return self.path(name)

    def text(self, name: str, content: str | bytes) -> Path:
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def fcsv(self, name: str, points: np.ndarray, labels: list[str], system: str = "RAS") -> Path:
        lines = ["# Markups fiducial file version = 4.11", f"# CoordinateSystem = {system}",
                 "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"]
        lines += [f"{i + 1},{p[0]:.4f},{p[1]:.4f},{p[2]:.4f},0,0,0,1,1,1,0,{n},," for i, (n, p) in
                  enumerate(zip(labels, points))]
        return self.text(name, "\n".join(lines) + "\n")

    def markups(self, name: str, points: list[dict[str, Any]], system: str = "LPS") -> Path:
        doc = {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                          "Resources/Schema/markups-schema-v1.0.3.json#",
               "markups": [{"type": "Fiducial", "coordinateSystem": system, "controlPoints": points}]}
        return self.text(name, json.dumps(doc))

    def model(self, name: str, data: bytes | None = None, meta: dict[str, Any] | None = None,
              drop: tuple[str, ...] = (), raw_json: str | None = None) -> Path:
        """A weights file (`data`, default the good weights) with a JSON beside it whose sha256 matches it,
        changed by `meta` or `drop`, or replaced by `raw_json`."""
        path = self.path(name)
        path.write_bytes(self.weights.read_bytes() if data is None else data)
        good = json.loads(models.metadata_path(self.weights).read_text())
        good.update({"sha256": models.sha256_of(path), **(meta or {})})
        for key in drop:
            good.pop(key)
        models.metadata_path(path).write_text(raw_json if raw_json is not None else json.dumps(good))
        return path

    def dicom(self, name: str, shape=(8, 9, 7), **kw) -> Path:
        grid = Grid.from_spacing(shape, (2.0, 2.0, 2.5), (-8.0, -9.0, -8.0), np.eye(3))
        data = (np.arange(np.prod(shape)).reshape(shape) % 500).astype(np.int16)
        return write_dicom_series(Image(data, grid), self.path(name), **kw)


def _make_writable(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            os.chmod(p, 0o755)


@pytest.fixture(scope="module")
def env():
    root = Path(tempfile.mkdtemp(prefix="deepregistration-matrix-"))
    os.chmod(root, 0o755)
    try:
        yield Env(root)
    finally:
        _make_writable(root)
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    """One row of the matrix: `build(env)` makes its inputs and returns the arguments; `code` and `expect` (a
    regular expression searched in the message) are what the command must answer; `check(env, metrics)` looks at
    the outputs of a successful run; `as_user` runs it as an unprivileged user when the tests run as root (so
    that file permissions hold); `run(env)` replaces the standard runner and returns (code, message)."""

    group: str
    name: str
    build: Callable[[Env], list[str]] | None
    code: int
    expect: str
    check: Callable[[Env, dict], None] | None = None
    as_user: bool = False
    run: Callable[[Env], tuple[int, str]] | None = None

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", f"{self.group}-{self.name}".lower()).strip("-")[:80]


CASES: list[Case] = []


def case(group: str, name: str, code: int, expect: str, **kw: Any):
    def add(build: Callable[[Env], list[str]]) -> Callable[[Env], list[str]]:
        CASES.append(Case(group, name, build, code, expect, **kw))
        return build
    return add


def special(group: str, name: str, code: int, expect: str):
    def add(run: Callable[[Env], tuple[int, str]]) -> Callable[[Env], tuple[int, str]]:
        CASES.append(Case(group, name, None, code, expect, run=run))
        return run
    return add


IMAGES, DICOM, LABELS, MARKS, REFINE, OPTIONS, WEIGHTS, OUTPUT, RUN = (
    "Images", "DICOM", "Label maps", "Landmarks", "Refinement (presets, guidance, masks)", "Options and parameters",
    "Weights", "Output directory", "Interruption, concurrency, internal errors")

# Images ------------------------------------------------------------------------------------------------

case(IMAGES, "2D image", 2, "expected a 3D volume, got 2D")(
    lambda e: e.register({"--moving": e.nifti("flat.nii.gz", np.zeros((20, 22), np.float32))}))
case(IMAGES, "4D image (time series)", 2, "expected a 3D volume, got 4D")(
    lambda e: e.register({"--moving": e.nifti("4d.nii.gz", np.zeros((20, 22, 18, 3), np.float32))}))
case(IMAGES, "singleton axis (20×1×18)", 2, "dimension of size 1")(
    lambda e: e.register({"--moving": e.image("thin.nii.gz", np.ones((20, 1, 18), np.float32))}))
case(IMAGES, "NaN voxels", 2, r"1 voxel\(s\) are NaN or infinite")(
    lambda e: e.register({"--moving": e.image("nan.nii.gz", np.where(np.arange(20 * 22 * 18).reshape(SHAPE) == 5,
                                                                     np.nan, 1.0).astype(np.float32))}))
case(IMAGES, "infinite voxels", 2, "NaN or infinite")(
    lambda e: e.register({"--fixed": e.image("inf.nii.gz", np.full(SHAPE, np.inf, np.float32))}))
case(IMAGES, "constant image", 2, "image is constant")(
    lambda e: e.register({"--moving": e.image("const.nii.gz", np.ones(SHAPE, np.float32), e.grid)}))
case(IMAGES, "tiny image (3×3×3)", 2, r"too small \(\(3, 3, 3\) voxels\)")(
    lambda e: e.register({"--moving": e.image("tiny.nii.gz", np.random.rand(3, 3, 3).astype(np.float32))}))
case(IMAGES, "truncated .nii", 2, "cannot be read as an image")(
    lambda e: e.register({"--moving": e.text("cut.nii", e.image("whole.nii", e.fixed_data).read_bytes()[:2000])}))
case(IMAGES, "truncated .nii.gz", 2, "corrupt gzip data .* cut short")(
    lambda e: e.register({"--moving": e.text("cut.nii.gz", e.moving.read_bytes()[:-3000])}))
case(IMAGES, ".nii.gz failing its CRC", 2, "corrupt gzip data .*CRC")(
    lambda e: e.register({"--moving": e.text("crc.nii.gz", e.moving.read_bytes()[:-8] + bytes(4)
                                             + e.moving.read_bytes()[-4:])}))
case(IMAGES, "text file named .nii.gz", 2, "not gzip data")(
    lambda e: e.register({"--moving": e.text("text.nii.gz", "this is not an image\n")}))
case(IMAGES, "text file named .nii", 2, "cannot be read as an image")(
    lambda e: e.register({"--moving": e.text("text.nii", "this is not an image\n" * 30)}))
case(IMAGES, "directory without images", 2, "no DICOM image series found")(
    lambda e: [*e.register({"--moving": e.text("folder/readme.txt", "notes").parent})])
case(IMAGES, "unsupported format (.png)", 2, "unsupported format '.png'")(
    lambda e: e.register({"--moving": e.text("scan.png", b"\x89PNG\r\n\x1a\n")}))
case(IMAGES, "missing file", 2, "missing.nii.gz: no such file")(
    lambda e: e.register({"--moving": e.path("missing.nii.gz")}))
case(IMAGES, "fields of view that do not overlap (network alone; the refinement's affine stage aligns them)", 2,
     "the fields of view do not overlap")(
    lambda e: e.register({"--moving": e.image("far.nii.gz", e.fixed_data, Grid.from_spacing(
        SHAPE, SPACING, (400.0, -20.0, -18.0), e.grid.direction))}, "--preset", "fast"))


def _partial_overlap(e: Env) -> list[str]:
    shifted = Grid.from_spacing(SHAPE, SPACING, tuple(e.grid.origin + e.grid.direction[:, 0] * 17 * SPACING[0]),
                                e.grid.direction)
    return e.register({"--moving": e.image("shifted.nii.gz", e.fixed_data, shifted)})


case(IMAGES, "fields of view overlapping by less than a quarter (network alone)", 0,
     r"only \d+% of the fixed field of view", check=lambda e, m: _warned(m, "of the fixed field of view"))(
    lambda e: _partial_overlap(e) + ["--preset", "fast"])
case(IMAGES, "--fixed-series on a NIfTI file", 2, "a DICOM series UID was given, but this is not a DICOM")(
    lambda e: e.register({}, "--fixed-series", "1.2.3"))


def _warned(metrics: dict, text: str) -> None:
    assert any(text in w for w in metrics["warnings"]), metrics["warnings"]


# DICOM -------------------------------------------------------------------------------------------------


def _two_series(e: Env) -> Path:
    e.dicom("study/a", uid="1.2.3.9.1")
    e.dicom("study/b", uid="1.2.3.9.2", modality="CT")
    return e.path("study")


case(DICOM, "folder with two series, none chosen", 2,
     r"2 DICOM series found, choose one by its series UID: 1\.2\.3\.9\.1 \(MR, 7 file\(s\).*with --moving-series UID")(
    lambda e: e.register({"--moving": _two_series(e)}))
case(DICOM, "series UID not in the folder", 2, "no DICOM series with UID '1.2.9'")(
    lambda e: e.register({"--moving": _two_series(e)}, "--moving-series", "1.2.9"))
case(DICOM, "single-slice series", 2, "has a single slice")(
    lambda e: e.register({"--moving": e.dicom("one", shape=(8, 9, 1))}))
case(DICOM, "multi-frame (enhanced) object", 2, "multi-frame .* 4 frames")(
    lambda e: e.register({"--moving": _multiframe(e)}))
case(DICOM, "non-uniform slice spacing (a missing slice)", 2, "non-uniform slice spacing")(
    lambda e: e.register({"--moving": _broken_series(e, "gap")}))
case(DICOM, "two slices at one position", 2, "two slices at one position")(
    lambda e: e.register({"--moving": _broken_series(e, "duplicate")}))
case(DICOM, "gantry tilt (slices not stacked along their normal)", 2, "not stacked along their normal")(
    lambda e: e.register({"--moving": _broken_series(e, "tilt")}))
case(DICOM, "fixed: a folder of two series, one chosen by UID; moving: one slice file of a series", 0, "",
     check=lambda e, m: m["warnings"] == [] or pytest.fail(str(m["warnings"])))(
    lambda e: e.register({"--fixed": _dicom_twin(e, "dicom_fixed", e.fixed, "1.2.3.9.7"),
                          "--moving": _dicom_twin(e, "dicom_moving", e.moving, "1.2.3.9.5") / "image" / "IM0009.dcm"},
                         "--fixed-series", "1.2.3.9.7", "--preset", "fast"))


def _dicom_twin(e: Env, name: str, source: Path, uid: str) -> Path:
    """An input image (rounded to integers) as a DICOM series, beside another series in the same folder."""
    from DeepRegistrationLib.core.image import read_image

    image = read_image(source)
    write_dicom_series(Image(np.round(image.data).astype(np.int16), image.grid), e.path(name) / "image", uid=uid)
    e.dicom(f"{name}/other", uid=uid + "0")
    return e.path(name)


def _multiframe(e: Env) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 9, 8), np.uint16)), str(e.path("multi.dcm")))
    return e.path("multi.dcm")


def _broken_series(e: Env, fault: str) -> Path:
    from DeepRegistrationLib.core.image import image_to_sitk

    shape = (8, 9, 7)
    image = Image(np.zeros(shape, np.int16), Grid.from_spacing(shape, (2.0, 2.0, 2.5), (0.0, 0.0, 0.0), np.eye(3)))
    volume = image_to_sitk(image)
    positions = [volume.TransformContinuousIndexToPhysicalPoint((0, 0, k)) for k in range(7)]
    if fault == "gap":
        positions = positions[:3] + [volume.TransformContinuousIndexToPhysicalPoint((0, 0, k + 1))
                                     for k in (3, 4, 5, 6)]
    elif fault == "duplicate":
        positions[4] = positions[3]
    else:
        positions = [volume.TransformContinuousIndexToPhysicalPoint((0.5 * k, 0, k)) for k in range(7)]
    return write_dicom_series(image, e.path(fault), positions=positions)


# Label maps ----------------------------------------------------------------------------------------------

case(LABELS, "labels on another grid", 2, "label map grid .* differs from its image")(
    lambda e: e.register({"--fixed-labels": e.fixed_labels, "--moving-labels": e.image(
        "other_grid.nii.gz", np.zeros((5, 6, 7), np.int16))}))
case(LABELS, "float labels", 2, "label map has non-integer values")(
    lambda e: e.register({"--fixed-labels": e.image("float.nii.gz", e.labels_data * 0.5 + 0.25, e.grid),
                          "--moving-labels": e.moving_labels}))
case(LABELS, "negative labels", 2, r"label map has negative values \(min -1\)")(
    lambda e: e.register({"--fixed-labels": e.image("neg.nii.gz", (e.labels_data - 1).astype(np.int16), e.grid),
                          "--moving-labels": e.moving_labels}))
case(LABELS, "only one label map", 2, "give both fixed and moving label maps")(
    lambda e: e.register({"--fixed-labels": e.fixed_labels}))

# Landmarks -----------------------------------------------------------------------------------------------

case(MARKS, ".fcsv labels that do not match", 2, r"landmarks \['b', 'x'\] appear in only one")(
    lambda e: e.register({"--fixed-landmarks": e.fixed_landmarks, "--moving-landmarks": e.fcsv(
        "x.fcsv", e.points, ["a", "x", "c"])}))
case(MARKS, "empty .fcsv", 2, "contains no landmarks")(
    lambda e: e.register({"--fixed-landmarks": e.fcsv("empty.fcsv", np.zeros((0, 3)), []),
                          "--moving-landmarks": e.moving_landmarks}))
case(MARKS, "malformed .fcsv (a coordinate is text)", 2, "cannot be read as landmarks")(
    lambda e: e.register({"--fixed-landmarks": e.text("bad.fcsv", "# CoordinateSystem = RAS\n1,x,2,3\n"),
                          "--moving-landmarks": e.moving_landmarks}))
case(MARKS, ".fcsv with an unknown CoordinateSystem", 2, "unknown CoordinateSystem 'ijk'")(
    lambda e: e.register({"--fixed-landmarks": e.fcsv("ijk.fcsv", e.points, ["a", "b", "c"], "IJK"),
                          "--moving-landmarks": e.moving_landmarks}))
case(MARKS, ".fcsv `CoordinateSystem = lps` in lower case", 0, "",
     check=lambda e, m: np.testing.assert_allclose(m["landmarks"]["before"], np.sqrt(3), atol=1e-3))(
    lambda e: e.register({"--fixed-landmarks": e.fcsv("f_lps.fcsv", e.points * [-1, -1, 1], ["a", "b", "c"], "lps"),
                          "--moving-landmarks": e.fcsv("m_lps.fcsv", (e.points + 1.0) * [-1, -1, 1],
                                                       ["a", "b", "c"], "lps")}, "--preset", "fast"))


def _unplaced(e: Env) -> list[str]:
    lps = e.points * [-1, -1, 1]
    points = [{"label": n, "position": list(p), "positionStatus": "defined"} for n, p in zip("abc", lps)]
    points[1] = {"label": "b", "position": [0.0, 0.0, 0.0], "positionStatus": "undefined"}
    return e.register({"--fixed-landmarks": e.markups("f.mrk.json", points),
                       "--moving-landmarks": e.moving_landmarks}, "--preset", "fast")


case(MARKS, ".mrk.json with an unplaced point", 0, r"control point 2 \(b\) is not placed; skipped",
     check=lambda e, m: (len(m["landmarks"]["before"]) == 2 or pytest.fail("3 landmarks"),
                         _warned(m, "is not placed"), _warned(m, "landmark 'b'")))(_unplaced)
case(MARKS, ".mrk.json labels that do not match", 2, r"landmarks \['c', 'z'\] appear in only one")(
    lambda e: e.register({"--fixed-landmarks": e.markups("z.mrk.json", [
        {"label": n, "position": list(p)} for n, p in zip("abz", e.points * [-1, -1, 1])]),
        "--moving-landmarks": e.moving_landmarks}))
case(MARKS, ".mrk.json point with two coordinates", 2, r"control point 1 has position \[1, 2\], not 3 numbers")(
    lambda e: e.register({"--fixed-landmarks": e.markups("two.mrk.json", [{"label": "a", "position": [1, 2]}]),
                          "--moving-landmarks": e.moving_landmarks}))
case(MARKS, ".mrk.json that is not a markups file", 2, r"not a Slicer markups file")(
    lambda e: e.register({"--fixed-landmarks": e.text("list.mrk.json", "[1, 2, 3]"),
                          "--moving-landmarks": e.moving_landmarks}))
case(MARKS, ".mrk.json holding NaN", 2, "not valid JSON .*NaN is not valid JSON")(
    lambda e: e.register({"--fixed-landmarks": e.text("nan.mrk.json", '{"markups": [{"controlPoints": '
                                                                      '[{"position": [NaN, 0, 0]}]}]}'),
                          "--moving-landmarks": e.moving_landmarks}))
case(MARKS, ".mrk.json without control points", 2, "contains no landmarks")(
    lambda e: e.register({"--fixed-landmarks": e.markups("none.mrk.json", []),
                          "--moving-landmarks": e.moving_landmarks}))
case(MARKS, "CSV with another number of points (matched by order)", 2, "has 2 landmarks .* 3; without unique")(
    lambda e: e.register({"--fixed-landmarks": e.text("two.csv", "x,y,z\n0,0,0\n1,1,1\n"),
                          "--moving-landmarks": e.text("three.csv", "x,y,z\n0,0,0\n1,1,1\n2,2,2\n")}))
case(MARKS, "malformed CSV", 2, "cannot be read as landmarks")(
    lambda e: e.register({"--fixed-landmarks": e.text("bad.csv", "x,y,z\n1,2\n"),
                          "--moving-landmarks": e.text("ok.csv", "x,y,z\n1,2,3\n")}))
case(MARKS, "empty CSV", 2, "contains no landmarks")(
    lambda e: e.register({"--fixed-landmarks": e.text("empty.csv", "x,y,z\n"),
                          "--moving-landmarks": e.text("ok.csv", "x,y,z\n1,2,3\n")}))
case(MARKS, "only fixed landmarks", 2, "give both --fixed-landmarks and --moving-landmarks")(
    lambda e: e.register({"--fixed-landmarks": e.fixed_landmarks}))
case(MARKS, "fixed landmarks outside the fixed image", 2, r"fixed landmark\(s\) \[0\] lie outside the fixed image")(
    lambda e: e.register({"--fixed-landmarks": e.fcsv("far_f.fcsv", np.vstack([e.points[:1] + [500, 0, 0],
                                                                                e.points[1:]]), ["a", "b", "c"]),
                          "--moving-landmarks": e.moving_landmarks}))
case(MARKS, "moving landmarks far outside the moving image", 2,
     r"moving landmark\(s\) \[0, 1, 2\] lie outside the moving image \(up to [\d.]+ mm")(
    lambda e: e.register({"--fixed-landmarks": e.fixed_landmarks,
                          "--moving-landmarks": e.fcsv("far_m.fcsv", e.points + [0, 300, 0], ["a", "b", "c"])}))
case(MARKS, "unsupported landmark format", 2, "unsupported landmark format '.xyz'")(
    lambda e: e.register({"--fixed-landmarks": e.text("p.xyz", "1 2 3"), "--moving-landmarks": e.moving_landmarks}))

# Refinement ---------------------------------------------------------------------------------------------

case(REFINE, "guidance landmark outside the fixed image", 2, r"fixed landmark\(s\) \[0\] lie outside the fixed image")(
    lambda e: e.register({"--fixed-guidance": e.fcsv("fg.fcsv", np.array([[500.0, 0, 0]]), ["g"]),
                          "--moving-guidance": e.fcsv("mg.fcsv", e.points[:1], ["g"])}))
case(REFINE, "guidance pairs that do not match", 2, r"landmarks \['b', 'x'\] appear in only one")(
    lambda e: e.register({"--fixed-guidance": e.fixed_landmarks, "--moving-guidance": e.fcsv(
        "x.fcsv", e.points, ["a", "x", "c"])}))
case(REFINE, "only one guidance file", 2, "give both --fixed-guidance and --moving-guidance")(
    lambda e: e.register({"--fixed-guidance": e.fixed_landmarks}))
case(REFINE, "guidance with preset fast (no refinement to steer)", 2, "guidance landmarks steer the refinement")(
    lambda e: e.register({"--fixed-guidance": e.fixed_landmarks, "--moving-guidance": e.moving_landmarks},
                         "--preset", "fast"))
case(REFINE, "mask on another grid than its image", 2, "differs from its image")(
    lambda e: e.register({"--fixed-mask": e.image("mask.nii.gz", np.ones((5, 6, 7), np.int16))}))
case(REFINE, "empty mask", 2, "the mask is empty")(
    lambda e: e.register({"--moving-mask": e.image("empty.nii.gz", np.zeros(SHAPE, np.int16), e.grid)}))
case(REFINE, "a preset that does not exist", 2, "argument --preset: 'quick' is not allowed")(
    lambda e: e.register({}, "--preset", "quick"))
case(REFINE, "a refinement setting that does not exist", 2, r"unknown refinement setting\(s\) \['nosuch'\]")(
    lambda e: e.register({}, "--set", "refine.nosuch=1"))
case(REFINE, "a negative iteration count", 2, "refinement setting 'iterations'")(
    lambda e: e.register({}, "--set", "refine.iterations=[-5,10]"))
case(REFINE, "refinement settings with preset fast", 2, "runs the network alone")(
    lambda e: e.register({}, "--preset", "fast", "--set", "refine.lr=0.1"))
case(REFINE, "method optimise with preset fast", 2, "is the refinement alone")(
    lambda e: e.register({"--weights": None}, "--method", "optimise", "--preset", "fast"))


# Options and parameters ------------------------------------------------------------------------------------

for _flag, _value, _expect in (
    ("working_spacing", "0", r"working_spacing = 0: expected a number in \[0.5, 4\]"),
    ("working_spacing", "-2", r"working_spacing = -2: expected a number in \[0.5, 4\]"),
    ("working_spacing", "abc", r"working_spacing = \"abc\": expected a number"),
    ("working_spacing", "NaN", r"working_spacing = \"NaN\": expected a number"),
    ("int_steps", "-3", r"int_steps = -3: expected an integer in \[0, 12\]"),
    ("int_steps", "2.5", r"int_steps = 2.5: expected an integer"),
    ("working_shape", "[64,64]", r"working_shape = \[64, 64\]: expected a list of 3 integers in \[8, 1024\]"),
    ("no_such_field", "1", "has no field"),
):
    case(OPTIONS, f"--set {_flag}={_value}", 2, _expect)(
        lambda e, f=_flag, v=_value: e.register({}, "--set", f"{f}={v}"))

case(OPTIONS, "--set without =", 2, "--set expects KEY=VALUE")(lambda e: e.register({}, "--set", "working_spacing"))
case(OPTIONS, "--method nosuch", 2, "unknown method 'nosuch'")(lambda e: e.register({"--method": "nosuch"}))
case(OPTIONS, "--device quantum", 2, "device 'quantum'")(lambda e: e.register({"--device": "quantum"}))
case(OPTIONS, "--instance-optimization abc", 2, r"argument --instance-optimization: 'abc' is not allowed: expected an "
     r"integer in \[0, 10000\]")(lambda e: e.register({"--instance-optimization": "abc"}))


def _out_of_range(field, hint) -> str:
    meta = field.metadata
    if meta.get("choices") is not None:
        return "nosuch"
    origin = typing.get_origin(hint)
    element = typing.get_args(hint)[0] if origin is tuple else hint
    value = meta["high"] + (1 if element is int else 0.5)
    if origin is tuple:
        count = len(typing.get_args(hint)) if typing.get_args(hint)[-1] is not Ellipsis else 2
        return json.dumps([value] * count)
    return json.dumps(value)


_HINTS = typing.get_type_hints(RegistrationOptions)
for _f in fields(RegistrationOptions):  # every declared option with a range or choices
    if _f.metadata.get("choices") is None and _f.metadata.get("high") is None:
        continue
    _flag, _bad = "--" + _f.name.replace("_", "-"), _out_of_range(_f, _HINTS[_f.name])
    case(OPTIONS, f"{_flag} {_bad}", 2, rf"argument {_flag}: '{re.escape(_bad)}' is not allowed: expected")(
        lambda e, flag=_flag, bad=_bad: e.register({flag: bad}))
_CONFIG = registry.get_method("lapirn").config_class
_HINTS = typing.get_type_hints(_CONFIG)
for _f in fields(_CONFIG):  # every lapirn parameter beyond its declared range
    _bad = _out_of_range(_f, _HINTS[_f.name])
    case(OPTIONS, f"--set {_f.name}={_bad}", 2, rf"lapirn parameter {_f.name} = .*: expected")(
        lambda e, name=_f.name, bad=_bad: e.register({}, "--set", f"{name}={bad}"))

# Weights ----------------------------------------------------------------------------------------------------


class _Bomb:
    """Unpickling this would create the file `marker`: the test that pickles are never loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickle_bomb(e: Env) -> list[str]:
    marker = e.path("PICKLE_WAS_LOADED")
    return e.register({"--weights": e.model("bomb.safetensors", pickle.dumps(_Bomb(marker), protocol=2))})


def _torch_checkpoint(e: Env) -> list[str]:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    return e.register({"--weights": e.model("checkpoint.pt", buffer.getvalue())})


case(WEIGHTS, "random bytes", 2, "not a readable safetensors file, corrupt or truncated")(
    lambda e: e.register({"--weights": e.model("random.safetensors", os.urandom(4096))}))
case(WEIGHTS, "a pickle (never unpickled)", 2, "a PyTorch pickle/zip checkpoint, not safetensors",
     check=None)(_pickle_bomb)
case(WEIGHTS, "a torch.save .pt checkpoint", 2, "a PyTorch pickle/zip checkpoint")(_torch_checkpoint)
case(WEIGHTS, "truncated .safetensors, JSON sha256 of the truncated file", 2, "not a readable safetensors file")(
    lambda e: e.register({"--weights": e.model("cut.safetensors", e.weights.read_bytes()[:-500])}))
case(WEIGHTS, "truncated .safetensors, original JSON", 2, r"sha256 [0-9a-f]+… does not match its JSON")(
    lambda e: e.register({"--weights": e.model("cut2.safetensors", e.weights.read_bytes()[:-500],
                                               meta={"sha256": models.sha256_of(e.weights)})}))
case(WEIGHTS, "no JSON beside the weights", 2, "model description missing")(
    lambda e: e.register({"--weights": e.text("alone.safetensors", e.weights.read_bytes())}))
case(WEIGHTS, "JSON that is not JSON", 2, "not valid JSON")(
    lambda e: e.register({"--weights": e.model("nojson.safetensors", raw_json="{method: lapirn")}))
case(WEIGHTS, "JSON holding NaN", 2, "NaN is not valid JSON")(
    lambda e: e.register({"--weights": e.model("nan.safetensors", raw_json=models.metadata_path(
        e.weights).read_text().replace('"working_spacing": 3.0', '"working_spacing": NaN'))}))
case(WEIGHTS, "JSON without config", 2, "model description lacks 'config'")(
    lambda e: e.register({"--weights": e.model("noconfig.safetensors", drop=("config",))}))
case(WEIGHTS, "JSON without sha256", 2, "model description lacks 'sha256'")(
    lambda e: e.register({"--weights": e.model("nosha.safetensors", drop=("sha256",))}))
case(WEIGHTS, "JSON that is a list", 2, "a model description is a JSON object")(
    lambda e: e.register({"--weights": e.model("list.safetensors", raw_json="[]")}))
case(WEIGHTS, "weights of another method", 2, "this model is for method 'voxelmorph', not 'lapirn'")(
    lambda e: e.register({"--weights": e.model("other.safetensors", meta={"method": "voxelmorph"})}))
case(WEIGHTS, "JSON config of another method", 2, "config does not fit method 'lapirn'.*has no field")(
    lambda e: e.register({"--weights": e.model("vmconfig.safetensors", meta={
        "config": registry.get_method("voxelmorph").config_class().to_dict()})}))
case(WEIGHTS, "JSON config out of range", 2, r"config does not fit .*working_spacing = 0: expected")(
    lambda e: e.register({"--weights": e.model("range.safetensors", meta={
        "config": {**e.config.to_dict(), "working_spacing": 0}})}))
case(WEIGHTS, "tensors of another architecture", 2, "weights do not fit the lapirn architecture")(
    lambda e: e.register({"--weights": e.model("arch.safetensors", meta={
        "config": {**e.config.to_dict(), "start_channels": 3}})}))
case(WEIGHTS, "NaN weights", 2, r"weight tensor\(s\) hold NaN")(
    lambda e: e.register({"--weights": _nan_weights(e)}))
case(WEIGHTS, "weights path is a directory", 2, "no weights for method 'lapirn'")(
    lambda e: e.register({"--weights": e.text("dir.safetensors/x", "").parent}))
case(WEIGHTS, "missing weights file", 2, "no weights for method 'lapirn'")(
    lambda e: e.register({"--weights": e.path("none.safetensors")}))


def _nan_weights(e: Env) -> Path:
    net = registry.get_method("lapirn").build(e.config)
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    return models.save_model(net, "lapirn", e.path("nan_weights.safetensors"))


# Output directory --------------------------------------------------------------------------------------------


def _earlier_run(e: Env, extra: tuple[str, ...] = ()) -> Path:
    e.out.mkdir()
    for name in ("affine.tfm", "displacement.nii", "metrics.json") + extra:
        (e.out / name).write_text("from an earlier jad run\n")
    return e.out


case(OUTPUT, "output directory is the moving image", 2, "the output directory is the input --moving")(
    lambda e: e.register({"--output-dir": e.moving}))
case(OUTPUT, "moving image inside the output directory (would be overwritten)", 2,
     "the output directory holds the input --moving")(
    lambda e: e.register({"--moving": shutil.copy(e.moving, _earlier_run(e) / "warped.nii.gz")}, "--overwrite"))
case(OUTPUT, "output directory inside the input DICOM folder", 2, "lies inside the input folder --moving")(
    lambda e: e.register({"--moving": e.dicom("series"), "--output-dir": e.path("series") / "out"}))
case(OUTPUT, "output path is an existing file", 2, "exists and is not a directory")(
    lambda e: e.register({"--output-dir": e.text("file_out", "x")}))
case(OUTPUT, "output path below a file", 2, "file_parent is a file, not a folder")(
    lambda e: e.register({"--output-dir": e.text("file_parent", "x") / "out"}))
case(OUTPUT, "non-empty output directory without --overwrite", 2, r"is not empty \(3 entries\); pass --overwrite")(
    lambda e: (_earlier_run(e), e.register())[1])
case(OUTPUT, "--overwrite of a directory holding other files", 2, r"holds notes.txt, warped.nii.gz, not outputs")(
    lambda e: (_earlier_run(e, ("notes.txt",)), (e.out / "warped.nii.gz").mkdir(), e.register({}, "--overwrite"))[2])
case(OUTPUT, "--overwrite replaces an earlier run's outputs as a whole", 0, "",
     check=lambda e, m: (not (e.out / "affine.tfm").exists() or pytest.fail("affine.tfm of the earlier run left"),
                         m["method"] == "lapirn" or pytest.fail("metrics.json not replaced")))(
    lambda e: (_earlier_run(e), e.register({}, "--overwrite", "--preset", "fast"))[1])
case(OUTPUT, "read-only output directory", 2, "the output directory is not writable", as_user=True)(
    lambda e: (e.out.mkdir(), os.chmod(e.out, 0o555), e.register())[2])
case(OUTPUT, "read-only parent directory", 2, r"not writable; the outputs of .* are staged beside it",
     as_user=True)(lambda e: (e.path("ro").mkdir(), os.chmod(e.path("ro"), 0o555),
                              e.register({"--output-dir": e.path("ro") / "out"}))[2])


def _busy(e: Env) -> tuple[int, str]:
    """Another run holds the output directory's lock (taken here the way a run takes it)."""
    with outdir.OutputDirectory(e.out, {}, False, outputs.RUN_FILES):
        return run_standard(Case(OUTPUT, "busy", lambda e: e.register(), 3, "another deepregistration run"), e,
                            fresh=False, staging_ok=True)


special(OUTPUT, "a second run into a directory a run is writing", 3,
        r"another deepregistration run \(pid \d+\) is writing into this output directory")(_busy)


def _disk_full(e: Env) -> tuple[int, str]:
    def full(result, out):
        (out / "warped.nii.gz").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "displacement.nii"))

    original = cli.write_outputs
    cli.write_outputs = full
    try:
        return run_standard(Case(OUTPUT, "disk full", lambda e: e.register(), 3, "No space left"), e, fresh=False)
    finally:
        cli.write_outputs = original


special(OUTPUT, "disk full while writing", 3, "resource failure: .*displacement.nii: No space left on device")(
    _disk_full)


# evaluate ----------------------------------------------------------------------------------------------------

EVALUATE = "evaluate (metrics of another tool's field)"
case(EVALUATE, "displacement that is a text file", 2, "cannot be read as a displacement field")(
    lambda e: e.register({"--displacement": e.text("field.nii", "not a field\n" * 40)}, command="evaluate"))
case(EVALUATE, "displacement holding NaN", 2, "the displacement field has NaN or infinite values")(
    lambda e: e.register({"--displacement": _nan_field(e)}, command="evaluate"))
case(EVALUATE, "scalar image given as the displacement", 2, "expected a 3D field with 3 components per voxel")(
    lambda e: e.register({"--displacement": e.moving}, command="evaluate"))
case(EVALUATE, "output directory is the displacement's folder", 2, "holds the input --displacement")(
    lambda e: e.register({"--displacement": _nan_field(e, np.zeros), "--output-dir": e.case_dir},
                         command="evaluate"))


def _nan_field(e: Env, fill=None) -> Path:
    from DeepRegistrationLib.core.field import DisplacementField, write_itk_displacement

    data = np.zeros((*SHAPE, 3), np.float32) if fill is not None else np.full((*SHAPE, 3), np.nan, np.float32)
    return write_itk_displacement(DisplacementField(data, e.grid), e.path("field.nii.gz"))


def _no_memory(e: Env) -> tuple[int, str]:
    """The machine has (as far as the engine can tell) no free memory: the fallbacks end in a ResourceError."""
    from DeepRegistrationLib.engine import network

    original = network.available_bytes
    network.available_bytes = lambda device: 1024
    try:
        return run_standard(Case(RUN, "memory", lambda e: e.register(), 3, "GiB"), e, fresh=False)
    finally:
        network.available_bytes = original


special(RUN, "not enough memory, even on the coarsest working grid", 3,
        r"resource failure: registration needs about [\d.]+ GiB but 0.0 GiB are free")(_no_memory)


# ------------------------------------------------------------------------------------------------ running


def snapshot(paths: list[Path]) -> dict[str, Any]:
    """Content hash and modification time of every file under `paths`."""
    state = {}
    for path in paths:
        for p in ([path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []):
            if p.is_file():
                stat = p.stat()
                state[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), stat.st_mtime_ns, stat.st_mode)
    return state


@contextlib.contextmanager
def unprivileged(active: bool):
    """Run as user `nobody` (effective uid) when the tests run as root, so that permissions apply."""
    if not active or os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def run_cli(args: list[str], as_user: bool = False) -> tuple[int, str, list[str]]:
    """`cli.main(args)` in this process: (exit code, stderr, warnings issued)."""
    stderr = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(stderr), \
            unprivileged(as_user):
        warnings.simplefilter("always")
        code = cli.main(args)
    return code, stderr.getvalue(), [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def run_standard(c: Case, e: Env, fresh: bool = True, out_existed: bool | None = None,
                 staging_ok: bool = False) -> tuple[int, str]:
    if fresh:
        e.start(c.slug)
    if c.as_user:
        os.chmod(e.case_dir, 0o777)
    args = c.build(e)
    out = Path(args[args.index("--output-dir") + 1])
    existed = out.exists() if out_existed is None else out_existed
    inputs = [Path(a) for a in args if os.sep in a and Path(a).exists() and Path(a) != out]
    before, out_before = snapshot(inputs), snapshot([out]) if existed else None
    code, stderr, issued = run_cli(args, c.as_user)
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == c.code, f"{c.name}: exit {code}, stderr {stderr!r}"
    if code != 0:
        assert len(lines) == 1 and lines[0].startswith("deepregistration"), stderr
        message = lines[0]
        if existed:
            assert snapshot([out]) == out_before, "the output directory changed"
        else:
            assert not out.exists(), f"{out} left behind"
    else:
        metrics = json.loads((out / "metrics.json").read_text(), parse_constant=lambda name: pytest.fail(name))
        assert set(issued) >= set(metrics["warnings"])
        message = "; ".join(metrics["warnings"]) or "(no warning)"
        if c.check is not None:
            c.check(e, metrics)
        assert {p.name for p in out.iterdir()} <= outputs.RUN_FILES
    assert staging_ok or not list(out.parent.glob(f".*{outdir.STAGING_SUFFIX}")), "staging directory left behind"
    assert snapshot(inputs) == before, "an input changed"
    assert re.search(c.expect, message), f"{c.name}: {message!r} lacks {c.expect!r}"
    assert not (e.case_dir / "PICKLE_WAS_LOADED").exists(), "a pickle was loaded"
    return code, message


OUTCOMES: dict[str, tuple[int, str]] = {}


def run_case(c: Case, e: Env) -> tuple[int, str]:
    if c.run is not None:
        e.start(c.slug)
        code, message = c.run(e)
        assert code == c.code and re.search(c.expect, message), (c.name, code, message)
    else:
        code, message = run_standard(c, e)
    OUTCOMES[c.slug] = (code, normalise(message, e, c.slug))
    return OUTCOMES[c.slug]


def normalise(message: str, e: Env, slug: str) -> str:
    """The message as the document shows it: paths relative to the case's folder (the shared good inputs under
    `inputs/`), volatile numbers replaced."""
    text = message.replace(str(e.root / slug) + os.sep, "").replace(str(e.root / slug), ".")
    text = text.replace(str(e.root) + os.sep, "")
    text = re.sub(r"interrupt-[\w-]+/", "", text)
    text = re.sub(r"(not a readable safetensors file, corrupt or truncated|cannot be read as an image|cannot be "
                  r"read as a displacement field) \(.*\)$", r"\1 (the reader's words)", text)
    text = re.sub(r"\b[0-9a-f]{12}…", "<sha256>…", text)
    text = re.sub(r"pid \d+", "pid N", text)
    text = re.sub(r"CRC check failed 0x[0-9a-f]+ != 0x[0-9a-f]+", "CRC check failed <stored> != <computed>", text)
    text = re.sub(r"crash-[\d-]+\.log", "crash-<time>-<pid>.log", text)
    text = re.sub(r"\(signal \d+\)", "(signal N)", text)
    return text


# --------------------------------------------------------------------- interruption, crashes, concurrency


def _stage_interrupt(e: Env) -> tuple[int, str]:
    """SIGINT delivered to this process in each stage: one line, exit 130, nothing left, handlers restored (to
    what they were before the run: Python's default, or SIG_IGN where the test runner started in the background)."""
    stages = ("preprocessing", "affine", "network", "refinement", "export", "metrics", "writing outputs")
    original_call = cli._Progress.__call__
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for sig, targets in ((signal.SIGINT, stages), (signal.SIGTERM, ("network", "writing outputs"))):
        for stage in targets:
            e.start(f"interrupt-{sig.name}-{stage.replace(' ', '-')}")

            def call(self, name, fraction, target=stage, sig=sig):
                if name == target:
                    os.kill(os.getpid(), sig)
                    time.sleep(0.5)  # the handler raises at once; never reached

            cli._Progress.__call__ = call
            try:
                code, stderr, _ = run_cli(e.register())
            finally:
                cli._Progress.__call__ = original_call
            assert code == failures.EXIT_SIGNAL[sig.name], (stage, code, stderr)
            assert stderr.strip() == f"deepregistration: interrupted by {sig.name}", stderr
            assert not e.out.exists() and not list(e.case_dir.glob(".*staging")), stage
            assert {s: signal.getsignal(s) for s in handlers} == handlers, stage
    return 130, "deepregistration: interrupted by SIGINT (SIGTERM: exit 143, 'interrupted by SIGTERM')"


special(RUN, "SIGINT or SIGTERM in any stage (preprocessing, affine, network, refinement, export, metrics, writing)",
        130,
        "interrupted by SIGINT")(_stage_interrupt)


def _internal_error(e: Env) -> tuple[int, str]:
    logs = e.path("logs")
    original, previous = cli.register, os.environ.get(failures.LOG_DIR_ENV)

    def broken(*args, **kwargs):
        return {}["a key that is not there"]

    cli.register, os.environ[failures.LOG_DIR_ENV] = broken, str(logs)
    try:
        code, stderr, _ = run_cli(e.register())
    finally:
        cli.register = original
        os.environ.pop(failures.LOG_DIR_ENV)
        if previous is not None:
            os.environ[failures.LOG_DIR_ENV] = previous
    (log,) = logs.iterdir()
    assert "Traceback" in log.read_text() and "a key that is not there" in log.read_text()
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert str(log) in stderr and not e.out.exists()
    return code, stderr.strip()


special(RUN, "an unexpected internal error (simulated)", 1,
        r"internal error: KeyError: 'a key that is not there'; the traceback is in .*crash-.*\.log")(_internal_error)


def _process(args: list[str]) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "DeepRegistration"), str(ROOT)])}
    return subprocess.Popen([sys.executable, "-m", "DeepRegistrationLib.frontends.console", *args], cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment)


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 120.0) -> list[bytes]:
    """Read the process's stderr (in a thread) until `text` appears; returns the buffer that keeps filling."""
    buffer: list[bytes] = []
    seen = threading.Event()

    def pump():
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            buffer.append(chunk)
            if text.encode() in b"".join(buffer):
                seen.set()
        seen.set()

    threading.Thread(target=pump, daemon=True).start()
    assert seen.wait(timeout) and text.encode() in b"".join(buffer), b"".join(buffer).decode(errors="replace")
    return buffer


def _long_run(e: Env, out: Path) -> list[str]:
    """A registration that stays in its instance-optimisation stage long enough to be signalled; not quiet, so
    that its progress names the stage; with an unplaced markups point, so that a warning is printed first."""
    args = e.register({"--output-dir": out, "--instance-optimization": 10000})
    args.remove("--quiet")
    lps = e.points * [-1, -1, 1]
    points = [{"label": n, "position": list(p)} for n, p in zip("abc", lps)] + [{"label": "d", "positionStatus":
                                                                                 "undefined"}]
    return args + ["--fixed-landmarks", str(e.markups(f"{out.name}.mrk.json", points)), "--moving-landmarks",
                   str(e.fixed_landmarks)]


_PROCESSES: dict[str, Any] = {}


def _processes(e: Env) -> dict[str, Any]:
    """Two real registrations started together and caught in their instance-optimisation stage: one is sent
    SIGTERM, the other is killed with SIGKILL after a second run into its directory was refused; then a new run
    into the killed one's directory. The outcomes feed two rows of the matrix."""
    if _PROCESSES:
        return _PROCESSES
    folder = e.root / "processes"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    e.case_dir = folder
    term_out, kill_out = folder / "term" / "out", folder / "kill" / "out"
    procs = {"term": _process(_long_run(e, term_out)), "kill": _process(_long_run(e, kill_out))}
    try:
        buffers = {name: _wait_for(proc, "instance optimisation") for name, proc in procs.items()}
        staging = outdir.staging_path(kill_out)
        assert staging.is_dir() and (staging / outdir.LOCK_NAME).is_file()
        e.out = kill_out
        code, busy, _ = run_cli(e.register())
        assert code == 3 and f"pid {procs['kill'].pid}" in busy, busy
        procs["term"].send_signal(signal.SIGTERM)
        procs["kill"].kill()
        assert procs["term"].wait(60) == failures.EXIT_SIGNAL["SIGTERM"]
        procs["kill"].wait(60)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    time.sleep(0.1)
    stderr = b"".join(buffers["term"]).decode(errors="replace") + procs["term"].stderr.read().decode(errors="replace")
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    lines = [line.split("\r")[-1] for line in stderr.splitlines() if line.split("\r")[-1].strip()]
    assert lines[-1] == "deepregistration: interrupted by SIGTERM", lines
    assert any(line.startswith("deepregistration: warning: ") and "is not placed; skipped" in line for line in lines)
    assert not (folder / "term").exists(), "SIGTERM left something behind (the parent folder the run made)"
    assert [p.name for p in (folder / "kill").iterdir()] == [staging.name], "SIGKILL: more than the staging folder"
    code, recovered, _ = run_cli(e.register())
    assert code == 0, recovered
    assert not staging.exists() and (kill_out / "metrics.json").is_file()
    killed = (f"killed: {staging.name}/ left (lock and partial outputs); meanwhile a second run: exit 3 "
              f"({busy.strip()}); the next run: exit 0, the staging folder is cleared")
    _PROCESSES.update(term=(143, lines[-1]), kill=(0, killed))
    return _PROCESSES


special(RUN, "SIGTERM sent to a running process", 143, "interrupted by SIGTERM")(lambda e: _processes(e)["term"])
special(RUN, "kill -9 of a running process, a second run meanwhile, then a new run", 0,
        "the next run: exit 0, the staging folder is cleared")(lambda e: _processes(e)["kill"])


assert len({c.slug for c in CASES}) == len(CASES), "two cases with one name"


@pytest.mark.parametrize("c", CASES, ids=[c.slug for c in CASES])
def test_bad_input_matrix(env, c):
    run_case(c, env)


# ------------------------------------------------------------------------------------------- other checks


@pytest.mark.parametrize("method", sorted(registry.network_names()))
def test_every_config_field_out_of_range_is_refused_naming_its_range(method):
    """For every method, every declared field beyond its range (or off its choices) is an InputError naming the
    field and what it allows; the declared defaults and the shipped models' configs pass."""
    config_class = registry.get_method(method).config_class
    hints = typing.get_type_hints(config_class)
    for f in fields(config_class):
        meta = f.metadata
        if hints[f.name] is not bool:
            assert meta.get("choices") is not None or (meta.get("low") is not None and meta.get("high") is not None), \
                f"{method}.{f.name} declares no range"
        if meta.get("choices") is not None:
            bad = "nosuch"
        elif hints[f.name] in (bool, str):
            bad = 3
        else:
            bad = json.loads(_out_of_range(f, hints[f.name]))
        with pytest.raises(InputError, match=rf"{method} parameter {f.name} = .*: expected "):
            config_class.check({f.name: bad})
    config_class().validate()
    path = registry.get_method(method).weights_path
    if path.is_file():
        config_class.from_dict(models.read_metadata(path)["config"]).validate()


def test_options_are_checked_by_the_engine_for_every_front_end():
    """The job runner and the Slicer module call the engine, which checks the options the same way."""
    from DeepRegistrationLib.engine.options import check_options

    with pytest.raises(InputError, match=r"lapirn parameter working_spacing = -2: expected a number in \[0.5, 4\]"):
        check_options(RegistrationOptions(parameters={"working_spacing": -2}))
    with pytest.raises(InputError, match=r"option instance_optimization = -1: expected an integer in \[0, 10000\]"):
        check_options(RegistrationOptions(instance_optimization=-1))
    assert check_options(RegistrationOptions(parameters={"working_shape": [64, 64, 64], "int_steps": 5.0})) \
        .parameters == {"working_shape": (64, 64, 64), "int_steps": 5}
    with pytest.raises(InputError, match="option prealign"):
        check_fields(RegistrationOptions, {"prealign": "sideways"}, "option")


def test_the_job_runner_refuses_bad_parameters_naming_them(tmp_path, env):
    """The worker process of the Slicer module runs the same engine checks: exit 2, error.json names the field."""
    from DeepRegistrationLib.core.image import read_image
    from DeepRegistrationLib.frontends import job, worker

    image = read_image(env.fixed)
    options = RegistrationOptions(weights=str(env.weights), parameters={"int_steps": -3})
    job.write_job(job.RegistrationJob(image, image, options), tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        assert worker.main([str(tmp_path)]) == 2
    kind, message = job.read_error(tmp_path)
    assert kind == "InputError" and "lapirn parameter int_steps = -3: expected an integer in [0, 12]" in message


def test_report_files_are_the_declared_run_files():
    report = ROOT / "DeepRegistration" / "DeepRegistrationLib" / "frontends" / "report.py"
    names = set(re.findall(r'_save\(fig, folder, "([\w.]+)"\)', report.read_text(encoding="utf-8")))
    assert names | {"report.html"} == set(outputs.REPORT_FILES)


def test_warnings_print_as_one_line():
    from DeepRegistrationLib.core.errors import RegistrationWarning

    with cli._one_line_warnings():
        text = warnings.formatwarning("landmark 'b' left out", RegistrationWarning, "x.py", 1)
    assert text == "deepregistration: warning: landmark 'b' left out\n"


def test_usage_errors_and_help_return_codes(capsys):
    assert cli.main(["register", "--fixed", "f"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "required" in err
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["--help"]) == 0


# ------------------------------------------------------------------------------------------------ the document


def document(outcomes: dict[str, tuple[int, str]]) -> str:
    lines = ["# Robustness: what the command line answers to bad or unusual input", "",
             "Generated by `python Testing/test_robustness.py` from the cases of `Testing/test_robustness.py`, which",
             "runs each one and asserts its exit code and message, that no traceback is printed, that nothing is left",
             "in or beside the output directory when it fails and that the inputs are unchanged (CI checks that this",
             "page is up to date). Paths are shown relative to the test's folders.", "",
             "Exit codes: 0 success, 1 unexpected error (one line naming a log file that holds the traceback), 2 bad",
             "input, 3 resources (memory, device, disk, a busy output directory), 130 SIGINT, 143 SIGTERM. Warnings",
             "(exit 0) are printed as `deepregistration: warning: ...` and listed in metrics.json under `warnings`.",
             "", "Output directory rules: it must be new or empty, or, with `--overwrite`, hold only outputs of an",
             "earlier run, which are then replaced as a whole; it may not be, hold or lie inside an input. A run",
             "stages its outputs in `.<name>.deepregistration-staging/` beside it, holding a lock there, and puts the",
             "finished set in place with one rename; a run killed outright leaves only that folder, which the next",
             "run into the same directory clears.", ""]
    for group in dict.fromkeys(c.group for c in CASES):
        lines += [f"## {group}", "", "| case | exit | message |", "|---|---|---|"]
        for c in (c for c in CASES if c.group == group):
            code, message = outcomes[c.slug]
            message = message.replace("|", "\\|")
            lines.append(f"| {c.name.replace('|', chr(92) + '|')} | {code} | `{message}` |"
                         if not message.startswith("(") else f"| {c.name} | {code} | {message} |")
        lines.append("")
    return "\n".join(lines)


def test_robustness_md_is_up_to_date(env):
    for c in CASES:
        if c.slug not in OUTCOMES:
            run_case(c, env)
    text = document(OUTCOMES)
    if os.environ.get(WRITE_DOC):
        DOC.write_text(text, encoding="utf-8")
    assert DOC.is_file() and DOC.read_text(encoding="utf-8") == text, \
        "docs/ROBUSTNESS.md is stale: regenerate it with `python Testing/test_robustness.py`"


if __name__ == "__main__":
    os.environ[WRITE_DOC] = "1"
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
