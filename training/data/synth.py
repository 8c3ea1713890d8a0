"""Synthetic registration pairs with exact ground truth (torch, CPU, reproducible from a seed).

Frames and units (docs/CONVENTIONS.md): volumes are [1, C, I, J, K]; velocities and displacements are [1, 3, I, J, K]
in voxels of the (shared) grid, channel c along voxel axis c; `spacing` is the voxel size in mm along i, j, k.

Construction of every pair: draw a stationary velocity v, u = exp(v) (`warp.integrate_velocity(v)`) and
u⁻¹ = exp(−v). The fixed image is the original; the moving image is the original resampled by u⁻¹, i.e.
moving = original ∘ φ⁻¹. Then warp(moving, u) = original ∘ φ⁻¹ ∘ φ ≈ fixed, up to interpolation and the
discretisation of exp. `displacement` = u is the ground truth fixed→moving field: fixed voxel x corresponds to moving
voxel x + u(x), which is how landmarks are mapped. Intensity perturbations are drawn independently for fixed and
moving (after warping), so intensities never match exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from DeepRegistrationLib.core import warp

Seed = int | torch.Generator
Spacing = Sequence[float]

TISSUE_CLASSES: dict[int, str] = {0: "background", 1: "csf", 2: "gm", 3: "wm"}
"""Label id → tissue class of the ICBM152 tissue map (`fetch.TISSUE_TABLE`); pass others for other protocols."""

CONTRASTS: dict[str, dict[str, float]] = {
    # MR in arbitrary units on [0, 1]; CT in Hounsfield units.
    "t1": {"background": 0.0, "air": 0.0, "csf": 0.15, "gm": 0.5, "wm": 0.8, "bone": 0.1, "soft_tissue": 0.6,
           "fat": 0.95},
    "t2": {"background": 0.0, "air": 0.0, "csf": 0.95, "gm": 0.55, "wm": 0.35, "bone": 0.05, "soft_tissue": 0.4,
           "fat": 0.7},
    "ct": {"background": -1000.0, "air": -1000.0, "csf": 5.0, "gm": 40.0, "wm": 30.0, "bone": 1000.0,
           "soft_tissue": 40.0, "fat": -100.0},
}
_CONTRAST_NOISE = {"t1": (0.03, 0.02), "t2": (0.03, 0.02), "ct": (2.0, 4.0)}
"""Per-modality (class-mean jitter, noise standard deviation), in the modality's units."""


@dataclass
class SyntheticPair:
    """A pair on one grid with its ground truth; fields and landmarks in voxels of that grid."""

    fixed: Tensor  # [1, 1, I, J, K] float32
    moving: Tensor  # [1, 1, I, J, K] float32
    displacement: Tensor  # u: fixed voxel x ↦ moving voxel x + u(x), [1, 3, I, J, K]
    inverse: Tensor  # u⁻¹ = exp(−v): moving → fixed
    velocity: Tensor  # v, [1, 3, I, J, K]
    fixed_labels: Tensor | None = None  # [1, 1, I, J, K] int64
    moving_labels: Tensor | None = None  # fixed labels resampled by u⁻¹ (nearest)
    fixed_landmarks: Tensor | None = None  # [N, 3] voxel indices in the fixed image
    moving_landmarks: Tensor | None = None  # [N, 3] voxel positions x + u(x) in the moving image
    landmark_labels: Tensor | None = None  # [N] label id each landmark was drawn from


def make_generator(seed: Seed) -> torch.Generator:
    """A CPU generator from an int seed (or the generator itself)."""
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))


def _uniform(generator: torch.Generator, low: float, high: float, size: Sequence[int] = ()) -> Tensor:
    return low + (high - low) * torch.rand(tuple(size), generator=generator)


def _as_volume(x: Tensor) -> Tensor:
    """[I, J, K] or [1, C, I, J, K] → [1, C, I, J, K]."""
    if x.dim() == 3:
        return x[None, None]
    if x.dim() != 5 or x.shape[0] != 1:
        raise ValueError(f"expected a volume [I,J,K] or [1,C,I,J,K], got {tuple(x.shape)}")
    return x


def smooth_noise(shape: Sequence[int], spacing: Spacing, sigma_mm: float, generator: torch.Generator,
                 channels: int = 1) -> Tensor:
    """Smooth Gaussian noise [1, C, I, J, K] with correlation length about `sigma_mm`, scaled to max |n| = 1.

    White noise on a coarse lattice of node spacing `sigma_mm`, smoothed over one node and upsampled trilinearly
    (piecewise linear between lattice planes).
    """
    coarse = [max(2, math.ceil((n - 1) * s / sigma_mm) + 1) for n, s in zip(shape, spacing)]
    noise = warp.gaussian_smooth(torch.randn(1, channels, *coarse, generator=generator), 1.0)
    noise = warp.resize_image(noise, shape)
    return noise / noise.abs().amax().clamp_min(1e-12)


