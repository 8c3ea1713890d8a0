"""Benchmark harness (benchmark): manifest, deterministic pairs, scoring, the child-process runner, and the
ANTs / Elastix field extraction checked against each tool's own warped image. Phantoms only, no fetched data."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from DeepRegistrationLib.core import warp
from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.core.field import DisplacementField, apply_field
from DeepRegistrationLib.core.geometry import Grid
from DeepRegistrationLib.core.image import Image, write_image
from benchmark.methods import IDENTITY, available_methods
from benchmark.scoring import score
from benchmark.suite import (SUITE_PATH, SUITE_V1_PATH, ManifestError, load_manifest, load_pair, materialise,
                             suite_grid)
from training.data.phantom import ellipsoid_labels, phantom_image

PHANTOM = (24, 24, 24)


def _tiny_manifest() -> dict:
    """A manifest over two phantom 'subjects' with every pair kind, on a 22×22×20 grid of 1 mm."""
    structures = {"blob_a": [2], "blob_b": [3], "core": [4]}
    subject = {"structures": structures, "tissue_classes": {"1": "wm", "2": "gm", "3": "gm", "4": "csf"}}
    return {
        "suite": "test", "version": 1, "resolution_mm": 1.0,
        "grid": {"fov_mm": [22.0, 22.0, 20.0], "centre_ras_mm": [0.0, 0.0, 0.0]},
        "subjects": {name: {"image": f"{name}/t1.nii.gz", "labels": f"{name}/labels.nii.gz", **subject}
                     for name in ("a", "b")},
        "label_sets": {"blobs": ["blob_a", "blob_b", "core"]},
        "pairs": [
            {"id": "xs", "kind": "cross_subject", "fixed": "a", "moving": "b", "label_set": "blobs"},
            {"id": "kw", "kind": "known_warp", "subject": "a", "label_set": "blobs", "seed": 7, "magnitude_mm": 2.0,
             "affine": True, "boundary_landmarks": 3},
            {"id": "mm", "kind": "multimodal", "subject": "b", "label_set": "blobs", "seed": 8, "magnitude_mm": 2.0,
             "moving_contrast": "ct", "boundary_landmarks": 3},
        ],
        "subsets": {"synthetic": ["kw", "mm"]},
        "speed": {"pair": "kw", "resolution_mm": 1.0},
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(manifest, anatomy dir, cache dir): phantom subjects a and b (b shifted 1.5 mm and re-contrasted)."""
    root = tmp_path_factory.mktemp("bench")
    labels = ellipsoid_labels(PHANTOM)
    for name, shift, intensities in (("a", 0.0, (0.0, 0.5, 1.0, 0.25, 0.8)), ("b", 1.5, (0.0, 0.6, 0.9, 0.3, 0.7))):
        grid = Grid.from_spacing(PHANTOM, (1.0,) * 3, (-11.5 + shift, -11.5, -11.5))
        (root / "anatomy" / name).mkdir(parents=True)
        image = phantom_image(labels, intensities)[0, 0].numpy()
        write_image(Image(image, grid), root / "anatomy" / name / "t1.nii.gz")
        write_image(Image(labels[0, 0].numpy().astype(np.int16), grid), root / "anatomy" / name / "labels.nii.gz")
    path = root / "suite.json"
    path.write_text(json.dumps(_tiny_manifest()))
    return load_manifest(path), root / "anatomy", root / "cache"


def test_shipped_manifest_parses():
    manifest = load_manifest(SUITE_PATH)
    pairs = manifest.pairs
    assert {p.kind for p in pairs.values()} == {"cross_subject", "known_warp", "multimodal", "head_ct"}
    assert {p.kind for p in load_manifest(SUITE_V1_PATH).pairs.values()} == {"cross_subject", "known_warp",
                                                                            "multimodal"}
    small = manifest.select(["small"])
    assert len(small) == 7 and {p.kind for p in small} == {"cross_subject", "known_warp", "multimodal"}
    assert suite_grid(manifest).shape == (96, 112, 96) and suite_grid(manifest, 1.0).shape == (192, 224, 192)
    assert [m.name for m in available_methods(manifest, [IDENTITY, "ants_syn", "elastix"])] == [
        IDENTITY, "ants_syn", "elastix"]
    with pytest.raises(ManifestError, match="no pair or subset 'nope'"):
        manifest.select(["nope"])
    with pytest.raises(InputError, match="unknown or unavailable method"):
        available_methods(manifest, ["not_a_method"])


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["subsets"].update(bad=["kw", "missing_pair"]), "names missing pairs"),
    (lambda m: m["pairs"][0].update(moving="nobody"), "names subject 'nobody'"),
    (lambda m: m["pairs"][1].update(kind="other"), "kind 'other'"),
    (lambda m: m["pairs"][2].pop("seed"), "need a seed"),
    (lambda m: m["label_sets"].update(blobs=["blob_a", "hippocampus"]), "does not define structure"),
])
def test_bad_manifest_is_a_clear_error(tmp_path, edit, message):
    raw = copy.deepcopy(_tiny_manifest())
    edit(raw)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=message):
        load_manifest(path)


