"""The visual checks and the comparison table of the MRML logic, on slicer-core without the engine (synthetic
results): colour legend, outlined folding, coloured residual lines, one table row per run, and the checkerboard,
difference and flicker views."""

from __future__ import annotations

import math

import numpy as np
import pytest
import slicer

from DeepRegistrationLib.core import errors
from DeepRegistrationLib.engine.options import RegistrationOptions
from DeepRegistrationLib.frontends import mrml
from DeepRegistrationLib.frontends.mrml import MRMLLogic, Outputs, table_values

from test_slicer_logic import build_scene, data, image_from_volume_node, synthetic_result  # noqa: F401


def add_slice_views(scene):
    """The composite nodes of Slicer's three slice views."""
    return [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]


def run(scene, nodes, method="lapirn", landmarks=True, outputs=None):
    logic = MRMLLogic()
    inputs = {"fixedLandmarks": nodes["fixedLandmarks"], "movingLandmarks": nodes["movingLandmarks"]} if landmarks \
        else {}
    prepared = logic.prepareJob(nodes["fixed"], nodes["moving"], RegistrationOptions(method=method), **inputs)
    result = synthetic_result(prepared.job.fixed, prepared.job.moving, points=prepared.job if landmarks else None)
    result.metrics.run.options = RegistrationOptions(method=method, weights="/models/my_model.safetensors")
    return logic.createOutputs(prepared, result, outputs)


def test_each_run_adds_one_row_to_the_scene_comparison_table_and_a_failed_one_none(data, monkeypatch):
    scene, nodes = build_scene(data)
    first = run(scene, nodes, "lapirn")
    second = run(scene, nodes, "voxelmorph", landmarks=False)
    assert second.comparison is first.comparison is mrml.comparison_table(scene)
    rows = table_values(second.comparison)
    assert [r["Method"] for r in rows] == ["lapirn", "voxelmorph"]
    assert rows[0]["Run"] == first.transform.GetName() and rows[1]["Run"] == second.transform.GetName()
    assert rows[0]["Model"] == "my_model.safetensors" and rows[0]["Preset"] == "balanced"
    assert rows[0]["Folding"] == pytest.approx(first.metrics.jacobian.percent_nonpositive)
    assert rows[0]["TRE"] == pytest.approx(first.metrics.landmarks.mean_after)
    assert math.isnan(rows[1]["TRE"]) and math.isnan(rows[1]["Dice"]), "no landmarks, no segmentations: NaN"
    assert second.comparison.GetColumnUnitLabel("HD95") == "mm"

    def broken(self, key, value):
        raise RuntimeError("broken jacobian")

    monkeypatch.setattr(mrml._OutputBuilder, "jacobian", broken)
    with pytest.raises(RuntimeError):
        run(scene, nodes, "jad")
    assert len(table_values(mrml.comparison_table(scene))) == 2, "a failed run adds no row"
    monkeypatch.undo()
    out = run(scene, nodes, outputs=Outputs(comparison=False))
    assert out.comparison is None and len(table_values(mrml.comparison_table(scene))) == 2


def test_preset_column_reads_the_run_options(data):
    scene, nodes = build_scene(data)
    out = run(scene, nodes)
    row = mrml.comparison_row(out.result, "run", "m", "f")
    assert row["Preset"] == "balanced", "the default preset"
    out.result.metrics.run.options.preset = "accurate"
    assert mrml.comparison_row(out.result, "run", "m", "f")["Preset"] == "accurate"


def test_jacobian_legend_folding_outline_and_residual_colours(data):
    scene, nodes = build_scene(data)
    colors = slicer.vtkSlicerColorLogic()  # Slicer's Colors module registers the colour legend node on its scene
    colors.SetMRMLScene(scene)
    out = run(scene, nodes)
    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(out.jacobian)
    assert legend.GetTitleText() == "det J" and legend.GetVisibility() and legend.GetVisibility2D()
    assert mrml.add_jacobian_legend(out.jacobian) is legend, "one legend per volume"
    display = out.folding.GetDisplayNode()
    assert display.GetVisibility2DOutline() and not display.GetVisibility2DFill()
    report = out.landmarkReport
    for line, before, after in zip(out.residuals, report["before"], report["after"]):
        expected = mrml.RESIDUAL_COLORS["improved" if after <= before else "worse"]
        assert line.GetDisplayNode().GetSelectedColor() == pytest.approx(expected)
        assert f"{after:.1f} mm (before {before:.1f})" in line.GetName()
        assert float(line.GetAttribute("DeepRegistration.treAfter")) == pytest.approx(after, abs=1e-4)


def test_comparison_views_in_every_slice_view(data):
    scene, nodes = build_scene(data)
    composites = add_slice_views(scene)
    out = run(scene, nodes)
    fixed, warped = nodes["fixed"], out.warped
    assert mrml.show_comparison(fixed, warped, "overlay") is None
    assert all(c.GetBackgroundVolumeID() == fixed.GetID() and c.GetForegroundVolumeID() == warped.GetID()
               and c.GetForegroundOpacity() == pytest.approx(0.5) for c in composites)
    mrml.show_comparison(fixed, warped, "difference")
    assert all(c.GetCompositing() == c.Subtract and c.GetForegroundOpacity() == 1.0 for c in composites)

    board = mrml.show_comparison(fixed, warped, "checkerboard")
    assert all(c.GetBackgroundVolumeID() == board.GetID() and not c.GetForegroundVolumeID() for c in composites)
    assert all(c.GetCompositing() == c.Alpha for c in composites)
    values = image_from_volume_node(board).data
    a, b = mrml._unit_intensities(fixed), mrml._unit_intensities(warped)
    shape = values.shape
    blocks = [np.arange(n) * 8 // n for n in shape]
    parity = (blocks[0][:, None, None] + blocks[1][None, :, None] + blocks[2][None, None, :]) % 2 == 0
    np.testing.assert_allclose(values[parity], a[parity], atol=1e-6)
    np.testing.assert_allclose(values[~parity], b[~parity], atol=1e-6)
    assert mrml.show_comparison(fixed, warped, "checkerboard") is board, "the same node is updated"

    mrml.show_comparison(fixed, warped, "flicker")
    assert [mrml.flicker_step(scene) for _ in range(3)] == [0.0, 1.0, 0.0]
    with pytest.raises(errors.InputError, match="unknown comparison"):
        mrml.show_comparison(fixed, warped, "sideways")
    with pytest.raises(errors.InputError, match="grid of"):
        mrml.checkerboard_volume(fixed, nodes["moving"])  # the moving volume lies on its own grid
