"""Spatial transformer, composition, integration and smoothing of voxel displacement fields.

Tensors are [B, C, I, J, K]; displacements [B, 3, I, J, K] in voxels, channel c along voxel axis c, mapping a fixed
voxel x to the moving voxel x + u(x). Every sampler uses `align_corners=True` (docs/CONVENTIONS.md §2-§5).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def identity_grid(shape: Sequence[int], device=None, dtype=torch.float32) -> Tensor:
    """Voxel coordinates of every voxel of a grid of `shape` (I, J, K), as a [1, 3, I, J, K] tensor."""
    axes = [torch.arange(s, device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


def _normalise(coords: Tensor, shape: Sequence[int]) -> Tensor:
    """Voxel coordinates [B, 3, ...] to grid_sample's [B, ..., 3] in (k, j, i) order, align_corners=True."""
    channels = []
    for c, size in enumerate(shape):
        scale = 2.0 / (size - 1) if size > 1 else 0.0
        channels.append(coords[:, c] * scale - (1.0 if size > 1 else 0.0))
    return torch.stack(channels[::-1], dim=-1)


def sample(image: Tensor, coords: Tensor, mode: str = "bilinear", padding_mode: str = "border") -> Tensor:
    """Sample `image` [B, C, I, J, K] at voxel coordinates `coords` [B, 3, I', J', K'] of its own grid.

    `mode` is "bilinear" (trilinear in 3D) or "nearest"; `padding_mode` "border" or "zeros".
    """
    if image.dim() != 5 or coords.dim() != 5 or coords.shape[1] != 3:
        raise ValueError(f"sample expects image [B,C,I,J,K] and coords [B,3,I,J,K], got {tuple(image.shape)}, "
                         f"{tuple(coords.shape)}")
    grid = _normalise(coords, image.shape[2:])
    if grid.shape[0] != image.shape[0]:
        grid = grid.expand(image.shape[0], *grid.shape[1:])
    return F.grid_sample(image, grid.to(image.dtype), mode=mode, padding_mode=padding_mode, align_corners=True)


def warp_image(image: Tensor, disp: Tensor, mode: str = "bilinear", padding_mode: str = "border") -> Tensor:
    """The moving image resampled into the fixed frame: warped(x) = image(x + disp(x)); same grid for both."""
    if image.shape[2:] != disp.shape[2:]:
        raise ValueError(f"image grid {tuple(image.shape[2:])} differs from field grid {tuple(disp.shape[2:])}")
    coords = identity_grid(disp.shape[2:], device=disp.device, dtype=disp.dtype) + disp
    return sample(image, coords, mode=mode, padding_mode=padding_mode)


def warp_labels(labels: Tensor, disp: Tensor, mode: str = "nearest") -> Tensor:
    """Warp an integer label map [B, 1, I, J, K].

    `mode="nearest"` takes the nearest voxel's label; `mode="onehot"` warps each label's indicator trilinearly and
    takes the most probable label (smoother boundaries). Outside the image, labels are background (0).
    """
    if mode == "nearest":
        warped = warp_image(labels.to(disp.dtype), disp, mode="nearest", padding_mode="zeros")
        return warped.round().to(labels.dtype)
    if mode != "onehot":
        raise ValueError(f"unknown label warp mode {mode!r}; use 'nearest' or 'onehot'")
    values = torch.unique(labels)
    if not bool((values == 0).any()):
        values = torch.cat([values.new_zeros(1), values])
    onehot = torch.cat([(labels == v).to(disp.dtype) for v in values], dim=1)
    warped = warp_image(onehot, disp, mode="bilinear", padding_mode="zeros")
    # Outside the image all indicators are 0; argmax then picks index 0, which is background.
    return values[warped.argmax(dim=1, keepdim=True)].to(labels.dtype)


def compose(a: Tensor, b: Tensor) -> Tensor:
    """Displacement of φ_a∘φ_b: x ↦ x + b(x) + a(x + b(x)). Warping by it equals warping by `a`, then by `b`."""
    return b + warp_image(a, b, padding_mode="border")


def integrate_velocity(velocity: Tensor, steps: int = 7) -> Tensor:
    """Scaling and squaring of a stationary velocity field (voxels): exp(v) as a displacement field.

    `steps` = 0 returns the velocity itself (a plain displacement). The inverse transform is
    `integrate_velocity(-velocity, steps)`.
    """
    disp = velocity / (2**steps)
    for _ in range(steps):
        disp = compose(disp, disp)
    return disp


