"""Evaluation metrics in physical units on numpy arrays (convert torch tensors before calling).

Volumes are indexed [i, j, k]; `spacing` is the voxel size in mm along i, j, k (`geometry.Grid.spacing`; for an
oblique grid this is still the step along each index axis, which is what distance transforms need). Points are
RAS mm (docs/CONVENTIONS.md §1). Fields map fixed-space points to moving-space points (§3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

# --------------------------------------------------------------------------------------------------- overlap


def dice_per_label(a: np.ndarray, b: np.ndarray, labels: Sequence[int] | None = None) -> dict[int, float]:
    """Dice 2|A∩B| / (|A| + |B|) of each label of two integer label maps on one grid.

    `labels` defaults to the union of the nonzero labels of `a` and `b`. A label absent from both maps is skipped
    (left out of the result); a label present in only one map scores 0.0.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    if labels is None:
        labels = np.union1d(np.unique(a), np.unique(b))
        labels = labels[labels != 0]
    result: dict[int, float] = {}
    for label in labels:
        in_a, in_b = a == label, b == label
        total = int(in_a.sum()) + int(in_b.sum())
        if total == 0:
            continue
        result[int(label)] = 2.0 * float(np.logical_and(in_a, in_b).sum()) / total
    return result


def mean_dice(a: np.ndarray, b: np.ndarray, labels: Sequence[int] | None = None) -> float:
    """Mean of `dice_per_label` over the labels it scores (NaN when none is present)."""
    scores = list(dice_per_label(a, b, labels).values())
    return float(np.mean(scores)) if scores else float("nan")


# -------------------------------------------------------------------------------------------- surface distance


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: the mask minus its binary erosion (6-connected; voxels on the array border are boundary)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _union_box(a_mask: np.ndarray, b_mask: np.ndarray) -> tuple[slice, ...]:
    """Index box around both masks, one voxel wider on each side (clipped to the array), so that erosion inside
    it finds the same boundary as in the whole array."""
    found = np.nonzero(a_mask | b_mask)
    if not found[0].size:
        return tuple(slice(0, 0) for _ in a_mask.shape)
    return tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in found)


