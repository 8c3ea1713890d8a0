"""The contract every registered network keeps with the engine (networks/base.py), checked for all of them."""

from __future__ import annotations

import pytest
import torch

from DeepRegistrationLib.methods import models, registry
from DeepRegistrationLib.core import warp
from DeepRegistrationLib.core.padding import crop_to_shape, pad_to_multiple

METHODS = sorted(registry.METHODS)


@pytest.fixture(scope="module", params=METHODS)
def built(request):
    spec = registry.get_method(request.param)
    torch.manual_seed(0)
    return spec, spec.build().eval()


def test_forward_on_an_odd_grid_after_padding(built):
    spec, net = built
    shape = (net.multiple + 3, net.multiple + 1, net.multiple + 5)
    fixed, moving = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    with torch.no_grad():
        out = net(pad_to_multiple(fixed, net.multiple), pad_to_multiple(moving, net.multiple))
    disp = crop_to_shape(out.displacement, shape)
    assert disp.shape == (1, 3, *shape) and torch.isfinite(disp).all()
    assert (out.affine is not None) == spec.has_affine
    if spec.diffeomorphic:
        # The engine inverts by integrating −velocity: the displacement must be exp(velocity).
        assert out.velocity is not None
        full = out.displacement.shape[2:]
        expected = warp.resize_field(warp.integrate_velocity(out.velocity, net.config.int_steps), full)
        if out.affine is None:
            assert torch.allclose(out.displacement, expected, atol=1e-4)


def test_weights_round_trip_through_safetensors(built, tmp_path):
    spec, net = built
    path = models.save_model(net, spec.name, tmp_path / f"{spec.name}.safetensors")
    loaded, meta = models.load_model(spec.name, path)
    assert meta["sha256"] == models.sha256_of(path)
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_config_fields_carry_gui_metadata(built):
    spec, net = built
    from dataclasses import fields

    for f in fields(net.config):
        assert f.metadata.get("help"), f"{spec.name}.{f.name} has no help text"
