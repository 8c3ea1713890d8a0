"""The shipped models in Resources/Models: the default method has one; each is loadable (safetensors, sha256 and
method checked), under 20 MB, carries the recipe that reproduces it, and beats the identity on its own held-out
validation pairs (a model that does not is not shipped; docs/MODELS.md says which and why)."""

from __future__ import annotations

import pytest
import torch

from DeepRegistrationLib.core import warp
from DeepRegistrationLib.methods.models import load_model
from DeepRegistrationLib.methods.registry import DEFAULT_METHOD, METHODS
from training.recipe import Recipe

MAX_BYTES = 20 * 2**20


SHIPPED = sorted(name for name, spec in METHODS.items() if spec.weights_path.is_file())


def test_the_default_method_ships_a_model() -> None:
    assert DEFAULT_METHOD in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model(name: str) -> None:
    path = METHODS[name].weights_path
    assert path.stat().st_size < MAX_BYTES
    network, meta = load_model(name)

    record = meta["record"]
    recipe = Recipe.from_dict(record["recipe"])
    assert recipe.method == name
    assert recipe.method_config().to_dict() == meta["config"], "the recorded recipe does not rebuild this config"
    assert record["iteration"] > 0 and record["wall_time_s"] > 0
    validation = record["validation"]
    assert validation["iteration"] == record["iteration"], "validation of other weights than these"
    assert validation["dice"] > validation["dice_identity"] + 0.01
    assert validation["folding_percent"] < 1.0

    shape = network.config.working_shape
    grid = warp.identity_grid(shape)  # smooth, non-constant images of the working shape
    fixed = torch.sin(grid.sum(1, keepdim=True) / 7.0) ** 2
    moving = torch.sin((grid.sum(1, keepdim=True) + 2.0) / 7.0) ** 2
    with torch.no_grad():
        displacement = network(fixed, moving).displacement
    assert displacement.shape == (1, 3, *shape)
    assert torch.isfinite(displacement).all()
