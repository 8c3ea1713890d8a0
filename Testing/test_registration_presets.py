"""The engine's presets end to end on a small pair: the refinement improves on the network, `optimise` needs no
network, guidance and masks reach the refinement, and bad preset input exits 2 before compute."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from DeepRegistrationLib.core import warp
from DeepRegistrationLib.core.errors import Cancelled, InputError, RegistrationWarning
from DeepRegistrationLib.core.geometry import Grid
from DeepRegistrationLib.core.image import Image, write_image
from DeepRegistrationLib.engine.options import RegistrationOptions
from DeepRegistrationLib.engine.registration import register
from DeepRegistrationLib.frontends import cli

from conftest import ellipsoid_labels, phantom_image, smooth_field

QUICK = {"rigid_iterations": [10, 5], "affine_iterations": [5, 5], "iterations": [20, 10]}
"""A short refinement (these tests check the wiring, the refinement's own tests its accuracy)."""


@pytest.fixture(scope="module")
def pair():
    shape = (32, 36, 30)
    grid = Grid.from_spacing(shape, (2.0, 2.0, 2.0), (-31.0, -35.0, -29.0))
    labels = ellipsoid_labels(shape)
    fixed = phantom_image(labels)
    inverse = warp.integrate_velocity(-smooth_field(shape, 2.5, seed=3))
    moving = warp.warp_image(fixed, inverse)
    moving_labels = warp.warp_labels(labels, inverse)
    return {"fixed": Image(fixed[0, 0].numpy() * 100, grid, "fixed"),
            "moving": Image(moving[0, 0].numpy() * 100, grid, "moving"),
            "fixed_labels": Image(labels[0, 0].numpy().astype(np.int32), grid, "fixed labels"),
            "moving_labels": Image(moving_labels[0, 0].numpy().astype(np.int32), grid, "moving labels")}


def dice(result) -> float:
    return result.metrics.labels.after.mean_dice


def run(pair, **options):
    return register(pair["fixed"], pair["moving"], RegistrationOptions(device="cpu", **options),
                    fixed_labels=pair["fixed_labels"], moving_labels=pair["moving_labels"])


def test_optimise_alone_registers_without_weights_and_its_inverse_is_exact(pair):
    result = run(pair, method="optimise", refinement=QUICK)
    before = result.metrics.labels.before.mean_dice
    assert dice(result) > before + 0.05
    assert result.metrics.jacobian.percent_nonpositive == 0.0
    assert result.metrics.run.model_sha256 is None and "refinement" in result.metrics.run.time_s
    p = pair["fixed"].grid.voxel_to_world(np.array([[16.0, 18, 15], [10, 12, 9], [20, 25, 18]]))
    back = result.inverse.map_points(result.field.map_points(p))
    assert np.abs(back - p).max() < 0.05


def test_the_same_seed_gives_the_same_field(pair):
    a = run(pair, method="optimise", refinement={**QUICK, "iterations": [5, 3]}, seed=7)
    b = run(pair, method="optimise", refinement={**QUICK, "iterations": [5, 3]}, seed=7)
    assert np.array_equal(a.field.data, b.field.data)


def test_presets_and_refinement_settings_are_checked_before_compute(pair):
    for options, message in (({"method": "optimise", "preset": "fast"}, "refinement alone"),
                             ({"preset": "nosuch"}, "option preset = \"nosuch\": expected one of"),
                             ({"method": "optimise", "refinement": {"nosuch": 1}}, "unknown refinement setting"),
                             ({"method": "optimise", "refinement": {"iterations": [-3, 1]}}, "iterations"),
                             ({"preset": "fast", "refinement": {"lr": 0.1}}, "network alone"),
                             ({"method": "optimise", "prealign": "moments"}, "affine refinement")):
        with pytest.raises(InputError, match=message):
            run(pair, **options)
    with pytest.raises(InputError, match="guidance landmarks steer the refinement"):
        register(pair["fixed"], pair["moving"], RegistrationOptions(preset="fast"),
                 guidance=(np.zeros((1, 3)), np.zeros((1, 3))))


def test_cancel_stops_the_refinement(pair):
    calls = {"n": 0}

    def cancel() -> bool:
        calls["n"] += 1
        return calls["n"] > 30  # past preprocessing and the affine stage's first steps

    with pytest.raises(Cancelled):
        register(pair["fixed"], pair["moving"], RegistrationOptions(method="optimise", refinement=QUICK),
                 cancel=cancel)


def test_command_line_optimise_with_guidance_and_masks(pair, tmp_path, capsys):
    files = {name: write_image(image, tmp_path / f"{name}.nii.gz") for name, image in pair.items()}
    mask = write_image(Image((pair["fixed_labels"].data > 0).astype(np.uint8), pair["fixed"].grid),
                       tmp_path / "mask.nii.gz")
    points = pair["fixed"].grid.voxel_to_world(np.array([[16.0, 18, 15], [12, 20, 14]]))
    for name, pts in (("fg", points), ("mg", points + 1.0)):
        (tmp_path / f"{name}.csv").write_text("x,y,z\n" + "\n".join(",".join(map(str, p)) for p in pts) + "\n")
    out = tmp_path / "out"
    sets = [a for k, v in QUICK.items() for a in ("--set", f"refine.{k}={json.dumps(v)}")]
    assert cli.main(["register", "--quiet", "--method", "optimise", "--fixed", str(files["fixed"]), "--moving",
                     str(files["moving"]), "--output-dir", str(out), "--fixed-mask", str(mask), "--moving-mask",
                     str(mask), "--fixed-guidance", str(tmp_path / "fg.csv"), "--moving-guidance",
                     str(tmp_path / "mg.csv"), *sets]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "optimise" and metrics["preset"] == "balanced"
    assert metrics["refinement"] == QUICK and "mask" in metrics
    assert (out / "displacement.nii").is_file()
    assert cli.main(["register", "--quiet", "--method", "optimise", "--preset", "fast", "--fixed",
                     str(files["fixed"]), "--moving", str(files["moving"]), "--output-dir",
                     str(tmp_path / "o2")]) == 2
    assert "refinement alone" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_a_network_start_reaches_the_refinement(pair, tmp_path):
    """A tiny untrained LapIRN whose field makes the images match worse than the identity: the refinement says so,
    starts from the identity, and balanced still improves on fast (a useful seed is kept: test_refine)."""
    from DeepRegistrationLib.methods import models, registry

    spec = registry.get_method("lapirn")
    torch.manual_seed(0)
    net = spec.build(spec.config_class(start_channels=2, num_res_blocks=1, working_spacing=4.0))
    weights = str(models.save_model(net, "lapirn", tmp_path / "tiny.safetensors"))
    fast = run(pair, method="lapirn", weights=weights, preset="fast")
    with pytest.warns(RegistrationWarning, match="starts from the identity"):
        balanced = run(pair, method="lapirn", weights=weights, refinement=QUICK)
    assert dice(balanced) > dice(fast) + 0.05
    assert balanced.metrics.run.working_spacing_mm == 2.0


@pytest.mark.parametrize("affine_stage", ["on", "off"])
def test_a_network_affine_is_folded_into_the_refinement_start(pair, monkeypatch, affine_stage):
    """A jad-like estimate p ↦ T·A(p + u) with A a 3 mm shift along R: when the refinement found its own affine T it
    keeps T and starts its velocity from A's displacement (3 mm, constant); without an affine stage T·A stays the
    affine and the velocity starts from u (zero here)."""
    from DeepRegistrationLib.engine import registration
    from DeepRegistrationLib.engine.transforms import Estimate, working_grid

    shift = np.eye(4)
    shift[0, 3] = 3.0
    seen = {}

    def fake_network(net, fixed_n, fixed_grid, moving_n, moving_grid, pre, device, *args):
        grid = working_grid(fixed_grid, 4.0, 1)
        seen["pre"] = pre
        return Estimate(pre @ shift, grid, torch.zeros(1, 3, *grid.shape), has_affine=True), device

    def fake_svf(fixed, fixed_grid, moving, moving_grid, affine_ras, settings, *, grid, initial_velocity, **kw):
        seen["affine"], seen["initial"], seen["grid"] = affine_ras, initial_velocity, grid
        return torch.zeros(1, 3, *grid.shape)

    monkeypatch.setattr(registration, "network_estimate", fake_network)
    monkeypatch.setattr(registration, "optimise_svf", fake_svf)
    result = run(pair, method="jad", refinement={**QUICK, "affine": affine_stage})
    initial_mm = seen["initial"][0, 0] * seen["grid"].spacing[0]  # the R component (RAS-aligned working grid)
    if affine_stage == "on":
        np.testing.assert_allclose(seen["affine"], seen["pre"])
        np.testing.assert_allclose(initial_mm.numpy(), 3.0, atol=1e-4)
    else:
        np.testing.assert_allclose(seen["affine"], shift)
        assert float(seen["initial"].abs().max()) == 0.0
    assert result.affine_ras is not None  # jad has an affine part either way (affine.tfm)
