"""LapIRN (networks/lapirn.py): defaults, parameter count, shapes, identity, gradients, diffeomorphism, the
progressive-training hooks, the extension points, the per-level loss and a short optimisation on a toy pair."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from DeepRegistrationLib.core import losses, warp
from DeepRegistrationLib.methods import registry
from DeepRegistrationLib.methods.networks import lapirn
from conftest import assert_gradients_reach_every_parameter, assert_parameter_count, conv_parameters
from conftest import forward_on_padded_odd_grid, random_pair as pair

pytestmark = pytest.mark.usefixtures("one_thread")


def zero_outputs(net: lapirn.LapIRN) -> None:
    for level in net.levels:
        torch.nn.init.zeros_(level.head.out.weight)


def test_defaults_and_registry():
    spec = registry.get_method("lapirn")
    config = spec.config_class()
    assert (config.start_channels, config.num_res_blocks, config.int_steps, config.range_flow) == (7, 5, 7, 0.4)
    assert (config.smooth_weight, config.ncc_window, config.working_shape) == (3.5, 7, (160, 192, 144))
    assert lapirn.Config.from_dict(config.to_dict()) == config
    assert spec.network_class is lapirn.LapIRN and spec.diffeomorphic
    assert all(s % lapirn.LapIRN.multiple == 0 for s in config.working_shape)
    meta = {f.name: f.metadata for f in dataclasses.fields(config)}
    assert not any(meta[name]["paper"] for name in ("int_steps", "start_channels", "smooth_weight", "ncc_window"))


def test_parameter_count_from_architecture():
    c = 4 * 7  # level width: 4 × start channels
    conv = functools.partial(conv_parameters, bias=False)  # no bias anywhere in LapIRN

    def level(inputs: int) -> int:
        encoder = conv(inputs, c) + conv(c, c)
        down, up = conv(c, c), conv(c, c, k=2)
        residual = 5 * 2 * conv(c, c)
        head = conv(2 * c, c) + conv(c, 3)
        return encoder + down + residual + up + head

    assert_parameter_count(lapirn.Network(lapirn.Config()), level(2) + 2 * level(5), "LapIRN")


def test_shapes_and_finiteness_on_padded_odd_grid():
    grid = (24, 32, 16)
    out = forward_on_padded_odd_grid(lapirn.Network(lapirn.Config()), (21, 27, 13), grid)
    assert out.velocity.shape == (1, 3, *grid)
    for p, level in enumerate(out.levels, start=1):
        level_grid = tuple(s // 2 ** (3 - p) for s in grid)
        for key in ("residual", "velocity", "displacement"):
            assert level[key].shape == (1, 3, *level_grid)
        assert level["warped"].shape == (1, 1, *level_grid)


def test_zero_output_layer_gives_identity_at_every_stage():
    net = lapirn.Network(lapirn.Config())
    zero_outputs(net)
    fixed, moving = pair((16, 16, 16))
    for p in (1, 2, 3):
        net.active_levels = p
        with torch.no_grad():
            out = net(fixed, moving)
        assert out.displacement.abs().max() == 0 and out.velocity.abs().max() == 0


def test_gradients_reach_every_parameter():
    net = lapirn.Network(lapirn.Config(start_channels=2))
    fixed, moving = pair((16, 16, 16))
    assert_gradients_reach_every_parameter(net, {"fixed": fixed, "moving": moving})


def test_diffeomorphic_with_random_weights():
    net = lapirn.Network(lapirn.Config())
    fixed, moving = pair((24, 24, 24), seed=3)
    with torch.no_grad():
        out = net(fixed, moving)
    assert out.displacement.abs().max() > 0.05
    assert warp.jacobian_determinant(out.displacement).min() > 0
    # The displacement is exp(velocity) on the velocity's grid.
    exp = warp.integrate_velocity(out.velocity, net.config.int_steps)
    torch.testing.assert_close(out.displacement, exp)


def test_active_levels_and_freezing():
    net = lapirn.Network(lapirn.Config(start_channels=2))
    fixed, moving = pair((16, 24, 16))
    for p in (1, 2):
        net.active_levels = p
        out = net(fixed, moving)
        grid = tuple(s // 2 ** (3 - p) for s in (16, 24, 16))
        assert len(out.levels) == p and out.velocity.shape == (1, 3, *grid)
        assert out.displacement.shape == (1, 3, 16, 24, 16)
        expected = warp.resize_field(warp.integrate_velocity(out.velocity, 7), (16, 24, 16))
        torch.testing.assert_close(out.displacement, expected)
    try:
        net.active_levels = 4
    except ValueError:
        pass
    else:
        raise AssertionError("active_levels=4 accepted")

    net.active_levels = 2
    net.freeze_levels([1])
    assert not any(p.requires_grad for p in net.levels[0].parameters())
    net.loss(net(fixed, moving), {"fixed": fixed, "moving": moving})["total"].backward()
    assert all(p.grad is None for p in net.levels[0].parameters())
    assert all(p.grad is not None for p in net.levels[1].parameters())
    assert all(p.grad is None for p in net.levels[2].parameters())  # level 3 is not active
    net.unfreeze_levels([1])
    assert all(p.requires_grad for p in net.parameters())


def test_extension_points_are_used():
    calls = []

    class Recorder(lapirn.LapIRN):
        def combine_velocity(self, coarse_up, residual):
            calls.append(tuple(coarse_up.shape[2:]))
            return residual  # drop the coarser velocity

    class ScaledSkip(lapirn.ConcatSkip):
        def forward(self, decoded, encoded):
            return torch.cat([decoded, 0 * encoded], dim=1)

    class SkipLevel(lapirn.LevelNet):
        def make_skip(self, width):
            return ScaledSkip(width)

    def factory(level: int, config: lapirn.Config) -> lapirn.LevelNet:
        return SkipLevel(2 if level == 1 else 5, config.start_channels, config.num_res_blocks, config.range_flow)

    net = Recorder(lapirn.Config(start_channels=2), level_factory=factory)
    assert all(isinstance(level.skip, ScaledSkip) for level in net.levels)
    fixed, moving = pair((16, 16, 16))
    with torch.no_grad():
        out = net(fixed, moving)
    assert calls == [(8, 8, 8), (16, 16, 16)]
    torch.testing.assert_close(out.levels[2]["velocity"], out.levels[2]["residual"])


def test_loss_is_the_finest_active_level_loss():
    config = lapirn.Config(start_channels=2)
    net = lapirn.Network(config)
    fixed, moving = pair((32, 32, 32))
    v = warp.gaussian_smooth(torch.randn(1, 3, 32, 32, 32), 2.0)
    # k/2^(L−p): level 1 weighs the same velocity a quarter of level 3, in LapIRN units (×2N/(N−1) voxels).
    s3, s1 = net.smoothness(v, 3), net.smoothness(v, 1)
    torch.testing.assert_close(s1, s3 / 4)
    torch.testing.assert_close(s3, 3.5 * losses.gradient_loss(v * (2 * 32 / 31)))
    # Level 1: single NCC with window 3; level 2: window 5 + half of window 3 on the pooled images.
    small_f, small_m = fixed[..., :16, :16, :16], moving[..., :16, :16, :16]
    torch.testing.assert_close(net.similarity(small_f, small_m, 1), losses.local_ncc_loss(small_f, small_m, 3))
    pool = lambda x: torch.nn.functional.avg_pool3d(x, 3, 2, 1, count_include_pad=False)  # noqa: E731
    expected = losses.local_ncc_loss(small_f, small_m, 5) + 0.5 * losses.local_ncc_loss(pool(small_f),
                                                                                         pool(small_m), 3)
    torch.testing.assert_close(net.similarity(small_f, small_m, 2), expected)

    net.active_levels = 2
    out = net(fixed, moving)
    terms = net.loss(out, {"fixed": fixed, "moving": moving})
    last = out.levels[-1]
    torch.testing.assert_close(terms["similarity"], net.similarity(last["fixed"], last["warped"], 2))
    torch.testing.assert_close(terms["smoothness"], net.smoothness(last["velocity"], 2))
    torch.testing.assert_close(terms["total"], terms["similarity"] + terms["smoothness"])
