"""The outputs of a registration, declared once: what of the result each holds, the file the command line writes
and the MRML node the Slicer module builds. The CLI writer (`write_outputs`), the job runner (`frontends.job`) and
the Slicer output builder (`frontends.mrml`) iterate `OUTPUTS`; adding an output is one row here plus its builder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk

from ..core.field import write_itk_displacement
from ..core.geometry import RAS_FROM_LPS
from ..core.image import Image, atomic_path, write_image
from ..engine.results import Metrics, RegistrationResult


def folding_image(result: RegistrationResult) -> Image:
    """1 where det J ≤ 0 on the fixed grid, else 0."""
    return Image((result.jacobian.data <= 0).astype(np.uint8), result.jacobian.grid, "folding")


def write_affine_tfm(affine_ras: np.ndarray, path: Path) -> None:
    """The RAS affine (fixed point ↦ moving point) as an ITK transform file (LPS)."""
    lps = RAS_FROM_LPS @ affine_ras[:3, :3] @ RAS_FROM_LPS
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(lps.flatten()))
    transform.SetTranslation(tuple(RAS_FROM_LPS @ affine_ras[:3, 3]))
    with atomic_path(path) as tmp:
        sitk.WriteTransform(transform, str(tmp))


def strict_json(value: Any) -> Any:
    """`value` with numpy scalars made Python numbers and NaN/±inf made None, so that it is valid JSON."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics(metrics: Metrics, path: Path) -> None:
    """metrics.json: `Metrics.to_json()` as strict JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(strict_json(metrics.to_json()), indent=2, allow_nan=False) + "\n")


@dataclass(frozen=True)
class OutputSpec:
    """One output. `value(result)` is what it holds (None when this run has none, e.g. no affine part); `file` the
    name the CLI writes it to, with `write(value, path)` (None: not a CLI file); `attr` the `RegistrationResult`
    attribute it is (None: derived from other outputs; the job runner stores these); `node_class` the MRML class of
    a new node, `accepts` the class a node chosen by the user must have (default `node_class`), `build`
    the `frontends.mrml` builder method that fills it (None: no node); `slicer_default` whether the Slicer module
    creates it unless told otherwise, `chosen` whether the user may choose an existing node to overwrite."""

    key: str
    value: Callable[[RegistrationResult], Any]
    file: str | None = None
    write: Callable[[Any, Path], Any] | None = None
    attr: str | None = None
    node_class: str | None = None
    accepts: str | None = None
    build: str | None = None
    slicer_default: bool = True
    chosen: bool = True


def _attribute(name: str) -> Callable[[RegistrationResult], Any]:
    return lambda result: getattr(result, name)


def _stored(key: str, name: str, file: str, write: Callable[[Any, Path], Any], **node: Any) -> OutputSpec:
    """An output that is the `RegistrationResult` attribute `name`, written to `file` by `write`."""
    return OutputSpec(key, _attribute(name), file, write, name, **node)


OUTPUTS: tuple[OutputSpec, ...] = (
    _stored("transform", "field", "displacement.nii", write_itk_displacement,
            node_class="vtkMRMLGridTransformNode", accepts="vtkMRMLTransformNode", build="transform"),
    _stored("inverse", "inverse", "inverse_displacement.nii", write_itk_displacement,
            node_class="vtkMRMLGridTransformNode", accepts="vtkMRMLTransformNode", build="transform",
            slicer_default=False),
    _stored("affine", "affine_ras", "affine.tfm", write_affine_tfm,
            node_class="vtkMRMLLinearTransformNode", accepts="vtkMRMLTransformNode", build="affine"),
    _stored("warped", "warped", "warped.nii.gz", write_image, node_class="vtkMRMLScalarVolumeNode",
            build="warped"),
    _stored("jacobian", "jacobian", "jacobian.nii", write_image, node_class="vtkMRMLScalarVolumeNode",
            build="jacobian"),
    OutputSpec("folding", folding_image, "folding.nii.gz", write_image, node_class="vtkMRMLSegmentationNode",
               build="folding"),
    _stored("warped_labels", "warped_labels", "warped_labels.nii.gz", write_image),
    OutputSpec("segmentTable", lambda r: r.metrics.labels, node_class="vtkMRMLTableNode", build="segment_table"),
    OutputSpec("segmentChart", lambda r: r.metrics.labels, node_class="vtkMRMLPlotChartNode", build="dice_chart",
               chosen=False),
    OutputSpec("landmarkTable", lambda r: r.metrics.landmarks, node_class="vtkMRMLTableNode", build="landmark_table"),
    OutputSpec("residuals", lambda r: r.metrics.landmarks, node_class="vtkMRMLMarkupsLineNode", build="residuals",
               chosen=False),
    OutputSpec("comparison", lambda r: r.metrics, node_class="vtkMRMLTableNode", build="comparison", chosen=False),
    _stored("metrics", "metrics", "metrics.json", write_metrics),
)
"""Every output, in the order they are written and built. The fields and the Jacobian map are float32 values that
vary over the whole grid: gzip shrinks them by about a quarter for ~10 s per 1 mm field, so they are plain `.nii`."""

OUTPUT_FILES = {spec.key: spec.file for spec in OUTPUTS if spec.file}
"""Output key → file name of the CLI's output directory."""

REPORT_FILES = ("report.html", "slices.png", "checkerboard.png", "difference.png", "deformation_grid.png",
                "jacobian.png", "outlines.png", "dice.png")
"""What `frontends.report.write_report` writes (`--report`); `Testing/test_robustness.py` checks the list."""

RUN_FILES = frozenset(OUTPUT_FILES.values()) | frozenset(REPORT_FILES)
"""Every name a run may write into its output directory: the only names `--overwrite` replaces."""


def write_outputs(result: RegistrationResult, out: Path) -> list[Path]:
    """Every CLI output file of `result` that this run has into directory `out`; returns the paths written."""
    written = []
    for spec in OUTPUTS:
        value = spec.value(result)
        if spec.file is None or value is None:
            continue
        spec.write(value, out / spec.file)
        written.append(out / spec.file)
    return written
