"""What a registration produces: the typed metrics (the one schema of metrics.json) and `RegistrationResult`.

Front ends read `Metrics` only: the command line's summary, the QA report, the benchmark's scores and the Slicer
widget. `Metrics.to_json()` writes the documented metrics.json keys (docs: README "Command line"; pinned by
`Testing/test_results.py`) and `Metrics.from_json()` reads them back. Distances are mm, times s, memory MB.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from ..core.field import DisplacementField
from ..core.image import Image
from ..core.metrics import JacobianSummary
from .options import RegistrationOptions

LANDMARK_STATISTICS = {"mean": np.mean, "std": np.std, "median": np.median, "max": np.max}
"""Summary statistics of per-landmark TRE, in the order tables show them."""


@dataclass
class Similarity:
    """Global NCC (Pearson r, unitless) and mutual information (nats) of the fixed and the moving image."""

    ncc: float
    mi: float


@dataclass
class StructureScores:
    """Overlap of one label: Dice (unitless), HD95 and ASSD (mm)."""

    dice: float
    hd95: float
    assd: float


@dataclass
class Overlap:
    """Per-label scores (keyed by the label value as a string) and their means over the finite values."""

    per_label: dict[str, StructureScores]
    mean_dice: float
    mean_hd95: float
    mean_assd: float


@dataclass
class LabelMetrics:
    """Overlap before (identity resampling) and after registration; volume change warped / moving per label."""

    before: Overlap
    after: Overlap
    volume_change: dict[str, float]


@dataclass
class LandmarkMetrics:
    """Target registration error (mm) of each landmark before (identity) and after registration."""

    before: list[float]
    after: list[float]

    @property
    def mean_before(self) -> float:
        return float(np.mean(self.before))

    @property
    def mean_after(self) -> float:
        return float(np.mean(self.after))

    def summary(self) -> dict[str, tuple[float, float]]:
        """(before, after) of each of `LANDMARK_STATISTICS`."""
        return {name: (float(f(self.before)), float(f(self.after))) for name, f in LANDMARK_STATISTICS.items()}


@dataclass
class RunInfo:
    """How the registration ran: its options, the model, device, working grid, peak memory and stage times."""

    options: RegistrationOptions
    model_sha256: str | None
    device: str
    working_shape: tuple[int, int, int]
    working_spacing_mm: float
    peak_memory_mb: float | None
    time_s: dict[str, float]
    peak_gpu_memory_mb: float | None = None

    @property
    def method(self) -> str:
        return self.options.method


@dataclass
class Metrics:
    """Every measure of one transform on one pair.

    `jacobian` is over the whole fixed grid; `jacobian_in_labels` inside the fixed labels' foreground (when labels
    were given); `mask` inside the user's mask (when one was given); `run` only for registrations (not for
    `evaluate` of another tool's field). `warnings` are the warnings issued while reading the inputs and
    registering (in metrics.json too, so a result never hides what was doubtful about it).
    """

    jacobian: JacobianSummary
    similarity_before: Similarity
    similarity_after: Similarity
    jacobian_in_labels: JacobianSummary | None = None
    labels: LabelMetrics | None = None
    landmarks: LandmarkMetrics | None = None
    mask: JacobianSummary | None = None
    run: RunInfo | None = None
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The metrics.json dict (documented keys; NaN stays a float here, the writer makes it strict JSON)."""
        jac = self.jacobian
        out: dict[str, Any] = {"jacobian": {"percent_nonpositive": jac.percent_nonpositive, "sdlogj": jac.sdlogj,
                                            "sdlogj_learn2reg": jac.sdlogj_learn2reg, "min": jac.min,
                                            "max": jac.max}}
        if self.jacobian_in_labels is not None:
            inside = self.jacobian_in_labels
            out["jacobian"].update({"percent_nonpositive_mask": inside.percent_nonpositive,
                                    "sdlogj_mask": inside.sdlogj, "sdlogj_learn2reg_mask": inside.sdlogj_learn2reg})
        out["similarity"] = {"before": _plain(self.similarity_before), "after": _plain(self.similarity_after)}
        if self.labels is not None:
            out["labels"] = {stage: {"per_label": {k: _plain(v) for k, v in overlap.per_label.items()},
                                     "mean_dice": overlap.mean_dice, "mean_hd95": overlap.mean_hd95,
                                     "mean_assd": overlap.mean_assd}
                             for stage, overlap in (("before", self.labels.before), ("after", self.labels.after))}
            out["labels"]["volume_change"] = dict(self.labels.volume_change)
        if self.landmarks is not None:
            marks = self.landmarks
            out["landmarks"] = {"before": list(marks.before), "after": list(marks.after),
                                "mean_before": marks.mean_before, "mean_after": marks.mean_after}
        if self.mask is not None:
            out["mask"] = _plain(self.mask)
        if self.run is not None:
            run = self.run
            out.update({"method": run.method, "model_sha256": run.model_sha256, "device": run.device,
                        "working_grid": {"shape": list(run.working_shape), "spacing_mm": run.working_spacing_mm}})
            out.update({k: v for k, v in run.options.to_dict().items() if k not in ("method", "device")})
            out["peak_memory_mb"] = run.peak_memory_mb
            if run.peak_gpu_memory_mb is not None:
                out["peak_gpu_memory_mb"] = run.peak_gpu_memory_mb
            out["time_s"] = dict(run.time_s)
        out["warnings"] = list(self.warnings)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Metrics":
        """Inverse of `to_json` (null read as NaN where a number is expected)."""
        jac = data["jacobian"]
        whole = JacobianSummary(_num(jac["percent_nonpositive"]), None, _num(jac["sdlogj"]),
                                _num(jac["sdlogj_learn2reg"]), _num(jac["min"]), _num(jac["max"]))
        inside = None
        if "percent_nonpositive_mask" in jac:
            inside = JacobianSummary(_num(jac["percent_nonpositive_mask"]), None, _num(jac["sdlogj_mask"]),
                                     _num(jac["sdlogj_learn2reg_mask"]), float("nan"), float("nan"))
        sim = data["similarity"]
        metrics = cls(whole, Similarity(**_nums(sim["before"])), Similarity(**_nums(sim["after"])), inside)
        if "labels" in data:
            labels = data["labels"]

            def overlap(stage: dict[str, Any]) -> Overlap:
                return Overlap({k: StructureScores(**_nums(v)) for k, v in stage["per_label"].items()},
                               _num(stage["mean_dice"]), _num(stage["mean_hd95"]), _num(stage["mean_assd"]))

            metrics.labels = LabelMetrics(overlap(labels["before"]), overlap(labels["after"]),
                                          _nums(labels["volume_change"]))
        if "landmarks" in data:
            metrics.landmarks = LandmarkMetrics([_num(v) for v in data["landmarks"]["before"]],
                                                [_num(v) for v in data["landmarks"]["after"]])
        if "mask" in data:
            metrics.mask = JacobianSummary(**{f.name: _num(data["mask"][f.name]) if f.name != "voxels"
                                              else int(data["mask"][f.name]) for f in fields(JacobianSummary)})
        if "method" in data:
            option_names = {f.name for f in fields(RegistrationOptions)}
            options = RegistrationOptions.from_dict({k: v for k, v in data.items() if k in option_names
                                                     and k != "device"})
            grid = data["working_grid"]
            metrics.run = RunInfo(options, data.get("model_sha256"), data["device"], tuple(grid["shape"]),
                                  float(grid["spacing_mm"]), data.get("peak_memory_mb"), dict(data["time_s"]),
                                  data.get("peak_gpu_memory_mb"))
        metrics.warnings = [str(w) for w in data.get("warnings", [])]
        return metrics


def _plain(value: Any) -> dict[str, Any]:
    return {f.name: getattr(value, f.name) for f in fields(value)}


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _nums(values: dict[str, Any]) -> dict[str, float]:
    return {k: _num(v) for k, v in values.items()}


@dataclass
class RegistrationResult:
    """Everything a registration produces; fields in RAS mm on the fixed grid (docs/CONVENTIONS.md §3).

    `affine_ras` is the affine part of the transform (RAS 4×4, fixed point ↦ moving point) when the method has one.
    """

    field: DisplacementField
    inverse: DisplacementField
    affine_ras: np.ndarray | None
    warped: Image
    jacobian: Image
    warped_labels: Image | None
    metrics: Metrics

    @property
    def method(self) -> str:
        return self.metrics.run.method

    @property
    def model_sha256(self) -> str | None:
        return self.metrics.run.model_sha256

    @property
    def device(self) -> str:
        return self.metrics.run.device
