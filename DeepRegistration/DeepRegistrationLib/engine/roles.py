"""A model trained for one direction of a multimodal pair, run on the other: swap the inputs, invert the output.

A model trained on fixed CT / moving MR pairs, given fixed MR / moving CT, is run with the images swapped (it then
maps the moving image's points to the fixed image's) and its output inverted: for a stationary velocity v the
forward transform is exactly exp(−v) (and the engine's inverse, exp(v), is the model's own field); for other
outputs the inverse is taken by fixed-point iteration on the working grid. The modalities come from the model's
training record (`methods.models.trained_modalities`).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..core.warp import identity_grid, integrate_velocity, resize_field, sample
from ..methods.networks.base import RegistrationNetwork, RegistrationOutput


def roles_swapped(trained: tuple[str, str] | None, modalities: tuple[str, str]) -> bool:
    """True when a model trained on (fixed, moving) = `trained` is given the two modalities the other way round."""
    return trained is not None and trained != modalities and trained == modalities[::-1]


def inverted(output: RegistrationOutput, net: RegistrationNetwork, shape: tuple[int, ...]) -> RegistrationOutput:
    """The output of the swapped run turned into the forward output of the pair as given (voxels on `shape`)."""
    if output.velocity is not None and output.affine is None:
        velocity = -output.velocity
        displacement = resize_field(integrate_velocity(velocity, net.config.int_steps), shape)
        return replace(output, displacement=displacement, velocity=velocity, levels=[], segmentations={})
    return replace(output, displacement=_fixed_point_inverse(output.displacement), velocity=None, affine=None,
                   levels=[], segmentations={})


def _fixed_point_inverse(u: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """e with x + e(x) = (x + u)⁻¹, by e(x) = −u(x + e(x)) (voxels, [B, 3, I, J, K])."""
    grid = identity_grid(u.shape[2:], dtype=u.dtype, device=u.device)
    e = -u
    for _ in range(iterations):
        e = -sample(u, grid + e, padding_mode="border")
    return e

