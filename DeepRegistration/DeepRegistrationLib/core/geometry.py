"""Voxel grids in RAS millimetres (docs/CONVENTIONS.md §1-§4)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])
"""Flips x and y: converts points, directions and vectors between LPS and RAS (its own inverse)."""


@dataclass(frozen=True)
class Grid:
    """A 3D voxel grid: `shape` (I, J, K) and `affine`, the 4×4 map from voxel index (i, j, k, 1) to RAS mm."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def __post_init__(self) -> None:
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise ValueError(f"grid affine must be a finite 4x4 matrix, got {affine!r}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise ValueError("grid affine is singular")
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"grid shape must be three positive sizes, got {self.shape}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "affine", affine)

    @classmethod
    def from_spacing(
        cls,
        shape: tuple[int, int, int],
        spacing: tuple[float, float, float],
        origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
        direction: np.ndarray | None = None,
    ) -> "Grid":
        """Grid from spacing (mm), origin (RAS mm, centre of voxel 0) and direction (columns = RAS unit axes)."""
        direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
        affine = np.eye(4)
        affine[:3, :3] = direction @ np.diag(spacing)
        affine[:3, 3] = origin
        return cls(tuple(shape), affine)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along i, j, k in mm."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        """3×3 matrix whose columns are the RAS unit vectors of the i, j, k axes."""
        return self.affine[:3, :3] / self.spacing

    @property
    def origin(self) -> np.ndarray:
        """RAS position (mm) of the centre of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """Voxel indices [..., 3] to RAS mm [..., 3]."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return np.einsum("ij,...j->...i", self.affine[:3, :3], ijk) + self.affine[:3, 3]

    def world_to_voxel(self, ras: np.ndarray) -> np.ndarray:
        """RAS mm [..., 3] to (fractional) voxel indices [..., 3]."""
        inv = np.linalg.inv(self.affine)
        ras = np.asarray(ras, dtype=np.float64)
        return np.einsum("ij,...j->...i", inv[:3, :3], ras) + inv[:3, 3]

    def world_coordinates(self) -> np.ndarray:
        """RAS mm of every voxel centre, shape (I, J, K, 3)."""
        ijk = np.stack(np.meshgrid(*[np.arange(s) for s in self.shape], indexing="ij"), axis=-1)
        return self.voxel_to_world(ijk)

    def same_as(self, other: "Grid", tol: float = 1e-4) -> bool:
        """True when both grids have the same shape and (within `tol` mm) the same affine."""
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=tol)

    def with_shape(self, shape: tuple[int, int, int]) -> "Grid":
        """The grid covering the same field of view (first and last voxel centres) with another shape.

        Matches `align_corners=True` resizing: voxel 0 and voxel N-1 keep their centres.
        """
        scale = np.array([(s - 1) / (n - 1) if n > 1 else 1.0 for s, n in zip(self.shape, shape)])
        affine = self.affine.copy()
        affine[:3, :3] = self.affine[:3, :3] @ np.diag(scale)
        return Grid(tuple(shape), affine)

    def to_lps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(origin, spacing, direction) in ITK's LPS convention."""
        return RAS_FROM_LPS @ self.origin, self.spacing, RAS_FROM_LPS @ self.direction

    @classmethod
    def from_lps(cls, shape, origin, spacing, direction) -> "Grid":
        """Grid from ITK's LPS origin, spacing and direction (row-major 3×3 or flat 9)."""
        direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
        return cls.from_spacing(
            tuple(shape), tuple(spacing), tuple(RAS_FROM_LPS @ np.asarray(origin)), RAS_FROM_LPS @ direction
        )


def isotropic_grid_like(grid: Grid, spacing: float) -> Grid:
    """A grid covering `grid`'s field of view with isotropic `spacing` (mm) and the same direction."""
    extent = (np.array(grid.shape) - 1) * grid.spacing
    shape = tuple(int(round(e / spacing)) + 1 for e in extent)
    return Grid.from_spacing(shape, (spacing,) * 3, tuple(grid.origin), grid.direction)