def surface_distances(
    a_mask: np.ndarray, b_mask: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (from each boundary voxel of A to B's boundary, from B's to A's).

    Boundaries are the masks minus their binary erosion; distances are Euclidean between voxel centres, measured
    with `scipy.ndimage.distance_transform_edt(sampling=spacing)`. When one mask is empty the other's distances
    are all `inf` and its own array is empty; two empty masks give two empty arrays.
    """
    a_mask, b_mask = np.asarray(a_mask, dtype=bool), np.asarray(b_mask, dtype=bool)
    if a_mask.shape != b_mask.shape:
        raise ValueError(f"masks differ in shape: {a_mask.shape} vs {b_mask.shape}")
    spacing = tuple(float(s) for s in spacing)
    box = _union_box(a_mask, b_mask)  # every boundary voxel and its nearest partner lie inside it
    a_surf, b_surf = _surface(a_mask[box]), _surface(b_mask[box])

    def directed(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        if not dst.any():
            return np.full(int(src.sum()), np.inf)
        return ndimage.distance_transform_edt(~dst, sampling=spacing)[src]

    return directed(a_surf, b_surf), directed(b_surf, a_surf)


def hausdorff_distance(
    a_mask: np.ndarray, b_mask: np.ndarray, spacing: Sequence[float], percentile: float = 100.0
) -> float:
    """Symmetric (percentile) Hausdorff distance in mm: max of the two directed `percentile`-th percentiles.

    With `d(A→B)` the distances from A's boundary voxels to B's boundary (`surface_distances`), the result is
    `max(P(d(A→B)), P(d(B→A)))`, P the percentile with numpy's linear interpolation. This is MONAI's
    `compute_hausdorff_distance(percentile=..., directed=False)` and the "robust Hausdorff" that Learn2Reg
    reports (there weighted by surface element area). NaN when both masks are empty, inf when exactly one is.
    """
    return _hausdorff(*surface_distances(a_mask, b_mask, spacing), percentile)


def _hausdorff(d_ab: np.ndarray, d_ba: np.ndarray, percentile: float) -> float:
    if d_ab.size == 0 and d_ba.size == 0:
        return float("nan")
    if d_ab.size == 0 or d_ba.size == 0:
        return float("inf")
    return float(max(np.percentile(d_ab, percentile), np.percentile(d_ba, percentile)))


def hd95(a_mask: np.ndarray, b_mask: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile Hausdorff distance in mm: `max(P95(d(A→B)), P95(d(B→A)))` (see `hausdorff_distance`).

    NaN when both masks are empty, inf when exactly one is.
    """
    return hausdorff_distance(a_mask, b_mask, spacing, 95.0)


def assd(a_mask: np.ndarray, b_mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance in mm: `(Σ d(A→B) + Σ d(B→A)) / (|∂A| + |∂B|)`.

    The mean of the pooled directed distances of `surface_distances`. NaN when both masks are empty, inf when
    exactly one is.
    """
    return _assd(*surface_distances(a_mask, b_mask, spacing))


def _assd(d_ab: np.ndarray, d_ba: np.ndarray) -> float:
    if d_ab.size == 0 and d_ba.size == 0:
        return float("nan")
    if d_ab.size == 0 or d_ba.size == 0:
        return float("inf")
    return float((d_ab.sum() + d_ba.sum()) / (d_ab.size + d_ba.size))


def surface_metrics(a_mask: np.ndarray, b_mask: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """`hd95` and `assd` (mm) of two masks from one computation of their surface distances."""
    d_ab, d_ba = surface_distances(a_mask, b_mask, spacing)
    return {"hd95": _hausdorff(d_ab, d_ba, 95.0), "assd": _assd(d_ab, d_ba)}


# ------------------------------------------------------------------------------------------------ volume change


def volume_change(
    before: np.ndarray,
    after: np.ndarray,
    labels: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    spacing_after: Sequence[float] | None = None,
) -> dict[int, float]:
    """Tissue change TC of each label: volume in `after` / volume in `before` (1 = volume preserved).

    The papers' TC (000 §4.2, 001 §4.2) is "the volume ratio of the two segmented images before and after the
    spatial transformation": `before` is the moving segmentation on the moving grid, `after` the warped moving
    segmentation on the fixed grid. Volumes are voxel counts × voxel volume (product of `spacing`, mm, for
    `before`; `spacing_after` for `after`, defaulting to `spacing`); without spacing both are voxel counts, so the
    two grids must then share a voxel size. `labels` defaults to the nonzero labels of `before`; a requested label
    absent from `before` gives NaN.
    """
    before, after = np.asarray(before), np.asarray(after)
    if labels is None:
        labels = np.unique(before)
        labels = labels[labels != 0]
    if spacing is None and spacing_after is not None:
        raise ValueError("spacing_after needs spacing (the voxel size of `before`)")
    voxel_before = float(np.prod(spacing)) if spacing is not None else 1.0
    voxel_after = float(np.prod(spacing_after)) if spacing_after is not None else voxel_before
    result: dict[int, float] = {}
    for label in labels:
        v_before = float((before == label).sum()) * voxel_before
        v_after = float((after == label).sum()) * voxel_after
        result[int(label)] = v_after / v_before if v_before > 0 else float("nan")
    return result


def mean_volume_change(
    before: np.ndarray,
    after: np.ndarray,
    labels: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    spacing_after: Sequence[float] | None = None,
) -> float:
    """The TC score of one registration: `volume_change` averaged over labels (ignoring NaN).

    The papers do not say how structures are combined; we average per-structure ratios, as Dice is averaged.
    """
    ratios = [r for r in volume_change(before, after, labels, spacing, spacing_after).values() if np.isfinite(r)]
    return float(np.mean(ratios)) if ratios else float("nan")


# ----------------------------------------------------------------------------------------------------- Jacobian


def jacobian_stats(det: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """Folding statistics of a Jacobian-determinant map (`warp.jacobian_determinant`, any shape).

    Returns `count_nonpositive` (voxels with det J ≤ 0), `voxels`, `fraction_nonpositive` (count / voxels) and
    `percent_nonpositive` (100 × fraction, the papers' |J_φ| ≤ 0 column), over the whole field; with a `mask` (same
    shape, nonzero = inside) also the same four keys with the suffix `_mask`, counted inside the mask.
    """
    det = np.asarray(det, dtype=np.float64)
    regions = {"": np.ones(det.shape, dtype=bool)}
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != det.shape:
            raise ValueError(f"mask shape {mask.shape} differs from det shape {det.shape}")
        regions["_mask"] = mask != 0
    stats: dict = {}
    for suffix, region in regions.items():
        voxels = int(region.sum())
        count = int((det[region] <= 0).sum())
        fraction = count / voxels if voxels else float("nan")
        stats["count_nonpositive" + suffix] = count
        stats["voxels" + suffix] = voxels
        stats["fraction_nonpositive" + suffix] = fraction
        stats["percent_nonpositive" + suffix] = 100.0 * fraction
    return stats


def _masked(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is None:
        return values.ravel()
    mask = np.asarray(mask)
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {mask.shape} differs from det shape {values.shape}")
    return values[mask != 0]


def sdlogj(det: np.ndarray, mask: np.ndarray | None = None, eps: float = 1e-9) -> float:
    """Standard deviation of log det J over the field (or inside `mask`), population std (ddof 0).

    det J is clipped below at `eps` before the log, so folded voxels (det ≤ 0) count as log(eps) ≈ −20.7: they
    stay in the statistic and raise it sharply rather than being dropped.
    """
    det = np.asarray(det, dtype=np.float64)
    return float(np.std(np.log(_masked(np.maximum(det, eps), mask))))


LEARN2REG_CROP = 2
"""Voxels cropped from every face by Learn2Reg's evaluation `jacobian_determinant` (`[2:-2, 2:-2, 2:-2]`)."""


def sdlogj_learn2reg(det: np.ndarray, mask: np.ndarray | None = None) -> float:
    """SDlogJ as the Learn2Reg evaluation script computes it, from a full-size det J map [I, J, K].

    Learn2Reg (github.com/MDL-UzL/L2R, evaluation.py) takes det J by central differences on the field cropped by
    2 voxels per face, then `std(log(clip(det J + 3, 1e-9, 1e9)))`, restricted to `mask[2:-2, 2:-2, 2:-2] != 0`
    when the task has masks. The `+ 3` offset is part of their script and of every SDlogJ they publish, so it is
    kept here. Inside that crop our `warp.jacobian_determinant` (central differences) equals theirs.
    """
    det = np.asarray(det, dtype=np.float64)
    if det.ndim != 3:
        raise ValueError(f"det must be [I, J, K], got shape {det.shape}")
    crop = (slice(LEARN2REG_CROP, -LEARN2REG_CROP),) * 3
    log_det = np.log(np.clip(det[crop] + 3.0, 1e-9, 1e9))
    return float(np.std(_masked(log_det, None if mask is None else np.asarray(mask)[crop])))


@dataclass
class JacobianSummary:
    """det J over a region: % of voxels with det J ≤ 0 (folding), their count, SDlogJ (ours and Learn2Reg's) and the
    range. The one place where det J is summarised (engine metrics, user masks, benchmark scores)."""

    percent_nonpositive: float
    voxels: int | None  # None where unknown (read back from a metrics.json that does not store it)
    sdlogj: float
    sdlogj_learn2reg: float
    min: float
    max: float


def jacobian_summary(det: np.ndarray, mask: np.ndarray | None = None) -> JacobianSummary:
    """`JacobianSummary` of a det J map [I, J, K] over the whole grid or inside `mask` (same shape, nonzero inside)."""
    det = np.asarray(det, dtype=np.float64)
    stats = jacobian_stats(det, mask)
    suffix = "" if mask is None else "_mask"
    inside = det.ravel() if mask is None else _masked(det, mask)
    empty = inside.size == 0
    return JacobianSummary(percent_nonpositive=stats["percent_nonpositive" + suffix], voxels=stats["voxels" + suffix],
                           sdlogj=float("nan") if empty else sdlogj(det, mask),
                           sdlogj_learn2reg=sdlogj_learn2reg(det, mask),
                           min=float("nan") if empty else float(inside.min()),
                           max=float("nan") if empty else float(inside.max()))


# ---------------------------------------------------------------------------------------------------- landmarks


def tre(
    fixed_points_ras: np.ndarray,
    moving_points_ras: np.ndarray,
    field_fn: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """Target registration error in mm per landmark: `|φ(p_fixed) − p_moving|`.

    `field_fn` maps fixed-space RAS points [N, 3] (mm) to moving space [N, 3] (the transform the engine provides,
    e.g. `DisplacementField(disp_ras, grid).map_points` of core/field.py).
    """
    fixed = np.asarray(fixed_points_ras, dtype=np.float64).reshape(-1, 3)
    moving = np.asarray(moving_points_ras, dtype=np.float64).reshape(-1, 3)
    if fixed.shape != moving.shape:
        raise ValueError(f"landmark sets differ in size: {fixed.shape} vs {moving.shape}")
    mapped = np.asarray(field_fn(fixed), dtype=np.float64).reshape(-1, 3)
    return np.linalg.norm(mapped - moving, axis=1)


def tre_identity(fixed_points_ras: np.ndarray, moving_points_ras: np.ndarray) -> np.ndarray:
    """TRE in mm per landmark before registration (identity transform): `|p_fixed − p_moving|`."""
    return tre(fixed_points_ras, moving_points_ras, lambda p: p)


# --------------------------------------------------------------------------------------------- image similarity


def ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Global normalised cross-correlation (Pearson r) of two images over all voxels or inside `mask`.

    In [−1, 1], unitless; NaN when either image is constant there.
    """
    a = _masked(np.asarray(a, dtype=np.float64), mask)
    b = _masked(np.asarray(b, dtype=np.float64), mask)
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def _bin_index(x: np.ndarray, bins: int) -> np.ndarray:
    """Index of each value's bin among `bins` equal-width bins spanning [min, max] (the maximum in the last bin)."""
    low, high = float(x.min()), float(x.max())
    if high <= low:
        return np.zeros(x.shape, np.intp)
    return np.minimum(((x - low) * (bins / (high - low))).astype(np.intp), bins - 1)


def mutual_information(
    a: np.ndarray, b: np.ndarray, bins: int = 32, mask: np.ndarray | None = None, normalised: bool = False
) -> float:
    """Histogram mutual information in nats, over all voxels or inside `mask`.

    The joint histogram has `bins` equal-width bins spanning each image's [min, max];
    MI = H(A) + H(B) − H(A, B). With `normalised`, Studholme's NMI = (H(A) + H(B)) / H(A, B) ∈ [1, 2] instead.
    """
    a = _masked(np.asarray(a, dtype=np.float64), mask)
    b = _masked(np.asarray(b, dtype=np.float64), mask)
    joint = np.bincount(_bin_index(a, bins) * bins + _bin_index(b, bins), minlength=bins * bins)
    p = joint.reshape(bins, bins) / joint.sum()

    def entropy(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    h_a, h_b, h_ab = entropy(p.sum(axis=1)), entropy(p.sum(axis=0)), entropy(p)
    if normalised:
        return (h_a + h_b) / h_ab if h_ab > 0 else float("nan")
    return h_a + h_b - h_ab


def ssim(a: np.ndarray, b: np.ndarray, data_range: float | None = None, window: int = 7) -> float:
    """Mean 3D structural similarity (Wang et al. 2004) with a cubic uniform window of `window` voxels.

    Local means, variances and covariance come from `scipy.ndimage.uniform_filter` (sample covariance, as
    scikit-image); K1 = 0.01, K2 = 0.03, L = `data_range` (default: max − min over both images). The SSIM map is
    averaged over the voxels whose whole window lies inside the volume (scikit-image's cropping).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if window % 2 != 1 or min(a.shape) < window:
        raise ValueError(f"window must be odd and no larger than the volume, got {window} for {a.shape}")
    if data_range is None:
        data_range = float(max(a.max(), b.max()) - min(a.min(), b.min()))
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    n = window**a.ndim
    cov_norm = n / (n - 1)

    def mean(x: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(x, size=window, mode="reflect")

    mu_a, mu_b = mean(a), mean(b)
    var_a = cov_norm * (mean(a * a) - mu_a * mu_a)
    var_b = cov_norm * (mean(b * b) - mu_b * mu_b)
    cov = cov_norm * (mean(a * b) - mu_a * mu_b)
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    pad = (window - 1) // 2
    return float(s[(slice(pad, -pad or None),) * a.ndim].mean())
