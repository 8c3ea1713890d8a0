"""Evaluation metrics against analytic answers (DeepRegistrationLib.core.metrics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from DeepRegistrationLib.core import metrics, warp
from DeepRegistrationLib.core.field import DisplacementField
from DeepRegistrationLib.core.geometry import Grid

SPACING = np.array([1.0, 1.5, 2.0])
SHAPE = (40, 36, 30)


def ball(center_mm: np.ndarray, radius_mm: float, shape=SHAPE, spacing=SPACING) -> np.ndarray:
    """Boolean ball of `radius_mm` around `center_mm` (mm from voxel 0) on an axis-aligned grid."""
    mm = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1) * spacing
    return ((mm - center_mm) ** 2).sum(-1) < radius_mm**2


def centre(shape=SHAPE, spacing=SPACING) -> np.ndarray:
    return (np.array(shape) - 1) / 2 * spacing


def test_dice_identical_disjoint_and_absent_labels():
    a = np.zeros((10, 10, 10), dtype=np.int64)
    a[:5] = 1
    a[5:] = 2
    b = np.zeros_like(a)
    b[:5] = 2
    b[5:, :, :3] = 3
    assert metrics.dice_per_label(a, a) == {1: 1.0, 2: 1.0}
    assert metrics.mean_dice(a, a) == 1.0
    scores = metrics.dice_per_label(a, b)
    assert scores[1] == 0.0 and scores[2] == 0.0 and scores[3] == 0.0  # disjoint / present in one map only
    assert metrics.dice_per_label(a, b, labels=[1, 7]) == {1: 0.0}  # 7 absent from both: skipped
    half = a.copy()
    half[:5, 5:] = 0
    assert metrics.dice_per_label(a, half)[1] == pytest.approx(2 * 250 / (500 + 250))


@pytest.mark.parametrize("axis,steps", [(0, 4), (1, 3), (2, 2)])
def test_hd95_of_shifted_ball_anisotropic(axis, steps):
    """A ball shifted by whole voxels along one axis: Hausdorff = shift exactly; HD95 ≈ 0.95 × shift."""
    shift = np.zeros(3)
    shift[axis] = steps * SPACING[axis]
    d = shift[axis]
    a = ball(centre(), 12.0)
    b = ball(centre() + shift, 12.0)
    assert metrics.hausdorff_distance(a, b, SPACING) == pytest.approx(d, abs=1e-9)
    hd = metrics.hd95(a, b, SPACING)
    assert 0.85 * d <= hd <= d + 1e-9
    assert metrics.hd95(b, a, SPACING) == pytest.approx(hd)
    # Mean distance between a sphere and its shifted copy is d/2 in the continuum.
    assert 0.35 * d < metrics.assd(a, b, SPACING) < 0.6 * d


def test_surface_distances_identical_and_empty():
    a = ball(centre(), 10.0)
    empty = np.zeros_like(a)
    d_ab, d_ba = metrics.surface_distances(a, a, SPACING)
    assert d_ab.size > 0 and np.all(d_ab == 0) and np.all(d_ba == 0)
    assert metrics.assd(a, a, SPACING) == 0.0
    assert metrics.hd95(a, a, SPACING) == 0.0
    assert np.isnan(metrics.hd95(empty, empty, SPACING)) and np.isnan(metrics.assd(empty, empty, SPACING))
    assert metrics.hd95(a, empty, SPACING) == np.inf and metrics.assd(empty, a, SPACING) == np.inf


def test_surface_distance_uses_physical_spacing():
    """Two slabs along k (2 mm per voxel): facing faces 2 voxels = 4 mm apart, far faces 3 voxels = 6 mm."""
    a = np.zeros((8, 8, 12), dtype=bool)
    b = np.zeros_like(a)
    a[:, :, 2:4] = True
    b[:, :, 5:7] = True  # the facing faces (k = 3 and k = 5) are 2 voxels = 4 mm apart
    d_ab, _ = metrics.surface_distances(a, b, SPACING)
    assert d_ab.min() == pytest.approx(4.0)
    assert metrics.hausdorff_distance(a, b, SPACING) == pytest.approx(6.0)


def test_volume_change_of_scaled_ball():
    shape, spacing = (32, 32, 32), np.ones(3)
    before = ball(centre(shape, spacing), 8.0, shape, spacing).astype(np.int64) * 3
    after = ball(centre(shape, spacing), 10.0, shape, spacing).astype(np.int64) * 3
    tc = metrics.volume_change(before, after, [3])
    assert tc[3] == pytest.approx(1.25**3, rel=0.04)
    assert metrics.volume_change(before, before) == {3: 1.0}
    assert np.isnan(metrics.volume_change(before, after, [5])[5])
    assert metrics.mean_volume_change(before, after) == pytest.approx(tc[3])


def test_volume_change_across_grids_uses_voxel_volume():
    """The same 6 mm ball on a 1 mm and a (0.5, 1, 0.5) mm grid: TC ≈ 1 with spacings, ≈ 4 from raw counts."""
    coarse_sp, fine_sp = np.ones(3), np.array([0.5, 1.0, 0.5])
    before = ball(np.full(3, 10.0), 6.0, (21, 21, 21), coarse_sp).astype(np.int64)
    after = ball(np.full(3, 10.0), 6.0, (41, 21, 41), fine_sp).astype(np.int64)
    assert metrics.volume_change(before, after, [1], coarse_sp, fine_sp)[1] == pytest.approx(1.0, rel=0.03)
    assert metrics.volume_change(before, after, [1])[1] == pytest.approx(4.0, rel=0.03)


def test_jacobian_stats_on_handmade_map():
    det = np.ones((4, 5, 6))
    det[0, 0, :3] = [-1.0, 0.0, -0.5]
    det[3, 4, 5] = -2.0
    mask = np.zeros(det.shape, dtype=bool)
    mask[0] = True
    stats = metrics.jacobian_stats(det, mask)
    assert stats["count_nonpositive"] == 4 and stats["voxels"] == 120
    assert stats["fraction_nonpositive"] == pytest.approx(4 / 120)
    assert stats["percent_nonpositive"] == pytest.approx(100 * 4 / 120)
    assert stats["count_nonpositive_mask"] == 3 and stats["voxels_mask"] == 30
    assert stats["percent_nonpositive_mask"] == pytest.approx(10.0)
    assert "voxels_mask" not in metrics.jacobian_stats(det)


def test_sdlogj_definitions():
    assert metrics.sdlogj(np.full((8, 8, 8), 1.7)) == pytest.approx(0.0, abs=1e-12)
    assert metrics.sdlogj_learn2reg(np.full((8, 8, 8), 1.7)) == pytest.approx(0.0, abs=1e-12)
    det = np.ones((10, 10, 10))
    det[5:] = np.e
    assert metrics.sdlogj(det) == pytest.approx(0.5)
    mask = np.zeros(det.shape)
    mask[:5] = 1
    assert metrics.sdlogj(det, mask) == pytest.approx(0.0)
    # Learn2Reg: crop 2 voxels per face (i = 2..7: three at 1, three at e), std of log(det + 3) in equal halves.
    crop = det[2:-2, 2:-2, 2:-2]
    expected = np.std(np.log(crop + 3))
    assert metrics.sdlogj_learn2reg(det) == pytest.approx(expected)
    assert metrics.sdlogj_learn2reg(det) == pytest.approx((np.log(np.e + 3) - np.log(4)) / 2)
    # Values outside the crop do not count; folded voxels are clipped, not dropped.
    det[0] = -100.0
    assert metrics.sdlogj_learn2reg(det) == pytest.approx(expected)
    assert metrics.sdlogj(det) > 2.0


def test_sdlogj_learn2reg_on_a_field_matches_its_central_differences():
    """Inside the 2-voxel crop, warp.jacobian_determinant equals Learn2Reg's [-0.5, 0, 0.5] stencil with identity."""
    x = np.stack(np.meshgrid(*[np.arange(12.0)] * 3, indexing="ij"))
    disp = 0.05 * np.sin(x[[1, 2, 0]] / 2.0) * np.array([1.0, 2.0, 3.0])[:, None, None, None]
    det = warp.jacobian_determinant(torch.from_numpy(disp)[None])[0, 0].numpy()
    grads = [[np.gradient(disp[c], axis=r) for r in range(3)] for c in range(3)]
    jac = np.array(grads) + np.eye(3)[:, :, None, None, None]
    reference = np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))[2:-2, 2:-2, 2:-2]
    assert metrics.sdlogj_learn2reg(det) == pytest.approx(np.std(np.log(reference + 3)), rel=1e-6)


