"""Scores of one forward field on one pair, from the engine's `evaluate` plus the benchmark's field metrics.

Units: Dice unitless; HD95, ASSD, TRE and end-point error (EPE) in mm; folding in percent of the fixed brain mask's
voxels with det J ≤ 0; SDlogJ is the standard deviation of log det J inside that mask (`metrics.sdlogj`).
EPE is |d(p) − d_true(p)| over the fixed brain mask, both fields on the fixed grid (fixed point ↦ moving point).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.engine.evaluation import evaluate
from DeepRegistrationLib.core.field import DisplacementField

from .suite import Pair

SUMMARY_KEYS = ("dice", "hd95", "assd", "folding_pct", "sdlogj", "tre_mm", "epe_mm")


def end_point_error(field: DisplacementField, truth: DisplacementField, mask: np.ndarray) -> np.ndarray:
    """|d − d_true| in mm at the voxels of `mask` (both fields on the same grid)."""
    if not field.grid.same_as(truth.grid, tol=1e-3):
        raise ValueError("field and ground truth lie on different grids")
    return np.linalg.norm(field.data[mask].astype(np.float64) - truth.data[mask], axis=-1)


def score(pair: Pair, field: DisplacementField) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary row, per-structure rows) of `field` on `pair`."""
    metrics, _, _, _ = evaluate(pair.fixed, pair.moving, field, fixed_labels=pair.fixed_labels,
                                moving_labels=pair.moving_labels, fixed_points=pair.fixed_points,
                                moving_points=pair.moving_points,
                                mask=Image(pair.fixed_mask.astype(np.uint8), pair.fixed.grid, "fixed brain mask"))
    after, before = metrics.labels.after, metrics.labels.before
    row: dict[str, Any] = {
        "dice": after.mean_dice, "hd95": after.mean_hd95, "assd": after.mean_assd, "dice_before": before.mean_dice,
        "folding_pct": metrics.mask.percent_nonpositive, "folding_pct_grid": metrics.jacobian.percent_nonpositive,
        "sdlogj": metrics.mask.sdlogj, "ncc": metrics.similarity_after.ncc, "mi": metrics.similarity_after.mi,
        "tre_mm": float("nan"), "tre_before_mm": float("nan"), "epe_mm": float("nan"), "epe_p95_mm": float("nan"),
        "landmarks": 0}
    if metrics.landmarks is not None:
        row.update(tre_mm=metrics.landmarks.mean_after, tre_before_mm=metrics.landmarks.mean_before,
                   landmarks=len(metrics.landmarks.after))
    if pair.truth is not None:
        epe = end_point_error(field, pair.truth, pair.fixed_mask)
        row.update(epe_mm=float(epe.mean()), epe_p95_mm=float(np.percentile(epe, 95)))
    structures = [{"structure": pair.label_names.get(int(lab), lab), "label": int(lab), "dice": values.dice,
                   "hd95": values.hd95, "assd": values.assd} for lab, values in after.per_label.items()]
    return row, structures
