"""Resampling volumes and fields between grids in physical (RAS mm) space, and intensity normalisation."""

from __future__ import annotations

import numpy as np
import torch

from .errors import InputError
from .geometry import Grid
from .image import Image
from .warp import sample


def index_map(matrix: np.ndarray, target: Grid) -> torch.Tensor:
    """The first three rows of the 4×4 `matrix` applied to every voxel index (i, j, k, 1) of `target`, as
    [1, 3, I, J, K] float32.

    Separable: row r is m_r0·i + m_r1·j + m_r2·k + m_r3, each axis term computed in float64 on its own axis, then
    broadcast-summed in float32 (no [I, J, K, 3] float64 index grid).
    """
    m = np.asarray(matrix, np.float64)
    axes = [torch.arange(n, dtype=torch.float64) for n in target.shape]
    out = torch.empty(1, 3, *target.shape)
    for r in range(3):
        ij = ((m[r, 0] * axes[0] + m[r, 3]).view(-1, 1, 1) + (m[r, 1] * axes[1]).view(1, -1, 1)).float()
        torch.add(ij, (m[r, 2] * axes[2]).float().view(1, 1, -1), out=out[0, r])
    return out


def source_coordinates(source: Grid, target: Grid, transform: np.ndarray | None = None) -> torch.Tensor:
    """Voxel coordinates in `source` of T(p) for every voxel centre p of `target`, as [1, 3, I, J, K] float32.

    `transform` T is a RAS 4×4 (target point ↦ source point; default the identity).
    """
    transform = np.eye(4) if transform is None else transform
    return index_map(np.linalg.inv(source.affine) @ transform @ target.affine, target)


def sample_with_fill(data: torch.Tensor, coords: torch.Tensor, *, order: int = 1, fill: float = 0.0) -> torch.Tensor:
    """Sample [1, C, I, J, K] at voxel `coords` [1, 3, ...] as ITK's resampler does.

    Inside the continuous index range [−0.5, N − 0.5] the border value extends the image; beyond it, `fill`.
    `order` 1 is trilinear, 0 nearest neighbour.
    """
    out = sample(data, coords, mode="bilinear" if order == 1 else "nearest", padding_mode="border")
    size = torch.tensor(data.shape[2:], dtype=coords.dtype).view(1, 3, *([1] * (coords.dim() - 2)))
    inside = ((coords >= -0.5) & (coords <= size - 0.5)).all(dim=1, keepdim=True)
    return torch.where(inside, out, torch.full_like(out, fill))


def resample_array(data: np.ndarray, source: Grid, target: Grid, *, order: int = 1, fill: float = 0.0,
                   transform: np.ndarray | None = None) -> np.ndarray:
    """Resample an array [I, J, K] or [I, J, K, C] from `source` onto `target`: out(p) = data(T(p)).

    `transform` T is a RAS 4×4 (target point ↦ source point, default the identity); `order` 1 is trilinear, 0
    nearest neighbour; outside `source`, voxels take `fill`.
    """
    if data.shape[:3] != source.shape:
        raise ValueError(f"array shape {data.shape} does not match grid {source.shape}")
    if transform is None and source.same_as(target, tol=1e-6):
        return data.copy()
    vector = data.ndim == 4
    t = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    t = t.permute(3, 0, 1, 2)[None] if vector else t[None, None]
    out = sample_with_fill(t, source_coordinates(source, target, transform), order=order, fill=fill)
    out = out[0].permute(1, 2, 3, 0) if vector else out[0, 0]
    result = out.numpy()
    if order == 0 and np.issubdtype(data.dtype, np.integer):
        result = np.round(result).astype(data.dtype)
    return result


def resample_image(image: Image, target: Grid, *, order: int = 1, fill: float = 0.0) -> Image:
    """`image` resampled onto `target` (labels: `order=0`)."""
    return Image(resample_array(image.data, image.grid, target, order=order, fill=fill), target, image.source)


CT_HU_KNOTS: tuple[tuple[float, float], ...] = ((-1000.0, 0.0), (0.0, 0.2), (100.0, 0.8), (2000.0, 1.0))
"""(HU, normalised value) knots of the CT map: piecewise linear, flat outside. 0–100 HU (CSF, grey and white
matter, soft tissue) take 60 % of the range, so the brain's 10–40 HU contrasts stay visible to the descriptors
beside air and bone (a linear [−1000, 2000] window leaves grey against white matter 0.004 apart)."""


def normalize_intensity(data: np.ndarray, modality: str, source: str = "<memory>") -> np.ndarray:
    """Map intensities to [0, 1] float32.

    "mr": linear between the 0.5th and 99.5th percentiles of the non-zero voxels, clipped.
    "ct": HU through `CT_HU_KNOTS` (air 0, water 0.2, brain ≈ 0.35–0.47, 100 HU 0.8, dense bone 1).
    A constant image is an InputError naming `source`.
    """
    data = np.asarray(data, dtype=np.float32)
    if modality == "ct":
        low, high = float(data.min()), float(data.max())
    elif modality == "mr":
        values = data[data != 0] if np.any(data != 0) else data
        low, high = np.percentile(values, [0.5, 99.5])
    else:
        raise InputError(f"unknown modality {modality!r}; use 'mr' or 'ct'")
    if not high > low:
        raise InputError(f"{source}: image is constant (intensity range {low}..{high}); nothing to register")
    if modality == "ct":
        hu, value = zip(*CT_HU_KNOTS)
        return np.interp(data, hu, value).astype(np.float32)
    return np.clip((data - low) / (high - low), 0.0, 1.0).astype(np.float32)
