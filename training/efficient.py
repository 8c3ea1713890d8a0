"""The sample-efficient changes to a paper's recipe, as the trainer applies them (recipe fields in recipe.py).

Each is off in the paper recipes (`training/recipes/<method>.json`) and on in the CPU-budget ones
(`<method>_cpu.json`); docs/MODELS.md ("Sample-efficient recipes") gives the reasons and the measured effect.

* `learning_rate(recipe, base, iteration)`: the paper's step decay, or a linear warm-up then cosine decay; a
  function of the iteration alone, so a resumed run continues it exactly.
* `end_point_error(output, batch, spacing)`: the supervised warm start's loss, mean |u − u_true| in mm over the
  grid, on pairs whose true field is known (every synthetic pair carries it as "displacement").
* `label_dice_loss(output, batch)`: 1 − mean soft Dice of the moving labels warped (one-hot, trilinear) by the
  output, on the labels both images share.
* `output_layers(network)`, `init_output_layers(network, std)`, `zero_level_outputs(network, levels)`: the
  velocity output convolutions (found by name: `flow`, `output`, `head.out`; JAD's affine head is left alone), a
  wider initialisation N(0, std) of them, and a pyramid level whose output starts at zero, so that adding it
  keeps the coarser levels' transform instead of adding a random residual to it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from DeepRegistrationLib.core import losses, warp
from DeepRegistrationLib.methods.networks.base import RegistrationNetwork, RegistrationOutput

from .recipe import Recipe

OUTPUT_NAMES = ("flow", "output", "out")


def learning_rate(recipe: Recipe, base: float, iteration: int) -> float:
    """The rate at 0-based `iteration` for an optimiser whose initial rate is `base`."""
    if recipe.warmup_iterations and iteration < recipe.warmup_iterations:
        return base * (iteration + 1) / recipe.warmup_iterations
    if recipe.lr_schedule == "cosine":
        span = max(1, recipe.iterations - recipe.warmup_iterations)
        t = min(1.0, (iteration - recipe.warmup_iterations) / span)
        return recipe.lr_min + 0.5 * (base - recipe.lr_min) * (1.0 + math.cos(math.pi * t))
    if recipe.lr_step:
        return base * recipe.lr_gamma ** (iteration // recipe.lr_step)
    return base


def end_point_error(output: RegistrationOutput, batch: dict[str, Tensor], spacing: float) -> Tensor:
    """Mean end-point error (mm) of the output's displacement against the batch's true one (voxels, same grid)."""
    truth = batch["displacement"].float()
    disp = output.displacement.float()
    if disp.shape != truth.shape:  # padded inputs: compare on the overlap
        disp = disp[(...,) + tuple(slice(0, s) for s in truth.shape[2:])]
    return spacing * (disp - truth).norm(dim=1).mean()


def label_dice_loss(output: RegistrationOutput, batch: dict[str, Tensor]) -> Tensor | None:
    """1 − mean soft Dice of the warped moving labels and the fixed labels; None when the batch has none."""
    if "fixed_labels" not in batch or "moving_labels" not in batch:
        return None
    values = [int(v) for v in torch.unique(batch["fixed_labels"]) if v != 0]
    if not values:
        return None
    moving = losses.one_hot(batch["moving_labels"], values)
    warped = warp.warp_image(moving, output.displacement.float(), padding_mode="zeros")
    return losses.soft_dice_loss(warped, losses.one_hot(batch["fixed_labels"], values))


def output_layers(network: RegistrationNetwork) -> dict[str, nn.Module]:
    """{name: module} of the convolutions that output a velocity or displacement."""
    return {name: m for name, m in network.named_modules()
            if isinstance(m, (nn.Conv3d, nn.Conv2d)) and name.split(".")[-1] in OUTPUT_NAMES}


def init_output_layers(network: RegistrationNetwork, std: float) -> list[str]:
    """Draw every output layer's weights from N(0, std) (biases zero); returns the layer names."""
    layers = output_layers(network)
    generator = torch.Generator().manual_seed(0)
    for module in layers.values():
        with torch.no_grad():
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
            if module.bias is not None:
                module.bias.zero_()
    return sorted(layers)


def zero_level_outputs(network: RegistrationNetwork, levels: list[int]) -> list[str]:
    """Zero the output layers of pyramid levels `levels` (1-based; LapIRN family), so each starts as the identity
    residual; returns the layer names."""
    chosen = [name for name in output_layers(network)
              if any(name.startswith(f"levels.{p - 1}.") for p in levels)]
    modules = dict(network.named_modules())
    for name in chosen:
        with torch.no_grad():
            modules[name].weight.zero_()
            if modules[name].bias is not None:
                modules[name].bias.zero_()
    return chosen