def resize_field(disp: Tensor, shape: Sequence[int]) -> Tensor:
    """Resample a voxel displacement to a grid of `shape` covering the same field of view.

    Trilinear with align_corners=True; component c is rescaled by (N'_c − 1)/(N_c − 1) so that the physical
    displacement is kept.
    """
    old = disp.shape[2:]
    if tuple(old) == tuple(shape):
        return disp
    out = F.interpolate(disp, size=tuple(shape), mode="trilinear", align_corners=True)
    scale = [(n - 1) / (o - 1) if o > 1 else 1.0 for o, n in zip(old, shape)]
    return out * torch.tensor(scale, device=disp.device, dtype=disp.dtype).view(1, 3, 1, 1, 1)


def resize_image(image: Tensor, shape: Sequence[int]) -> Tensor:
    """Trilinear resize of an image [B, C, I, J, K] keeping its field of view (align_corners=True)."""
    if tuple(image.shape[2:]) == tuple(shape):
        return image
    return F.interpolate(image, size=tuple(shape), mode="trilinear", align_corners=True)


def affine_displacement(theta: Tensor, shape: Sequence[int]) -> Tensor:
    """Displacement of the voxel-index affine x ↦ A x + b given `theta` = [A | b] of shape [B, 3, 4]."""
    grid = identity_grid(shape, device=theta.device, dtype=theta.dtype)
    mapped = torch.einsum("bij,bjxyz->bixyz", theta[:, :, :3], grid.expand(theta.shape[0], -1, -1, -1, -1))
    return mapped + theta[:, :, 3].view(-1, 3, 1, 1, 1) - grid


def gaussian_kernel1d(sigma: float, kernel_size: int, device=None, dtype=torch.float32) -> Tensor:
    """Normalised 1D Gaussian of standard deviation `sigma` (voxels) and odd length `kernel_size`."""
    if kernel_size % 2 != 1 or sigma <= 0:
        raise ValueError(f"Gaussian needs sigma > 0 and an odd kernel size, got sigma={sigma}, size={kernel_size}")
    x = torch.arange(kernel_size, device=device, dtype=dtype) - kernel_size // 2
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_smooth(x: Tensor, sigma: float, kernel_size: int | None = None) -> Tensor:
    """Separable Gaussian smoothing of every channel of [B, C, I, J, K]; σ in voxels, replicate padding.

    `kernel_size` defaults to 2·ceil(3σ)+1.
    """
    if kernel_size is None:
        kernel_size = 2 * math.ceil(3 * sigma) + 1
    k = gaussian_kernel1d(sigma, kernel_size, device=x.device, dtype=x.dtype)
    channels = x.shape[1]
    half = kernel_size // 2
    out = x
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel_size
        weight = k.view(shape).expand(channels, 1, *shape[2:]).contiguous()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = half
        out = F.conv3d(F.pad(out, pad, mode="replicate"), weight, groups=channels)
    return out


class GaussianSmoothing(torch.nn.Module):
    """A fixed (non-trainable) Gaussian smoothing layer: σ in voxels, odd kernel size."""

    def __init__(self, sigma: float, kernel_size: int) -> None:
        super().__init__()
        gaussian_kernel1d(sigma, kernel_size)  # validates the arguments
        self.sigma = sigma
        self.kernel_size = kernel_size

    def forward(self, x: Tensor) -> Tensor:
        return gaussian_smooth(x, self.sigma, self.kernel_size)


def jacobian_determinant(disp: Tensor) -> Tensor:
    """det(∂φ/∂x) = det(I + ∂u/∂x) for a displacement [B, 3, I, J, K] (every axis at least 2 voxels), as
    [B, 1, I, J, K].

    Central differences inside, one-sided at the border. Works in voxel units; the determinant equals the physical
    one (docs/CONVENTIONS.md §6).
    """
    d0, d1, d2 = torch.gradient(disp, dim=(2, 3, 4))  # d_c[:, r] = ∂u_r/∂x_c

    def j(r: int, c: int) -> Tensor:
        g = (d0, d1, d2)[c][:, r]
        return g + 1 if r == c else g

    det = (
        j(0, 0) * (j(1, 1) * j(2, 2) - j(1, 2) * j(2, 1))
        - j(0, 1) * (j(1, 0) * j(2, 2) - j(1, 2) * j(2, 0))
        + j(0, 2) * (j(1, 0) * j(2, 1) - j(1, 1) * j(2, 0))
    )
    return det.unsqueeze(1)
