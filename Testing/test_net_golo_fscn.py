"""GoLo-FSCN (Zheng et al. 2022): redundant blocks, self-calibration, Eq. 5 superposition, loss, training."""

from __future__ import annotations


import pytest
import torch

from DeepRegistrationLib.core import losses, padding, warp
from DeepRegistrationLib.methods.networks import golo_fscn
from DeepRegistrationLib.methods.registry import get_method
from conftest import optimise_on_pair

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(start_channels=2)  # width 8: fast CPU tests of the same architecture


def small_net(**overrides) -> golo_fscn.GoLoFSCN:
    return golo_fscn.Network(golo_fscn.Config(**{**SMALL, **overrides}))


def level_nets(net: golo_fscn.GoLoFSCN) -> list[golo_fscn.FSCNLevel]:
    return [m for m in net.modules() if isinstance(m, golo_fscn.FSCNLevel)]


# ---------------------------------------------------------------------------------------------------- blocks


def test_block_windows_take_real_neighbour_voxels():
    assert golo_fscn.block_windows(16, 2, 2) == [(0, 10), (6, 10)]  # 2 extra rows towards the neighbour
    assert golo_fscn.block_windows(16, 4, 2) == [(0, 8), (2, 8), (6, 8), (8, 8)]
    assert golo_fscn.block_windows(16, 2, 0) == [(0, 8), (8, 8)]
    x = torch.randn(2, 3, 8, 12, 16)
    blocks = golo_fscn.split_blocks(x, 2, 2)
    assert blocks.shape == (16, 3, 6, 8, 10)
    # block n = (1, 0, 1) of batch item 1 is the window starting at (4−2, 0, 8−2) of the image itself
    n = (1 * 2 + 0) * 2 + 1
    torch.testing.assert_close(blocks[n * 2 + 1], x[1, :, 2:8, 0:8, 6:16], rtol=0, atol=0)


@pytest.mark.parametrize("blocks,margin", [(2, 2), (2, 0), (4, 2), (2, 4)])
def test_split_then_stitch_returns_the_tensor_exactly(blocks, margin):
    x = torch.randn(2, 3, 16, 24, 32)
    y = golo_fscn.stitch_blocks(golo_fscn.split_blocks(x, blocks, margin), x.shape[2:], blocks, margin)
    assert torch.equal(y, x)


def test_blockwise_filtering_has_no_seams_with_redundancy():
    """A 5³ filter (reach 2 = the margin) run on redundant blocks and stitched equals the filter on the whole image,
    seams included; without redundancy the voxels next to the seams are wrong and only those."""
    x = warp.gaussian_smooth(torch.randn(1, 2, 16, 16, 24), 1.5)
    conv = torch.nn.Conv3d(2, 2, 5, padding=2)
    with torch.no_grad():
        whole = conv(x)
        redundant = golo_fscn.stitch_blocks(conv(golo_fscn.split_blocks(x, 2, 2)), x.shape[2:], 2, 2)
        standard = golo_fscn.stitch_blocks(conv(golo_fscn.split_blocks(x, 2, 0)), x.shape[2:], 2, 0)
    torch.testing.assert_close(redundant, whole, rtol=0, atol=1e-5)
    near_seam = torch.zeros(16, 16, 24, dtype=torch.bool)
    near_seam[6:10], near_seam[:, 6:10], near_seam[:, :, 10:14] = True, True, True
    error = (standard - whole).abs()
    assert error[..., near_seam].amax() > 1e-2
    assert error[..., ~near_seam].amax() < 1e-5


# ------------------------------------------------------------------------------------------ superposition


