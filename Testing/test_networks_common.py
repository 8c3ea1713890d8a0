"""The contract every registered network keeps with the engine (networks/base.py), checked for all of them; and
the checks several networks share, each with its own numbers (a short optimisation, autocast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from DeepRegistrationLib.methods import models, registry
from DeepRegistrationLib.methods.networks import jad, lapirn, mdregnet, voxelmorph
from DeepRegistrationLib.core import warp
from DeepRegistrationLib.core.padding import crop_to_shape, pad_to_multiple
from conftest import optimise_on_pair, random_pair

METHODS = sorted(registry.network_names())


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


# ------------------------------------------------------------------------------ checks with per-method numbers


def lapirn_stage_2() -> lapirn.LapIRN:
    """Stage 2 of LapIRN's progressive training (levels 1 and 2); narrow CNNs keep it fast on CPU (level 3 is
    covered by test_net_lapirn's gradient test)."""
    net = lapirn.Network(lapirn.Config(start_channels=2))
    net.active_levels = 2
    return net


@dataclass(frozen=True)
class Optimisation:
    """A short optimisation on one 32³ toy pair: Adam `steps` at `lr` on the loss of the `keys` of the batch must
    lower the loss by more than `loss_drop` and raise the label Dice by more than `dice_gain`; with `positive_jacobian`
    the final displacement must also fold nowhere."""

    network: Callable[[], torch.nn.Module]
    magnitude: float
    steps: int
    lr: float
    loss_drop: float
    dice_gain: float
    keys: tuple[str, ...] = ("fixed", "moving")
    positive_jacobian: bool = False


OPTIMISATIONS = {
    "jad": Optimisation(lambda: jad.Network(jad.Config()), magnitude=3.0, steps=16, lr=1e-3, loss_drop=0.03,
                        dice_gain=0.01, keys=("fixed", "moving", "fixed_labels", "moving_labels")),
    "mdregnet": Optimisation(lambda: mdregnet.Network(mdregnet.Config()), magnitude=3.0, steps=20, lr=1e-3,
                             loss_drop=0.03, dice_gain=0.01),
    "lapirn": Optimisation(lapirn_stage_2, magnitude=4.0, steps=20, lr=5e-3, loss_drop=0.015, dice_gain=0.01,
                           positive_jacobian=True),
    "voxelmorph": Optimisation(lambda: voxelmorph.Network(voxelmorph.Config()), magnitude=4.0, steps=30, lr=1e-3,
                               loss_drop=0.02, dice_gain=0.008, positive_jacobian=True),
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", sorted(OPTIMISATIONS))
def test_short_optimisation_lowers_loss_and_raises_dice(name, toy_pair):
    case = OPTIMISATIONS[name]
    r = optimise_on_pair(case.network(), toy_pair((32, 32, 32), magnitude=case.magnitude), steps=case.steps,
                         lr=case.lr, keys=case.keys)
    print(f"{name} loss {r['first']:.4f} → {r['final']:.4f}; Dice {r['dice_before']:.4f} → {r['dice_after']:.4f}")
    assert r["final"] < r["first"] - case.loss_drop
    assert r["dice_after"] > r["dice_before"] + case.dice_gain
    if case.positive_jacobian:
        assert warp.jacobian_determinant(r["output"].displacement).min() > 0


AUTOCAST = {  # network, the output fields that must stay float32 (with the total loss), those that must be finite
    "jad": (lambda: jad.Network(jad.Config()), ("displacement", "affine"), ("displacement",)),
    "mdregnet": (lambda: mdregnet.Network(mdregnet.Config()), ("displacement", "velocity"), ("displacement",)),
    "lapirn": (lambda: lapirn.Network(lapirn.Config(start_channels=2)), ("displacement", "velocity"), ()),
    "voxelmorph": (lambda: voxelmorph.Network(voxelmorph.Config()), ("displacement", "velocity"), ()),
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", sorted(AUTOCAST))
def test_autocast_keeps_fields_and_loss_in_float32(name):
    network, float32_fields, finite_fields = AUTOCAST[name]
    net = network()
    fixed, moving = random_pair((16, 16, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(fixed, moving)
        terms = net.loss(out, {"fixed": fixed, "moving": moving})
    assert [getattr(out, f).dtype for f in float32_fields] == [torch.float32] * len(float32_fields)
    assert terms["total"].dtype == torch.float32
    assert all(torch.isfinite(getattr(out, f)).all() for f in finite_fields) and torch.isfinite(terms["total"])
