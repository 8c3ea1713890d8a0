"""Metrics of any transform (ours or another tool's) on a pair: regularity, similarity, overlap and landmark error.

"Before" is the moving image resampled on the fixed grid with the identity transform. Fields map fixed points to
moving points (docs/CONVENTIONS.md §3); distances are mm.
"""

from __future__ import annotations

import numpy as np

from ..core import metrics as M
from ..core.errors import InputError, warn
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


def _outside(points: np.ndarray, grid: Grid) -> tuple[list[int], float]:
    """Indices of the RAS `points` outside `grid` by more than half a voxel, and the largest distance (mm)."""
    ijk = grid.world_to_voxel(points)
    excess = np.maximum(-0.5 - ijk, 0) + np.maximum(ijk - (np.array(grid.shape) - 0.5), 0)
    outside = np.where(np.any(excess > 0, axis=1))[0]
    return outside.tolist(), float(np.max(np.linalg.norm(excess * grid.spacing, axis=1), initial=0.0))


def check_landmarks(fixed_points: np.ndarray | None, moving_points: np.ndarray | None, fixed: Grid,
                    moving: Grid | None = None) -> None:
    """Both or neither; matched [N, 3] arrays; fixed landmarks inside the fixed image and, given its grid, moving
    landmarks inside the moving image (InputError otherwise: points outside their image are almost always in
    another coordinate system, LPS read as RAS, or belong to another image)."""
    if (fixed_points is None) != (moving_points is None):
        raise InputError("give both fixed and moving landmarks, or neither")
    if fixed_points is None:
        return
    fixed_points, moving_points = np.asarray(fixed_points, float), np.asarray(moving_points, float)
    if fixed_points.shape != moving_points.shape or fixed_points.ndim != 2 or fixed_points.shape[1] != 3:
        raise InputError(f"landmarks must be matched [N, 3] arrays, got {fixed_points.shape} and "
                         f"{moving_points.shape}")
    if not (np.isfinite(fixed_points).all() and np.isfinite(moving_points).all()):
        raise InputError("landmarks have non-finite coordinates")
    outside, _ = _outside(fixed_points, fixed)
    if outside:
        raise InputError(f"fixed landmark(s) {outside} lie outside the fixed image")
    if moving is not None:
        outside, distance = _outside(moving_points, moving)
        if outside:
            raise InputError(f"moving landmark(s) {outside} lie outside the moving image (up to {distance:.1f} mm "
                             "beyond its edge); landmarks are RAS mm of their own image")


def _extent(grid: Grid) -> str:
    corners = np.array([[i, j, k] for i in (0, grid.shape[0] - 1) for j in (0, grid.shape[1] - 1)
                        for k in (0, grid.shape[2] - 1)], dtype=np.float64)
    world = grid.voxel_to_world(corners)
    low, high = world.min(0), world.max(0)
    return " × ".join(f"[{a:.0f}, {b:.0f}]" for a, b in zip(low, high)) + " mm RAS"


MIN_OVERLAP = 0.25
"""Below this fraction of the fixed field of view inside the moving image a registration warns."""


def overlap_fraction(fixed: Grid, moving: Grid, transform: np.ndarray | None = None) -> float:
    """Fraction of the fixed image's voxels (sampled on at most ~24³ of them) whose point, mapped by the RAS 4×4
    `transform` (fixed point ↦ moving point; identity by default), lies inside the moving image."""
    axes = [np.unique(np.linspace(0, n - 1, min(n, 24)).round()) for n in fixed.shape]
    ijk = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    world = fixed.voxel_to_world(ijk)
    if transform is not None:
        world = world @ transform[:3, :3].T + transform[:3, 3]
    inside = moving.world_to_voxel(world)
    ok = np.all((inside >= -0.5) & (inside <= np.array(moving.shape) - 0.5), axis=1)
    return float(ok.mean())


def check_overlap(fixed: Image, moving: Image, transform: np.ndarray | None = None) -> float:
    """InputError when the fields of view of `fixed` and `moving` (after `transform`) do not overlap at all, a
    warning when less than `MIN_OVERLAP` of the fixed one lies inside the moving one; returns the fraction."""
    fraction = overlap_fraction(fixed.grid, moving.grid, transform)
    where = f"fixed {_extent(fixed.grid)}, moving {_extent(moving.grid)}"
    if fraction == 0:
        raise InputError(f"{fixed.source} and {moving.source}: the fields of view do not overlap ({where}); check "
                         "the images' origins (or pre-align with prealign 'moments')")
    if fraction < MIN_OVERLAP:
        warn(f"{fixed.source} and {moving.source}: only {100 * fraction:.0f}% of the fixed field of view lies "
             f"inside the moving image ({where}); the result outside it is meaningless")
    return fraction


def check_mask(mask: Image, grid: Grid, role: str = "fixed") -> None:
    """A mask must lie on its (`role`) image's grid and contain at least one voxel (InputError otherwise)."""
    if not mask.grid.same_as(grid, tol=1e-3):
        raise InputError(f"{mask.source}: mask grid (shape {mask.grid.shape}) differs from the {role} image grid "
                         f"(shape {grid.shape})")
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
    check_landmarks(fixed_points, moving_points, forward.grid, moving.grid)
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
