"""The engine's transform model and its conversion to physical fields on the fixed grid (docs/CONVENTIONS.md).

A registration estimates p ↦ T(p + A_G·u(G⁻¹p)): an affine T (RAS 4×4, fixed point ↦ moving point) after a
deformable part u, a voxel displacement on a RAS-aligned working grid G (A_G = G.affine[:3, :3]). When u = exp(v)
for a stationary velocity v, the inverse is exact: q ↦ T⁻¹(q) + A_G·exp(−v)(…).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.field import DisplacementField
from ..core.geometry import Grid
from ..core.resample import index_map
from ..core.warp import identity_grid, integrate_velocity, resize_field, sample


def working_grid(fixed: Grid, spacing: float, multiple: int) -> Grid:
    """RAS-aligned grid of isotropic `spacing` mm covering `fixed`, each size a multiple of `multiple`, centred."""
    corners = np.array([[i, j, k] for i in (0, fixed.shape[0] - 1) for j in (0, fixed.shape[1] - 1)
                        for k in (0, fixed.shape[2] - 1)], dtype=np.float64)
    world = fixed.voxel_to_world(corners)
    low, high = world.min(0), world.max(0)
    sizes = np.floor((high - low) / spacing).astype(int) + 1
    sizes = np.maximum(-(-sizes // multiple) * multiple, multiple)
    centre = (low + high) / 2
    origin = centre - (sizes - 1) / 2 * spacing
    return Grid.from_spacing(tuple(int(s) for s in sizes), (spacing,) * 3, tuple(origin), np.eye(3))


def affine_to_ras(theta: np.ndarray, grid: Grid) -> np.ndarray:
    """Voxel-index affine [3, 4] on `grid` to the RAS 4×4 map fixed point ↦ moving point."""
    voxel = np.eye(4)
    voxel[:3, :] = theta
    return grid.affine @ voxel @ np.linalg.inv(grid.affine)


def compose_ras(field_w: DisplacementField, affine: np.ndarray, target: Grid) -> DisplacementField:
    """Field on `target` of p ↦ T(p + d_W(p)) given the working field d_W: T(p) − p + R_T·d_W(p)."""
    on_target = field_w.resampled(target)
    if np.allclose(affine, np.eye(4)):
        return on_target
    rotated = torch.einsum("ij,bjxyz->bixyz", torch.from_numpy(affine[:3, :3]).float(), on_target.tensor())
    d = index_map((affine - np.eye(4)) @ target.affine, target) + rotated
    return DisplacementField(d[0].permute(1, 2, 3, 0).contiguous().numpy(), target)


def numerical_inverse(forward: DisplacementField, iterations: int = 30) -> DisplacementField:
    """Inverse by fixed-point iteration e(q) = −d(q + e(q)) on the same grid (converges where |∇d| < 1)."""
    grid = forward.grid
    to_voxels = torch.from_numpy(np.linalg.inv(grid.affine[:3, :3])).float()
    index = identity_grid(grid.shape)
    d = forward.tensor()
    e = -d
    for _ in range(iterations):
        coords = index + torch.einsum("ij,bjxyz->bixyz", to_voxels, e)
        e = -sample(d, coords, padding_mode="border")
    return DisplacementField(e[0].permute(1, 2, 3, 0).contiguous().numpy(), grid)


def velocity_on(velocity: torch.Tensor, source: Grid, target: Grid) -> torch.Tensor:
    """A voxel velocity [1, 3, ...] on a grid over `source`'s field of view (any size) as voxels of `target`
    (resampled in RAS mm; outside `source` the edge value)."""
    own = source.with_shape(tuple(velocity.shape[2:]))
    return DisplacementField.from_voxels(velocity.detach().float().cpu(), own).resampled(target).to_voxels()


@dataclass
class Estimate:
    """p ↦ T(p + A_G·u(G⁻¹p)): `affine` T (RAS 4×4), `displacement` u [1, 3, I, J, K] in voxels of `grid`, and
    `velocity` v (voxels of a grid over `grid`'s field of view, possibly coarser) with u = exp(v) by `int_steps`
    squarings when the deformable part is diffeomorphic. `has_affine`: T is a result of its own (written as
    affine.tfm), not only a pre-alignment."""

    affine: np.ndarray
    grid: Grid
    displacement: torch.Tensor
    velocity: torch.Tensor | None = None
    int_steps: int = 0
    has_affine: bool = False

    def forward(self, target: Grid) -> DisplacementField:
        """The complete transform as a physical field on `target`."""
        return compose_ras(DisplacementField.from_voxels(self.displacement.detach().float().cpu(), self.grid),
                           self.affine, target)

    def inverse(self, target: Grid) -> DisplacementField:
        """The inverse transform on `target` (moving point ↦ fixed point): exp(−v) when there is a velocity,
        else fixed-point iteration of u on the working grid; then T⁻¹ first."""
        if self.velocity is not None:
            u_inv = resize_field(integrate_velocity(-self.velocity.detach().float(), self.int_steps), self.grid.shape)
            inv_w = DisplacementField.from_voxels(u_inv.cpu(), self.grid)
        else:
            inv_w = numerical_inverse(DisplacementField.from_voxels(self.displacement.detach().float().cpu(),
                                                                    self.grid))
        # Moving point q ↦ p' = T⁻¹(q) in working space ↦ p' + d_inv(p').
        return inv_w.after_affine(np.linalg.inv(self.affine), target)
