"""Per-pair optimisation ("refinement"): a rigid → affine pre-alignment and a stationary velocity field, each
optimised with Adam on one image pair, coarse to fine.

Frames (docs/CONVENTIONS.md): every point is RAS mm. `optimise_affine` returns the RAS 4×4 T mapping a fixed
point to its moving point. `optimise_svf` returns a stationary velocity v in voxels of the caller's working grid W
(channel c along voxel axis c); its deformable part is u = exp(v) by scaling and squaring with
`RefineSettings.int_steps` steps on W, its exact inverse exp(−v), and the complete transform is
p ↦ T(p + A_W·u(W⁻¹p)), A_W = W.affine[:3, :3].

Inputs are intensity-normalised [0, 1] float32 arrays [I, J, K] on their own `Grid`s (any grids, oblique
included); masks lie on their image's grid, nonzero inside. Both functions report progress as
`progress(stage, fraction)` (fraction of the function's steps done, 0..1) and call `cancel()` before every step,
raising `errors.Cancelled` when it returns True.

Speed (docs/REFINEMENT.md): the velocity lives on a control grid of `control_mm` per level (never finer than the
level) and is integrated there; its displacement is upsampled trilinearly to the level grid, where the moving
image (or its MIND-SSC descriptor) is warped and compared with the fixed image's precomputed statistics inside the
box around the fixed foreground only.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from ..core.errors import Cancelled, InputError, RegistrationWarning
from ..core.geometry import Grid
from ..core.losses import bending_energy, gradient_loss
from ..core.mind import mind_ssc
from ..core.resample import resample_array
from ..core.warp import gaussian_smooth, integrate_velocity, resize_field, sample
from .refine_settings import RefineSettings

Progress = Callable[[str, float], None]
Cancel = Callable[[], bool]

FOREGROUND = 0.1
"""Normalised intensity above which a voxel is foreground (centre of mass, overlap check)."""
FINAL_LR = 0.05
"""Adam's step size at the end of each level, relative to its start (half-cosine decay)."""
FLAT_VARIANCE = 1e-4
"""Local intensity variance (normalised units², a standard deviation of 0.01) below which local NCC treats a
neighbourhood as flat."""

# ------------------------------------------------------------------------------------------------------ geometry


def level_grid(fixed_grid: Grid, spacing: float) -> Grid:
    """RAS-aligned grid of isotropic `spacing` mm covering every voxel centre of `fixed_grid`, centred on them."""
    corners = np.array([[i, j, k] for i in (0, fixed_grid.shape[0] - 1) for j in (0, fixed_grid.shape[1] - 1)
                        for k in (0, fixed_grid.shape[2] - 1)], dtype=np.float64)
    world = fixed_grid.voxel_to_world(corners)
    low, high = world.min(0), world.max(0)
    sizes = np.maximum(np.floor((high - low) / spacing).astype(int) + 1, 2)
    origin = (low + high) / 2 - (sizes - 1) / 2 * spacing
    return Grid.from_spacing(tuple(int(s) for s in sizes), (spacing,) * 3, tuple(origin), np.eye(3))


def _coarser(grid: Grid, spacing: float) -> Grid:
    """The grid over `grid`'s field of view (first and last voxel centres) with voxels of about `spacing` mm
    (never finer than `grid`), so that `warp.resize_field` converts voxel fields between the two."""
    extent = (np.array(grid.shape) - 1) * grid.spacing
    shape = tuple(min(n, max(2, int(round(e / spacing)) + 1)) for n, e in zip(grid.shape, extent))
    return grid.with_shape(shape)


def _resampled(data: np.ndarray, source: Grid, target: Grid, transform: np.ndarray | None = None,
               smooth: bool = True) -> np.ndarray:
    """`data` on `source` resampled trilinearly onto `target` through the RAS 4×4 `transform` (target point ↦
    source point; outside `source` 0), Gaussian pre-blurred (FWHM matching) when `smooth` and `target` is coarser."""
    if smooth:
        sigma = np.sqrt(np.clip(target.spacing.mean() ** 2 - source.spacing**2, 0, None)) / 2.355 / source.spacing
        if np.any(sigma > 0.1):
            data = ndimage.gaussian_filter(data, sigma)
    return resample_array(np.asarray(data, np.float32), source, target, transform=transform)