def oblique_grid() -> Grid:
    angle = 0.4
    rot = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    tilt = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(0.3), -np.sin(0.3)], [0.0, np.sin(0.3), np.cos(0.3)]])
    return Grid.from_spacing((20, 16, 12), (1.2, 0.8, 2.5), (-10.0, 5.0, 3.0), rot @ tilt)


def test_tre_of_constant_translation_on_oblique_grid():
    grid = oblique_grid()
    rng = np.random.default_rng(0)
    fixed = grid.voxel_to_world(rng.uniform(1, np.array(grid.shape) - 2, size=(7, 3)))
    t = np.array([3.0, -4.0, 12.0])
    moving = fixed + t
    disp = np.broadcast_to(t, (*grid.shape, 3))
    errors = metrics.tre(fixed, moving, DisplacementField(disp, grid).map_points)
    assert errors.shape == (7,)
    np.testing.assert_allclose(errors, 0.0, atol=1e-9)
    np.testing.assert_allclose(metrics.tre_identity(fixed, moving), 13.0)
    np.testing.assert_allclose(metrics.tre(fixed, moving, lambda p: p), 13.0)


def test_map_points_through_linear_field_is_exact():
    """Trilinear interpolation reproduces an affine RAS field d(p) = M p + b exactly inside the grid."""
    grid = oblique_grid()
    m = np.array([[0.02, -0.01, 0.03], [0.0, 0.05, -0.02], [0.01, 0.0, -0.04]])
    b = np.array([1.0, -2.0, 0.5])
    disp = grid.world_coordinates() @ m.T + b
    rng = np.random.default_rng(1)
    points = grid.voxel_to_world(rng.uniform(0, np.array(grid.shape) - 1, size=(50, 3)))
    field = DisplacementField(disp, grid)
    np.testing.assert_allclose(field.map_points(points), points + points @ m.T + b, atol=1e-9)
    outside = grid.voxel_to_world(np.array([[-5.0, 0.0, 0.0]]))  # clamped to the border voxel's displacement
    np.testing.assert_allclose(field.map_points(outside) - outside, disp[:1, 0, 0])


