"""The command line end to end on a small synthetic pair: outputs, physical correctness, bad input."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepRegistrationLib.frontends import cli
from DeepRegistrationLib.methods import models, registry
from DeepRegistrationLib.core import warp
from DeepRegistrationLib.core.geometry import Grid
from DeepRegistrationLib.core.image import Image, write_image
from DeepRegistrationLib.core.landmarks import Landmarks, write_fcsv

from conftest import ellipsoid_labels, phantom_image, smooth_field


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A 2 mm oblique pair with labels and landmarks, and an untrained (non-identity) lapirn model."""
    root = tmp_path_factory.mktemp("case")
    shape = (30, 34, 28)
    direction = np.array([[0.96, -0.28, 0.0], [0.28, 0.96, 0.0], [0.0, 0.0, 1.0]])
    grid = Grid.from_spacing(shape, (2.0, 1.8, 2.2), (-28.0, -30.0, -30.0), direction)
    labels = ellipsoid_labels(shape)
    fixed = phantom_image(labels)
    inverse = warp.integrate_velocity(-smooth_field(shape, 1.5, seed=7))
    moving = warp.warp_image(fixed, inverse)
    moving_labels = warp.warp_labels(labels, inverse)
    files = {
        "fixed": write_image(Image(fixed[0, 0].numpy() * 1000, grid), root / "fixed.nii.gz"),
        "moving": write_image(Image(moving[0, 0].numpy() * 1000, grid), root / "moving.nrrd"),
        "fixed_labels": write_image(Image(labels[0, 0].numpy().astype(np.int16), grid), root / "fl.nii.gz"),
        "moving_labels": write_image(Image(moving_labels[0, 0].numpy().astype(np.int16), grid), root / "ml.nii.gz"),
    }
    pts = grid.voxel_to_world(np.array([[15, 17, 14], [10, 12, 9], [20, 20, 18]], float))
    files["fixed_landmarks"] = write_fcsv(root / "f.fcsv", Landmarks(["a", "b", "c"], pts))
    files["moving_landmarks"] = write_fcsv(root / "m.fcsv", Landmarks(["c", "a", "b"], pts[[2, 0, 1]] + 1.0))
    files["weights"] = models.save_model(fresh_net("lapirn", seed=1), "lapirn", root / "lapirn.safetensors")
    return files


def fresh_net(method: str, seed: int) -> torch.nn.Module:
    """`method` with freshly initialised weights (seeded) and a 2.5 mm working grid: non-identity, fast."""
    spec = registry.get_method(method)
    torch.manual_seed(seed)
    return spec.build(spec.config_class(working_spacing=2.5))


def run(args):
    return cli.main([str(a) for a in args])


def register_args(case, out, *extra):
    """The network alone (preset fast): these tests are about the network path and the files."""
    return ["register", "--quiet", "--preset", "fast", "--method", "lapirn", "--weights", case["weights"],
            "--fixed", case["fixed"],
            "--moving", case["moving"], "--output-dir", out, *extra]


def test_register_writes_everything_and_simpleitk_reproduces_the_warp(case, tmp_path):
    out = tmp_path / "out"
    assert run(register_args(case, out, "--fixed-labels", case["fixed_labels"], "--moving-labels",
                             case["moving_labels"], "--fixed-landmarks", case["fixed_landmarks"],
                             "--moving-landmarks", case["moving_landmarks"])) == 0
    names = {p.name for p in out.iterdir()}
    assert {"warped.nii.gz", "displacement.nii", "inverse_displacement.nii", "jacobian.nii",
            "folding.nii.gz", "warped_labels.nii.gz", "metrics.json"} <= names
    assert not list(tmp_path.glob(".out.*")), "temporary directory left behind"

    fixed = sitk.ReadImage(str(case["fixed"]), sitk.sitkFloat64)
    moving = sitk.ReadImage(str(case["moving"]), sitk.sitkFloat64)
    field = sitk.ReadImage(str(out / "displacement.nii"), sitk.sitkVectorFloat64)
    assert np.abs(sitk.GetArrayFromImage(field)).max() > 0.1, "the test model should not be the identity"
    theirs = sitk.GetArrayFromImage(
        sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field), sitk.sitkLinear, 0.0))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    assert np.abs(theirs - ours).max() < 1e-2 * np.abs(ours).max()

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "lapirn" and len(metrics["model_sha256"]) == 64
    assert set(metrics["labels"]["before"]["per_label"]) == {"1", "2", "3", "4"}
    # Landmarks were matched by label: before = |p_fixed − p_moving| = |(1, 1, 1)| mm for every point.
    assert np.allclose(metrics["landmarks"]["before"], np.sqrt(3), atol=1e-3)
    jac = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "jacobian.nii")))
    fold = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "folding.nii.gz")))
    assert np.array_equal(fold.astype(bool), jac <= 0)