def _volume(data: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(data, np.float32))[None, None].to(device)


def _check_volume(name: str, data: np.ndarray | None, grid: Grid) -> None:
    if data is None:
        return
    if not isinstance(data, np.ndarray) or data.shape != grid.shape:
        raise InputError(f"{name} must be an array of its grid's shape {grid.shape}, got "
                         f"{getattr(data, 'shape', type(data).__name__)}")
    if not np.isfinite(data).all():
        raise InputError(f"{name} has NaN or infinite voxels")


def _centre_and_radius(data: np.ndarray, grid: Grid, mask: np.ndarray | None) -> tuple[np.ndarray, float]:
    """Centre of mass (RAS mm) of the foreground intensity above `FOREGROUND` (inside `mask`) and its radius of
    gyration (mm); InputError when there is no foreground."""
    weights = np.clip(data - FOREGROUND, 0, None) * (1.0 if mask is None else (mask != 0))
    total = float(weights.sum())
    if total <= 0:
        raise InputError("an image has no foreground (no voxel above "
                         f"{FOREGROUND} of the normalised range{' inside its mask' if mask is not None else ''})")
    ijk = [np.arange(n, dtype=np.float64) for n in grid.shape]
    marginals = [weights.sum(axis=tuple(a for a in range(3) if a != ax)) for ax in range(3)]
    centre_ijk = np.array([(m * i).sum() for m, i in zip(marginals, ijk)]) / total
    second = np.array([(m * i**2).sum() for m, i in zip(marginals, ijk)]) / total - centre_ijk**2
    radius = float(np.sqrt(np.sum(second * grid.spacing**2)))  # exact for axis-aligned spacing, else close
    return grid.voxel_to_world(centre_ijk), max(radius, float(grid.spacing.max()))


