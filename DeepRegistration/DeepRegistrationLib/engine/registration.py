"""The registration engine shared by every front end (command line, job runner, Slicer logic, benchmark).

From two images with any grids to a transform that is right in physical space:
preprocessing (canonical working grid, normalisation, optional pre-alignment) → network (optional instance
optimisation) → field on the fixed grid, its inverse, warped image, Jacobian and metrics (`evaluation.evaluate`).

Frames (docs/CONVENTIONS.md): the working grid W has RAS axes and `config.working_spacing` mm voxels covering the
fixed image. The moving image is resampled on W through the pre-alignment T (RAS 4×4, fixed point ↦ moving point),
the network maps working voxel x to x + u(x), and the complete transform is p ↦ T(p + A_W·u(W⁻¹p)).
"""

from __future__ import annotations

import copy
import time
from typing import Callable

import numpy as np
import torch

from ..core.errors import Cancelled, InputError, ResourceError, recorded_warnings, warn
from ..core.field import DisplacementField
from ..core.geometry import Grid
from ..core.image import Image
from ..core.resample import index_map, normalize_intensity, resample_array
from ..core.warp import identity_grid, integrate_velocity, resize_field, sample
from ..methods.models import load_model, trained_modalities
from ..methods.networks.base import RegistrationNetwork, RegistrationOutput
from .evaluation import check_landmarks, check_mask, check_overlap, evaluate
from .options import RegistrationOptions, check_options
from .resources import available_bytes, estimate_peak_bytes, resolve_device
from .results import RegistrationResult, RunInfo

Progress = Callable[[str, float], None]

MIN_SIZE = 4
"""Fewest voxels along any axis of an image the engine registers (central differences, surface distances)."""
MAX_WORKING_SPACING = 4.0
"""Coarsest working grid (mm) the memory fallback may choose before refusing."""


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


def _centre_of_mass(image: Image, normalised: np.ndarray) -> np.ndarray:
    weights = np.clip(normalised - 0.1, 0, None)
    if weights.sum() == 0:
        weights = np.ones_like(normalised)
    ijk = np.array([(weights.sum(axis=tuple(a for a in range(3) if a != ax)) * np.arange(n)).sum()
                    for ax, n in enumerate(weights.shape)]) / weights.sum()
    return image.grid.voxel_to_world(ijk)


def _check_image(image: Image, role: str) -> None:
    if image.data.ndim != 3:
        raise InputError(f"{image.source}: {role} image must be 3D, got shape {image.data.shape}")
    if np.issubdtype(image.data.dtype, np.floating) and not np.isfinite(image.data).all():
        raise InputError(f"{image.source}: {role} image has NaN or infinite voxels")
    if min(image.data.shape) < 2:
        raise InputError(f"{image.source}: {role} image has a dimension of size 1 ({image.data.shape}); need 3D")
    if min(image.data.shape) < MIN_SIZE:
        raise InputError(f"{image.source}: {role} image is too small ({image.data.shape} voxels); every axis needs at "
                         f"least {MIN_SIZE}")


