"""The registration engine shared by every front end (command line, job runner, Slicer logic, benchmark).

From two images with any grids to a transform that is right in physical space, in stages: preprocessing
(validation, intensity normalisation) → affine (the refinement's rigid → affine optimisation, or a pre-alignment)
→ network (`engine.network`; none for `optimise`) → refinement (`engine.refine`: a stationary velocity field
optimised on the pair, started from the network's) → export (field on the fixed grid and its inverse) → metrics
(`engine.evaluation`). The preset (`RegistrationOptions.preset`) chooses the refinement: "fast" has none.

Frames (docs/CONVENTIONS.md, `engine.transforms`): the complete transform is p ↦ T(p + A_G·u(G⁻¹p)) with T the
affine (RAS 4×4, fixed point ↦ moving point) and u a voxel displacement on a RAS working grid G covering the fixed
image (the network's grid, or the refinement's finest level).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from ..core.errors import Cancelled, InputError, recorded_warnings, warn
from ..core.field import DisplacementField
from ..core.geometry import Grid
from ..core.image import Image
from ..core.resample import normalize_intensity
from ..core.warp import integrate_velocity
from ..methods.models import load_model, trained_modalities
from ..methods.registry import get_method
from .evaluation import check_landmarks, check_mask, check_overlap, evaluate
from .network import jad_prealign, network_estimate
from .options import RegistrationOptions, check_options
from .refine import optimise_affine, optimise_svf
from .refine_settings import RefineSettings, preset_settings
from .resources import resolve_device
from .roles import roles_swapped
from .results import RegistrationResult, RunInfo
from .transforms import Estimate, compose_ras, velocity_on, working_grid

Progress = Callable[[str, float], None]

MIN_SIZE = 4
"""Fewest voxels along any axis of an image the engine registers (central differences, surface distances)."""


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

    def within(self, low: float, high: float) -> Progress:
        """A progress callback for a stage's own steps: its fraction 0..1 reported as `low`..`high` of the whole
        registration, under the step's own name (the timed stage does not change)."""
        def report(name: str, fraction: float) -> None:
            if self.progress is not None:
                self.progress(name, low + (high - low) * fraction)
        return report

    def finish(self) -> dict[str, float]:
        self("done", 1.0)
        return {k: round(v, 4) for k, v in self.times.items() if k != "done"}


def _check_inputs(fixed: Image, moving: Image, options: RegistrationOptions, fixed_labels: Image | None,
                  moving_labels: Image | None, fixed_points: np.ndarray | None, moving_points: np.ndarray | None,
                  guidance: tuple[np.ndarray, np.ndarray] | None, fixed_mask: Image | None,
                  moving_mask: Image | None) -> RefineSettings | None:
    """InputError for any bad input before compute is spent; returns the refinement settings of the preset."""
    _check_image(fixed, "fixed")
    _check_image(moving, "moving")
    spec = get_method(options.method)
    settings = preset_settings(options.preset, options.refinement)
    if not spec.is_network and settings is None:
        raise InputError(f"method {spec.name!r} is the refinement alone; use preset 'balanced' or 'accurate', "
                         "not 'fast'")
    if options.prealign != "none" and settings is not None and settings.affine != "off":
        raise InputError(f"pre-alignment {options.prealign!r} applies when there is no affine refinement (preset "
                         "'fast', or refinement affine=off); the balanced and accurate presets find the affine "
                         "themselves")
    check_landmarks(fixed_points, moving_points, fixed.grid, moving.grid)
    if guidance is not None:
        if settings is None:
            raise InputError("guidance landmarks steer the refinement; use preset 'balanced' or 'accurate'")
        check_landmarks(*guidance, fixed.grid, moving.grid)
    if fixed_mask is not None:
        check_mask(fixed_mask, fixed.grid)
    if moving_mask is not None:
        check_mask(moving_mask, moving.grid, "moving")
    if (fixed_labels is None) != (moving_labels is None):
        raise InputError("give both fixed and moving label maps, or neither")
    for labels, image in ((fixed_labels, fixed), (moving_labels, moving)):
        if labels is not None and not labels.grid.same_as(image.grid, tol=1e-3):
            raise InputError(f"{labels.source}: label map grid differs from its image {image.source}")
    return settings