@pytest.mark.parametrize("method", ["lapirn", "jad"])
def test_inverse_field_undoes_the_forward_field(case, tmp_path, method):
    """lapirn's inverse is exp(−v); jad's (affine + plain displacement) comes from fixed-point iteration."""
    out = tmp_path / "out"
    weights = case["weights"]
    if method == "jad":
        net = fresh_net("jad", seed=3)
        torch.nn.init.normal_(net.flow.weight, std=0.2)  # a deformable part of about a millimetre
        weights = models.save_model(net, "jad", tmp_path / "jad.safetensors")
    assert run(["register", "--quiet", "--preset", "fast", "--method", method, "--weights", weights,
                "--fixed", case["fixed"],
                "--moving", case["moving"], "--output-dir", out]) == 0
    field = sitk.ReadImage(str(out / "displacement.nii"), sitk.sitkVectorFloat64)
    assert np.abs(sitk.GetArrayFromImage(field)).max() > 0.5, "a trivial field would not test the inverse"
    fwd = sitk.DisplacementFieldTransform(field)
    inv = sitk.DisplacementFieldTransform(
        sitk.ReadImage(str(out / "inverse_displacement.nii"), sitk.sitkVectorFloat64))
    ref = sitk.ReadImage(str(case["fixed"]))
    centre = ref.TransformContinuousIndexToPhysicalPoint([s / 2 for s in ref.GetSize()])
    for offset in ([0, 0, 0], [5, -4, 3], [-6, 3, -2]):
        p = np.array(centre) + offset
        back = inv.TransformPoint(fwd.TransformPoint(tuple(p)))
        assert np.linalg.norm(np.array(back) - p) < 0.1