def test_materialise_is_deterministic_and_ground_truth_is_exact(tiny, tmp_path):
    manifest, anatomy, cache = tiny
    for spec in manifest.pairs.values():
        first = load_pair(materialise(manifest, spec, anatomy_dir=anatomy, cache_dir=cache))
        again = load_pair(materialise(manifest, spec, anatomy_dir=anatomy, cache_dir=tmp_path))
        for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
            np.testing.assert_array_equal(getattr(first, key).data, getattr(again, key).data)
        assert first.fixed.grid.same_as(suite_grid(manifest)) and first.label_names == {
            1: "blob_a", 2: "blob_b", 3: "core"}
        if spec.kind == "cross_subject":
            assert first.truth is None
            continue
        np.testing.assert_array_equal(first.truth.data, again.truth.data)
        # The true field carries the moving labels and landmarks back onto the fixed ones.
        warped = apply_field(first.moving_labels, first.truth, order=0).data
        inside = first.fixed_labels.data > 0
        assert (warped[inside] == first.fixed_labels.data[inside]).mean() > 0.97
        np.testing.assert_allclose(first.truth.map_points(first.fixed_points), first.moving_points, atol=2e-3)
        assert len(first.fixed_points) >= 9
    mm = load_pair(materialise(manifest, manifest.pairs["mm"], anatomy_dir=anatomy, cache_dir=cache))
    assert mm.moving.data.min() < -900 and mm.spec.modalities == ("mr", "ct")  # CT-like moving image in HU
    stamp = (cache / "suite_v1" / "1mm" / "kw" / "moving.nii.gz").stat().st_mtime_ns
    materialise(manifest, manifest.pairs["kw"], anatomy_dir=anatomy, cache_dir=cache)  # cached: not rebuilt
    assert (cache / "suite_v1" / "1mm" / "kw" / "moving.nii.gz").stat().st_mtime_ns == stamp
    with pytest.raises(InputError, match="not a materialised pair"):
        load_pair(tmp_path / "empty")


def test_scores_of_identity_and_of_the_true_field(tiny):
    manifest, anatomy, cache = tiny
    pair = load_pair(materialise(manifest, manifest.pairs["kw"], anatomy_dir=anatomy, cache_dir=cache))
    zero = DisplacementField(np.zeros_like(pair.truth.data), pair.truth.grid)
    row, structures = score(pair, zero)
    true_norm = np.linalg.norm(pair.truth.data[pair.fixed_mask].astype(np.float64), axis=-1)
    assert row["epe_mm"] == pytest.approx(true_norm.mean(), rel=1e-6)
    assert row["tre_mm"] == pytest.approx(row["tre_before_mm"]) and row["tre_mm"] > 0.5
    assert row["dice"] == pytest.approx(row["dice_before"])
    assert row["folding_pct"] == 0 and row["sdlogj"] == pytest.approx(0.0, abs=1e-9)
    assert [s["structure"] for s in structures] == ["blob_a", "blob_b", "core"]
    best, _ = score(pair, pair.truth)
    assert best["epe_mm"] == 0 and best["tre_mm"] < 2e-3 and best["dice"] > row["dice"] + 0.05


def test_run_suite_in_child_process_writes_every_output(tiny, tmp_path):
    from benchmark.run import run_suite

    manifest, anatomy, cache = tiny
    records = run_suite(manifest, ["kw"], [IDENTITY, "optimise@balanced-half"], tmp_path, threads=1,
                        anatomy_dir=anatomy, cache_dir=cache, log=lambda line: None)
    record, optimised = records
    assert not record["error"] and record["seconds"] >= 0 and record["peak_mb"] > 50
    assert record["epe_mm"] > 0.2 and record["dice"] == pytest.approx(record["dice_before"])
    assert not optimised["error"] and optimised["epe_mm"] < record["epe_mm"]
    assert record["held_out"] and optimised["held_out"]  # neither learns anything: every pair is held out
    for name in ("results.csv", "structures.csv", "summary.md", "run.json", "results.jsonl",
                 "dice_known_warp_blobs.png"):
        assert (tmp_path / name).is_file(), name
    assert "| identity | 1 |" in (tmp_path / "summary.md").read_text()


