"""MMLN (networks/mmln.py): shapes, identity, gradients, diffeomorphism, parameter count, training-only branches,
slice stitching, the core region and a short optimisation on a toy pair."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from DeepRegistrationLib.core import losses, padding, warp
from DeepRegistrationLib.methods import registry
from DeepRegistrationLib.methods.networks import mmln
from conftest import optimise_on_pair, random_pair as pair

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(start_channels=2, planar_start_channels=2, num_res_blocks=1)
"""A narrow network for the tests that run it (the CPU is shared); the structure is the paper's."""


def small_net(**overrides) -> mmln.MMLN:
    return mmln.MMLN(mmln.Config(**{**SMALL, **overrides}))


def zero_heads(net: mmln.MMLN) -> None:
    for level in [*net.levels, *net.planar_levels]:
        torch.nn.init.zeros_(level.head.out.weight)


def test_paper_defaults():
    config = registry.get_method("mmln").config_class()
    assert (config.alpha, config.beta, config.theta) == (0.25, 0.5, 0.25)
    assert config.working_shape == (160, 192, 224)
    meta = {f.name: f.metadata for f in dataclasses.fields(config)}
    assert meta["alpha"]["paper"] and meta["core_fraction"]["paper"] and not meta["slice_axis"]["paper"]
    assert mmln.Config.from_dict(config.to_dict()) == config


def test_core_region_is_the_centred_half():
    box, half_box = mmln.core_boxes((160, 192, 224), 0.5)
    assert box[1:] == (slice(40, 120), slice(48, 144), slice(56, 168))  # 80 × 96 × 112, centred (§3.3)
    assert half_box[1:] == (slice(20, 60), slice(24, 72), slice(28, 84))


def test_parameter_count_from_architecture():
    config = mmln.Config()
    c, r = config.start_channels, config.num_res_blocks
    w = 4 * c

    def level(in_channels: int, taps: int, up_taps: int, components: int) -> int:
        encoder = in_channels * w * taps + w * w * taps
        down = w * w * taps
        blocks = r * 2 * w * w * taps
        up = w * w * up_taps
        head = 2 * w * w * taps + w * components * taps  # 2w → w → components, no biases
        return encoder + down + blocks + up + head

    expected_3d = level(2, 27, 8, 3) + 2 * level(5, 27, 8, 3)
    expected_2d = 2 * level(2, 9, 4, 2)  # config.planar_start_channels == config.start_channels (LapIRN width)
    net = mmln.MMLN(config)
    count = sum(p.numel() for p in net.parameters())
    print(f"MMLN parameters: {count} (3D pyramid {expected_3d}, two 2D networks {expected_2d})")
    assert sum(p.numel() for p in net.levels.parameters()) == expected_3d
    assert count == expected_3d + expected_2d


