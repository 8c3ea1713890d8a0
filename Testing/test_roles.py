"""A multimodal model given its modalities the other way round: run with the inputs swapped, the exact inverse
returned (engine/roles.py), no warning; a real mismatch still warns."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from DeepRegistrationLib.core.geometry import Grid
from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.engine.options import RegistrationOptions
from DeepRegistrationLib.engine.registration import register
from DeepRegistrationLib.engine.roles import inverted, roles_swapped
from DeepRegistrationLib.methods.models import save_model
from DeepRegistrationLib.methods.registry import get_method
from training.data.phantom import ellipsoid_labels, phantom_image

SHAPE = (32, 32, 32)


@pytest.fixture(scope="module")
def ct_mr_model(tmp_path_factory):
    """A tiny LapIRN whose record says fixed CT / moving T1, with output layers wide enough for a real field."""
    spec = get_method("lapirn")
    config = spec.config_class.from_dict({"working_shape": list(SHAPE), "working_spacing": 2.0, "start_channels": 2,
                                          "num_res_blocks": 1})
    torch.manual_seed(5)
    net = spec.build(config)
    for level in net.levels:
        torch.nn.init.normal_(level.head.out.weight, 0.0, 0.3)
    path = tmp_path_factory.mktemp("model") / "ctmr.safetensors"
    save_model(net, "lapirn", path, {"recipe": {"data": {"kind": "multimodal", "fixed_modality": "ct",
                                                         "moving_modality": "t1"}}})
    return str(path)


def _images():
    grid = Grid.from_spacing(SHAPE, (2.0,) * 3, (-31.0, -31.0, -31.0), np.eye(3))
    labels = ellipsoid_labels(SHAPE)
    mr = phantom_image(labels)[0, 0].numpy()
    shifted = torch.roll(labels, 2, dims=2)
    ct = phantom_image(shifted, (-1000.0, 40.0, 30.0, 5.0, 900.0))[0, 0].numpy()
    return Image(mr, grid, "mr"), Image(ct.astype(np.float32), grid, "ct")


def test_roles_swapped_only_for_the_reverse_direction():
    assert roles_swapped(("ct", "mr"), ("mr", "ct"))
    assert not roles_swapped(("ct", "mr"), ("ct", "mr"))
    assert not roles_swapped(("mr", "mr"), ("mr", "ct"))
    assert not roles_swapped(None, ("mr", "ct"))


def test_swapped_roles_return_the_exact_inverse_without_warning(ct_mr_model):
    mr, ct = _images()
    as_trained = register(ct, mr, RegistrationOptions(method="lapirn", preset="fast", weights=ct_mr_model, device="cpu",
                                                      fixed_modality="ct", moving_modality="mr"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swapped = register(mr, ct, RegistrationOptions(method="lapirn", preset="fast", weights=ct_mr_model, device="cpu",
                                                       fixed_modality="mr", moving_modality="ct"))
    peak = np.abs(as_trained.field.data).max()
    assert peak > 1.0, "the test model should produce a real warp"
    # exp(−v) of the trained-direction run is this run's forward field, and exp(v) its inverse.
    np.testing.assert_allclose(swapped.field.data, as_trained.inverse.data, atol=1e-4 * peak)
    np.testing.assert_allclose(swapped.inverse.data, as_trained.field.data, atol=1e-4 * peak)


def test_other_mismatch_still_warns(ct_mr_model):
    mr, _ = _images()
    with pytest.warns(UserWarning, match="trained on fixed CT / moving MR"):
        register(mr, mr, RegistrationOptions(method="lapirn", preset="fast", weights=ct_mr_model, device="cpu"))


def test_inverted_without_velocity_is_a_fixed_point_inverse():
    from DeepRegistrationLib.core import warp
    from DeepRegistrationLib.methods.networks.base import RegistrationOutput

    gen = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 3, 4, 4, 4, generator=gen)
    u = torch.nn.functional.interpolate(coarse, size=(16, 16, 16), mode="trilinear", align_corners=True)
    u = u * (1.5 / u.abs().max())
    net = get_method("jad").build(get_method("jad").config_class.from_dict({"working_shape": [16, 16, 16]}))
    e = inverted(RegistrationOutput(displacement=u), net, (16, 16, 16)).displacement
    roundtrip = warp.compose(u, e)  # x ↦ x + e(x) then u: the identity
    assert roundtrip[..., 3:-3, 3:-3, 3:-3].abs().max() < 0.05