def _step(cancel: Cancel | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("refinement cancelled")


# --------------------------------------------------------------------------------------------------- similarity


def _weighted_mean(x: Tensor, weight: Tensor | None) -> Tensor:
    if weight is None:
        return x.mean()
    weight = weight.expand_as(x)
    return (x * weight).sum() / weight.sum().clamp_min(1e-6)


def _ncc_loss(fixed: Tensor, moving: Tensor, weight: Tensor | None) -> Tensor:
    """1 − (weighted) Pearson correlation over all voxels (signed: an inverted match scores badly)."""
    df = fixed - _weighted_mean(fixed, weight)
    dm = moving - _weighted_mean(moving, weight)
    cov = _weighted_mean(df * dm, weight)
    return 1 - cov / torch.sqrt(_weighted_mean(df * df, weight) * _weighted_mean(dm * dm, weight) + 1e-8)


def _box_sums(x: Tensor, window: int) -> Tensor:
    """Mean over a cubic window of odd size `window`, zero padding, normalised by the full window volume (the
    result of `losses.box_mean`): per axis a cumulative sum and one difference, so the cost does not grow with
    the window (several times faster than the convolutions for windows of 5 and more)."""
    half = window // 2
    for dim in (2, 3, 4):
        n = x.shape[dim]
        pad = [0] * 6
        pad[2 * (4 - dim)], pad[2 * (4 - dim) + 1] = half + 1, half
        sums = torch.cumsum(F.pad(x, pad), dim=dim)
        x = (sums.narrow(dim, window, n) - sums.narrow(dim, 0, n)) / window
    return x


class _BoxMean(torch.autograd.Function):
    """`_box_sums` whose backward is itself: a symmetric, zero-padded box filter is self-adjoint."""

    @staticmethod
    def forward(ctx, x: Tensor, window: int) -> Tensor:
        ctx.window = window
        return _box_sums(x, window)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _box_sums(grad, ctx.window), None


class _LocalNCC:
    """1 − weighted mean of the squared local correlation cross² / (var_m · (var_f + `FLAT_VARIANCE`)) over
    `window`³ neighbourhoods; fixed-side box statistics precomputed once.

    The usual form cross² / (var_m · var_f + ε) is not maximised by the true match: ε rewards any warp that raises
    the moving image's local contrast, which drifts flat regions. Here the stabiliser touches only the fixed side
    (it down-weights neighbourhoods flat in the fixed image), and the result is invariant to the moving image's
    contrast but for `FLAT_VARIANCE`·1e-4 added to var_m (a relative bias below 1e-4 wherever the moving
    neighbourhood is not flat; a clamp instead would bias every flat neighbourhood). Intensities are centred on
    0.5 first (correlation ignores offsets), which keeps the box sums small and float32 exact enough.
    """

    def __init__(self, fixed: Tensor, window: int) -> None:
        self.fixed, self.window = fixed - 0.5, window
        self.mean_f = _box_sums(self.fixed, window)
        self.var_f = (_box_sums(self.fixed**2, window) - self.mean_f**2).clamp_min(0) + FLAT_VARIANCE

    def __call__(self, moving: Tensor, weight: Tensor | None) -> Tensor:
        moving = moving - 0.5
        stats = _BoxMean.apply(torch.cat([moving, moving * moving, moving * self.fixed], dim=1), self.window)
        mean_m, mean_mm, mean_mf = stats[:, 0:1], stats[:, 1:2], stats[:, 2:3]
        cross = mean_mf - mean_m * self.mean_f
        var_m = (mean_mm - mean_m**2).clamp_min(0) + FLAT_VARIANCE * 1e-4
        return 1 - _weighted_mean(cross * cross / (var_m * self.var_f), weight)


def _parzen(values: Tensor, bins: int) -> Tensor:
    """Gaussian Parzen weights [N, bins] (σ = one bin) of intensities on 0..1, each row summing to 1."""
    centres = torch.linspace(0, 1, bins, device=values.device, dtype=values.dtype)
    w = torch.exp(-0.5 * ((values.reshape(-1, 1).clamp(0, 1) - centres) * (bins - 1)) ** 2)
    return w / w.sum(dim=1, keepdim=True)


class _MutualInformation:
    """−normalised MI (H(F) + H(M)) / H(F, M) of a Parzen (soft) joint histogram of `bins`² bins (Studholme's
    form: plain MI rewards changes of the overlap, which biases an affine towards shrinking or growing); the fixed
    side's weights precomputed once."""

    def __init__(self, fixed: Tensor, bins: int) -> None:
        self.bins, self.fixed_weights = bins, _parzen(fixed, bins)

    def __call__(self, moving: Tensor, weight: Tensor | None) -> Tensor:
        wf = self.fixed_weights if weight is None else self.fixed_weights * weight.reshape(-1, 1)
        joint = wf.T @ _parzen(moving, self.bins)
        joint = joint / joint.sum().clamp_min(1e-12)
        entropy = lambda p: -(p * torch.log(p + 1e-10)).sum()  # noqa: E731
        return -(entropy(joint.sum(1)) + entropy(joint.sum(0))) / entropy(joint)


def _descriptor_loss(fixed: Tensor) -> Callable[[Tensor, Tensor | None], Tensor]:
    """Weighted mean squared difference of two MIND-SSC descriptors (fixed one given)."""
    return lambda moving, weight: _weighted_mean((moving - fixed) ** 2, weight)


# ------------------------------------------------------------------------------------------------------- affine


class _Adam:
    """Adam (β = 0.9, 0.999) whose step size falls from `lr` along a half cosine to `lr`·`FINAL_LR` over `steps`
    steps, so that each level ends settled rather than jittering by about one step.

    `shared`: one second-moment estimate per tensor (the mean of the squared gradient over its elements) instead of
    one per element. A velocity field needs it: per-element Adam moves every control point by about `lr` per step
    however small its gradient, so flat image regions, where the gradient is only interpolation noise, drift.
    `eps` is added to the root second moment; gradients far below it barely move the parameters.
    """

    def __init__(self, params: Sequence[Tensor], lr: float, steps: int, shared: bool = False,
                 eps: float = 1e-8) -> None:
        self.params, self.lr, self.steps, self.shared, self.eps = list(params), lr, max(1, steps), shared, eps
        self.first = [torch.zeros_like(p) for p in self.params]
        self.second = [p.new_zeros(()) if shared else torch.zeros_like(p) for p in self.params]
        self.taken = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.taken += 1
        progress = min(1.0, (self.taken - 1) / self.steps)
        lr = self.lr * (FINAL_LR + (1 - FINAL_LR) * 0.5 * (1 + math.cos(math.pi * progress)))
        correction1, correction2 = 1 - 0.9**self.taken, 1 - 0.999**self.taken
        for p, m, v in zip(self.params, self.first, self.second):
            g = p.grad
            m.mul_(0.9).add_(g, alpha=0.1)
            v.mul_(0.999).add_((g * g).mean() if self.shared else g * g, alpha=0.001)
            p.sub_(lr * (m / correction1) / (torch.sqrt(v / correction2) + self.eps))


class _AffineLevel:
    """One resolution of the affine stage: fixed voxels drawn once, the moving image on its own RAS grid."""

    def __init__(self, fixed: np.ndarray, fixed_grid: Grid, moving: np.ndarray, moving_grid: Grid, spacing: float,
                 settings: RefineSettings, multimodal: bool, fixed_mask: np.ndarray | None,
                 moving_mask: np.ndarray | None, generator: torch.Generator, device: torch.device) -> None:
        grid_f, self.grid_m = level_grid(fixed_grid, spacing), level_grid(moving_grid, spacing)
        f = torch.from_numpy(_resampled(fixed, fixed_grid, grid_f)).flatten()
        inside = torch.ones_like(f, dtype=torch.bool)
        if fixed_mask is not None:
            inside = torch.from_numpy(_resampled((fixed_mask != 0).astype(np.float32), fixed_grid, grid_f,
                                                 smooth=False)).flatten() > 0.5
        index = torch.nonzero(inside)[:, 0]
        if settings.affine_samples and len(index) > settings.affine_samples:
            index = index[torch.randperm(len(index), generator=generator)[: settings.affine_samples]]
        ijk = np.stack(np.unravel_index(index.numpy(), grid_f.shape), axis=1)
        self.points = torch.from_numpy(grid_f.voxel_to_world(ijk)).to(device)  # [N, 3] RAS mm, float64
        self.fixed = f[index].view(1, 1, -1, 1, 1).to(device)
        self.moving = _volume(_resampled(moving, moving_grid, self.grid_m), device)
        self.moving_mask = None if moving_mask is None else _volume(
            _resampled((moving_mask != 0).astype(np.float32), moving_grid, self.grid_m, smooth=False), device)
        self.to_moving = torch.from_numpy(np.linalg.inv(self.grid_m.affine)).to(device)
        self.compare = _MutualInformation(self.fixed, settings.mi_bins) if multimodal else (
            lambda m, w: _ncc_loss(self.fixed, m, w))

    def sampled(self, transform: Tensor) -> tuple[Tensor, Tensor | None]:
        """Moving intensities at T(points) [1, 1, N, 1, 1] (0 outside) and the moving mask there (or None)."""
        m = self.to_moving @ transform
        coords = (self.points @ m[:3, :3].T + m[:3, 3]).float().T.reshape(1, 3, -1, 1, 1)
        values = sample(self.moving, coords, padding_mode="zeros")
        mask = None if self.moving_mask is None else sample(self.moving_mask, coords, padding_mode="zeros")
        return values, mask

    def loss(self, transform: Tensor) -> Tensor:
        values, mask = self.sampled(transform)
        return self.compare(values, mask)

    def overlap(self, transform: Tensor) -> int:
        """Number of drawn fixed foreground voxels whose mapped point is moving foreground."""
        values, mask = self.sampled(transform)
        hit = (self.fixed > FOREGROUND) & (values > FOREGROUND)
        if mask is not None:
            hit &= mask > 0.5
        return int(hit.sum())


class _AffineParameters:
    """T(p) = R·S·(p − c_f) + c_m + t: rotation R = exp([ω]×) about the fixed centre of mass c_f, stretch
    S = exp(symmetric: log-scales and shears), translation t from the centre-of-mass offset c_m − c_f.

    Rotation and stretch parameters are stored times `radius` (mm), so one Adam step size in mm suits all.
    """

    def __init__(self, fixed_centre: np.ndarray, moving_centre: np.ndarray, radius: float,
                 device: torch.device) -> None:
        self.fixed_centre = torch.from_numpy(fixed_centre).to(device)
        self.moving_centre = torch.from_numpy(moving_centre).to(device)
        self.radius = radius
        self.rigid = torch.zeros(6, dtype=torch.float64, device=device, requires_grad=True)  # t (mm), ω·radius
        self.stretch = torch.zeros(6, dtype=torch.float64, device=device, requires_grad=True)  # log s, shear ·radius

    def matrix(self) -> Tensor:
        """The RAS 4×4 float64 T (fixed point ↦ moving point)."""
        w = self.rigid[3:] / self.radius
        s = self.stretch / self.radius
        zero = w.new_zeros(())
        skew = torch.stack([torch.stack([zero, -w[2], w[1]]), torch.stack([w[2], zero, -w[0]]),
                            torch.stack([-w[1], w[0], zero])])
        sym = torch.stack([torch.stack([s[0], s[3], s[4]]), torch.stack([s[3], s[1], s[5]]),
                           torch.stack([s[4], s[5], s[2]])])
        linear = torch.linalg.matrix_exp(skew) @ torch.linalg.matrix_exp(sym)
        offset = self.moving_centre + self.rigid[:3] - linear @ self.fixed_centre
        bottom = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64, device=w.device)
        return torch.cat([torch.cat([linear, offset[:, None]], dim=1), bottom])


