"""JAD (networks/jad.py): shapes, identity, gradients, parameter count, the affine parameterisation, the order of
the complete transform, affine recovery on the global-correlation loss and a short optimisation on a toy pair."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from DeepRegistrationLib.core import losses, warp
from DeepRegistrationLib.methods import registry
from DeepRegistrationLib.methods.networks import jad

from conftest import assert_gradients_reach_every_parameter, assert_parameter_count, conv_parameters as conv
from conftest import ellipsoid_labels, forward_on_padded_odd_grid, phantom_image, random_pair as pair
from conftest import zero_output_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def rigid(shape, degrees: float, translation) -> torch.Tensor:
    """Voxel affine [1, 3, 4]: rotation by `degrees` in the (i, j) plane about the grid centre, then translation."""
    a = math.radians(degrees)
    rotation = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    centre = torch.tensor([(s - 1) / 2 for s in shape])
    b = centre - rotation @ centre + torch.tensor(translation)
    return torch.cat([rotation, b[:, None]], dim=1)[None]


def invert(affine: torch.Tensor) -> torch.Tensor:
    a_inv = torch.linalg.inv(affine[:, :, :3])
    return torch.cat([a_inv, -(a_inv @ affine[:, :, 3:])], dim=2)


def test_paper_defaults():
    config = registry.get_method("jad").config_class()
    assert config.working_shape == (192, 192, 192)
    assert (config.reg_weight, config.ncc_window, config.int_steps) == (1000.0, 9, 0)
    meta = {f.name: f.metadata for f in dataclasses.fields(config)}
    assert meta["reg_weight"]["paper"] and meta["ncc_window"]["paper"] and meta["int_steps"]["paper"]
    assert not meta["leaky_slope"]["paper"] and not meta["group_norm_groups"]["paper"]
    assert jad.Config.from_dict(config.to_dict()) == config
    spec = registry.get_method("jad")
    assert spec.has_affine and spec.training_needs_labels and not spec.diffeomorphic


def test_parameter_count_from_architecture():
    # conv(cin, cout, k): kernel k³ with bias (transposed convolutions alike)
    def block(cin: int, cout: int) -> int:  # convolution → LeakyReLU → BatchNorm (weight and bias)
        return conv(cin, cout) + 2 * cout

    def residual(cin: int, cout: int) -> int:  # two blocks and a 1×1×1 shortcut when the width changes
        return block(cin, cout) + block(cout, cout) + (conv(cin, cout, 1) if cin != cout else 0)

    encoder = (block(2, 16) + conv(16, 16) + block(16, 32) + conv(32, 32) + block(32, 32) + conv(32, 32)
               + block(32, 32))
    affine_head = 32 * 12 + 12
    dilated = 4 * (conv(32, 32) + 2 * 32)  # convolution and GroupNorm (weight and bias)
    decoder = (conv(32, 32, 2) + residual(64, 32)  # 1/4: up, concatenate the 32-channel skip
               + conv(32, 32, 2) + residual(64, 32)  # 1/2
               + conv(32, 16, 2) + residual(32, 16)  # full grid, 16-channel skip
               + conv(16, 3))
    assert_parameter_count(jad.Network(jad.Config()), encoder + affine_head + dilated + decoder, "JAD")


def test_shapes_and_finiteness_on_padded_odd_grid():
    net = jad.Network(jad.Config())
    grid = (16, 24, 16)
    for mode in (net.train, net.eval):
        mode()
        out = forward_on_padded_odd_grid(net, (13, 21, 9), grid)
        assert out.affine.shape == (1, 3, 4) and out.velocity is None
        assert torch.isfinite(out.affine).all()
        for value in out.levels[0].values():
            assert value.shape[2:] == grid and torch.isfinite(value).all()


def test_zero_output_layers_give_identity():
    out = zero_output_layers(jad.Network(jad.Config()))(*pair((16, 16, 16)))
    torch.testing.assert_close(out.affine, torch.eye(3, 4)[None])
    assert out.displacement.abs().max() < 1e-5
    assert out.levels[0]["deformable"].abs().max() == 0


def test_normalised_parameters_convert_to_the_voxel_affine():
    """θ acts on n = 2x/(N−1) − 1 (channel order i, j, k); the voxel affine must move every voxel identically."""
    shape = (9, 12, 7)
    theta = torch.eye(3, 4)[None] + 0.1 * torch.randn(2, 3, 4)
    affine = jad.normalised_to_voxel_affine(theta, shape)
    grid = warp.identity_grid(shape).expand(2, -1, -1, -1, -1)
    scale = torch.tensor([2.0 / (n - 1) for n in shape]).view(1, 3, 1, 1, 1)
    normalised = grid * scale - 1
    mapped = torch.einsum("bij,bjxyz->bixyz", theta[:, :, :3], normalised) + theta[:, :, 3].view(2, 3, 1, 1, 1)
    expected = (mapped + 1) / scale
    torch.testing.assert_close(jad.apply_affine(affine, grid), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(warp.affine_displacement(affine, shape), expected - grid, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(jad.normalised_to_voxel_affine(torch.eye(3, 4)[None], shape), torch.eye(3, 4)[None])


def test_displacement_is_affine_then_deformable():
    """Warping by `displacement` equals warping by the affine, then by the deformable field (§5: compose(T, u))."""
    net = jad.Network(jad.Config())
    torch.nn.init.normal_(net.flow.weight, std=0.2)
    with torch.no_grad():
        net.affine_head.bias.copy_(torch.tensor([0.05, -0.08, 0.0, 0.1, 0.06, 0.02, 0.0, -0.1, 0.0, 0.0, 0.03, 0.1]))
    net.eval()
    shape = (24, 24, 24)
    fixed, _ = pair(shape)
    grid = warp.identity_grid(shape)
    moving = 0.03 * grid[:, :1] - 0.02 * grid[:, 1:2] + 0.05 * grid[:, 2:]  # linear: interpolation is exact
    with torch.no_grad():
        out = net(fixed, moving)
    deformable = out.levels[0]["deformable"]
    affine_disp = warp.affine_displacement(out.affine, shape)
    assert deformable.abs().max() > 0.3 and (out.affine - torch.eye(3, 4)).abs().max() > 0.05
    inner = (slice(None), slice(None), slice(5, -5), slice(5, -5), slice(5, -5))
    sequential = warp.warp_image(warp.warp_image(moving, affine_disp), deformable)
    torch.testing.assert_close(warp.warp_image(moving, out.displacement)[inner], sequential[inner], atol=1e-4,
                               rtol=1e-4)
    torch.testing.assert_close(out.displacement[inner], warp.compose(affine_disp, deformable)[inner], atol=1e-4,
                               rtol=1e-4)
    expected = jad.apply_affine(out.affine, grid + deformable) - grid  # x ↦ T(x + u(x)), exact everywhere
    torch.testing.assert_close(out.displacement, expected)
    assert (warp.compose(deformable, affine_disp) - out.displacement)[inner].abs().max() > 0.05  # order matters


def test_loss_terms_follow_eq5():
    net = jad.Network(jad.Config())
    torch.nn.init.normal_(net.flow.weight, std=0.02)
    shape = (16, 16, 16)
    labels = ellipsoid_labels(shape)
    fixed = phantom_image(labels)
    moving = warp.warp_image(fixed, 0.5 * torch.ones(1, 3, *shape))
    moving_labels = warp.warp_labels(labels, 0.5 * torch.ones(1, 3, *shape))
    out = net(fixed, moving)
    level = out.levels[0]
    unlabelled = net.loss(out, {"fixed": fixed, "moving": moving})
    assert "anatomical" not in unlabelled
    terms = net.loss(out, {"fixed": fixed, "moving": moving, "fixed_labels": labels, "moving_labels": moving_labels})
    rho = 1 - losses.global_cc_loss(fixed, level["affine_warped"])
    torch.testing.assert_close(terms["affine"], 1 - rho**2)
    warped = warp.warp_image(level["affine_warped"], level["deformable"])
    torch.testing.assert_close(terms["similarity"], losses.local_ncc_loss(fixed, warped, 9))
    normalised = level["deformable"] * 2 / 15
    torch.testing.assert_close(terms["smoothness"], losses.gradient_loss(normalised, "l2"))
    values = [1, 2, 3, 4]
    onehot = warp.warp_image(losses.one_hot(moving_labels, values), level["affine_displacement"], padding_mode="zeros")
    onehot = warp.warp_image(onehot, level["deformable"], padding_mode="zeros")
    torch.testing.assert_close(terms["anatomical"], losses.soft_dice_loss(onehot, losses.one_hot(labels, values)))
    torch.testing.assert_close(terms["total"], terms["affine"] + terms["similarity"] + terms["anatomical"]
                               + 1000.0 * terms["smoothness"])
    torch.testing.assert_close(unlabelled["total"], terms["total"] - terms["anatomical"])
    net.config.anat_weight = 0.25
    weighted = net.loss(out, {"fixed": fixed, "moving": moving, "fixed_labels": labels, "moving_labels": moving_labels})
    torch.testing.assert_close(weighted["total"], unlabelled["total"] + 0.25 * terms["anatomical"])
    net.config.anat_weight = 0.0
    images_only = net.loss(out, {"fixed": fixed, "moving": moving, "fixed_labels": labels, "moving_labels": moving_labels})
    assert "anatomical" not in images_only
    torch.testing.assert_close(images_only["total"], unlabelled["total"])


def test_gradients_reach_every_parameter():
    net = jad.Network(jad.Config())
    labels = ellipsoid_labels((16, 16, 16))
    fixed, moving = pair((16, 16, 16))
    assert_gradients_reach_every_parameter(
        net, {"fixed": fixed, "moving": moving, "fixed_labels": labels, "moving_labels": labels})


def test_affine_head_recovers_a_known_affine():
    """A few Adam steps on the global-correlation loss (Eq. 1) find a rotation of 8° plus a translation."""
    shape = (24, 24, 24)
    fixed = phantom_image(ellipsoid_labels(shape))
    truth = rigid(shape, 8.0, [1.5, -1.0, 2.0])
    moving = warp.warp_image(fixed, warp.affine_displacement(invert(truth), shape))
    true_disp = warp.affine_displacement(truth, shape)
    net = jad.Network(jad.Config())
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(50):
        affine = net.predict_affine(fixed, moving)
        loss = jad.squared_global_cc_loss(fixed, warp.warp_image(moving, warp.affine_displacement(affine, shape)))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        affine = net.predict_affine(fixed, moving)
    error = (warp.affine_displacement(affine, shape) - true_disp).norm(dim=1)
    start = true_disp.norm(dim=1)
    print(f"affine recovery: mean error {float(start.mean()):.2f} → {float(error.mean()):.2f} voxels, "
          f"max {float(start.max()):.2f} → {float(error.max()):.2f}")
    assert error.mean() < 0.3 and error.max() < 0.8
    torch.testing.assert_close(affine[:, :, :3], truth[:, :, :3], atol=0.03, rtol=0)


def test_velocity_output_when_integration_is_requested():
    net = jad.Network(jad.Config(int_steps=7))
    torch.nn.init.normal_(net.flow.weight, std=0.05)
    out = net(*pair((16, 16, 16)))
    assert out.velocity is not None and out.velocity.abs().max() > 0
    torch.testing.assert_close(out.levels[0]["deformable"], warp.integrate_velocity(out.velocity, 7))
