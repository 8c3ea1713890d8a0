"""MDReg-Net (networks/mdregnet.py): shapes, identity, gradients, diffeomorphism, parameter count, the level
structure of Eq. 3 and a short optimisation on a toy pair."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from DeepRegistrationLib.core import losses, warp
from DeepRegistrationLib.methods import registry
from DeepRegistrationLib.methods.networks import mdregnet
from conftest import assert_gradients_reach_every_parameter, assert_parameter_count, conv_parameters as conv
from conftest import forward_on_padded_odd_grid, random_pair as pair, zero_output_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def test_paper_defaults():
    config = registry.get_method("mdregnet").config_class()
    assert config.working_shape == (176, 192, 176)
    assert (config.reg_weight, config.smoothing_sigma, config.smoothing_kernel, config.int_steps) == (
        0.35, 1.732, 3, 7)
    meta = {f.name: f.metadata for f in dataclasses.fields(config)}
    assert meta["reg_weight"]["paper"] and meta["smoothing_sigma"]["paper"] and meta["working_shape"]["paper"]
    assert not meta["ncc_window"]["paper"] and not meta["leaky_slope"]["paper"]
    assert mdregnet.Config.from_dict(config.to_dict()) == config
    assert registry.get_method("mdregnet").diffeomorphic


def test_parameter_count_from_architecture():
    # conv(cin, cout): 3×3×3 kernel with bias (deconvolutions alike)
    encoder = conv(2, 16) + conv(16, 32) + 2 * conv(32, 32)
    # Decoders: deconvolutions of 32 filters, each followed by concatenation with the encoder map of its grid
    # (32 channels at 1/8 and 1/4, 16 at 1/2), then 32- and 16-filter convolutions and a 3-channel output.
    tail = conv(32, 16) + conv(16, 3)
    s1 = conv(32, 32) + conv(64, 32) + tail
    s2 = conv(32, 32) + conv(64, 32) + conv(64, 32) + tail
    s3 = conv(32, 32) + conv(64, 32) + conv(64, 32) + conv(48, 32) + tail
    assert_parameter_count(mdregnet.Network(mdregnet.Config()), 3 * encoder + s1 + s2 + s3, "MDReg-Net")


def test_shapes_and_finiteness_on_padded_odd_grid():
    grid = (16, 32, 16)
    out = forward_on_padded_odd_grid(mdregnet.Network(mdregnet.Config()), (13, 30, 9), grid)
    assert out.velocity.shape == (1, 3, *grid)
    increments = [tuple(level["increment"].shape[2:]) for level in out.levels]
    assert increments == [tuple(s // f for s in grid) for f in (8, 4, 2)]
    assert [tuple(level["velocity"].shape[2:]) for level in out.levels] == [increments[0], increments[1], grid]
    for level in out.levels:
        assert level["displacement"].shape == level["velocity"].shape
        assert all(torch.isfinite(v).all() for v in level.values())


def net_with_random_outputs(std: float) -> mdregnet.Network:
    """A network whose output layers are drawn from N(0, std²), so that every level produces a field."""
    net = mdregnet.Network(mdregnet.Config())
    for layer in net.output_layers:
        torch.nn.init.normal_(layer.weight, std=std)
    return net


def test_zero_output_layers_give_identity():
    net = zero_output_layers(mdregnet.Network(mdregnet.Config()))
    fixed, moving = pair((16, 16, 16))
    out = net(fixed, moving)
    assert out.displacement.abs().max() == 0 and out.velocity.abs().max() == 0
    torch.testing.assert_close(warp.warp_image(moving, out.displacement), moving)


def test_velocities_accumulate_by_summation():
    """Eq. 3 with the smoothing layer and scaling and squaring (7 steps) at the full grid."""
    net = net_with_random_outputs(std=1e-2)
    fixed, moving = pair((16, 32, 16))
    out = net(fixed, moving)
    first, second, third = out.levels
    torch.testing.assert_close(second["velocity"],
                               warp.resize_field(first["increment"], (4, 8, 4)) + second["increment"])
    accumulated = warp.resize_field(second["velocity"], (8, 16, 8)) + third["increment"]
    expected = warp.gaussian_smooth(warp.resize_field(accumulated, (16, 32, 16)), 1.732, 3)
    torch.testing.assert_close(out.velocity, expected)
    torch.testing.assert_close(out.displacement, warp.integrate_velocity(expected, 7))
    torch.testing.assert_close(first["displacement"], warp.integrate_velocity(first["velocity"], 7))


def test_finer_levels_see_the_moving_image_warped_by_the_coarser_deformation():
    net = net_with_random_outputs(std=1e-2)
    seen = []
    for subnetwork in net.subnetworks:
        subnetwork.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    fixed, moving = pair((16, 32, 16))
    out = net(fixed, moving)
    torch.testing.assert_close(seen[0], torch.cat([fixed, moving], dim=1))
    for index in (1, 2):
        coarse = warp.resize_field(out.levels[index - 1]["displacement"], (16, 32, 16))
        torch.testing.assert_close(seen[index], torch.cat([fixed, warp.warp_image(moving, coarse)], dim=1))


def test_loss_terms_follow_eq4():
    net = net_with_random_outputs(std=1e-2)
    fixed, moving = pair((16, 32, 16))
    out = net(fixed, moving)
    terms = net.loss(out, {"fixed": fixed, "moving": moving})
    pooled = (3, 2)  # the 1/8 and 1/4 levels: average pooling 3×3×3 stride 2 applied three and two times
    for index, level in enumerate(out.levels):
        f, m = fixed, moving
        for _ in range(pooled[index] if index < 2 else 0):
            f, m = mdregnet.average_pool(f), mdregnet.average_pool(m)
        inverse = warp.integrate_velocity(-level["velocity"], 7)
        expected = (losses.local_ncc_loss(f, warp.warp_image(m, level["displacement"]), 9)
                    + losses.local_ncc_loss(m, warp.warp_image(f, inverse), 9))
        torch.testing.assert_close(terms[f"similarity_{index + 1}"], expected)
    regularisation = sum(losses.gradient_loss(level["increment"], "l1") for level in out.levels)
    torch.testing.assert_close(terms["regularisation"], regularisation)
    similarity = sum(terms[f"similarity_{i}"] for i in (1, 2, 3))
    torch.testing.assert_close(terms["total"], similarity + 0.35 * regularisation)


def test_gradients_reach_every_parameter():
    net = mdregnet.Network(mdregnet.Config())
    fixed, moving = pair((16, 16, 16))
    assert_gradients_reach_every_parameter(net, {"fixed": fixed, "moving": moving})


def test_random_small_outputs_are_diffeomorphic():
    net = net_with_random_outputs(std=0.3)
    fixed, moving = pair((32, 32, 32))
    with torch.no_grad():
        out = net(fixed, moving)
    assert out.displacement.abs().max() > 1.0  # a real deformation of a few voxels
    assert warp.jacobian_determinant(out.displacement).min() > 0