def test_superposition_samples_the_coarse_velocity_at_the_displaced_point():
    """Eq. 5 with V1 affine (exact under trilinear sampling) and V2 a small translation t:
    V(x) = t + V1(x + t) = V1(x) + t + A t, not V2 sampled at x + V1 (the other order)."""
    net = small_net()
    grid = warp.identity_grid((12, 12, 12))
    a = torch.tensor([[0.02, -0.01, 0.0], [0.0, 0.03, 0.01], [0.01, 0.0, -0.02]])
    v1 = torch.einsum("ij,bjxyz->bixyz", a, grid) + torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1, 1)
    t = torch.tensor([0.5, -0.25, 0.75]).view(1, 3, 1, 1, 1)
    v2 = t.expand(1, 3, 12, 12, 12)
    v = net.combine_velocity(v1, v2)
    expected = v1 + t + (a @ t.view(3)).view(1, 3, 1, 1, 1)
    inner = (slice(None), slice(None), slice(2, 10), slice(2, 10), slice(2, 10))
    torch.testing.assert_close(v[inner], expected[inner], rtol=0, atol=1e-5)
    assert not torch.allclose(v[inner], (v1 + t)[inner], atol=1e-3)


def test_superposition_is_composition_to_first_order(toy_pair):
    """exp(V2 + warp(V1, V2)) = exp(V1)∘exp(V2) + O(ε²) for velocities of size ε: halving ε quarters the error."""
    net = small_net()
    base1, base2 = toy_pair((16, 16, 16), 1.0, seed=1)["velocity"], toy_pair((16, 16, 16), 1.0, seed=2)["velocity"]
    errors = []
    for eps in (0.5, 0.25):
        v1, v2 = eps * base1, eps * base2
        combined = warp.integrate_velocity(net.combine_velocity(v1, v2))
        composed = warp.compose(warp.integrate_velocity(v1), warp.integrate_velocity(v2))
        errors.append(float((combined - composed).abs().amax()))
    assert errors[0] < 0.05  # ε = 0.5: velocities up to 0.7 voxel
    assert errors[1] < 0.35 * errors[0]


# ------------------------------------------------------------------------------------------ self-calibration


