"""The inference engine shared by the command line and the Slicer module.

From two images with any grids to a transform that is right in physical space:
preprocessing (canonical working grid, normalisation, optional pre-alignment) → network (optional instance
optimisation) → field on the fixed grid, its inverse, warped image, Jacobian and metrics.

Frames (docs/CONVENTIONS.md): the working grid W has RAS axes and `config.working_spacing` mm voxels covering the
fixed image. The moving image is resampled on W through the pre-alignment T (RAS 4×4, fixed point ↦ moving point),
the network maps working voxel x to x + u(x), and the complete transform is p ↦ T(p + A_W·u(W⁻¹p)).
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import metrics as M
from .errors import Cancelled, InputError, ResourceError
from .field_io import DisplacementField, apply_field
from .geometry import Grid
from .image import Image
from .memory import available_bytes, estimate_peak_bytes
from .models import load_model, trained_modalities
from .networks.base import RegistrationNetwork, RegistrationOutput
from .resample import index_map, normalize_intensity, resample_array, resample_image
from .warp import identity_grid, integrate_velocity, resize_field, sample

Progress = Callable[[str, float], None]

PREALIGN_CHOICES = ("none", "moments", "jad")
MAX_WORKING_SPACING = 4.0
"""Coarsest working grid (mm) the memory fallback may choose before refusing."""


@dataclass
class RegistrationResult:
    """Everything a registration produces; fields in RAS mm on the fixed grid (docs/CONVENTIONS.md §3)."""

    method: str
    field: DisplacementField
    inverse: DisplacementField
    affine_ras: np.ndarray | None
    warped: Image
    jacobian: Image
    warped_labels: Image | None
    metrics: dict[str, Any]
    model_sha256: str | None
    device: str
    working_grid: Grid
    segmentations: dict[str, Image] = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    """"auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps"; InputError if not available here."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} requested but this PyTorch build sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("device 'mps' requested but MPS is not available")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unsupported device {device!r}")
    return dev


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


def label_metrics(fixed_labels: np.ndarray, moving_labels: np.ndarray, spacing: np.ndarray,
                  labels: list[int]) -> dict[str, Any]:
    """Dice, HD95 and ASSD (mm) per label of two label maps on one grid, and their means."""
    dice = M.dice_per_label(fixed_labels, moving_labels, labels)
    per = {}
    for lab in labels:
        a, b = fixed_labels == lab, moving_labels == lab
        per[str(lab)] = {"dice": dice.get(lab, float("nan")), **M.surface_metrics(a, b, spacing)}
    finite = lambda key: [v[key] for v in per.values() if np.isfinite(v[key])]  # noqa: E731
    return {"per_label": per, "mean_dice": float(np.mean(finite("dice"))) if finite("dice") else float("nan"),
            "mean_hd95": float(np.mean(finite("hd95"))) if finite("hd95") else float("nan"),
            "mean_assd": float(np.mean(finite("assd"))) if finite("assd") else float("nan")}


