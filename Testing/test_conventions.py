"""Every rule of docs/CONVENTIONS.md, each with a test that fails when the rule is flipped."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepRegistrationLib.core import warp
from DeepRegistrationLib.engine.transforms import compose_ras
from DeepRegistrationLib.core.field import DisplacementField, apply_field, read_itk_displacement, write_itk_displacement
from DeepRegistrationLib.core.geometry import RAS_FROM_LPS, Grid
from DeepRegistrationLib.core.image import Image, image_to_sitk, read_image, write_image
from DeepRegistrationLib.core.resample import resample_image

from conftest import smooth_field


def rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


OBLIQUE = rotation(2, 20) @ rotation(0, -12)


def centred_grid(shape, spacing, direction, centre=(1.0, -2.0, 0.5)) -> Grid:
    """A grid whose middle voxel sits at `centre` (RAS mm)."""
    half = direction @ np.diag(spacing) @ ((np.array(shape) - 1) / 2)
    return Grid.from_spacing(shape, spacing, tuple(np.array(centre) - half), direction)


def oblique_grid(shape=(24, 20, 16), spacing=(1.2, 0.9, 1.7)) -> Grid:
    return centred_grid(shape, spacing, OBLIQUE)


def blob(points: np.ndarray) -> np.ndarray:
    """A smooth analytic function of RAS mm, with no symmetry that would hide an axis flip."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    return (np.exp(-((x - 3) ** 2 / 60 + (y + 2) ** 2 / 90 + (z - 1) ** 2 / 40)) + 0.02 * x + 0.01 * y).astype(
        np.float32)


def test_identity_warp_is_exact():
    img = torch.rand(1, 2, 7, 9, 11)
    out = warp.warp_image(img, torch.zeros(1, 3, 7, 9, 11))
    assert torch.allclose(out, img, atol=1e-5)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_translation_along_each_axis(axis):
    img = torch.rand(1, 1, 8, 9, 10)
    disp = torch.zeros(1, 3, 8, 9, 10)
    disp[:, axis] = 2.0
    out = warp.warp_image(img, disp)
    n = img.shape[2 + axis]
    assert torch.allclose(out.narrow(2 + axis, 0, n - 2), img.narrow(2 + axis, 2, n - 2), atol=1e-5)


def test_positive_displacement_samples_further_along_axis():
    ramp = warp.identity_grid((6, 6, 6))[:, :1]  # value = i
    disp = torch.zeros(1, 3, 6, 6, 6)
    disp[:, 0] = 1.5
    out = warp.warp_image(ramp, disp, padding_mode="border")
    # warped(x) = moving(x + u): sampling at i + 1.5 reads the value i + 1.5 inside the image.
    assert torch.allclose(out[0, 0, :4], ramp[0, 0, :4] + 1.5, atol=1e-5)


def test_known_translation_and_rotation_in_mm_oblique_anisotropic():
    fixed_grid = oblique_grid()
    moving_grid = centred_grid((34, 30, 32), (1.0, 1.3, 1.1), rotation(1, 15))
    r, t = rotation(2, 7), np.array([2.5, -1.5, 3.0])  # moving point q = R p + t (RAS mm)
    p = fixed_grid.world_coordinates()
    field = DisplacementField((p @ r.T + t - p).astype(np.float32), fixed_grid)
    moving = Image(blob(moving_grid.world_coordinates()), moving_grid)
    warped = apply_field(moving, field)
    expected = blob(p @ r.T + t)
    inside = np.all((moving_grid.world_to_voxel(p @ r.T + t) > 0.5)
                    & (moving_grid.world_to_voxel(p @ r.T + t) < np.array(moving_grid.shape) - 1.5), axis=-1)
    assert inside.mean() > 0.7
    assert np.abs(warped.data - expected)[inside].max() < 0.02
    # The same transform as a voxel field on the fixed grid, applied to the moving image resampled there.
    moving_on_fixed = resample_image(moving, fixed_grid)
    u = field.to_voxels()
    voxel_warp = warp.warp_image(torch.from_numpy(moving_on_fixed.data)[None, None], u)[0, 0].numpy()
    inner = inside & np.all(
        (fixed_grid.world_to_voxel(p) > 3) & (fixed_grid.world_to_voxel(p) < np.array(fixed_grid.shape) - 4), -1)
    assert np.abs(voxel_warp - expected)[inner].max() < 0.05
    assert np.allclose(DisplacementField.from_voxels(u, fixed_grid).data, field.data, atol=1e-4)


