"""VoxelMorph-diff (networks/voxelmorph.py): defaults, parameter count, shapes, identity, gradients,
diffeomorphism, the (bidirectional) loss and a short optimisation on a toy pair."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from DeepRegistrationLib.core import losses, warp
from DeepRegistrationLib.methods import registry
from DeepRegistrationLib.methods.networks import voxelmorph
from DeepRegistrationLib.methods.networks.base import RegistrationOutput
from conftest import assert_gradients_reach_every_parameter, assert_parameter_count, conv_parameters as conv
from conftest import forward_on_padded_odd_grid, random_pair as pair

pytestmark = pytest.mark.usefixtures("one_thread")


def test_defaults_and_registry():
    spec = registry.get_method("voxelmorph")
    config = spec.config_class()
    assert config.encoder_features == (16, 32, 32, 32)
    assert config.decoder_features == (32, 32, 32, 32, 32, 16, 16)
    assert (config.int_steps, config.int_downsize, config.ncc_window, config.reg_weight) == (7, 2, 9, 1.0)
    assert config.bidirectional and config.working_shape == (160, 192, 224)
    assert voxelmorph.Config.from_dict(config.to_dict()) == config
    assert spec.network_class is voxelmorph.VoxelMorph and spec.diffeomorphic
    meta = {f.name: f.metadata for f in dataclasses.fields(config)}
    assert all(meta[name]["paper"] for name in ("encoder_features", "decoder_features", "int_downsize", "ncc_window"))


def test_parameter_count_from_architecture():
    # conv(cin, cout): 3×3×3 with bias
    encoder = conv(2, 16) + conv(16, 32) + conv(32, 32) + conv(32, 32)
    # Decoder convs at 1/16, 1/8, 1/4, 1/2; each output is upsampled and concatenated with the encoder output of
    # the next finer scale (32, 32, 32, then 16 channels at full resolution).
    decoder = conv(32, 32) + conv(32 + 32, 32) + conv(32 + 32, 32) + conv(32 + 32, 32)
    remaining = conv(32 + 16, 32) + conv(32, 16) + conv(16, 16)
    flow = conv(16, 3)
    assert_parameter_count(voxelmorph.Network(voxelmorph.Config()), encoder + decoder + remaining + flow, "VoxelMorph")


def test_shapes_and_finiteness_on_padded_odd_grid():
    grid = (32, 32, 16)
    out = forward_on_padded_odd_grid(voxelmorph.Network(voxelmorph.Config()), (21, 27, 13), grid)
    assert out.velocity.shape == (1, 3, 16, 16, 8)
    # displacement = exp(velocity) on the half grid, upsampled (base.py contract)
    expected = warp.resize_field(warp.integrate_velocity(out.velocity, 7), grid)
    torch.testing.assert_close(out.displacement, expected)


def test_zero_output_layer_gives_identity():
    net = voxelmorph.Network(voxelmorph.Config())
    torch.nn.init.zeros_(net.flow.weight)
    fixed, moving = pair((16, 16, 16))
    with torch.no_grad():
        out = net(fixed, moving)
    assert out.displacement.abs().max() == 0 and out.velocity.abs().max() == 0


def test_gradients_reach_every_parameter():
    net = voxelmorph.Network(voxelmorph.Config())
    fixed, moving = pair((16, 16, 16))
    assert_gradients_reach_every_parameter(net, {"fixed": fixed, "moving": moving})


def test_diffeomorphic_with_random_weights():
    torch.manual_seed(1)
    net = voxelmorph.Network(voxelmorph.Config())
    fixed, moving = pair((32, 32, 32), seed=2)
    with torch.no_grad():
        # Random output weights scaled (the velocity is linear in them) so that max |v| = 1.5 half-grid voxels:
        # far larger than the paper's N(0, 1e-5) initialisation gives.
        torch.nn.init.normal_(net.flow.weight)
        net.flow.weight *= 1.5 / net(fixed, moving).velocity.abs().max()
        out = net(fixed, moving)
    assert out.velocity.abs().max() > 1.4
    assert warp.jacobian_determinant(out.displacement).min() > 0


def test_loss_terms():
    shape = (16, 16, 16)
    fixed, moving = pair(shape)
    velocity = warp.gaussian_smooth(torch.randn(1, 3, 8, 8, 8), 1.0)
    for bidirectional in (False, True):
        net = voxelmorph.Network(voxelmorph.Config(bidirectional=bidirectional))
        out = RegistrationOutput(displacement=net.exp(velocity, shape), velocity=velocity)
        terms = net.loss(out, {"fixed": fixed, "moving": moving})
        forward = losses.local_ncc_loss(fixed, warp.warp_image(moving, out.displacement), 9)
        if bidirectional:
            inverse = warp.resize_field(warp.integrate_velocity(-velocity, 7), shape)
            forward = 0.5 * forward + 0.5 * losses.local_ncc_loss(moving, warp.warp_image(fixed, inverse), 9)
        torch.testing.assert_close(terms["similarity"], forward)
        torch.testing.assert_close(terms["smoothness"], 1.0 * 2 * losses.gradient_loss(velocity))
        torch.testing.assert_close(terms["total"], terms["similarity"] + terms["smoothness"])