def optimise_affine(fixed: np.ndarray, fixed_grid: Grid, moving: np.ndarray, moving_grid: Grid,
                    settings: RefineSettings, *, multimodal: bool, fixed_mask: np.ndarray | None = None,
                    moving_mask: np.ndarray | None = None, progress: Progress | None = None,
                    cancel: Cancel | None = None, device: str | torch.device = "cpu") -> np.ndarray:
    """The RAS 4×4 affine T (fixed point ↦ moving point) aligning `moving` to `fixed`.

    Centre-of-mass initialisation, then rigid (rotation about the fixed centre of mass, translation) and affine
    (plus log-scales and shears) Adam steps at each of `settings.affine_levels_mm`, coarse to fine; global NCC
    (monomodal) or Parzen mutual information (`multimodal`) on `settings.affine_samples` fixed voxels per level.
    `settings.affine` "off" returns the identity, "auto" returns it unless T scores better at the finest level.
    InputError when an image has no foreground or, after the rigid stage, no fixed foreground voxel maps onto
    moving foreground.
    """
    for name, data, grid in (("fixed image", fixed, fixed_grid), ("moving image", moving, moving_grid),
                             ("fixed mask", fixed_mask, fixed_grid), ("moving mask", moving_mask, moving_grid)):
        _check_volume(name, data, grid)
    if settings.affine == "off":
        return np.eye(4)
    device = torch.device(device)
    generator = torch.Generator().manual_seed(settings.seed)
    fixed_centre, radius = _centre_and_radius(fixed, fixed_grid, fixed_mask)
    moving_centre, _ = _centre_and_radius(moving, moving_grid, moving_mask)
    params = _AffineParameters(fixed_centre, moving_centre, radius, device)
    levels = [_AffineLevel(fixed, fixed_grid, moving, moving_grid, s, settings, multimodal, fixed_mask, moving_mask,
                           generator, device) for s in settings.affine_levels_mm]
    schedule = [("rigid", params.rigid, level, s, n)
                for level, s, n in zip(levels, settings.affine_levels_mm, settings.rigid_iterations)]
    schedule += [("affine", [params.rigid, params.stretch], level, s, n)
                 for level, s, n in zip(levels, settings.affine_levels_mm, settings.affine_iterations)]
    total, done = max(1, sum(n for *_, n in schedule)), 0
    for index, (name, tensors, level, spacing, steps) in enumerate(schedule):
        optimiser = _Adam(tensors if isinstance(tensors, list) else [tensors], settings.affine_lr, steps)
        for _ in range(steps):
            _step(cancel)
            optimiser.zero_grad()
            level.loss(params.matrix()).backward()
            optimiser.step()
            done += 1
            if progress is not None:
                progress(f"{name} {spacing:g} mm", done / total)
        if index == len(levels) - 1:  # the rigid stage is over
            _check_overlap(levels[-1], params)
    with torch.no_grad():
        transform = params.matrix()
        if settings.affine == "auto":
            identity = torch.eye(4, dtype=torch.float64, device=device)
            if levels[-1].loss(transform) >= levels[-1].loss(identity):
                return np.eye(4)
    return transform.cpu().numpy()