def test_affine_jacobian_equals_det():
    a = np.array([[1.1, 0.1, 0.0], [-0.05, 0.9, 0.2], [0.0, 0.1, 1.2]])
    theta = torch.tensor(np.concatenate([a, [[1.0], [-2.0], [0.5]]], axis=1), dtype=torch.float64)[None]
    disp = warp.affine_displacement(theta, (9, 10, 11))
    det = warp.jacobian_determinant(disp)
    assert torch.allclose(det, torch.full_like(det, float(np.linalg.det(a))), atol=1e-9)
    # Voxel (i, j, k) goes to A (i, j, k) + b, channel c along axis c.
    assert torch.allclose(disp[0, :, 2, 3, 4], torch.tensor(a @ [2, 3, 4] + [1.0, -2.0, 0.5] - [2, 3, 4]))
    # The physical Jacobian on an oblique anisotropic grid is the same determinant.
    grid = oblique_grid((9, 10, 11))
    field = DisplacementField.from_voxels(disp.float(), grid)
    assert np.allclose(field.jacobian_determinant(), np.linalg.det(a), atol=1e-4)


def test_composition_equals_sequential_warping():
    shape = (24, 24, 24)
    img = warp.gaussian_smooth(torch.rand(1, 1, *shape), 2.0)
    img = (img - img.min()) / (img.max() - img.min())
    a = warp.integrate_velocity(smooth_field(shape, 4.0, seed=1))
    b = warp.integrate_velocity(smooth_field(shape, 4.0, seed=2))
    b[:, 0] += 2.0
    sequential = warp.warp_image(warp.warp_image(img, a), b)
    composed = warp.warp_image(img, warp.compose(a, b))
    flipped = warp.warp_image(img, warp.compose(b, a))
    core = (slice(None), slice(None), slice(5, -5), slice(5, -5), slice(5, -5))
    err = (sequential - composed)[core].abs().max()
    assert err < 0.015
    assert (sequential - flipped)[core].abs().max() > 3 * err


def test_field_and_affine_compose_in_both_orders_on_another_grid():
    """The engine's pre-alignment compositions, against point mapping: p ↦ T(p + d(p)) (`compose_ras`, forward) and
    q ↦ T(q) + d(T(q)) (`after_affine`, inverse), from an oblique working grid onto a differently shaped one."""
    source = oblique_grid()
    target = centred_grid((14, 12, 10), (1.5, 1.6, 1.4), rotation(1, 25))
    d = DisplacementField.from_voxels(smooth_field(source.shape, 1.5, seed=4), source)
    t = np.eye(4)
    t[:3, :3] = rotation(2, 8) @ np.diag([1.05, 0.97, 1.0])
    t[:3, 3] = [2.0, -1.5, 1.0]
    p = target.world_coordinates().reshape(-1, 3)
    forward = compose_ras(d, t, target).data.reshape(-1, 3)
    assert np.abs(p + forward - ((d.map_points(p)) @ t[:3, :3].T + t[:3, 3])).max() < 1e-4
    tp = p @ t[:3, :3].T + t[:3, 3]
    inverse_order = d.after_affine(t, target).data.reshape(-1, 3)
    assert np.abs(p + inverse_order - d.map_points(tp)).max() < 1e-4
    assert np.abs(forward - inverse_order).max() > 0.1  # the two orders differ


def test_composition_order_with_integer_translation():
    a = smooth_field((12, 12, 12), 2.0, seed=5)
    t = torch.zeros(1, 3, 12, 12, 12)
    t[:, 0] = 2.0
    # compose(a, t)(x) = t + a(x + t): a read two voxels further along i, no interpolation involved.
    assert torch.allclose(warp.compose(a, t)[:, :, :-2], 2.0 * (torch.arange(3) == 0).view(1, 3, 1, 1, 1)
                          + a[:, :, 2:], atol=1e-5)


def test_zero_velocity_is_identity():
    assert torch.equal(warp.integrate_velocity(torch.zeros(1, 3, 6, 7, 8)), torch.zeros(1, 3, 6, 7, 8))


def test_integrated_inverse_composes_to_identity():
    shape = (24, 24, 24)
    v = smooth_field(shape, 2.0, seed=3)
    forward, inverse = warp.integrate_velocity(v), warp.integrate_velocity(-v)
    core = (slice(None), slice(None), slice(5, -5), slice(5, -5), slice(5, -5))
    for residual in (warp.compose(forward, inverse)[core], warp.compose(inverse, forward)[core]):
        assert residual.abs().max() < 0.2 and residual.abs().mean() < 0.01
    assert forward[core].abs().max() > 0.5
    assert warp.jacobian_determinant(forward).min() > 0


