"""The QA report: radiological slice orientation from the grid affine, and a complete, self-contained report.html
whose tables carry the numbers of `engine.evaluate` and whose figures are valid PNGs."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest
from matplotlib.image import imread

from conftest import ellipsoid_labels, phantom_image, smooth_field
from DeepRegistrationLib.frontends import report
from DeepRegistrationLib.core import warp
from DeepRegistrationLib.engine.evaluation import evaluate
from DeepRegistrationLib.engine.options import RegistrationOptions
from DeepRegistrationLib.engine.results import RegistrationResult, RunInfo
from DeepRegistrationLib.core.field import DisplacementField
from DeepRegistrationLib.core.geometry import Grid
from DeepRegistrationLib.core.image import Image

SHAPE = (24, 28, 20)
SPACING = (1.5, 1.2, 2.0)
NAMES = {1: "Brain", 2: "Right <blob> & co"}


def _same_points_grids() -> dict[str, Grid]:
    """Three grids sampling the same RAS points: RAS-ordered, LPS-ordered (i → L, j → P) and permuted (A, S, R)."""
    shape, spacing, origin = (5, 6, 7), np.array([1.0, 2.0, 3.0]), np.array([-3.0, 4.0, 10.0])
    far = origin + (np.array(shape) - 1) * spacing
    return {
        "ras": Grid.from_spacing(shape, tuple(spacing), tuple(origin)),
        "lps": Grid.from_spacing(shape, tuple(spacing), (far[0], far[1], origin[2]), np.diag([-1.0, -1.0, 1.0])),
        "permuted": Grid.from_spacing((shape[1], shape[2], shape[0]), (spacing[1], spacing[2], spacing[0]),
                                      tuple(origin), np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]])),
    }


def test_ras_grid_axial_is_constant_k_radiological():
    grid = _same_points_grids()["ras"]
    axial, coronal, sagittal = report.slice_planes(grid)
    assert (axial.name, axial.normal, coronal.normal, sagittal.normal) == ("Axial", 2, 1, 0)
    x = grid.world_coordinates()
    shown = axial.take(x)
    assert shown.shape[:2] == (6, 5)  # rows: A→P along j, columns: R→L along i
    assert np.all(np.diff(shown[..., 0], axis=1) < 0)  # patient right on the image left
    assert np.all(np.diff(shown[..., 1], axis=0) < 0)  # anterior up
    assert axial.letters() == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert coronal.letters() == {"left": "R", "right": "L", "top": "S", "bottom": "I"}
    assert sagittal.letters() == {"left": "A", "right": "P", "top": "S", "bottom": "I"}


def test_planes_show_the_same_anatomy_for_any_voxel_order():
    grids = _same_points_grids()
    shown = {}
    for name, grid in grids.items():
        world = grid.world_coordinates()
        volume = world[..., 0] + 10 * world[..., 1] + 100 * world[..., 2]  # a distinct value at every point
        shown[name] = [(p.take(volume), p.letters(), p.row_spacing, p.col_spacing, p.position.split(", ")[1])
                       for p in report.slice_planes(grid)]
    for name in ("lps", "permuted"):
        for ref, other in zip(shown["ras"], shown[name]):
            np.testing.assert_allclose(other[0], ref[0])
            assert other[1:] == ref[1:], name


@pytest.fixture(scope="module")
def result_pair():
    """A known smooth field on a small anisotropic phantom, evaluated by the engine (no network)."""
    grid = Grid.from_spacing(SHAPE, SPACING, (-18.0, -17.0, -19.0))
    labels = ellipsoid_labels(SHAPE)
    image = phantom_image(labels)
    v = smooth_field(SHAPE, 2.0)
    inverse = warp.integrate_velocity(-v)
    fixed = Image(image[0, 0].numpy() * 100, grid, "fixed.nii.gz")
    moving = Image(warp.warp_image(image, inverse)[0, 0].numpy() * 100, grid, "moving.nii.gz")
    fixed_labels = Image(labels[0, 0].numpy().astype(np.int32), grid, "fixed_labels")
    moving_labels = Image(warp.warp_labels(labels, inverse)[0, 0].numpy().astype(np.int32), grid, "moving_labels")
    forward = DisplacementField.from_voxels(0.7 * warp.integrate_velocity(v), grid)
    fixed_points = grid.voxel_to_world(np.array([[6.0, 8, 5], [17, 20, 12], [12, 10, 15]]))
    moving_points = forward.map_points(fixed_points) + np.array([0.5, -1.0, 0.8])
    metrics, warped, warped_labels, _ = evaluate(fixed, moving, forward, fixed_labels=fixed_labels,
                                              moving_labels=moving_labels, fixed_points=fixed_points,
                                              moving_points=moving_points)
    metrics.run = RunInfo(RegistrationOptions(method="lapirn"), "0f" * 32, "cpu", grid.shape, 1.0, None,
                          {"preprocessing": 0.12, "network": 1.5, "metrics": 0.3, "total": 1.92})
    jacobian = Image(forward.jacobian_determinant(), grid, "jacobian")
    result = RegistrationResult(forward, forward, None, warped, jacobian, warped_labels, metrics)
    return fixed, moving, result, fixed_labels


def _table(text: str, css: str) -> list[list[str]]:
    table = re.search(rf'<table class="{css}">(.*?)</table>', text, re.S)
    assert table, f"no {css} table"
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table.group(1))[1:]]


def test_report_links_valid_pngs_and_shows_metrics(tmp_path, result_pair):
    fixed, moving, result, fixed_labels = result_pair
    out = report.write_report(tmp_path / "qa", fixed, moving, result, fixed_labels, NAMES)
    assert out == tmp_path / "qa" / "report.html" and out.is_file()
    text = out.read_text(encoding="utf-8")

    links = re.findall(r'<img src="([^"]+)"', text)
    names = {p.name for p in out.parent.iterdir()}
    assert set(links) | {"report.html"} == names  # every PNG linked, nothing else left (no temporary folder)
    assert {"slices.png", "checkerboard.png", "difference.png", "deformation_grid.png", "jacobian.png",
            "outlines.png", "dice.png"} <= set(links)
    for link in links:
        assert "/" not in link
        pixels = imread(out.parent / link)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100

    metrics = result.metrics.to_json()
    labels = metrics["labels"]
    rows = {cells[0]: cells for cells in _table(text, "dice")}
    for key, before in labels["before"]["per_label"].items():
        after = labels["after"]["per_label"][key]
        cells = rows[key]
        assert cells[1] == (html.escape(NAMES[int(key)]) if int(key) in NAMES else f"label {key}")
        assert cells[2:5] == [f"{before['dice']:.3f}", f"{after['dice']:.3f}", f"{after['dice'] - before['dice']:+.3f}"]
        assert cells[6] == f"{after['hd95']:.2f}"
    assert f"<b>{labels['after']['mean_dice']:.3f}</b>" in rows[""][3]

    marks = metrics["landmarks"]
    tre = _table(text, "tre")
    assert len(tre) == len(marks["before"]) + 1
    for i, (before, after) in enumerate(zip(marks["before"], marks["after"])):
        assert tre[i][:3] == [str(i + 1), f"{before:.2f}", f"{after:.2f}"]
    assert tre[-1][1:3] == [f"<b>{marks['mean_before']:.2f}</b>", f"<b>{marks['mean_after']:.2f}</b>"]

    assert "0f" * 32 in text and "Radiological convention" in text
    assert f"{metrics['jacobian']['percent_nonpositive']:.4f} %" in text
    assert f"{metrics['jacobian']['sdlogj']:.4f}" in text
    assert "<td>network</td><td>1.50</td>" in text


def test_failed_report_keeps_the_previous_one(tmp_path, result_pair, monkeypatch):
    fixed, moving, result, fixed_labels = result_pair
    (tmp_path / "report.html").write_text("previous report")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "_checkerboard_figure", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        report.write_report(tmp_path, fixed, moving, result, fixed_labels, NAMES)
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    assert (tmp_path / "report.html").read_text() == "previous report"