def _check_overlap(level: _AffineLevel, params: _AffineParameters) -> None:
    with torch.no_grad():
        if level.overlap(params.matrix()) == 0:
            raise InputError("after rigid alignment no fixed foreground voxel maps onto the moving foreground: the "
                             "images (or their masks) share no structure to register; check that they show the same "
                             "anatomy and that the masks cover it")


# -------------------------------------------------------------------------------------------------- deformable


@dataclass
class _DeformableLevel:
    """One resolution of the deformable stage: its image grid, the velocity's control grid and what is compared.

    The similarity is evaluated only in `crop`, the box of the level grid around the fixed foreground (with a
    margin for the similarity's neighbourhoods): background far from the anatomy holds no information but would
    cost most of the time. Fixed-side tensors are cropped; the moving features stay whole, to be sampled anywhere.
    """

    grid: Grid
    control: Grid
    crop: tuple[slice, slice, slice]
    index: Tensor  # [1, 3, ...] level-grid voxel coordinates of the crop's voxels
    moving_features: Tensor  # [1, C, ...] on `grid`: the moving image through T, or its MIND-SSC descriptor
    compare: Callable[[Tensor, Tensor | None], Tensor]  # (warped moving features in `crop`, weight) ↦ loss
    fixed_weight: Tensor | None  # in `crop`
    moving_weight: Tensor | None  # on `grid`
    int_steps: int
    overlaps: bool  # some fixed foreground voxel sees moving foreground (inside the masks)

    def similarity(self, disp: Tensor) -> Tensor:
        """Loss of the moving features warped by the level-grid voxel displacement `disp` [1, 3, ...] (whole
        grid), inside the crop and the masks."""
        coords = disp[(slice(None), slice(None), *self.crop)] + self.index
        weight = self.fixed_weight
        if self.moving_weight is not None:
            warped_mask = sample(self.moving_weight, coords, padding_mode="zeros")
            weight = warped_mask if weight is None else weight * warped_mask
        return self.compare(sample(self.moving_features, coords), weight)