def test_resize_field_keeps_physical_displacement():
    grid = oblique_grid((9, 13, 17))
    disp = torch.zeros(1, 3, 9, 13, 17)
    disp[:, 0], disp[:, 1], disp[:, 2] = 1.0, -2.0, 0.5
    fine = grid.with_shape((17, 25, 33))
    resized = warp.resize_field(disp, fine.shape)
    assert torch.allclose(resized[0, :, 0, 0, 0], torch.tensor([2.0, -4.0, 1.0]))
    mm_coarse = DisplacementField.from_voxels(disp, grid).data[0, 0, 0]
    mm_fine = DisplacementField.from_voxels(resized, fine).data[0, 0, 0]
    assert np.allclose(mm_coarse, mm_fine, atol=1e-5)
    assert np.allclose(fine.voxel_to_world([16, 24, 32]), grid.voxel_to_world([8, 12, 16]))


def test_gradcheck_through_warp():
    img = torch.rand(1, 1, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    disp = (0.3 * torch.rand(1, 3, 4, 5, 6, dtype=torch.float64) + 0.13).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda i, d: warp.warp_image(i, d), (img, disp), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".h5"])
def test_exported_field_applied_by_simpleitk_matches_our_warp(tmp_path, suffix):
    fixed_grid = oblique_grid()
    moving_grid = centred_grid((32, 30, 26), (1.1, 1.0, 1.4), rotation(0, 10))
    moving = Image(blob(moving_grid.world_coordinates()), moving_grid)
    u = warp.integrate_velocity(smooth_field(fixed_grid.shape, 2.0, seed=4))
    field = DisplacementField.from_voxels(u, fixed_grid)
    field.data += np.array([1.0, -2.0, 0.5], dtype=np.float32)  # a translation no axis flip can hide
    path = write_itk_displacement(field, tmp_path / f"field{suffix}")
    ours = apply_field(moving, field).data

    if suffix == ".h5":
        transform = sitk.ReadTransform(str(path))
    else:
        transform = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64))
    fixed_ref = image_to_sitk(Image(np.zeros(fixed_grid.shape, np.float32), fixed_grid))
    theirs = sitk.Resample(image_to_sitk(moving), fixed_ref, transform, sitk.sitkLinear, 0.0)
    theirs = sitk.GetArrayFromImage(theirs).transpose(2, 1, 0)
    assert np.abs(theirs).max() > 0.1
    assert np.abs(ours - theirs).max() < 1e-3
    assert np.allclose(read_itk_displacement(path).data, field.data, atol=1e-5)


def test_ras_lps_roundtrip_matches_simpleitk(tmp_path):
    grid = oblique_grid()
    image = Image(blob(grid.world_coordinates()), grid)
    path = write_image(image, tmp_path / "oblique.nii.gz")
    # nibabel reads the NIfTI affine in RAS: it must equal our grid, proving the LPS↔RAS flip at the boundary.
    assert np.allclose(nib.load(str(path)).affine, grid.affine, atol=1e-4)
    itk = sitk.ReadImage(str(path))
    assert np.allclose(itk.GetOrigin(), RAS_FROM_LPS @ grid.origin, atol=1e-4)
    assert np.allclose(itk.TransformIndexToPhysicalPoint((3, 4, 5)), RAS_FROM_LPS @ grid.voxel_to_world([3, 4, 5]),
                       atol=1e-4)
    assert np.allclose(sitk.GetArrayFromImage(itk)[5, 4, 3], image.data[3, 4, 5])


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mgz", ".nii"])
def test_read_nrrd_and_nifti_agree(tmp_path, suffix):
    grid = oblique_grid()
    image = Image(blob(grid.world_coordinates()), grid)
    back = read_image(write_image(image, tmp_path / f"img{suffix}"))
    assert back.grid.shape == grid.shape
    assert np.allclose(back.grid.affine, grid.affine, atol=1e-4)
    assert np.allclose(back.data, image.data, atol=1e-6)


def test_oblique_nifti_survives_read_resample_write(tmp_path):
    grid = oblique_grid()
    path = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(blob(grid.world_coordinates()), grid.affine), str(path))
    image = read_image(path)
    assert np.allclose(image.grid.affine, grid.affine, atol=1e-4)
    iso = Grid.from_spacing((40, 40, 40), (0.8,) * 3, tuple(grid.origin - 4), np.eye(3))
    back = resample_image(resample_image(image, iso), grid)
    written = read_image(write_image(back, tmp_path / "out.nii.gz"))
    assert np.allclose(written.grid.affine, grid.affine, atol=1e-4)
    inner = (slice(3, -3),) * 3
    truth = blob(grid.world_coordinates())
    covered = np.all(np.abs(iso.world_to_voxel(grid.world_coordinates()) - 19.5) < 18.5, axis=-1)
    assert np.abs(written.data - truth)[inner][covered[inner]].max() < 0.04