def test_methods_lists_every_registered_method(capsys):
    """Every method, and for each shipped model what its JSON says of its training (so an under-trained model is
    visible before anyone trusts its warp)."""
    assert run(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(registry.METHODS)
    for r in rows:
        path = registry.METHODS[r["name"]].weights_path
        if not path.is_file():
            assert r["shipped_model"] is None
            continue
        meta = models.read_metadata(path)
        assert r["shipped_model"]["iterations"] == meta["record"]["iteration"]
        assert r["shipped_model"]["validation_dice"] == meta["record"]["validation"]["dice"]
    assert run(["methods"]) == 0
    assert "val. Dice" in capsys.readouterr().out


@pytest.mark.parametrize("mutate, message", [
    (lambda c, t: ["--method", "nosuch"], "unknown method 'nosuch'"),
    (lambda c, t: ["--fixed", t / "missing.nii.gz"], "missing.nii.gz: no such file"),
    (lambda c, t: ["--fixed-labels", c["fixed_labels"], "--moving-labels", _other_grid(t)], "differs from its image"),
    (lambda c, t: ["--fixed-landmarks", c["fixed_landmarks"]], "give both --fixed-landmarks"),
    (lambda c, t: ["--fixed-landmarks", c["fixed_landmarks"], "--moving-landmarks", _two_points(t)],
     "appear in only one"),
    (lambda c, t: ["--fixed-landmarks", _outside(t), "--moving-landmarks", _outside(t)], "outside the fixed image"),
    (lambda c, t: ["--moving", _constant(t)], "image is constant"),
    (lambda c, t: ["--moving", _flat(t)], "expected a 3D volume, got 2D"),
])
def test_bad_input_exits_2_and_writes_nothing(case, tmp_path, capsys, mutate, message):
    out = tmp_path / "out"
    args = register_args(case, out) + mutate(case, tmp_path)
    assert run(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*"))


def test_model_checks(case, tmp_path, capsys):
    bad = tmp_path / "lapirn.safetensors"
    bad.write_bytes(case["weights"].read_bytes()[:-8] + b"corrupt!")
    meta = json.loads(models.metadata_path(case["weights"]).read_text())
    models.metadata_path(bad).write_text(json.dumps(meta))
    assert run(register_args(case, tmp_path / "o1")[:-2] + ["--weights", bad, "--output-dir", tmp_path / "o1"]) == 2
    assert "does not match its JSON" in capsys.readouterr().err
    other = tmp_path / "other.safetensors"
    other.write_bytes(case["weights"].read_bytes())
    models.metadata_path(other).write_text(json.dumps({**meta, "method": "voxelmorph"}))
    assert run(register_args(case, tmp_path / "o2")[:-2] + ["--weights", other, "--output-dir", tmp_path / "o2"]) == 2
    assert "is for method 'voxelmorph', not 'lapirn'" in capsys.readouterr().err


def test_a_model_run_on_other_modalities_than_it_was_trained_on_warns(case, tmp_path):
    """A model records the (fixed, moving) modalities of its training pairs; another modality warns, the reverse
    order runs swapped without a warning (engine/roles.py; Testing/test_roles.py checks the inverse)."""
    record = {"recipe": {"data": {"kind": "multimodal", "fixed_modality": "ct", "moving_modality": "t1"}}}
    weights = models.save_model(fresh_net("lapirn", seed=1), "lapirn", tmp_path / "ct_mr.safetensors", record)
    args = register_args(case, tmp_path / "o")[:-2] + ["--weights", weights]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*was trained on")
        assert run(args + ["--output-dir", tmp_path / "o1", "--fixed-modality", "mr", "--moving-modality", "ct"]) == 0
    with pytest.warns(UserWarning, match="not fixed MR / moving MR: its validation numbers"):
        assert run(args + ["--output-dir", tmp_path / "o2"]) == 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*was trained on")
        assert run(args + ["--output-dir", tmp_path / "o3", "--fixed-modality", "ct"]) == 0
    assert models.trained_modalities({"record": {"recipe": {"data": {"kind": "label_driven"}}}}) is None


def test_evaluate_an_external_field(case, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(register_args(case, out, "--fixed-labels", case["fixed_labels"], "--moving-labels",
                             case["moving_labels"])) == 0
    produced = json.loads((out / "metrics.json").read_text())
    assert run(["evaluate", "--json", "--fixed", case["fixed"], "--moving", case["moving"], "--displacement",
                out / "displacement.nii", "--fixed-labels", case["fixed_labels"], "--moving-labels",
                case["moving_labels"]]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["labels"]["after"]["mean_dice"] == pytest.approx(produced["labels"]["after"]["mean_dice"],
                                                                      abs=1e-3)


def _other_grid(tmp):
    return write_image(Image(np.zeros((5, 6, 7), np.int16), Grid((5, 6, 7), np.eye(4))), tmp / "other.nii.gz")


def _two_points(tmp):
    return write_fcsv(tmp / "two.fcsv", Landmarks(["a", "x"], np.zeros((2, 3))))


def _outside(tmp):
    return write_fcsv(tmp / "far.fcsv", Landmarks(["a"], np.array([[500.0, 0, 0]])))


def _constant(tmp):
    return write_image(Image(np.ones((30, 34, 28), np.float32), Grid((30, 34, 28), np.eye(4))), tmp / "c.nii.gz")


def _flat(tmp):
    img = sitk.GetImageFromArray(np.zeros((20, 20), np.float32))
    sitk.WriteImage(img, str(tmp / "flat.nii.gz"))
    return tmp / "flat.nii.gz"


@pytest.mark.parametrize("method", sorted(registry.network_names()))
def test_every_method_registers_through_the_command_line(case, tmp_path, method):
    """Each registry method (freshly initialised weights) gives every output, and SimpleITK agrees with it."""
    spec = registry.get_method(method)
    weights = models.save_model(fresh_net(method, seed=2), method, tmp_path / f"{method}.safetensors")
    out = tmp_path / "out"
    assert run(["register", "--quiet", "--preset", "fast", "--method", method, "--weights", weights,
                "--fixed", case["fixed"],
                "--moving", case["moving"], "--output-dir", out, "--fixed-labels", case["fixed_labels"],
                "--moving-labels", case["moving_labels"]]) == 0
    expected = {"warped.nii.gz", "displacement.nii", "inverse_displacement.nii", "jacobian.nii",
                "folding.nii.gz", "warped_labels.nii.gz", "metrics.json"}
    if spec.has_affine:
        expected.add("affine.tfm")
    assert expected <= {p.name for p in out.iterdir()}
    fixed = sitk.ReadImage(str(case["fixed"]), sitk.sitkFloat64)
    moving = sitk.ReadImage(str(case["moving"]), sitk.sitkFloat64)
    field = sitk.ReadImage(str(out / "displacement.nii"), sitk.sitkVectorFloat64)
    theirs = sitk.GetArrayFromImage(
        sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field), sitk.sitkLinear, 0.0))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    assert np.abs(theirs - ours).max() < 1e-2 * np.abs(ours).max()
    assert json.loads((out / "metrics.json").read_text())["method"] == method


def test_affine_tfm_is_the_complete_transform_when_the_deformable_part_is_zero(case, tmp_path):
    """jad with a zero flow layer and a known affine head: affine.tfm (ITK, LPS) and displacement.nii agree."""
    net = fresh_net("jad", seed=0)
    with torch.no_grad():
        net.flow.weight.zero_()
        net.flow.bias.zero_()
        net.affine_head.bias.copy_(torch.tensor([0.03, -0.02, 0.0, 0.05, 0.01, 0.04, 0.0, -0.03, 0.0, 0.02, 0.0,
                                                 -0.04]))
    weights = models.save_model(net, "jad", tmp_path / "jad.safetensors")
    out = tmp_path / "out"
    assert run(["register", "--quiet", "--preset", "fast", "--method", "jad", "--weights", weights,
                "--fixed", case["fixed"],
                "--moving", case["moving"], "--output-dir", out]) == 0
    affine = sitk.ReadTransform(str(out / "affine.tfm"))
    dense = sitk.DisplacementFieldTransform(sitk.ReadImage(str(out / "displacement.nii"), sitk.sitkVectorFloat64))
    ref = sitk.ReadImage(str(case["fixed"]))
    moved = 0.0
    for index in ([8, 9, 7], [15, 17, 14], [20, 22, 18]):
        p = ref.TransformIndexToPhysicalPoint(index)
        a, d = np.array(affine.TransformPoint(p)), np.array(dense.TransformPoint(p))
        assert np.linalg.norm(a - d) < 0.05
        moved = max(moved, np.linalg.norm(a - np.array(p)))
    assert moved > 1.0, "the test affine should move points"


def test_demo_registers_the_sample_pair_with_the_shipped_default(tmp_path, capsys):
    """The README's first command: the bundled pair, the shipped default model, metrics printed and written."""
    out = tmp_path / "demo"
    assert run(["demo", "--json", "--output-dir", out]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["method"] == registry.DEFAULT_METHOD
    written = json.loads((out / "metrics.json").read_text())
    labels = written["labels"]
    assert labels["after"]["mean_dice"] > labels["before"]["mean_dice"] + 0.03  # measured 0.653 -> 0.738
    assert written["jacobian"]["percent_nonpositive"] < 0.1
