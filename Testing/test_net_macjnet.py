"""macJNet (Zhou et al. 2023): Reg-SubNet (attention LapIRN) + two Seg-SubNets, dual-similarity loss, Eq. 16,
the alternating schedule, and a short optimisation on a multimodal toy pair."""

from __future__ import annotations

import pytest
import torch
from test_macmind import mean_dice, multimodal_pair

from DeepRegistrationLib.core import padding, warp
from DeepRegistrationLib.methods.networks import macjnet

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(start_channels=2, seg_features=(8, 8, 8, 8, 8), seg_classes=5)


def small_net(**overrides) -> macjnet.Network:
    return macjnet.Network(macjnet.Config(**{**SMALL, **overrides}))


def expected_parameter_count(config: macjnet.Config) -> tuple[int, int]:
    """(Reg-SubNet, both Seg-SubNets) parameter counts from the architecture (3³ convs unless stated)."""
    w = 4 * config.start_channels
    reg = 0
    for in_channels in (2, 5, 5):
        reg += 27 * in_channels * w + 27 * w * w  # encoder, no bias
        reg += 27 * w * w  # stride-2 conv
        reg += config.num_res_blocks * 2 * 27 * w * w  # pre-activation residual blocks
        reg += 8 * w * w  # 2³ transposed conv
        reg += w * (w // 2) + (w * (w // 2) + w // 2) + (w // 2 + 1)  # attention gate: W_x, W_g + b_g, ψ + b_ψ
        reg += 27 * 2 * w * w + 27 * w * 3  # velocity head (2w → w → 3)
    f = config.seg_features

    def unit(c_in: int, c_out: int) -> int:  # conv without bias + affine instance norm
        return 27 * c_in * c_out + 2 * c_out

    seg, c_in = 0, 1
    for c in f:
        seg += unit(c_in, c) + unit(c, c)
        c_in = c
    for s in range(len(f) - 1):
        c = f[s]
        seg += 8 * f[s + 1] * c  # transposed conv, no bias
        seg += unit(2 * c, c) + unit(c, c)
        seg += (c * (c // 2) + c // 2) + ((c // 2) * c + c) + (c + 1)  # scSE: two FC layers, 1³ conv
    seg += f[0] * config.seg_classes  # 1³ output conv, no bias
    return reg, 2 * seg


def test_config_defaults_are_the_papers():
    c = macjnet.Config()
    assert (c.sim_weight, c.label_weight, c.smooth_weight) == (20.0, 2.0, 0.5)
    assert (c.patch_size, c.patch_distance, c.aggregation_window) == (5, 2, 5)
    assert c.scale_weights == (0.7, 0.3) and c.descriptor == "macmind"
    assert c.working_shape == (128, 128, 96) and c.labelled_fraction == 0.3
    assert (c.lr_registration, c.lr_segmentation) == (2e-5, 1e-5)
    assert macjnet.Config.from_dict(c.to_dict()) == c


def test_parameter_count():
    net = macjnet.Network(macjnet.Config())
    reg = sum(p.numel() for p in net.registration_parameters())
    seg = sum(p.numel() for p in net.segmentation_parameters())
    print(f"macJNet parameters: Reg-SubNet {reg:,}, Seg-SubNets {seg:,}, total {reg + seg:,}")
    assert (reg, seg) == expected_parameter_count(net.config)
    assert reg + seg == sum(p.numel() for p in net.parameters())


def test_shapes_finiteness_and_segmentations_on_a_padded_odd_grid():
    net = small_net(return_segmentations=True).eval()
    shape = (20, 27, 18)
    fixed, moving = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    fixed_p, moving_p = (padding.pad_to_multiple(x, net.multiple) for x in (fixed, moving))
    assert fixed_p.shape[2:] == (32, 32, 32)
    with torch.no_grad():
        out = net(fixed_p, moving_p)
    assert out.displacement.shape == out.velocity.shape == (1, 3, 32, 32, 32)
    assert set(out.segmentations) == {"fixed", "moving"}
    assert all(s.shape == (1, 5, 32, 32, 32) for s in out.segmentations.values())
    for t in (out.displacement, out.velocity, *out.segmentations.values()):
        assert torch.isfinite(t).all()
    assert padding.crop_to_shape(out.displacement, shape).shape == (1, 3, *shape)
    net.config.return_segmentations = False
    with torch.no_grad():
        assert net(fixed_p, moving_p).segmentations == {}


def test_zero_output_layer_gives_identity():
    net = small_net().eval()
    for level in net.levels:
        torch.nn.init.zeros_(level.head.out.weight)
    with torch.no_grad():
        out = net(torch.rand(1, 1, 16, 16, 32), torch.rand(1, 1, 16, 16, 32))
    assert torch.equal(out.displacement, torch.zeros_like(out.displacement))


def test_diffeomorphic_with_random_weights():
    net = small_net().eval()
    with torch.no_grad():
        for level in net.levels:
            level.head.out.weight.mul_(10)  # random outputs of about a voxel
        out = net(torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32))
    print(f"max |u| = {out.displacement.abs().max():.2f} voxels")
    assert out.displacement.abs().max() > 0.3
    assert (warp.jacobian_determinant(out.displacement) > 0).all()


def test_alternating_schedule_and_labelled_subset():
    assert [macjnet.alternating_stage(i) for i in range(4)] == ["registration", "segmentation"] * 2
    assert [macjnet.alternating_stage(i, 2) for i in range(5)] == (
        ["registration"] * 2 + ["segmentation"] * 2 + ["registration"])
    with pytest.raises(ValueError):
        macjnet.alternating_stage(-1)
    chosen = macjnet.labelled_pairs(90, 0.3, seed=1)
    assert len(chosen) == 27 and chosen == sorted(set(chosen)) and set(chosen) <= set(range(90))
    assert chosen == macjnet.labelled_pairs(90, 0.3, seed=1)
    with pytest.raises(ValueError):
        small_net().set_stage("joint")


def _batch(shape=(16, 16, 32), labels=("fixed", "moving")) -> dict[str, torch.Tensor]:
    batch = {"fixed": torch.rand(1, 1, *shape), "moving": torch.rand(1, 1, *shape)}
    for name in labels:
        batch[f"{name}_labels"] = torch.randint(0, 5, (1, 1, *shape))
    return batch


def _step(net: macjnet.Network, optimiser: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> dict:
    out = net(batch["fixed"], batch["moving"])
    terms = net.loss(out, batch)
    optimiser.zero_grad()
    terms["total"].backward()
    optimiser.step()
    return terms


def test_each_stage_updates_only_its_parameter_group():
    net = small_net().train()
    reg, seg = list(net.registration_parameters()), list(net.segmentation_parameters())
    assert {id(p) for p in reg} | {id(p) for p in seg} == {id(p) for p in net.parameters()}
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)  # one optimiser: isolation comes from the stage
    batch = _batch(labels=("moving",))  # fixed labels absent: E_label uses the fixed Seg-SubNet's prediction
    for stage, updated, kept in (("registration", reg, seg), ("segmentation", seg, reg)):
        net.set_stage(stage)
        before = {id(p): p.detach().clone() for p in net.parameters()}
        terms = _step(net, optimiser, batch)
        # The stage's loss reaches every parameter of its group and none of the other (grad None: not in the graph).
        assert all(p.grad is not None for p in updated) and all(p.grad is None for p in kept), stage
        assert all(torch.equal(p, before[id(p)]) for p in kept), stage
        # Every parameter with a gradient moved (a cSE unit whose ReLU is off for this input has a zero gradient).
        assert all(not torch.equal(p, before[id(p)]) for p in updated if p.grad.any()), stage
        assert sum(bool(p.grad.any()) for p in updated) >= 0.9 * len(updated), stage
        assert torch.isclose(terms["total"], sum(v for k, v in terms.items() if k != "total"))


def test_registration_loss_terms_and_weights():
    net = small_net().train()
    for level in net.levels:
        torch.nn.init.zeros_(level.head.out.weight)
    batch = _batch()
    batch["moving"], batch["moving_labels"] = batch["fixed"], batch["fixed_labels"]
    terms = net.loss(net(batch["fixed"], batch["moving"]), batch)
    assert set(terms) == {"similarity", "label", "smoothness", "total"}
    assert terms["similarity"] < 1e-8 and terms["smoothness"] == 0 and terms["label"].abs() < 1e-5
    batch["moving_labels"] = torch.zeros_like(batch["fixed_labels"])  # no foreground: Dice 0, E_label = 1
    terms = net.loss(net(batch["fixed"], batch["moving"]), batch)
    assert torch.isclose(terms["label"], torch.tensor(2.0), atol=1e-4)
    mind_net = small_net(descriptor="mind")
    assert torch.isfinite(mind_net.loss(mind_net(batch["fixed"], batch["moving"]), batch)["similarity"])


def test_segmentation_loss_follows_eq16():
    net = small_net().train()
    net.set_stage("segmentation")
    both, none, one = _batch(), _batch(labels=()), _batch(labels=("fixed",))
    assert set(net.loss(net(both["fixed"], both["moving"]), both)) == {"dice_fixed", "dice_moving", "total"}
    assert set(net.loss(net(none["fixed"], none["moving"]), none)) == {"consistency", "total"}
    assert set(net.loss(net(one["fixed"], one["moving"]), one)) == {"dice_fixed", "consistency", "total"}
    net.eval()  # no segmentations in the output at inference unless configured
    with pytest.raises(ValueError):
        net.loss(net(none["fixed"], none["moving"]), none)


def test_pretraining_keeps_each_subnetwork_to_its_own_signal():
    """Pre-training: the registration loss has no label term even with labels in the batch; the segmentation loss
    is supervised Dice only, and a pair without labels gives a zero loss whose gradients are zero."""
    net = small_net().train()
    both, none = _batch(), _batch(labels=())
    net.set_stage("registration", pretraining=True)
    terms = net.loss(net(both["fixed"], both["moving"]), both)
    assert terms["label"] == 0 and torch.isclose(terms["total"], terms["similarity"] + terms["smoothness"])
    net.set_stage("segmentation", pretraining=True)
    assert set(net.loss(net(both["fixed"], both["moving"]), both)) == {"dice_fixed", "dice_moving", "total"}
    terms = net.loss(net(none["fixed"], none["moving"]), none)
    assert set(terms) == {"total"} and terms["total"] == 0
    terms["total"].backward()
    assert all(p.grad is not None and not p.grad.any() for p in net.segmentation_parameters())


def test_missing_labels_are_replaced_by_seg_subnet_predictions():
    net = small_net().eval()
    batch = _batch(labels=("moving",))
    out = net(batch["fixed"], batch["moving"])
    assert out.segmentations == {}
    predicted = net.label_maps(out, batch, "fixed")
    with torch.no_grad():
        expected = net.seg_fixed(batch["fixed"]).argmax(dim=1, keepdim=True)
    assert torch.equal(predicted.argmax(dim=1, keepdim=True), expected)
    assert torch.equal(predicted.sum(dim=1), torch.ones(1, 16, 16, 32))
    assert torch.equal(net.label_maps(out, batch, "moving").argmax(dim=1, keepdim=True), batch["moving_labels"])


@pytest.mark.parametrize("label_weight", [2.0, 0.0], ids=["dual-similarity", "macmind-only"])
def test_short_optimisation_on_multimodal_pair_raises_dice(toy_pair, label_weight):
    """Registration stage on the multimodal phantom: the full E_reg (labels given), and E_sim + E_smo alone (the
    unsupervised pre-training loss), where macMIND is the only image term."""
    torch.manual_seed(0)
    pair = multimodal_pair(toy_pair((32, 32, 32), magnitude=4.0))
    net = small_net(label_weight=label_weight).train()
    optimiser = torch.optim.Adam(net.registration_parameters(), lr=3e-3)
    history = [float(_step(net, optimiser, pair)["total"].detach()) for _ in range(10)]
    with torch.no_grad():
        field = net.eval()(pair["fixed"], pair["moving"]).displacement
    identity = mean_dice(pair["moving_labels"], pair["fixed_labels"])
    registered = mean_dice(warp.warp_labels(pair["moving_labels"], field), pair["fixed_labels"])
    print(f"loss {history[0]:.4f} → {history[-1]:.4f}; mean Dice identity {identity:.3f} → {registered:.3f}")
    assert min(history[-3:]) < 0.8 * history[0]
    assert registered > identity + 0.02