def evaluate(fixed: Image, moving: Image, forward: DisplacementField, *, fixed_labels: Image | None = None,
             moving_labels: Image | None = None, fixed_points: np.ndarray | None = None,
             moving_points: np.ndarray | None = None) -> tuple[dict[str, Any], Image, Image | None, np.ndarray]:
    """Metrics of any transform (ours or another tool's) before and after.

    Before = the moving image resampled on the fixed grid with the identity transform. Returns (metrics, warped
    image, warped labels or None, det J [I, J, K] on the field's grid).
    """
    warped = apply_field(moving, forward)
    before_img = resample_image(moving, forward.grid)
    det = forward.jacobian_determinant()
    out: dict[str, Any] = {}
    mask = None
    if fixed_labels is not None:
        mask = fixed_labels.data > 0
    stats = M.jacobian_stats(det, mask)
    out["jacobian"] = {"percent_nonpositive": stats["percent_nonpositive"], "sdlogj": M.sdlogj(det),
                       "sdlogj_learn2reg": M.sdlogj_learn2reg(det), "min": float(det.min()), "max": float(det.max())}
    if mask is not None:  # inside the fixed labels' foreground
        out["jacobian"].update({"percent_nonpositive_mask": stats["percent_nonpositive_mask"],
                                "sdlogj_mask": M.sdlogj(det, mask),
                                "sdlogj_learn2reg_mask": M.sdlogj_learn2reg(det, mask)})
    out["similarity"] = {
        stage: {"ncc": M.ncc(fixed.data, img.data), "mi": M.mutual_information(fixed.data, img.data)}
        for stage, img in (("before", before_img), ("after", warped))}
    warped_labels = None
    if (fixed_labels is None) != (moving_labels is None):
        raise InputError("give both fixed and moving label maps, or neither")
    if fixed_labels is not None:
        warped_labels = apply_field(moving_labels, forward, order=0)
        before_labels = resample_image(moving_labels, forward.grid, order=0)
        labels = sorted(int(v) for v in np.union1d(np.unique(fixed_labels.data), np.unique(moving_labels.data)) if v)
        spacing = forward.grid.spacing
        out["labels"] = {"before": label_metrics(fixed_labels.data, before_labels.data, spacing, labels),
                         "after": label_metrics(fixed_labels.data, warped_labels.data, spacing, labels)}
        change = M.volume_change(moving_labels.data, warped_labels.data, labels, moving_labels.grid.spacing, spacing)
        out["labels"]["volume_change"] = {str(k): v for k, v in change.items()}
    _check_landmarks(fixed_points, moving_points, forward.grid)
    if fixed_points is not None:
        before = M.tre_identity(fixed_points, moving_points)
        after = M.tre(fixed_points, moving_points, forward.map_points)
        out["landmarks"] = {"before": before.tolist(), "after": after.tolist(),
                            "mean_before": float(before.mean()), "mean_after": float(after.mean())}
    return out, warped, warped_labels, det


def _check_landmarks(fixed_points: np.ndarray | None, moving_points: np.ndarray | None, fixed: Grid) -> None:
    """Both or neither; matched [N, 3] arrays; fixed landmarks inside the fixed image."""
    if (fixed_points is None) != (moving_points is None):
        raise InputError("give both fixed and moving landmarks, or neither")
    if fixed_points is None:
        return
    fixed_points, moving_points = np.asarray(fixed_points, float), np.asarray(moving_points, float)
    if fixed_points.shape != moving_points.shape or fixed_points.ndim != 2 or fixed_points.shape[1] != 3:
        raise InputError(f"landmarks must be matched [N, 3] arrays, got {fixed_points.shape} and "
                         f"{moving_points.shape}")
    ijk = fixed.world_to_voxel(fixed_points)
    outside = np.where(np.any((ijk < -0.5) | (ijk > np.array(fixed.shape) - 0.5), axis=1))[0]
    if len(outside):
        raise InputError(f"fixed landmark(s) {outside.tolist()} lie outside the fixed image")


