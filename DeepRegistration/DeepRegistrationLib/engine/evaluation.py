"""Metrics of any transform (ours or another tool's) on a pair: regularity, similarity, overlap and landmark error.

"Before" is the moving image resampled on the fixed grid with the identity transform. Fields map fixed points to
moving points (docs/CONVENTIONS.md §3); distances are mm.
"""

from __future__ import annotations

import numpy as np

from ..core import metrics as M
from ..core.errors import InputError
from ..core.field import DisplacementField, apply_field
from ..core.geometry import Grid
from ..core.image import Image
from ..core.resample import resample_image
from .results import LabelMetrics, LandmarkMetrics, Metrics, Overlap, Similarity, StructureScores


def overlap(fixed_labels: np.ndarray, moving_labels: np.ndarray, spacing: np.ndarray, labels: list[int]) -> Overlap:
    """Dice, HD95 and ASSD (mm) per label of two label maps on one grid, and their means over finite values."""
    dice = M.dice_per_label(fixed_labels, moving_labels, labels)
    per = {str(lab): StructureScores(dice.get(lab, float("nan")),
                                     **M.surface_metrics(fixed_labels == lab, moving_labels == lab, spacing))
           for lab in labels}

    def mean(key: str) -> float:
        values = [getattr(v, key) for v in per.values() if np.isfinite(getattr(v, key))]
        return float(np.mean(values)) if values else float("nan")

    return Overlap(per, mean("dice"), mean("hd95"), mean("assd"))


def check_landmarks(fixed_points: np.ndarray | None, moving_points: np.ndarray | None, fixed: Grid) -> None:
    """Both or neither; matched [N, 3] arrays; fixed landmarks inside the fixed image (InputError otherwise)."""
    if (fixed_points is None) != (moving_points is None):
        raise InputError("give both fixed and moving landmarks, or neither")
    if fixed_points is None:
        return
    fixed_points, moving_points = np.asarray(fixed_points, float), np.asarray(moving_points, float)
    if fixed_points.shape != moving_points.shape or fixed_points.ndim != 2 or fixed_points.shape[1] != 3:
        raise InputError(f"landmarks must be matched [N, 3] arrays, got {fixed_points.shape} and "
                         f"{moving_points.shape}")
    ijk = fixed.world_to_voxel(fixed_points)
    outside = np.where(np.any((ijk < -0.5) | (ijk > np.array(fixed.shape) - 0.5), axis=1))[0]
    if len(outside):
        raise InputError(f"fixed landmark(s) {outside.tolist()} lie outside the fixed image")


def check_mask(mask: Image, fixed: Grid) -> None:
    """A mask must lie on the fixed grid and contain at least one voxel (InputError otherwise)."""
    if not mask.grid.same_as(fixed, tol=1e-3):
        raise InputError(f"{mask.source}: mask grid (shape {mask.grid.shape}) differs from the fixed image grid "
                         f"(shape {fixed.shape})")
    if not (mask.data != 0).any():
        raise InputError(f"{mask.source}: the mask is empty")


def evaluate(fixed: Image, moving: Image, forward: DisplacementField, *, fixed_labels: Image | None = None,
             moving_labels: Image | None = None, fixed_points: np.ndarray | None = None,
             moving_points: np.ndarray | None = None,
             mask: Image | None = None) -> tuple[Metrics, Image, Image | None, np.ndarray]:
    """Metrics of the transform `forward` (on the fixed grid) before and after.

    `mask` (on the fixed grid, nonzero inside) adds det J statistics inside it. Returns (metrics, warped image,
    warped labels or None, det J [I, J, K] on the field's grid).
    """
    if (fixed_labels is None) != (moving_labels is None):
        raise InputError("give both fixed and moving label maps, or neither")
    check_landmarks(fixed_points, moving_points, forward.grid)
    warped = apply_field(moving, forward)
    before_img = resample_image(moving, forward.grid)
    det = forward.jacobian_determinant()
    metrics = Metrics(M.jacobian_summary(det),
                      Similarity(M.ncc(fixed.data, before_img.data), M.mutual_information(fixed.data, before_img.data)),
                      Similarity(M.ncc(fixed.data, warped.data), M.mutual_information(fixed.data, warped.data)))
    if mask is not None:
        check_mask(mask, forward.grid)
        metrics.mask = M.jacobian_summary(det, mask.data != 0)
    warped_labels = None
    if fixed_labels is not None:
        metrics.jacobian_in_labels = M.jacobian_summary(det, fixed_labels.data > 0)
        warped_labels = apply_field(moving_labels, forward, order=0)
        before_labels = resample_image(moving_labels, forward.grid, order=0)
        labels = sorted(int(v) for v in np.union1d(np.unique(fixed_labels.data), np.unique(moving_labels.data)) if v)
        spacing = forward.grid.spacing
        change = M.volume_change(moving_labels.data, warped_labels.data, labels, moving_labels.grid.spacing, spacing)
        metrics.labels = LabelMetrics(overlap(fixed_labels.data, before_labels.data, spacing, labels),
                                      overlap(fixed_labels.data, warped_labels.data, spacing, labels),
                                      {str(k): v for k, v in change.items()})
    if fixed_points is not None:
        metrics.landmarks = LandmarkMetrics(M.tre_identity(fixed_points, moving_points).tolist(),
                                            M.tre(fixed_points, moving_points, forward.map_points).tolist())
    return metrics, warped, warped_labels, det