def test_self_calibration_keeps_shape_on_odd_sizes_and_uses_both_scales():
    module = golo_fscn.SelfCalibration(8, rate=2)
    x = torch.randn(2, 8, 5, 7, 9, requires_grad=True)
    y = module(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_global_velocity_supplements_the_stitched_local_velocity():
    level = small_net().levels[2]
    assert isinstance(level, golo_fscn.GlobalLocalLevel)
    fixed, warped = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    coarse, embedding = 0.01 * torch.randn(1, 3, 16, 16, 16), torch.randn(1, 8, 8, 8, 8)
    with torch.no_grad():
        total, features = level(fixed, warped, coarse, embedding)
        global_v, global_features = level.global_net(fixed, warped, coarse, embedding)
        blocks = [golo_fscn.split_blocks(t, 2, 2) for t in (fixed, warped, coarse)]
        local_v, _ = level.local_net(*blocks, golo_fscn.split_blocks(embedding, 2, 1))
    torch.testing.assert_close(total, global_v + golo_fscn.stitch_blocks(local_v, (16, 16, 16), 2, 2))
    torch.testing.assert_close(features, global_features)
    assert level.global_net is not level.local_net
    assert global_v.abs().amax() > 0 and local_v.abs().amax() > 0


# ------------------------------------------------------------------------------------------ network


def test_config_defaults_are_the_papers():
    cfg = golo_fscn.Config()
    assert cfg.working_shape == (160, 192, 224)
    assert (cfg.calibration_rate, cfg.blocks, cfg.block_margin, cfg.jacobian_weight) == (2, 2, 2, 1.0)
    assert isinstance(get_method("golo_fscn").build(), golo_fscn.GoLoFSCN)


def test_forward_shapes_and_finiteness_on_padded_odd_grid():
    net = small_net()
    shape = (13, 17, 30)
    fixed = padding.pad_to_multiple(torch.rand(1, 1, *shape), net.multiple)
    moving = padding.pad_to_multiple(torch.rand(1, 1, *shape), net.multiple)
    assert fixed.shape[2:] == (16, 32, 32)
    with torch.no_grad():
        out = net(fixed, moving)
    assert out.displacement.shape == out.velocity.shape == (1, 3, 16, 32, 32)
    assert [lv["velocity"].shape[2:] for lv in out.levels] == [(4, 8, 8), (8, 16, 16), (16, 32, 32)]
    assert torch.isfinite(out.displacement).all() and torch.isfinite(out.velocity).all()
    assert padding.crop_to_shape(out.displacement, shape).shape[2:] == shape


def test_zero_output_layers_give_identity():
    net = small_net()
    for level in level_nets(net):
        torch.nn.init.zeros_(level.head.out.weight)
    fixed, moving = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        out = net(fixed, moving)
    assert out.displacement.abs().amax() == 0 and out.velocity.abs().amax() == 0


def test_gradients_reach_every_parameter_and_freezing_covers_both_branches():
    net = small_net()
    fixed, moving = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    net(fixed, moving).displacement.square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing
    net.freeze_levels([2])
    assert not any(p.requires_grad for p in net.levels[1].local_net.parameters())
    assert not any(p.requires_grad for p in net.levels[1].global_net.parameters())


def test_random_weights_small_outputs_are_diffeomorphic():
    net = small_net(range_flow=0.05)  # residuals bounded by 0.05 normalised units (≈ 0.8 voxel at 32)
    fixed, moving = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        out = net(fixed, moving)
    assert out.velocity.abs().amax() > 0.05
    assert warp.jacobian_determinant(out.displacement).amin() > 0


def test_parameter_count_matches_the_architecture():
    cfg = golo_fscn.Config()
    w, h, r = 4 * cfg.start_channels, 2 * cfg.start_channels, cfg.num_res_blocks

    def lapirn_level(cin: int) -> int:
        encoder = 27 * (cin * w + w * w)
        down, up = 27 * w * w, 8 * w * w
        residual = r * 2 * 27 * w * w
        head = 27 * (2 * w * w + w * 3)
        return encoder + down + residual + up + head

    calibration = w * w + 5 * 27 * h * h  # 1³ split, then F1, F2 (r), F2' (2r), F3, F4
    expected = (lapirn_level(2) + calibration) + 4 * (lapirn_level(5) + calibration)  # levels 2, 3: two branches
    count = sum(p.numel() for p in golo_fscn.Network(cfg).parameters())
    print(f"GoLo-FSCN parameters (paper defaults): {count}")
    assert count == expected


def test_loss_terms_follow_eq_8_to_12():
    net = small_net()
    net.active_levels = 2
    fixed, moving = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    out = net(fixed, moving)
    terms = net.loss(out, {"fixed": fixed, "moving": moving})
    last = out.levels[-1]
    torch.testing.assert_close(terms["similarity"], losses.global_cc_loss(last["fixed"], last["warped"]))
    torch.testing.assert_close(terms["jacobian"], losses.neg_jacobian_loss(last["displacement"]))
    torch.testing.assert_close(terms["total"], terms["similarity"] + terms["smoothness"] + terms["jacobian"])
    folded = torch.zeros(1, 3, 8, 8, 8)
    folded[:, 0] = -2.0 * torch.arange(8.0).view(8, 1, 1)  # det J = −1 everywhere
    assert float(losses.neg_jacobian_loss(folded)) == pytest.approx(1.0)


def test_short_optimisation_lowers_loss_and_raises_dice(toy_pair):
    net = small_net()
    net.active_levels = 2  # levels 1 and 2: FSCN, the global-local branches and Eq. 5 all train
    r = optimise_on_pair(net, toy_pair((32, 32, 32), magnitude=4.0, seed=3), steps=40, lr=5e-3)
    print(f"GL-FSCN loss {r['first']:.4f} -> {r['final']:.4f}, Dice {r['dice_before']:.3f} -> {r['dice_after']:.3f}")
    assert r["final"] < 0.6 * r["first"]
    assert r["dice_after"] > r["dice_before"] + 0.03