def test_shapes_and_finiteness_on_padded_odd_grid():
    net = small_net()
    shape = (21, 27, 19)
    fixed, moving = (padding.pad_to_multiple(x, net.multiple) for x in pair(shape))
    grid = tuple(fixed.shape[2:])
    assert grid == (24, 32, 24)
    net.eval()
    out = net(fixed, moving)
    assert out.displacement.shape == out.velocity.shape == (1, 3, *grid)
    assert torch.isfinite(out.displacement).all()
    assert padding.crop_to_shape(out.displacement, shape).shape == (1, 3, *shape)
    net.train()
    for p in (1, 2, 3):
        net.active_levels = p
        last = net(fixed, moving).levels[-1]
        level_grid = net.level_shape(grid, p)
        keys = ("planar_velocity", "planar_displacement", "planar_warped") if p < 3 else (
            "core_fixed", "core_moving", "core_velocity", "core_displacement", "core_warped")
        for key in keys:
            expected = level_grid if p < 3 else tuple(s // 2 for s in level_grid)
            assert last[key].shape[2:] == expected and torch.isfinite(last[key]).all(), key


def test_zero_output_layers_give_identity_in_every_branch():
    net = small_net()
    zero_heads(net)
    fixed, moving = pair((32, 32, 32))
    net.train()
    for p in (1, 2, 3):
        net.active_levels = p
        out = net(fixed, moving)
        assert out.displacement.abs().max() == 0
        for key, value in out.levels[-1].items():
            if key.endswith(("displacement", "velocity")):
                assert value.abs().max() == 0, key
        if p == 3:
            torch.testing.assert_close(out.levels[-1]["core_warped"], out.levels[-1]["core_moving"])


def test_core_velocity_keeps_the_full_grid_voxel_units():
    """With level 3's output layer zeroed, the core velocity is the core of the upsampled level-2 velocity."""
    net = small_net()
    torch.nn.init.zeros_(net.levels[2].head.out.weight)
    net.train()
    out = net(*pair((32, 32, 32)))
    box, _ = mmln.core_boxes((32, 32, 32), net.config.core_fraction)
    last = out.levels[-1]
    assert last["velocity"].abs().max() > 0
    torch.testing.assert_close(last["core_velocity"], last["velocity"][box])


def test_slice_stitching_has_zero_out_of_plane_component():
    volume = torch.rand(2, 1, 4, 6, 8)
    for axis in range(3):
        slices = mmln.slice_volume(volume, axis)
        assert slices.shape[0] == 2 * volume.shape[2 + axis]
        planar = torch.randn(slices.shape[0], 2, *slices.shape[2:])
        field = mmln.stitch_slices(planar, 2, axis)
        assert field.shape == (2, 3, 4, 6, 8)
        assert field[:, axis].abs().max() == 0
        in_plane = [c for c in range(3) if c != axis]
        # Slice s of item b of the field is planar entry b·S + s, components in axis order.
        index = [slice(None)] * 3
        index[axis] = 1
        torch.testing.assert_close(field[1][in_plane][(slice(None), *index)], planar[volume.shape[2 + axis] + 1])
        torch.testing.assert_close(mmln.slice_volume(field[:, in_plane], axis), planar)


@pytest.mark.parametrize("axis", [0, 2])
def test_planar_branch_displacement_is_in_plane(axis):
    net = small_net(slice_axis=axis)
    net.train()
    net.active_levels = 2
    last = net(*pair((32, 32, 32))).levels[-1]
    assert last["planar_displacement"][:, axis].abs().max() == 0
    assert last["planar_displacement"].abs().max() > 0


def test_eval_runs_only_the_3d_pyramid():
    net = small_net()
    calls = {"planar": 0, "level3": 0}
    for planar in net.planar_levels:
        planar.register_forward_hook(lambda *_: calls.__setitem__("planar", calls["planar"] + 1))
    net.levels[2].register_forward_hook(lambda *_: calls.__setitem__("level3", calls["level3"] + 1))
    fixed, moving = pair((32, 32, 32))

    net.eval()
    for p in (1, 2, 3):
        net.active_levels = p
        out = net(fixed, moving)
        assert not any(k.startswith(("planar", "core")) for k in out.levels[-1])
        net.loss(out, {"fixed": fixed, "moving": moving})["total"].backward()
    assert calls == {"planar": 0, "level3": 1}
    assert all(p.grad is None for p in net.planar_levels.parameters())

    net.train()
    net.active_levels = 3
    net(fixed, moving)
    assert calls == {"planar": 0, "level3": 3}  # complete image, then the core
    for p in (1, 2):
        net.active_levels = p
        net(fixed, moving)
    assert calls["planar"] == 2


def test_loss_weights_per_level():
    net = small_net()
    net.train()
    fixed, moving = pair((32, 32, 32))
    for p, weight, key in ((1, 0.25, "planar_similarity"), (2, 0.5, "planar_similarity"), (3, 0.25, "core_similarity")):
        net.active_levels = p
        out = net(fixed, moving)
        terms = net.loss(out, {"fixed": fixed, "moving": moving})
        last = out.levels[-1]
        assert torch.isclose(terms["similarity"], losses.global_cc_loss(last["fixed"], last["warped"]))
        expected = terms["similarity"] + terms["smoothness"] + weight * terms[key]
        assert torch.isclose(terms["total"], expected)
        k = net.config.smooth_weight * losses.pyramid_weight(p, 3)
        assert terms["smoothness"] > 0 and k == net.config.smooth_weight / 2 ** (3 - p)


def test_gradients_reach_every_parameter_and_branches_train_the_3d_network():
    net = small_net()
    net.train()
    fixed, moving = pair((32, 32, 32))
    for p in (1, 2, 3):
        net.active_levels = p
        terms = net.loss(net(fixed, moving), {"fixed": fixed, "moving": moving})
        branch = terms["planar_similarity"] if p < 3 else terms["core_similarity"]
        # The 2D and core similarities alone reach the level's 3D network (2D: through M_p∘φ_p; core: shared CNN).
        grads = torch.autograd.grad(branch, list(net.levels[p - 1].parameters()), allow_unused=True,
                                    retain_graph=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
        terms["total"].backward()
    missing = [n for n, q in net.named_parameters() if q.grad is None or q.grad.abs().sum() == 0]
    assert not missing


def test_positive_jacobian_with_random_weights_and_small_outputs():
    net = small_net()
    with torch.no_grad():
        for level in net.levels:
            level.head.out.weight.mul_(0.05)
    net.eval()
    out = net(*pair((32, 32, 32)))
    assert out.displacement.abs().max() > 0.01
    assert warp.jacobian_determinant(out.displacement).min() > 0


def test_short_optimisation_lowers_loss_and_raises_dice(toy_pair):
    """Level 2 (the stage with the 2D branch, level 1 trained with it) on a 32³ toy pair; Dice at full resolution."""
    net = small_net()
    net.active_levels = 2
    r = optimise_on_pair(net, toy_pair((32, 32, 32), magnitude=6.0), steps=30, lr=3e-3, eval_output=True)
    print(f"MMLN toy optimisation: loss {r['first']:.4f} → {r['final']:.4f}, Dice {r['dice_before']:.3f} → "
          f"{r['dice_after']:.3f}")
    assert r["final"] < 0.6 * r["first"]
    assert r["dice_after"] > r["dice_before"] + 0.03
