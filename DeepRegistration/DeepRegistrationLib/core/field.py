"""Physical displacement fields: conversion from network fields, application, ITK files (docs/CONVENTIONS.md §3, §7).

A `DisplacementField` holds `data` [I, J, K, 3] in RAS mm on a `Grid` (normally the fixed image's): the moving
point of fixed point p is p + d(p). ITK files hold the same field with LPS components.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from .errors import InputError
from .geometry import RAS_FROM_LPS, Grid
from .image import Image, atomic_path, check_gzip, suffix_of
from .resample import index_map, sample_with_fill, source_coordinates
from .warp import jacobian_determinant, sample

FIELD_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".h5", ".hdf5")


@dataclass
class DisplacementField:
    """RAS mm displacements `data` [I, J, K, 3] on `grid`, fixed point p ↦ moving point p + d(p)."""

    data: np.ndarray
    grid: Grid

    def __post_init__(self) -> None:
        if self.data.shape != (*self.grid.shape, 3):
            raise InputError(f"displacement array {self.data.shape} does not match grid {self.grid.shape} x 3")

    @classmethod
    def from_voxels(cls, disp: torch.Tensor, grid: Grid) -> "DisplacementField":
        """From a voxel displacement [1, 3, I, J, K] on `grid` (both images on that grid): d = A·u."""
        u = disp.detach().to("cpu", torch.float32)[0]
        d = torch.einsum("ij,jxyz->xyzi", torch.from_numpy(grid.affine[:3, :3]).float(), u)
        return cls(d.contiguous().numpy(), grid)

    def to_voxels(self) -> torch.Tensor:
        """The voxel displacement [1, 3, I, J, K] of this grid: u = A⁻¹·d (valid when moving shares the grid)."""
        inv = torch.from_numpy(np.linalg.inv(self.grid.affine[:3, :3])).float()
        d = torch.from_numpy(np.asarray(self.data, np.float32))
        return torch.einsum("ij,xyzj->ixyz", inv, d)[None].contiguous()

    def resampled(self, target: Grid) -> "DisplacementField":
        """The same transform sampled on another grid (trilinear; outside this grid the edge value is used)."""
        if self.grid.same_as(target, tol=1e-6):
            return self
        return self.after_affine(np.eye(4), target)

    def after_affine(self, transform: np.ndarray, target: Grid) -> "DisplacementField":
        """The field on `target` of q ↦ T(q) + d(T(q)): first the RAS 4×4 `transform` T, then this field (trilinear;
        outside this grid the edge value is used)."""
        # Border padding: target points outside this grid take the field's edge value.
        d = sample(self.tensor(), source_coordinates(self.grid, target, transform), mode="bilinear",
                   padding_mode="border")
        if not np.allclose(transform, np.eye(4)):
            d = d + index_map((transform - np.eye(4)) @ target.affine, target)
        return DisplacementField(d[0].permute(1, 2, 3, 0).contiguous().numpy(), target)

    def tensor(self) -> torch.Tensor:
        """The RAS mm components as a float32 tensor [1, 3, I, J, K] (a view where the data allows)."""
        return torch.from_numpy(np.asarray(self.data, np.float32)).permute(3, 0, 1, 2)[None]

    def map_points(self, points_ras: np.ndarray) -> np.ndarray:
        """Map fixed-space RAS points [N, 3] to moving space: p + d(p), d interpolated trilinearly (in float64) at
        `grid.world_to_voxel(p)`; points outside the grid take the nearest border value."""
        points_ras = np.asarray(points_ras, dtype=np.float64).reshape(-1, 3)
        ijk = self.grid.world_to_voxel(points_ras).T
        d = np.stack([ndimage.map_coordinates(self.data[..., c], ijk, output=np.float64, order=1, mode="nearest")
                      for c in range(3)], axis=-1)
        return points_ras + d

    def jacobian_determinant(self) -> np.ndarray:
        """det(I + ∂d/∂p) on the grid, [I, J, K] (equal to the voxel-space determinant, §6)."""
        return jacobian_determinant(self.to_voxels())[0, 0].numpy()


def field_to_sitk(field: DisplacementField, dtype: type = np.float64) -> sitk.Image:
    """A SimpleITK vector image (LPS components, `dtype` pixels) holding `field`."""
    lps = field.data.astype(dtype)
    lps *= np.diag(RAS_FROM_LPS).astype(dtype)  # flips the x and y components
    img = sitk.GetImageFromArray(np.ascontiguousarray(lps.transpose(2, 1, 0, 3)), isVector=True)
    origin, spacing, direction = field.grid.to_lps()
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetSpacing(tuple(float(v) for v in spacing))
    img.SetDirection(tuple(float(v) for v in direction.flatten()))
    return img


def sitk_to_field(img: sitk.Image, source: str) -> DisplacementField:
    """A SimpleITK 3-component vector image (LPS) to a `DisplacementField` (RAS)."""
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 3:
        raise InputError(f"{source}: expected a 3D field with 3 components per voxel, got {img.GetDimension()}D with "
                         f"{img.GetNumberOfComponentsPerPixel()} components")
    ras = sitk.GetArrayFromImage(img).transpose(2, 1, 0, 3).astype(np.float32)
    ras *= np.diag(RAS_FROM_LPS).astype(np.float32)
    grid = Grid.from_lps(img.GetSize(), img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    return DisplacementField(ras, grid)


def write_itk_displacement(field: DisplacementField, path: str | os.PathLike) -> Path:
    """Write an ITK displacement field (LPS mm): a float32 `.nii.gz`/`.nii`/`.nrrd`/`.mha` vector image (the
    pixel type ANTs writes; half the bytes and write time of float64) or a float64 `.h5` transform (ITK's
    `DisplacementFieldTransform` holds doubles)."""
    path = Path(path)
    suffix = suffix_of(path)
    if suffix not in FIELD_SUFFIXES:
        raise InputError(f"{path}: unsupported field format {suffix!r}; use one of {', '.join(FIELD_SUFFIXES)}")
    with atomic_path(path) as tmp:
        if suffix in (".h5", ".hdf5"):
            sitk.WriteTransform(sitk.DisplacementFieldTransform(field_to_sitk(field)), str(tmp))
        else:
            sitk.WriteImage(field_to_sitk(field, np.float32), str(tmp), True)
    return path


def read_itk_displacement(path: str | os.PathLike) -> DisplacementField:
    """Read a field written by `write_itk_displacement`, ANTs or Elastix (vector image or `.h5` transform)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.name.lower().endswith(".gz"):
        check_gzip(path)
    try:
        if suffix_of(path) in (".h5", ".hdf5"):
            transform = sitk.ReadTransform(str(path))
            if transform.GetTransformEnum() == sitk.sitkComposite:
                transform = sitk.CompositeTransform(transform).GetNthTransform(0)
            img = sitk.DisplacementFieldTransform(transform).GetDisplacementField()
        else:
            img = sitk.ReadImage(str(path))
            if img.GetDimension() == 4 and img.GetNumberOfComponentsPerPixel() == 1 and img.GetSize()[3] == 3:
                img = sitk.Compose(*[img[:, :, :, c] for c in range(3)])
    except Exception as exc:
        words = " ".join(str(exc).split())
        raise InputError(f"{path}: cannot be read as a displacement field ({words[-200:]})") from None
    field = sitk_to_field(img, str(path))
    if suffix_of(path) in (".nii", ".nii.gz"):  # ITK's NIfTI reader turns NaN into 0: look at the voxels
        try:
            raw = np.asarray(nib.load(str(path)).dataobj)
        except Exception:  # what ITK read is what counts; nibabel only looks for NaN
            raw = field.data
        finite = np.isfinite(raw).all() if np.issubdtype(raw.dtype, np.floating) else True
    else:
        finite = True
    if not (finite and np.isfinite(field.data).all()):
        raise InputError(f"{path}: the displacement field has NaN or infinite values")
    return field


def apply_field(moving: Image, field: DisplacementField, *, order: int = 1, fill: float = 0.0) -> Image:
    """Resample `moving` onto the field's grid through the field: out(p) = moving(p + d(p)).

    Any moving grid works; `order` 1 trilinear, 0 nearest (labels); outside the moving image, `fill`, with ITK's
    half-voxel border rule (`resample.sample_with_fill`), so SimpleITK reproduces the result.
    """
    to_moving = torch.from_numpy(np.linalg.inv(moving.grid.affine)[:3, :3]).float()
    coords = source_coordinates(moving.grid, field.grid) + torch.einsum("ij,bjxyz->bixyz", to_moving, field.tensor())
    data = torch.from_numpy(np.ascontiguousarray(moving.data, dtype=np.float32))[None, None]
    out = sample_with_fill(data, coords, order=order, fill=fill)
    result = out[0, 0].numpy()
    if order == 0 and np.issubdtype(moving.data.dtype, np.integer):
        result = np.round(result).astype(moving.data.dtype)
    return Image(result, field.grid, moving.source)