def _crop_index(crop: tuple[slice, slice, slice], device: torch.device) -> Tensor:
    """Voxel coordinates [1, 3, ...] of the level grid inside `crop`."""
    axes = [torch.arange(c.start, c.stop, device=device, dtype=torch.float32) for c in crop]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)[None]


def _foreground_box(foreground: Tensor, margin: int) -> tuple[slice, slice, slice]:
    """The bounding box of the nonzero voxels of `foreground` [I, J, K], grown by `margin` voxels (the whole grid
    when there are none)."""
    shape = foreground.shape
    index = torch.nonzero(foreground)
    if len(index) == 0:
        return tuple(slice(0, n) for n in shape)
    low, high = index.min(0).values.tolist(), index.max(0).values.tolist()
    return tuple(slice(max(0, lo - margin), min(n, hi + margin + 1)) for lo, hi, n in zip(low, high, shape))


def _deformable_level(fixed: np.ndarray, fixed_grid: Grid, moving: np.ndarray, moving_grid: Grid,
                      transform: np.ndarray, spacing: float, control_mm: float, grid: Grid,
                      settings: RefineSettings, multimodal: bool, fixed_mask: np.ndarray | None,
                      moving_mask: np.ndarray | None, int_steps: int, device: torch.device) -> _DeformableLevel:
    level = _coarser(grid, spacing)
    control = _coarser(grid, max(spacing, control_mm))
    f = _volume(_resampled(fixed, fixed_grid, level), device)
    m = _volume(_resampled(moving, moving_grid, level, transform), device)
    if settings.image_sigma > 0:
        f, m = gaussian_smooth(f, settings.image_sigma), gaussian_smooth(m, settings.image_sigma)
    fixed_weight, moving_weight = (
        None if mask is None else _volume(_resampled((mask != 0).astype(np.float32), mask_grid, level, t,
                                                     smooth=False), device)
        for mask, mask_grid, t in ((fixed_mask, fixed_grid, None), (moving_mask, moving_grid, transform)))
    foreground = f > FOREGROUND
    if fixed_weight is not None:
        foreground &= fixed_weight > 0.5
    hit = foreground & (m > FOREGROUND)
    if moving_weight is not None:
        hit &= moving_weight > 0.5
    crop = _foreground_box(foreground[0, 0], settings.lncc_window + 2 * settings.mind_dilation + 2)
    region = (slice(None), slice(None), *crop)
    if multimodal and settings.multi_similarity == "mind":
        compare = _descriptor_loss(mind_ssc(f, settings.mind_radius, settings.mind_dilation)[region])
        m = mind_ssc(m, settings.mind_radius, settings.mind_dilation)
    elif multimodal:
        compare = _MutualInformation(f[region], settings.mi_bins)
    else:
        compare = _LocalNCC(f[region].contiguous(), settings.lncc_window)
    fixed_weight = None if fixed_weight is None else fixed_weight[region]
    return _DeformableLevel(level, control, crop, _crop_index(crop, device), m, compare, fixed_weight, moving_weight,
                            int_steps, bool(hit.any()))