def register(fixed: Image, moving: Image, options: RegistrationOptions | None = None, *,
             fixed_labels: Image | None = None, moving_labels: Image | None = None,
             fixed_points: np.ndarray | None = None, moving_points: np.ndarray | None = None,
             guidance: tuple[np.ndarray, np.ndarray] | None = None, fixed_mask: Image | None = None,
             moving_mask: Image | None = None, progress: Progress | None = None,
             cancel: Callable[[], bool] | None = None) -> RegistrationResult:
    """Register `moving` to `fixed` as `options` say (default `RegistrationOptions()`); see the module docstring.

    Labels (on their image's grid) and matched RAS landmarks [N, 3] only score the result. `guidance` = (fixed,
    moving) matched RAS landmarks [N, 3] pull the refinement together where the warp is wrong (kept apart from the
    scored landmarks). `fixed_mask`/`moving_mask` (on their image's grid, nonzero inside) restrict the
    refinement's similarity; det J is also reported inside `fixed_mask`. Raises InputError for bad input,
    ResourceError when the machine cannot run it, Cancelled when `cancel()` turns True. Options are checked first
    (`options.check_options`); the warnings issued on the way are listed in the result's `metrics.warnings` (and
    issued as usual).
    """
    with recorded_warnings() as messages:
        result = _register(fixed, moving, check_options(options or RegistrationOptions()), fixed_labels,
                           moving_labels, fixed_points, moving_points, guidance, fixed_mask, moving_mask, progress,
                           cancel)
    result.metrics.warnings = messages
    return result


def _register(fixed: Image, moving: Image, options: RegistrationOptions, fixed_labels: Image | None,
              moving_labels: Image | None, fixed_points: np.ndarray | None, moving_points: np.ndarray | None,
              guidance: tuple[np.ndarray, np.ndarray] | None, fixed_mask: Image | None, moving_mask: Image | None,
              progress: Progress | None, cancel: Callable[[], bool] | None) -> RegistrationResult:
    stages = _Stages(progress, cancel)
    stages("preprocessing", 0.0)
    settings = _check_inputs(fixed, moving, options, fixed_labels, moving_labels, fixed_points, moving_points,
                             guidance, fixed_mask, moving_mask)
    torch.manual_seed(options.seed)
    dev = resolve_device(options.device)
    spec = get_method(options.method)
    net, meta = load_model(spec.name, options.weights, options.parameters or None) if spec.is_network else (None, {})
    modalities = (options.fixed_modality, options.moving_modality)
    trained = trained_modalities(meta)
    swapped = roles_swapped(trained, modalities)  # run it the way round it was trained, return the inverse
    if trained is not None and trained != modalities and not swapped:
        warn(f"the {spec.name} model was trained on fixed {trained[0].upper()} / moving "
                      f"{trained[1].upper()} pairs, not fixed {modalities[0].upper()} / moving "
                      f"{modalities[1].upper()}: its validation numbers do not describe this warp")
    fixed_n = normalize_intensity(fixed.data, options.fixed_modality, fixed.source)
    moving_n = normalize_intensity(moving.data, options.moving_modality, moving.source)
    masks = {"fixed_mask": None if fixed_mask is None else fixed_mask.data != 0,
             "moving_mask": None if moving_mask is None else moving_mask.data != 0}
    multimodal = options.fixed_modality != options.moving_modality

    pre = np.eye(4)
    if settings is not None and settings.affine != "off":
        stages("affine", 0.05)
        pre = optimise_affine(fixed_n, fixed.grid, moving_n, moving.grid, settings, multimodal=multimodal,
                              progress=stages.within(0.05, 0.2), cancel=cancel, device=dev, **masks)
    elif options.prealign == "moments":
        pre[:3, 3] = _centre_of_mass(moving, moving_n) - _centre_of_mass(fixed, fixed_n)
    elif options.prealign == "jad":
        if spec.name == "jad":
            raise InputError("prealign 'jad' with method 'jad' is redundant; use prealign 'none'")
        stages("affine pre-alignment", 0.05)
        pre = jad_prealign(fixed_n, fixed.grid, moving_n, moving.grid, dev)
    check_overlap(fixed, moving, pre)

    estimate = None
    if net is not None:
        stages("network", 0.2)
        estimate, dev = network_estimate(net, fixed_n, fixed.grid, moving_n, moving.grid, pre, dev,
                                         options.instance_optimization, stages.within(0.2, 0.4), cancel, swapped)
    if settings is not None:
        stages("refinement", 0.4)
        estimate = _refine(estimate, pre, settings, fixed_n, fixed.grid, moving_n, moving.grid, multimodal,
                           guidance, masks, dev, stages.within(0.4, 0.8), cancel)
    stages("export", 0.8)
    forward, inverse = estimate.forward(fixed.grid), estimate.inverse(fixed.grid)
    affine_ras = estimate.affine if estimate.has_affine else None
    stages("metrics", 0.9)
    metrics, warped, warped_labels, det = evaluate(fixed, moving, forward, fixed_labels=fixed_labels,
                                                   moving_labels=moving_labels, fixed_points=fixed_points,
                                                   moving_points=moving_points, mask=fixed_mask)
    jacobian = Image(det.astype(np.float32), fixed.grid, "jacobian")
    peak = _peak_rss_bytes()
    metrics.run = RunInfo(options, meta.get("sha256"), str(dev), estimate.grid.shape,
                          float(estimate.grid.spacing[0]), None if peak is None else round(peak / 2**20, 1), {})
    if dev.type == "cuda":
        metrics.run.peak_gpu_memory_mb = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    metrics.run.time_s = stages.finish()
    metrics.run.time_s["total"] = round(sum(metrics.run.time_s.values()), 4)
    return RegistrationResult(forward, inverse, affine_ras, warped, jacobian, warped_labels, metrics)