def random_linear_velocity(shape: Sequence[int], spacing: Spacing, generator: torch.Generator,
                           rotation_deg: float = 2.0, scale: float = 0.02, shear: float = 0.02,
                           translation_mm: float = 2.0) -> Tensor:
    """A linear velocity v(p) = L (p − c) + t (mm, c = grid centre) in voxels, [1, 3, I, J, K].

    Its exponential is an affine map (rotation up to `rotation_deg` per axis, log-scale up to `scale`, shear up to
    `shear`, translation up to `translation_mm` per axis), so the affine part shares the exact inverse exp(−v).
    """
    angles = torch.deg2rad(_uniform(generator, -rotation_deg, rotation_deg, (3,)))
    rot = torch.zeros(3, 3)
    rot[1, 2], rot[0, 2], rot[0, 1] = -angles[0], angles[1], -angles[2]
    rot = rot - rot.T
    shears = _uniform(generator, -shear, shear, (3,))
    sym = torch.zeros(3, 3)
    sym[0, 1], sym[0, 2], sym[1, 2] = shears
    sym = sym + sym.T
    lin_mm = rot + sym + torch.diag(_uniform(generator, -scale, scale, (3,)))
    t_mm = _uniform(generator, -translation_mm, translation_mm, (3,))
    s = torch.tensor([float(x) for x in spacing])
    lin_vox = lin_mm * s[None, :] / s[:, None]  # S⁻¹ L S
    centre = torch.tensor([(n - 1) / 2 for n in shape]).view(1, 3, 1, 1, 1)
    grid = warp.identity_grid(shape) - centre
    return torch.einsum("rc,bcijk->brijk", lin_vox, grid) + (t_mm / s).view(1, 3, 1, 1, 1)


def random_velocity(shape: Sequence[int], generator: torch.Generator, spacing: Spacing = (1.0, 1.0, 1.0),
                    magnitude_mm: float = 6.0, scales_mm: Sequence[float] = (12.0, 24.0, 48.0),
                    affine: bool = False, **affine_ranges: float) -> Tensor:
    """Multi-scale smooth stationary velocity [1, 3, I, J, K] in voxels.

    Sum of smooth noise at `scales_mm` with random weights, smoothed over 1 voxel, scaled so that its largest vector is `magnitude_mm`
    (exp(v) then displaces by about that much: the default 6 mm is typical inter-subject brain variation after
    affine alignment). `affine=True` adds `random_linear_velocity(**affine_ranges)`.
    """
    weights = _uniform(generator, 0.5, 1.0, (len(scales_mm),))
    field = sum(w * smooth_noise(shape, spacing, s, generator, channels=3) for w, s in zip(weights, scales_mm))
    field = warp.gaussian_smooth(field, 1.0)  # removes the lattice kinks of `smooth_noise`
    field = field * (magnitude_mm / field.norm(dim=1).amax().clamp_min(1e-12))
    velocity = field / torch.tensor([float(x) for x in spacing]).view(1, 3, 1, 1, 1)
    if affine:
        velocity = velocity + random_linear_velocity(shape, spacing, generator, **affine_ranges)
    return velocity