class _Guidance:
    """w · mean over landmark pairs of |T(p + A_C·u(C⁻¹p)) − q|² (mm²), u the control-grid displacement."""

    def __init__(self, guidance: tuple[np.ndarray, np.ndarray], transform: np.ndarray, weight: float,
                 device: torch.device) -> None:
        fixed_points, moving_points = (np.asarray(g, np.float64) for g in guidance)
        if fixed_points.ndim != 2 or fixed_points.shape[1] != 3 or fixed_points.shape != moving_points.shape:
            raise InputError(f"guidance landmarks must be matched [N, 3] RAS arrays, got {fixed_points.shape} and "
                             f"{moving_points.shape}")
        self.fixed = fixed_points
        self.target = torch.from_numpy(moving_points).float().to(device)
        self.transform = torch.from_numpy(transform).float().to(device)
        self.weight = weight

    def __call__(self, disp: Tensor, control: Grid) -> Tensor:
        ijk = torch.from_numpy(control.world_to_voxel(self.fixed).T.copy()).float().to(disp.device)
        u = sample(disp, ijk.reshape(1, 3, -1, 1, 1))[0, :, :, 0, 0]  # [3, N] voxels of `control`
        to_mm = torch.from_numpy(control.affine[:3, :3]).float().to(disp.device)
        points = torch.from_numpy(self.fixed.T.copy()).float().to(disp.device) + to_mm @ u
        mapped = self.transform[:3, :3] @ points + self.transform[:3, 3:]
        return self.weight * ((mapped.T - self.target) ** 2).sum(dim=1).mean()


def _penalty(velocity: Tensor, spacing: Sequence[float], kind: str) -> Tensor:
    if kind == "bending":
        return bending_energy(velocity, spacing)
    return gradient_loss(velocity, "l2", spacing)


def optimise_svf(fixed: np.ndarray, fixed_grid: Grid, moving: np.ndarray, moving_grid: Grid,
                 affine_ras: np.ndarray, settings: RefineSettings, *, multimodal: bool, grid: Grid,
                 initial_velocity: Tensor | None = None, guidance: tuple[np.ndarray, np.ndarray] | None = None,
                 fixed_mask: np.ndarray | None = None, moving_mask: np.ndarray | None = None,
                 progress: Progress | None = None, cancel: Cancel | None = None,
                 device: str | torch.device = "cpu") -> Tensor:
    """Stationary velocity [1, 3, I, J, K] in voxels of `grid` (float32, on `device`) registering `moving`, seen
    through the pre-alignment `affine_ras` (RAS 4×4, fixed point ↦ moving point), to `fixed`.

    `grid` is the working grid W (as `level_grid` builds it) whose voxels the result is in; the levels
    `settings.levels_mm` cover W's field of view (none finer than W). Per level, Adam minimises
    similarity(fixed, moving ∘ (T∘(id + A·u))) + weight·penalty(v) + guidance, u = exp(v): local NCC (monomodal),
    or MIND-SSC or mutual information (`multimodal`), only inside `fixed_mask` and the warped `moving_mask`.
    `initial_velocity` (voxels of any grid over W's field of view, e.g. a network's velocity or displacement)
    starts the first level. `guidance` = (fixed RAS points [N, 3], moving RAS points [N, 3]): matched landmarks
    pulled together by the squared distance of the complete transform's image of each fixed point from its
    partner (mm², `settings.guidance_weight`). Deterministic on the CPU.
    """
    for name, data, g in (("fixed image", fixed, fixed_grid), ("moving image", moving, moving_grid),
                          ("fixed mask", fixed_mask, fixed_grid), ("moving mask", moving_mask, moving_grid)):
        _check_volume(name, data, g)
    affine_ras = np.asarray(affine_ras, np.float64)
    if affine_ras.shape != (4, 4) or not np.isfinite(affine_ras).all():
        raise InputError(f"affine_ras must be a finite 4x4 matrix, got shape {affine_ras.shape}")
    device = torch.device(device)
    pull = None if guidance is None else _Guidance(guidance, affine_ras, settings.guidance_weight, device)
    finest = float(grid.spacing.max())
    spacings = [max(s, finest) for s in settings.levels_mm]
    velocity = None if initial_velocity is None else initial_velocity.detach().float().to(device)
    total, done = max(1, sum(settings.iterations)), 0
    for spacing, control_mm, steps in zip(spacings, settings.control_mm, settings.iterations):
        halvings = int(round(math.log2(spacing / spacings[-1])))
        level = _deformable_level(fixed, fixed_grid, moving, moving_grid, affine_ras, spacing, control_mm, grid,
                                  settings, multimodal, fixed_mask, moving_mask,
                                  max(1, settings.int_steps - halvings), device)
        if done == 0 and not level.overlaps:
            raise InputError("through the pre-alignment no fixed foreground voxel sees moving foreground: the images "
                             "(or their masks) do not overlap; check the affine and the masks")
        if done == 0 and velocity is not None:
            velocity = _better_start(level, velocity)
        velocity = _optimise_level(level, f"deformable {spacing:g} mm", velocity, settings, pull, steps, done, total,
                                   progress, cancel)
        done += steps
    return resize_field(velocity, grid.shape)