def test_similarity_metrics():
    rng = np.random.default_rng(0)
    x = np.stack(np.meshgrid(*[np.linspace(0, 1, 20)] * 3, indexing="ij"))
    a = np.sin(4 * x[0]) * np.cos(3 * x[1]) + x[2] + 0.05 * rng.standard_normal((20, 20, 20))
    noise = rng.standard_normal(a.shape)

    assert metrics.ncc(a, 2 * a + 1) == pytest.approx(1.0)
    assert metrics.ncc(a, -a) == pytest.approx(-1.0)
    assert abs(metrics.ncc(a, noise)) < 0.1
    mask = np.zeros(a.shape, dtype=bool)
    mask[:10] = True
    assert metrics.ncc(a, np.where(mask, 3 * a, noise), mask) == pytest.approx(1.0)

    mi_self = metrics.mutual_information(a, a)
    assert mi_self > 1.0 > metrics.mutual_information(a, noise) + 0.5
    assert metrics.mutual_information(a, a.max() + a.min() - a) == pytest.approx(mi_self, rel=1e-3)
    assert metrics.mutual_information(a, a, normalised=True) == pytest.approx(2.0)
    assert 1.0 <= metrics.mutual_information(a, noise, normalised=True) < 1.2

    assert metrics.ssim(a, a) == pytest.approx(1.0)
    assert metrics.ssim(a, a + 0.3 * noise) < metrics.ssim(a, a + 0.1 * noise) < 1.0


def test_surface_metrics_match_whole_array_distances():
    """Distances computed inside the masks' box equal the whole-array ones, masks touching the border included;
    `surface_metrics` gives the same HD95 and ASSD as the separate functions."""
    from scipy import ndimage

    rng = np.random.default_rng(4)
    a = ndimage.gaussian_filter(rng.random((20, 24, 18)), 2) > 0.5
    b = np.roll(a, 2, axis=1)
    a[0, 5:9, 3:6] = b[19, 0:4, 17] = True

    def whole(src, dst):
        s = src & ~ndimage.binary_erosion(src, border_value=0)
        t = dst & ~ndimage.binary_erosion(dst, border_value=0)
        return ndimage.distance_transform_edt(~t, sampling=SPACING)[s]

    d_ab, d_ba = metrics.surface_distances(a, b, SPACING)
    assert np.array_equal(d_ab, whole(a, b)) and np.array_equal(d_ba, whole(b, a))
    both = metrics.surface_metrics(a, b, SPACING)
    assert both == {"hd95": metrics.hd95(a, b, SPACING), "assd": metrics.assd(a, b, SPACING)}