def _peak_rss_bytes() -> int | None:
    """Peak resident memory of this process (None where the platform does not report it, e.g. Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Stages:
    """Times each stage and reports progress; raises Cancelled when asked to."""

    def __init__(self, progress: Progress | None, cancel: Callable[[], bool] | None) -> None:
        self.progress, self.cancel, self.times = progress, cancel, {}
        self._start, self._name = None, None

    def __call__(self, name: str, fraction: float) -> None:
        self.check()
        now = time.perf_counter()
        if self._name is not None:
            self.times[self._name] = self.times.get(self._name, 0.0) + now - self._start
        self._name, self._start = name, now
        if self.progress is not None:
            self.progress(name, fraction)

    def check(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled("registration cancelled")

    def finish(self) -> dict[str, float]:
        self("done", 1.0)
        return {k: round(v, 4) for k, v in self.times.items() if k != "done"}


def _instance_optimise(net: RegistrationNetwork, fixed: torch.Tensor, moving: torch.Tensor, steps: int,
                       stages: _Stages, lr: float = 1e-4) -> RegistrationOutput:
    """Fine-tune a copy of the network on this pair with its own loss (images only); the original is untouched."""
    tuned = copy.deepcopy(net)
    tuned.eval()  # keep normalisation statistics fixed
    optimiser = torch.optim.Adam(tuned.parameters(), lr=lr)
    batch = {"fixed": fixed, "moving": moving}
    for step in range(steps):
        stages.check()
        optimiser.zero_grad()
        loss = tuned.loss(tuned(fixed, moving), batch)["total"]
        loss.backward()
        optimiser.step()
        if stages.progress is not None:
            stages.progress("instance optimisation", 0.3 + 0.4 * (step + 1) / steps)
    with torch.no_grad():
        return tuned(fixed, moving)


def _affine_to_ras(theta: np.ndarray, grid: Grid) -> np.ndarray:
    """Voxel-index affine [3, 4] on `grid` to the RAS 4×4 map fixed point ↦ moving point."""
    voxel = np.eye(4)
    voxel[:3, :] = theta
    return grid.affine @ voxel @ np.linalg.inv(grid.affine)


def _compose_ras(field_w: DisplacementField, pre: np.ndarray, target: Grid) -> DisplacementField:
    """Field on `target` of p ↦ pre(p + d_W(p)) given the working field d_W: pre(p) − p + R_pre·d_W(p)."""
    on_target = field_w.resampled(target)
    if np.allclose(pre, np.eye(4)):
        return on_target
    rotated = torch.einsum("ij,bjxyz->bixyz", torch.from_numpy(pre[:3, :3]).float(), on_target.tensor())
    d = index_map((pre - np.eye(4)) @ target.affine, target) + rotated
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


def _inverse(output: RegistrationOutput, net: RegistrationNetwork, field_w: DisplacementField, pre: np.ndarray,
             fixed: Grid) -> DisplacementField:
    """Inverse of the complete transform on the fixed grid: the working field's inverse, exact for diffeomorphic
    outputs without an affine part (integrate −v), otherwise by fixed-point iteration on the (coarse) working grid,
    followed by the inverse pre-alignment."""
    if output.velocity is None or output.affine is not None:
        inv_w = numerical_inverse(field_w)
    else:
        u_inv = resize_field(integrate_velocity(-output.velocity, net.config.int_steps), field_w.grid.shape)
        inv_w = DisplacementField.from_voxels(u_inv.float().cpu(), field_w.grid)
    # Moving point q ↦ p' = pre⁻¹(q) in working space ↦ p' + d_inv(p').
    return inv_w.after_affine(np.linalg.inv(pre), fixed)


def register(fixed: Image, moving: Image, options: RegistrationOptions | None = None, *,
             fixed_labels: Image | None = None, moving_labels: Image | None = None,
             fixed_points: np.ndarray | None = None, moving_points: np.ndarray | None = None,
             mask: Image | None = None, progress: Progress | None = None,
             cancel: Callable[[], bool] | None = None) -> RegistrationResult:
    """Register `moving` to `fixed` as `options` say (default `RegistrationOptions()`); see the module docstring.

    Labels (on their image's grid) and matched RAS landmarks [N, 3] only score the result; `mask` (on the fixed grid)
    adds det J statistics inside it. Raises InputError for bad input, ResourceError when the machine cannot run it,
    Cancelled when `cancel()` turns True. Options are checked first (`options.check_options`); the warnings issued
    on the way are listed in the result's `metrics.warnings` (and issued as usual).
    """
    with recorded_warnings() as messages:
        result = _register(fixed, moving, check_options(options or RegistrationOptions()), fixed_labels,
                           moving_labels, fixed_points, moving_points, mask, progress, cancel)
    result.metrics.warnings = messages
    return result


def _register(fixed: Image, moving: Image, options: RegistrationOptions, fixed_labels: Image | None,
              moving_labels: Image | None, fixed_points: np.ndarray | None, moving_points: np.ndarray | None,
              mask: Image | None, progress: Progress | None,
              cancel: Callable[[], bool] | None) -> RegistrationResult:
    stages = _Stages(progress, cancel)
    stages("preprocessing", 0.0)
    _check_image(fixed, "fixed")
    _check_image(moving, "moving")
    check_landmarks(fixed_points, moving_points, fixed.grid, moving.grid)
    if mask is not None:
        check_mask(mask, fixed.grid)
    if (fixed_labels is None) != (moving_labels is None):
        raise InputError("give both fixed and moving label maps, or neither")
    for labels, image in ((fixed_labels, fixed), (moving_labels, moving)):
        if labels is not None and not labels.grid.same_as(image.grid, tol=1e-3):
            raise InputError(f"{labels.source}: label map grid differs from its image {image.source}")
    torch.manual_seed(options.seed)
    dev = resolve_device(options.device)
    method = options.method
    net, meta = load_model(method, options.weights, options.parameters or None)
    modalities = (options.fixed_modality, options.moving_modality)
    trained = trained_modalities(meta)
    if trained is not None and trained != modalities:
        swap = " (swap fixed and moving)" if trained == modalities[::-1] else ""
        warn(f"the {method} model was trained on fixed {trained[0].upper()} / moving {trained[1].upper()} "
                      f"pairs, not fixed {modalities[0].upper()} / moving {modalities[1].upper()}{swap}: its "
                      "validation numbers do not describe this warp")
    fixed_n = normalize_intensity(fixed.data, options.fixed_modality, fixed.source)
    moving_n = normalize_intensity(moving.data, options.moving_modality, moving.source)

    pre = np.eye(4)
    if options.prealign == "moments":
        pre[:3, 3] = _centre_of_mass(moving, moving_n) - _centre_of_mass(fixed, fixed_n)
    elif options.prealign == "jad":
        if method == "jad":
            raise InputError("prealign 'jad' with method 'jad' is redundant; use prealign 'none'")
        pre = _jad_prealign(fixed, moving, fixed_n, moving_n, dev, stages)
    check_overlap(fixed, moving, pre)

    spacing = net.config.working_spacing
    grid_w = working_grid(fixed.grid, spacing, net.multiple)
    dev, grid_w = _fit_memory(net, dev, grid_w, fixed.grid, spacing)
    stages("resampling", 0.1)
    fixed_w = resample_array(fixed_n, fixed.grid, grid_w)
    moving_w = resample_array(moving_n, moving.grid, grid_w, transform=pre)
    ft = torch.from_numpy(fixed_w)[None, None]
    mt = torch.from_numpy(moving_w)[None, None]

    stages("network", 0.3)
    output, dev = _run(net, ft, mt, dev, options.instance_optimization, stages)
    stages("export", 0.7)
    disp = output.displacement.detach().float().cpu()
    field_w = DisplacementField.from_voxels(disp, grid_w)
    forward = _compose_ras(field_w, pre, fixed.grid)
    affine_ras = None
    if output.affine is not None:
        affine_ras = pre @ _affine_to_ras(output.affine[0].detach().double().cpu().numpy(), grid_w)
    inverse = _inverse(output, net, field_w, pre, fixed.grid)
    stages("metrics", 0.85)
    metrics, warped, warped_labels, det = evaluate(fixed, moving, forward, fixed_labels=fixed_labels,
                                                   moving_labels=moving_labels, fixed_points=fixed_points,
                                                   moving_points=moving_points, mask=mask)
    jacobian = Image(det.astype(np.float32), fixed.grid, "jacobian")
    peak = _peak_rss_bytes()
    metrics.run = RunInfo(options, meta.get("sha256"), str(dev), grid_w.shape, float(grid_w.spacing[0]),
                          None if peak is None else round(peak / 2**20, 1), {})
    if dev.type == "cuda":
        metrics.run.peak_gpu_memory_mb = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    metrics.run.time_s = stages.finish()
    metrics.run.time_s["total"] = round(sum(metrics.run.time_s.values()), 4)
    return RegistrationResult(forward, inverse, affine_ras, warped, jacobian, warped_labels, metrics)

def _jad_prealign(fixed: Image, moving: Image, fixed_n: np.ndarray, moving_n: np.ndarray, dev: torch.device,
                  stages: _Stages) -> np.ndarray:
    """The RAS affine (fixed point ↦ moving point) predicted by the shipped `jad` model."""
    stages("affine pre-alignment", 0.05)
    jad, _ = load_model("jad")
    grid_w = working_grid(fixed.grid, jad.config.working_spacing, jad.multiple)
    ft = torch.from_numpy(resample_array(fixed_n, fixed.grid, grid_w))[None, None].to(dev)
    mt = torch.from_numpy(resample_array(moving_n, moving.grid, grid_w))[None, None].to(dev)
    with torch.no_grad():
        theta = jad.to(dev)(ft, mt).affine
    return _affine_to_ras(theta[0].double().cpu().numpy(), grid_w)


def _fit_memory(net: RegistrationNetwork, dev: torch.device, grid_w: Grid, fixed: Grid,
                spacing: float) -> tuple[torch.device, Grid]:
    """Fall back to the CPU, then to coarser working grids, when the estimate exceeds free memory."""
    while True:
        need = estimate_peak_bytes(net, grid_w.shape, fixed.shape)
        free = available_bytes(dev)
        if need <= free:
            return dev, grid_w
        if dev.type != "cpu":
            warn(f"{dev}: estimated {need / 2**30:.1f} GiB exceeds free {free / 2**30:.1f} GiB; using the CPU")
            dev = torch.device("cpu")
            continue
        spacing *= 1.5
        if spacing > MAX_WORKING_SPACING:
            raise ResourceError(f"registration needs about {need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB are "
                                "free, even on the coarsest working grid")
        warn(f"estimated {need / 2**30:.1f} GiB exceeds free {free / 2**30:.1f} GiB; working grid "
                      f"coarsened to {spacing:.2f} mm")
        grid_w = working_grid(fixed, spacing, net.multiple)


def _run(net: RegistrationNetwork, ft: torch.Tensor, mt: torch.Tensor, dev: torch.device, steps: int,
         stages: _Stages) -> tuple[RegistrationOutput, torch.device]:
    """Run the network (and instance optimisation) on `dev`; a CUDA out-of-memory error retries on the CPU."""
    try:
        net = net.to(dev)
        f, m = ft.to(dev), mt.to(dev)
        if steps:
            return _instance_optimise(net, f, m, steps, stages), dev
        with torch.no_grad():
            return net(f, m), dev
    except torch.cuda.OutOfMemoryError:
        if dev.type != "cuda":
            raise
        torch.cuda.empty_cache()
        warn(f"{dev} ran out of memory; running on the CPU instead")
        return _run(net, ft, mt, torch.device("cpu"), steps, stages)