def _objective(level: _DeformableLevel, velocity: Tensor, settings: RefineSettings, pull: _Guidance | None) -> Tensor:
    """The loss of `velocity` (voxels of `level.control`): similarity + weight·penalty (+ guidance)."""
    disp = integrate_velocity(velocity, level.int_steps)
    loss = level.similarity(resize_field(disp, level.grid.shape))
    loss = loss + settings.regulariser_weight * _penalty(velocity, level.control.spacing, settings.regulariser)
    return loss if pull is None else loss + pull(disp, level.control)


def _better_start(level: _DeformableLevel, velocity: Tensor) -> Tensor | None:
    """`velocity` (a network's, voxels of any grid over the level's field of view), or None (the identity) with a
    RegistrationWarning when the images match worse through it than without it on the first level: a network
    outside what it was trained for can start the refinement in a basin it does not leave. The similarity alone
    decides (a penalty would always favour the identity)."""
    with torch.no_grad():
        disp = integrate_velocity(resize_field(velocity, level.control.shape), level.int_steps)
        seeded = float(level.similarity(resize_field(disp, level.grid.shape)))
        identity = float(level.similarity(torch.zeros(1, 3, *level.grid.shape, device=disp.device)))
    if identity < seeded:
        warnings.warn(RegistrationWarning(
            f"the images match worse through the network's field than without it (similarity loss {seeded:.6g} vs "
            f"{identity:.6g}); the refinement starts from the identity instead"), stacklevel=3)
        return None
    return velocity


def _optimise_level(level: _DeformableLevel, name: str, velocity: Tensor | None, settings: RefineSettings,
                    pull: _Guidance | None, steps: int, done: int, total: int, progress: Progress | None,
                    cancel: Cancel | None) -> Tensor:
    """Adam on the control-grid velocity (stored in mm along the voxel axes); returns it in voxels of
    `level.control`."""
    device = level.moving_features.device
    spacing = torch.from_numpy(level.control.spacing).float().to(device).view(1, 3, 1, 1, 1)
    if velocity is None:
        velocity = torch.zeros(1, 3, *level.control.shape, device=device)
    param = (resize_field(velocity, level.control.shape) * spacing).requires_grad_(True)
    # A velocity gradient is a mean over the level's voxels: about 1e-6 per mm of velocity per control point
    # where the images disagree by a millimetre, so 1e-10 leaves real gradients alone and stills rounding noise.
    optimiser = _Adam([param], settings.lr, steps, shared=True, eps=1e-10)
    for step in range(steps):
        _step(cancel)
        optimiser.zero_grad()
        loss = _objective(level, param / spacing, settings, pull)
        loss.backward()
        optimiser.step()
        if progress is not None:
            progress(name, (done + step + 1) / total)
    return (param / spacing).detach()