def test_head_ct_pairs_in_both_directions(tmp_path):
    """A whole-head phantom (scalp, dark skull, CSF, GM, WM): CT fixed or moving, HU in the CT, exact truth."""
    n = 40
    g = warp.identity_grid((n, n, n))[0]
    r = ((g - (n - 1) / 2) ** 2).sum(0).sqrt().numpy()
    head = np.select([r < 8, r < 12, r < 13, r < 17, r < 19.5], [0.8, 0.5, 0.2, 0.05, 0.7], 0.0).astype(np.float32)
    grid = Grid.from_spacing((n, n, n), (1.0,) * 3, (-19.5, -19.5, -19.5), np.eye(3))
    (tmp_path / "anatomy" / "h").mkdir(parents=True)
    write_image(Image(head, grid), tmp_path / "anatomy" / "h" / "head.nii.gz")
    write_image(Image(np.where(r < 13, head, 0).astype(np.float32), grid), tmp_path / "anatomy" / "h" / "brain.nii.gz")
    write_image(Image((r < 12).astype(np.int16), grid), tmp_path / "anatomy" / "h" / "labels.nii.gz")
    raw = {"suite": "test", "version": 2, "resolution_mm": 2.0,
           "grid": {"fov_mm": [40.0, 40.0, 40.0], "centre_ras_mm": [0.0, 0.0, 0.0]},
           "subjects": {"h": {"image": "h/brain.nii.gz", "labels": "h/labels.nii.gz", "head_image": "h/head.nii.gz",
                              "tissue_from_intensity": True,
                              "structures": {"csf": [1], "gray_matter": [2], "white_matter": [3]}}},
           "label_sets": {"tissue": ["csf", "gray_matter", "white_matter"]},
           "pairs": [{"id": f"hct_{role}", "kind": "head_ct", "subject": "h", "label_set": "tissue", "ct_role": role,
                      "seed": 5, "magnitude_mm": 3.0, "boundary_landmarks": 3} for role in ("fixed", "moving")]}
    (tmp_path / "suite.json").write_text(json.dumps(raw))
    manifest = load_manifest(tmp_path / "suite.json")
    for role in ("fixed", "moving"):
        pair = load_pair(materialise(manifest, manifest.pairs[f"hct_{role}"], anatomy_dir=tmp_path / "anatomy",
                                     cache_dir=tmp_path / "cache"))
        ct = pair.fixed if role == "fixed" else pair.moving
        assert ct.data.min() < -900 and ct.data.max() > 500  # air and bone in HU
        assert pair.spec.modalities == (("ct", "mr") if role == "fixed" else ("mr", "ct")) and pair.spec.multimodal
        warped = apply_field(pair.moving_labels, pair.truth, order=0).data
        inside = pair.fixed_labels.data > 0
        assert (warped[inside] == pair.fixed_labels.data[inside]).mean() > 0.9
    bad = json.loads(json.dumps(raw))
    bad["pairs"][0]["ct_role"] = "both"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ManifestError, match="ct_role must be"):
        load_manifest(tmp_path / "bad.json")


def _oblique_pair() -> tuple[Image, Image]:
    """A 26×24×22 phantom pair on oblique, anisotropic grids with different origins; moving shifted 1.5 voxels."""
    shape = (26, 24, 22)
    image = phantom_image(ellipsoid_labels(shape))
    rotation = Rotation.from_euler("xyz", [10, -5, 20], degrees=True).as_matrix()
    velocity = torch.zeros(1, 3, *shape)
    velocity[:, 0] = 1.5
    moving = warp.warp_image(image, warp.integrate_velocity(velocity))
    fixed_grid = Grid.from_spacing(shape, (1.5, 1.2, 1.0), (10.0, -20.0, 5.0), rotation)
    moving_grid = Grid.from_spacing(shape, (1.5, 1.2, 1.0), (12.0, -18.0, 4.0), rotation)
    return Image(image[0, 0].numpy(), fixed_grid), Image(moving[0, 0].numpy(), moving_grid)


