"""Analytic checks of the losses and the MIND-SSC descriptor."""

from __future__ import annotations

import torch

from DeepRegistrationLib.core import losses, warp
from DeepRegistrationLib.core.mind import SSC_PAIRS, mind_loss, mind_ssc


def test_global_cc_is_zero_for_linear_maps_and_two_for_inversion():
    a = torch.rand(2, 1, 8, 8, 8)
    assert losses.global_cc_loss(a, 3 * a + 1).abs() < 1e-4
    assert (losses.global_cc_loss(a, -a) - 2).abs() < 1e-4


def test_local_ncc_prefers_aligned_images():
    a = warp.gaussian_smooth(torch.rand(1, 1, 16, 16, 16), 1.0)
    a = (a - a.min()) / (a.max() - a.min())
    shifted = torch.roll(a, 3, dims=2)
    assert losses.local_ncc_loss(a, a) < 0.05  # eps = 1e-5 in the denominator, as VoxelMorph
    # Zero padding at the border (as in VoxelMorph and LapIRN) breaks exact linear invariance there only.
    assert losses.local_ncc_loss(a, 2 * a + 1) < losses.local_ncc_loss(a, shifted) / 3


def test_gradient_loss_of_linear_field_with_spacing():
    disp = torch.zeros(1, 3, 6, 6, 6)
    disp[:, 0] = torch.arange(6.0).view(6, 1, 1) * 0.5  # ∂u_i/∂i = 0.5
    assert torch.isclose(losses.gradient_loss(disp, "l2"), torch.tensor(0.25 / 9))
    assert torch.isclose(losses.gradient_loss(disp, "l1"), torch.tensor(0.5 / 9))
    # In mm: u_i in mm is 2·u, per mm of axis i (2 mm): derivative 0.5 again; on other axes zero.
    assert torch.isclose(losses.gradient_loss(disp, "l2", spacing=(2.0, 1.0, 1.0)), torch.tensor(0.25 / 9))
    assert torch.isclose(losses.gradient_loss(disp, "l2", spacing=(1.0, 2.0, 2.0)), torch.tensor(0.25 / 9))
    assert torch.isclose(losses.gradient_loss(disp, "l2", spacing=(2.0, 2.0, 2.0)), torch.tensor(0.25 / 9))
    assert torch.isclose(losses.gradient_loss(disp, "l2", spacing=(4.0, 1.0, 1.0)), torch.tensor(0.25 / 9))
    disp_j = torch.zeros(1, 3, 6, 6, 6)
    disp_j[:, 0] = torch.arange(6.0).view(1, 6, 1) * 0.5  # ∂u_i/∂j = 0.5 voxel per voxel
    # spacing (2, 1, 1): u_i is 1 mm per voxel of j, which is 1 mm: derivative 1.
    assert torch.isclose(losses.gradient_loss(disp_j, "l2", spacing=(2.0, 1.0, 1.0)), torch.tensor(1.0 / 9))


def test_bending_energy_vanishes_on_affine_and_not_on_quadratic():
    theta = torch.tensor([[[1.1, 0.1, 0.0, 1.0], [0.0, 0.9, 0.2, 0.0], [0.1, 0.0, 1.0, -1.0]]])
    assert losses.bending_energy(warp.affine_displacement(theta, (8, 8, 8))).abs() < 1e-8
    quad = torch.zeros(1, 3, 8, 8, 8)
    quad[:, 1] = (torch.arange(8.0).view(8, 1, 1) ** 2) * 0.05
    assert losses.bending_energy(quad) > 1e-4


def test_negative_jacobian_penalty():
    assert losses.neg_jacobian_loss(torch.zeros(1, 3, 6, 6, 6)) == 0
    folding = torch.zeros(1, 3, 6, 6, 6)
    folding[:, 0] = -2.0 * torch.arange(6.0).view(6, 1, 1)  # det J = 1 − 2 = −1 everywhere
    assert torch.isclose(losses.neg_jacobian_loss(folding), torch.tensor(1.0))


def test_pyramid_weights():
    assert [losses.pyramid_weight(p, 3) for p in (1, 2, 3)] == [0.25, 0.5, 1.0]


def test_soft_dice():
    labels = torch.zeros(1, 1, 6, 6, 6, dtype=torch.int64)
    labels[..., :3, :, :] = 1
    onehot = losses.one_hot(labels, [1])
    assert losses.soft_dice_loss(onehot, onehot) < 1e-6
    assert losses.soft_dice_loss(onehot, 1 - onehot) > 0.99


def test_mind_ssc_invariant_to_inversion_and_linear_maps():
    img = warp.gaussian_smooth(torch.rand(1, 1, 12, 12, 12), 1.0)
    d = mind_ssc(img)
    assert d.shape == (1, len(SSC_PAIRS), 12, 12, 12) and len(SSC_PAIRS) == 12
    assert torch.allclose(d, mind_ssc(1 - img), atol=1e-5)
    assert torch.allclose(d, mind_ssc(5 * img + 3), atol=1e-4)
    assert mind_loss(img, torch.roll(img, 2, dims=3)) > 10 * mind_loss(img, -img) + 1e-4


def test_separable_box_mean_equals_the_cubic_window():
    x = torch.rand(1, 2, 12, 13, 14)
    cubic = torch.nn.functional.conv3d(x, torch.ones(2, 1, 5, 5, 5) / 125, padding=2, groups=2)
    assert torch.allclose(losses.box_mean(x, 5), cubic, atol=1e-6)