def _refine(start: Estimate | None, pre: np.ndarray, settings: RefineSettings, fixed_n: np.ndarray,
            fixed_grid: Grid, moving_n: np.ndarray, moving_grid: Grid, multimodal: bool,
            guidance: tuple[np.ndarray, np.ndarray] | None, masks: dict[str, np.ndarray | None], device: torch.device,
            progress: Progress, cancel: Callable[[], bool] | None) -> Estimate:
    """The refinement's stationary velocity on its finest level's grid, started from the network's estimate (its
    velocity, or its displacement when it has none).

    A network's own affine part A (jad: p ↦ pre·A(p + u)) is folded into the start when the refinement found its
    affine `pre` itself: the seed is then the displacement of A(p + u) − p over `pre`, so the refinement can undo
    an affine error of the network as well as a deformable one. Without an affine stage A stays in T."""
    grid = working_grid(fixed_grid, min(settings.levels_mm), 1)
    affine, initial = pre, None
    if start is not None:
        seed = start.velocity if start.velocity is not None else start.displacement
        if start.has_affine and settings.affine != "off":
            relative = np.linalg.inv(pre) @ start.affine
            seed = compose_ras(DisplacementField.from_voxels(start.displacement, start.grid), relative,
                               start.grid).to_voxels()
        else:
            affine = start.affine
        initial = velocity_on(seed, start.grid, grid)
    velocity = optimise_svf(fixed_n, fixed_grid, moving_n, moving_grid, affine, settings, multimodal=multimodal,
                            grid=grid, initial_velocity=initial, guidance=guidance, progress=progress,
                            cancel=cancel, device=device, **masks).detach().float().cpu()
    return Estimate(affine, grid, integrate_velocity(velocity, settings.int_steps), velocity, settings.int_steps,
                    has_affine=(start is not None and start.has_affine) or not np.allclose(affine, np.eye(4)))