def register(fixed: Image, moving: Image, method: str, *, parameters: dict[str, Any] | None = None,
             weights: str | Path | None = None, device: str = "auto", instance_optimization: int = 0,
             seed: int = 0, prealign: str = "none", fixed_modality: str = "mr", moving_modality: str = "mr",
             fixed_labels: Image | None = None, moving_labels: Image | None = None,
             fixed_points: np.ndarray | None = None, moving_points: np.ndarray | None = None,
             progress: Progress | None = None, cancel: Callable[[], bool] | None = None) -> RegistrationResult:
    """Register `moving` to `fixed` with `method`; see the module docstring for frames.

    `parameters` override inference-time config fields (e.g. `working_spacing`, `int_steps`);
    `instance_optimization` N runs N Adam steps of the method's own loss on this pair, on a copy of the weights.
    Raises InputError for bad input, ResourceError when the machine cannot run it, Cancelled when `cancel()`.
    """
    stages = _Stages(progress, cancel)
    stages("preprocessing", 0.0)
    _check_image(fixed, "fixed")
    _check_image(moving, "moving")
    if prealign not in PREALIGN_CHOICES:
        raise InputError(f"unknown pre-alignment {prealign!r}; use one of {', '.join(PREALIGN_CHOICES)}")
    if instance_optimization < 0:
        raise InputError("instance optimisation steps must be ≥ 0")
    _check_landmarks(fixed_points, moving_points, fixed.grid)
    if (fixed_labels is None) != (moving_labels is None):
        raise InputError("give both fixed and moving label maps, or neither")
    for labels, image in ((fixed_labels, fixed), (moving_labels, moving)):
        if labels is not None and not labels.grid.same_as(image.grid, tol=1e-3):
            raise InputError(f"{labels.source}: label map grid differs from its image {image.source}")
    torch.manual_seed(seed)
    dev = resolve_device(device)
    net, meta = load_model(method, weights, parameters)
    trained = trained_modalities(meta)
    if trained is not None and trained != (fixed_modality, moving_modality):
        swap = " (swap fixed and moving)" if trained == (moving_modality, fixed_modality) else ""
        warnings.warn(f"the {method} model was trained on fixed {trained[0].upper()} / moving {trained[1].upper()} "
                      f"pairs, not fixed {fixed_modality.upper()} / moving {moving_modality.upper()}{swap}: its "
                      "validation numbers do not describe this warp")
    fixed_n = normalize_intensity(fixed.data, fixed_modality, fixed.source)
    moving_n = normalize_intensity(moving.data, moving_modality, moving.source)

    pre = np.eye(4)
    if prealign == "moments":
        pre[:3, 3] = _centre_of_mass(moving, moving_n) - _centre_of_mass(fixed, fixed_n)
    elif prealign == "jad":
        if method == "jad":
            raise InputError("prealign 'jad' with method 'jad' is redundant; use prealign 'none'")
        pre = _jad_prealign(fixed, moving, fixed_n, moving_n, dev, stages)

    spacing = net.config.working_spacing
    grid_w = working_grid(fixed.grid, spacing, net.multiple)
    dev, grid_w = _fit_memory(net, dev, grid_w, fixed.grid, spacing)
    stages("resampling", 0.1)
    fixed_w = resample_array(fixed_n, fixed.grid, grid_w)
    moving_w = resample_array(moving_n, moving.grid, grid_w, transform=pre)
    ft = torch.from_numpy(fixed_w)[None, None]
    mt = torch.from_numpy(moving_w)[None, None]

    stages("network", 0.3)
    output, dev = _run(net, ft, mt, dev, instance_optimization, stages)
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
                                                   moving_points=moving_points)
    jacobian = Image(det.astype(np.float32), fixed.grid, "jacobian")
    segmentations = {
        name: Image(resample_array(logits.argmax(1)[0].cpu().numpy().astype(np.int16), grid_w, fixed.grid, order=0),
                    fixed.grid, f"{name} segmentation")
        for name, logits in output.segmentations.items()}
    metrics.update({
        "method": method, "model_sha256": meta.get("sha256"), "device": str(dev),
        "working_grid": {"shape": list(grid_w.shape), "spacing_mm": float(grid_w.spacing[0])},
        "prealign": prealign, "instance_optimization": instance_optimization, "seed": seed,
        "peak_memory_mb": None if (peak := _peak_rss_bytes()) is None else round(peak / 2**20, 1)})
    if dev.type == "cuda":
        metrics["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    metrics["time_s"] = stages.finish()
    metrics["time_s"]["total"] = round(sum(metrics["time_s"].values()), 4)
    return RegistrationResult(method, forward, inverse, affine_ras, warped, jacobian, warped_labels, metrics,
                              meta.get("sha256"), str(dev), grid_w, segmentations)


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
            warnings.warn(f"{dev}: estimated {need / 2**30:.1f} GiB exceeds free {free / 2**30:.1f} GiB; using the CPU")
            dev = torch.device("cpu")
            continue
        spacing *= 1.5
        if spacing > MAX_WORKING_SPACING:
            raise ResourceError(f"registration needs about {need / 2**30:.1f} GiB but {free / 2**30:.1f} GiB are "
                                "free, even on the coarsest working grid")
        warnings.warn(f"estimated {need / 2**30:.1f} GiB exceeds free {free / 2**30:.1f} GiB; working grid "
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
        warnings.warn(f"{dev} ran out of memory; running on the CPU instead")
        return _run(net, ft, mt, torch.device("cpu"), steps, stages)