def robust_normalise(image: Tensor) -> Tensor:
    """Map [min, 99.9th percentile] to [0, 1] and clip."""
    flat = image.flatten()
    flat = flat[:: max(1, flat.numel() // 1_000_000)]
    low, high = flat.min(), torch.quantile(flat, 0.999)
    return ((image - low) / (high - low).clamp_min(1e-12)).clamp(0.0, 1.0)


def perturb_intensity(image: Tensor, generator: torch.Generator, spacing: Spacing = (1.0, 1.0, 1.0),
                      bias: float = 0.3, gamma_std: float = 0.2, noise_std: float = 0.04,
                      blur_mm: float = 1.0) -> Tensor:
    """Normalise to [0, 1], then random gamma, multiplicative bias field (±`bias` in log, 50 mm scale), Gaussian
    blur (σ up to `blur_mm`) and Gaussian noise (σ up to `noise_std`), clipped at 0. Returns [1, C, I, J, K].
    """
    x = robust_normalise(_as_volume(image).float())
    x = x ** torch.exp(gamma_std * torch.randn((), generator=generator))
    field = smooth_noise(x.shape[2:], spacing, 50.0, generator)
    x = x * torch.exp(bias * _uniform(generator, 0.0, 1.0) * field)
    sigma = float(_uniform(generator, 0.0, blur_mm)) / (sum(spacing) / 3)
    if sigma > 0.1:
        x = warp.gaussian_smooth(x, sigma)
    x = x + float(_uniform(generator, 0.0, noise_std)) * torch.randn(x.shape, generator=generator)
    return x.clamp_min(0.0)


def sample_landmarks(labels: Tensor, generator: torch.Generator, boundary_per_label: int = 4,
                     margin: int = 2) -> tuple[Tensor, Tensor]:
    """Voxel landmarks [N, 3] (integer indices, float) and their label ids [N].

    Per non-zero label: its voxel nearest the label's centroid, and `boundary_per_label` random boundary voxels
    (voxels of the label with a 26-neighbour of another label), all at least `margin` voxels inside the image.
    """
    vol = _as_volume(labels)[0, 0]
    inner = torch.zeros_like(vol, dtype=torch.bool)
    inner[margin:vol.shape[0] - margin, margin:vol.shape[1] - margin, margin:vol.shape[2] - margin] = True
    # A voxel is on a boundary when its 3×3×3 neighbourhood holds another label (one pass for all labels).
    v = vol[None, None].float()
    highest = F.max_pool3d(F.pad(v, (1,) * 6, mode="replicate"), 3, stride=1)[0, 0]
    lowest = -F.max_pool3d(F.pad(-v, (1,) * 6, mode="replicate"), 3, stride=1)[0, 0]
    on_boundary = (highest != vol) | (lowest != vol)
    points, ids = [], []
    for label in torch.unique(vol).tolist():
        if label == 0:
            continue
        mask = vol == label
        coords = torch.nonzero(mask & inner).float()
        if len(coords) == 0:
            continue
        centroid = torch.nonzero(mask).float().mean(0)
        chosen = [coords[(coords - centroid).norm(dim=1).argmin()]]
        boundary = torch.nonzero(mask & on_boundary & inner).float()
        if len(boundary):
            pick = torch.randperm(len(boundary), generator=generator)[:boundary_per_label]
            chosen.extend(boundary[pick])
        points.extend(chosen)
        ids.extend([label] * len(chosen))
    if not points:
        return torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64)
    return torch.stack(points), torch.tensor(ids, dtype=torch.int64)


def transform_points(points: Tensor, displacement: Tensor) -> Tensor:
    """Map voxel points [N, 3] through a field: x ↦ x + u(x), u trilinear (exact at integer points)."""
    coords = points.T.reshape(1, 3, -1, 1, 1).to(displacement.dtype)
    return points + warp.sample(displacement, coords, padding_mode="border").reshape(3, -1).T


def _pair(shape: Sequence[int], spacing: Spacing, generator: torch.Generator, labels: Tensor | None,
          render: Callable[[Tensor], tuple[Tensor, Tensor]], magnitude_mm: float, affine: bool,
          boundary_landmarks: int | None, velocity: Tensor | None = None) -> SyntheticPair:
    """Draw v (unless given: e.g. a field-bank warp, `fieldbank.FieldBank.velocity`), then render (fixed, moving)
    given u⁻¹ and attach labels and (unless `boundary_landmarks` is None, as in training, where they are not used)
    landmarks."""
    if velocity is None:
        velocity = random_velocity(shape, generator, spacing, magnitude_mm, affine=affine)
    displacement = warp.integrate_velocity(velocity)
    inverse = warp.integrate_velocity(-velocity)
    fixed, moving = render(inverse)
    pair = SyntheticPair(fixed.float(), moving.float(), displacement, inverse, velocity)
    if labels is not None:
        pair.fixed_labels = labels.long()
        pair.moving_labels = warp.warp_labels(pair.fixed_labels, inverse, mode="nearest")
    if labels is not None and boundary_landmarks is not None:
        points, ids = sample_landmarks(pair.fixed_labels, generator, boundary_landmarks)
        pair.fixed_landmarks, pair.landmark_labels = points, ids
        pair.moving_landmarks = transform_points(points, displacement)
    return pair


def known_warp_pair(image: Tensor, labels: Tensor | None = None, spacing: Spacing = (1.0, 1.0, 1.0),
                    seed: Seed = 0, magnitude_mm: float = 6.0, affine: bool = False, perturb_fixed: bool = True,
                    boundary_landmarks: int | None = 4, velocity: Tensor | None = None) -> SyntheticPair:
    """A real image and a random known warp of it: fixed = image, moving = image ∘ φ⁻¹ (see module docstring).

    Both get independent `perturb_intensity` (the fixed one only if `perturb_fixed`); landmarks need `labels`.
    """
    generator = make_generator(seed)
    image = _as_volume(image).float()
    labels = None if labels is None else _as_volume(labels)

    def render(inverse: Tensor) -> tuple[Tensor, Tensor]:
        fixed = perturb_intensity(image, generator, spacing) if perturb_fixed else image
        return fixed, perturb_intensity(warp.warp_image(image, inverse), generator, spacing)

    return _pair(image.shape[2:], spacing, generator, labels, render, magnitude_mm, affine, boundary_landmarks,
                 velocity)


def label_driven_image(labels: Tensor, generator: torch.Generator, spacing: Spacing = (1.0, 1.0, 1.0)) -> Tensor:
    """SynthMorph-style image [1, 1, I, J, K] on [0, 1]: per label a random mean U(0, 1) and texture σ U(0, 0.1),
    then random gamma, bias, blur and noise (`perturb_intensity`)."""
    vol = _as_volume(labels).long()
    n = int(vol.max()) + 1
    means, stds = torch.rand(n, generator=generator), 0.1 * torch.rand(n, generator=generator)
    image = means[vol] + stds[vol] * torch.randn(vol.shape, generator=generator)
    return perturb_intensity(image, generator, spacing)


def label_driven_pair(labels: Tensor, spacing: Spacing = (1.0, 1.0, 1.0), seed: Seed = 0,
                      magnitude_mm: float = 6.0, affine: bool = False, boundary_landmarks: int | None = 4,
                      velocity: Tensor | None = None) -> SyntheticPair:
    """Two independent label-driven images of one label map, the moving one warped by u⁻¹."""
    generator = make_generator(seed)
    labels = _as_volume(labels).long()

    def render(inverse: Tensor) -> tuple[Tensor, Tensor]:
        fixed = label_driven_image(labels, generator, spacing)
        return fixed, warp.warp_image(label_driven_image(labels, generator, spacing), inverse)

    return _pair(labels.shape[2:], spacing, generator, labels, render, magnitude_mm, affine, boundary_landmarks,
                 velocity)


def multimodal_contrast(labels: Tensor, modality: str, generator: Seed = 0,
                        classes: dict[int, str] | None = None, blur_voxels: float = 0.6) -> Tensor:
    """A `modality` ("t1", "t2", "ct") image [1, 1, I, J, K] of a tissue label map.

    `classes` maps label ids to tissue classes of `CONTRASTS` (default `TISSUE_CLASSES`). Class means follow the
    modality (T1: WM > GM > CSF; T2: CSF > GM > WM; CT in HU: bone 1000, GM 40, WM 30, CSF 5, air −1000), jittered
    per call (except background and air), then partial-volume blur and Gaussian noise. MR images are magnitudes on
    about [0, 1], CT in HU.
    """
    if modality not in CONTRASTS:
        raise ValueError(f"unknown modality {modality!r}; use one of {sorted(CONTRASTS)}")
    generator = make_generator(generator)
    classes = TISSUE_CLASSES if classes is None else classes
    vol = _as_volume(labels).long()
    present = set(torch.unique(vol).tolist())
    unknown = sorted(present - set(classes))
    if unknown:
        raise ValueError(f"label ids {unknown} have no tissue class; pass classes={{id: class}}")
    bad = sorted({c for c in classes.values()} - set(CONTRASTS[modality]))
    if bad:
        raise ValueError(f"unknown tissue classes {bad}; known: {sorted(CONTRASTS[modality])}")
    jitter, noise = _CONTRAST_NOISE[modality]
    lut = torch.zeros(max(max(classes), int(vol.max())) + 1)
    for label, tissue in classes.items():
        lut[label] = CONTRASTS[modality][tissue]
        if tissue not in ("background", "air"):
            lut[label] += jitter * float(torch.randn((), generator=generator))
    image = warp.gaussian_smooth(lut[vol], blur_voxels) if blur_voxels > 0 else lut[vol]
    image = image + noise * torch.randn(image.shape, generator=generator)
    return image if modality == "ct" else image.abs()  # MR magnitude images are non-negative


def multimodal_pair(labels: Tensor, spacing: Spacing = (1.0, 1.0, 1.0), seed: Seed = 0,
                    fixed_modality: str = "t1", moving_modality: str = "t2",
                    classes: dict[int, str] | None = None, magnitude_mm: float = 6.0, affine: bool = False,
                    boundary_landmarks: int | None = 4, velocity: Tensor | None = None) -> SyntheticPair:
    """One subject (a tissue label map) in two modalities, the moving one warped by u⁻¹."""
    generator = make_generator(seed)
    labels = _as_volume(labels).long()

    def render(inverse: Tensor) -> tuple[Tensor, Tensor]:
        fixed = multimodal_contrast(labels, fixed_modality, generator, classes)
        moving = multimodal_contrast(labels, moving_modality, generator, classes)
        return fixed, warp.warp_image(moving, inverse)

    return _pair(labels.shape[2:], spacing, generator, labels, render, magnitude_mm, affine, boundary_landmarks,
                 velocity)
