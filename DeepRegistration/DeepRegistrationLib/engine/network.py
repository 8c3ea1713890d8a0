"""The network stage of a registration: working grid, memory and device fallback, the network (and optional
instance optimisation), and its output as an `Estimate` (docs/CONVENTIONS.md §3, §5).

The moving image is resampled on the network's working grid W through the pre-alignment T (RAS 4×4); a network
with an affine part A (jad) adds it after T: the estimate is p ↦ T·A(p + A_W·u(W⁻¹p)).
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch

from ..core.errors import Cancelled, ResourceError, warn
from ..core.geometry import Grid
from ..core.resample import resample_array
from ..methods.models import load_model
from ..methods.networks.base import RegistrationNetwork, RegistrationOutput
from .resources import available_bytes, estimate_peak_bytes
from .roles import inverted
from .transforms import Estimate, affine_to_ras, working_grid

Progress = Callable[[str, float], None]

MAX_WORKING_SPACING = 4.0
"""Coarsest working grid (mm) the memory fallback may choose before refusing."""


def network_estimate(net: RegistrationNetwork, fixed_n: np.ndarray, fixed_grid: Grid, moving_n: np.ndarray,
                     moving_grid: Grid, pre: np.ndarray, device: torch.device, instance_steps: int,
                     progress: Progress | None, cancel: Callable[[], bool] | None,
                     swapped: bool = False) -> tuple[Estimate, torch.device]:
    """Run `net` on the normalised pair seen through `pre`; returns its estimate and the device it ran on.

    `swapped`: the model was trained with the two modalities the other way round, so it runs on (moving, fixed)
    and its output is inverted (`engine.roles`)."""
    spacing = net.config.working_spacing
    grid_w = working_grid(fixed_grid, spacing, net.multiple)
    device, grid_w = _fit_memory(net, device, grid_w, fixed_grid, spacing)
    ft = torch.from_numpy(resample_array(fixed_n, fixed_grid, grid_w))[None, None]
    mt = torch.from_numpy(resample_array(moving_n, moving_grid, grid_w, transform=pre))[None, None]
    if swapped:
        output, device = _run(net, mt, ft, device, instance_steps, progress, cancel)
        output = inverted(output, net, tuple(ft.shape[2:]))
    else:
        output, device = _run(net, ft, mt, device, instance_steps, progress, cancel)
    affine = pre
    displacement = output.displacement
    if output.affine is not None:  # jad: displacement = compose(affine, deformable); keep them apart
        affine = pre @ affine_to_ras(output.affine[0].detach().double().cpu().numpy(), grid_w)
        displacement = output.levels[0]["deformable"]
    return Estimate(affine, grid_w, displacement.detach().float().cpu(),
                    None if output.velocity is None else output.velocity.detach().float().cpu(),
                    net.config.int_steps, has_affine=output.affine is not None), device


def jad_prealign(fixed_n: np.ndarray, fixed_grid: Grid, moving_n: np.ndarray, moving_grid: Grid,
                 device: torch.device) -> np.ndarray:
    """The RAS affine (fixed point ↦ moving point) predicted by the shipped `jad` model."""
    jad, _ = load_model("jad")
    grid_w = working_grid(fixed_grid, jad.config.working_spacing, jad.multiple)
    ft = torch.from_numpy(resample_array(fixed_n, fixed_grid, grid_w))[None, None].to(device)
    mt = torch.from_numpy(resample_array(moving_n, moving_grid, grid_w))[None, None].to(device)
    with torch.no_grad():
        theta = jad.to(device)(ft, mt).affine
    return affine_to_ras(theta[0].double().cpu().numpy(), grid_w)


def _instance_optimise(net: RegistrationNetwork, fixed: torch.Tensor, moving: torch.Tensor, steps: int,
                       progress: Progress | None, cancel: Callable[[], bool] | None,
                       lr: float = 1e-4) -> RegistrationOutput:
    """Fine-tune a copy of the network on this pair with its own loss (images only); the original is untouched."""
    tuned = copy.deepcopy(net)
    tuned.eval()  # keep normalisation statistics fixed
    optimiser = torch.optim.Adam(tuned.parameters(), lr=lr)
    batch = {"fixed": fixed, "moving": moving}
    for step in range(steps):
        if cancel is not None and cancel():
            raise Cancelled("registration cancelled")
        optimiser.zero_grad()
        loss = tuned.loss(tuned(fixed, moving), batch)["total"]
        loss.backward()
        optimiser.step()
        if progress is not None:
            progress("instance optimisation", (step + 1) / steps)
    with torch.no_grad():
        return tuned(fixed, moving)


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
         progress: Progress | None, cancel: Callable[[], bool] | None) -> tuple[RegistrationOutput, torch.device]:
    """Run the network (and instance optimisation) on `dev`; a CUDA out-of-memory error retries on the CPU."""
    try:
        net = net.to(dev)
        f, m = ft.to(dev), mt.to(dev)
        if steps:
            return _instance_optimise(net, f, m, steps, progress, cancel), dev
        with torch.no_grad():
            return net(f, m), dev
    except torch.cuda.OutOfMemoryError:
        if dev.type != "cuda":
            raise
        torch.cuda.empty_cache()
        warn(f"{dev} ran out of memory; running on the CPU instead")
        return _run(net, ft, mt, torch.device("cpu"), steps, progress, cancel)