def test_ants_field_reproduces_ants_warped_image(tmp_path):
    ants = pytest.importorskip("ants")
    from benchmark.classical import ants_register

    fixed, moving = _oblique_pair()
    field, transforms = ants_register(fixed, moving, {"type_of_transform": "SyN", "reg_iterations": (20, 10, 0)},
                                      tmp_path)
    assert len(transforms) == 2  # the SyN warp and the affine, both composed into `field`
    theirs = ants.apply_transforms(ants.image_read(str(tmp_path / "fixed.nii")),
                                   ants.image_read(str(tmp_path / "moving.nii")), transforms).numpy()
    ours = apply_field(moving, field).data
    assert np.abs(field.data).max() > 1.0  # a real, non-trivial transform
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_elastix_field_reproduces_elastix_warped_image(tmp_path):
    itk = pytest.importorskip("itk")
    from benchmark.classical import elastix_register

    fixed, moving = _oblique_pair()
    maps = copy.deepcopy(load_manifest(SUITE_PATH).classical["elastix"]["parameter_maps"])
    for entries in maps:
        entries.update(NumberOfResolutions="1", MaximumNumberOfIterations="30", NumberOfSpatialSamples="500")
    maps[1].update(GridSpacingSchedule=["1"], FinalGridSpacingInPhysicalUnits=["8", "8", "8"],
                   SampleRegionSize=["20", "20", "20"])
    field, transform = elastix_register(fixed, moving, maps, tmp_path, threads=2)
    theirs = itk.array_from_image(itk.transformix_filter(itk.imread(str(tmp_path / "moving.nii"), itk.F),
                                                         transform)).transpose(2, 1, 0)
    ours = apply_field(moving, field).data
    # Elastix's order-1 B-spline interpolator returns the default value in the outer half voxel, where ITK's
    # resampler (and apply_field) extend the border; compare where the mapped point is inside by one voxel.
    ijk = moving.grid.world_to_voxel(field.grid.world_coordinates() + field.data)
    inside = np.all((ijk >= 0.5) & (ijk <= np.array(moving.grid.shape) - 1.5), axis=-1)
    assert inside.mean() > 0.5 and np.abs(field.data).max() > 1.0
    np.testing.assert_allclose(ours[inside], theirs[inside], atol=1e-4)


def test_half_the_refinement_steps_is_a_named_method_with_a_seed_verdict_in_the_summary():
    """`NAME@balanced-half`: balanced with half the deformable steps (only when named); the summary says whether a
    network seed with half the steps reaches `optimise@balanced` on the network's held-out pairs."""
    from DeepRegistrationLib.engine.refine_settings import PRESETS, preset_settings
    from benchmark.methods import HALF_STEPS, network_options
    from benchmark.run import SAME_DICE, summary_markdown

    manifest = load_manifest()
    assert not any(HALF_STEPS in m.name for m in available_methods(manifest))
    seeded, alone = available_methods(manifest, [f"lapirn@{HALF_STEPS}", f"optimise@{HALF_STEPS}"])
    half = tuple((n + 1) // 2 for n in PRESETS["balanced"].iterations)
    for method in (seeded, alone):
        options = network_options(method, ("mr", "mr"), "cpu", None)
        settings = preset_settings(options.preset, options.refinement)
        assert options.preset == "balanced" and settings.iterations == half != PRESETS["balanced"].iterations
        assert settings.levels_mm == PRESETS["balanced"].levels_mm

    assert 0.003 < SAME_DICE  # the seeded row below (Δ −0.003) counts as the same accuracy
    rows = [("kw_a", "optimise@balanced", 0.90), ("kw_a", "lapirn@balanced-half", 0.897),
            ("kw_a", "optimise@balanced-half", 0.85), ("kw_a", "mmln@balanced-half", 0.80),
            ("kw_b", "optimise@balanced", 0.95), ("kw_b", "lapirn@balanced-half", 0.5)]
    records = [{"pair": p, "kind": "known_warp", "method": m, "error": "", "dice": d, "hd95": 1.0, "assd": 0.5,
                "folding_pct": 0.0, "sdlogj": 0.1, "tre_mm": 1.0, "epe_mm": 1.0, "seconds": 1.0, "peak_mb": 10.0}
               for p, m, d in rows]
    info = {"held_out": {"lapirn@balanced-half": ["kw_a"], "mmln@balanced-half": ["kw_a"]},
            "resolution_mm": 2.0, "started": "", "finished": "",
            "machine": {"cpu": "cpu", "cores": 2, "threads": 1, "versions": {}}}
    text = summary_markdown(records, info)
    section = text[text.index("### Networks as the refinement's seed"):text.index("### Per pair")]
    assert "| lapirn@balanced-half | 1 | 0.897 | 0.900 | -0.003 | 0.850 | same accuracy, half the steps |" in section
    assert "| mmln@balanced-half | 1 | 0.800 | 0.900 | -0.100 | 0.850 | below |" in section
    assert "refinement's seed" not in summary_markdown(records[:1], info)
    easy = [{**r, "dice": 0.899} if r["method"] == "optimise@balanced-half" else r for r in records]
    assert "| 0.899 | same accuracy, half the steps (so does the identity: these pairs do not tell) |" in \
        summary_markdown(easy, info)
