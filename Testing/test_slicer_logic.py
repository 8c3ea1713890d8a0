"""The Slicer module's logic against real MRML (PyPI `slicer-core`): geometry end to end, metrics, no data loss.

The scene holds a known-warp phantom pair as volume nodes with oblique, anisotropic IJK-to-RAS matrices that differ
between fixed and moving. One registration (a tiny LapIRN whose output layers are perturbed, so the field is
non-trivial) feeds most tests; Slicer's own machinery (vtkImageReslice through the transform node's VTK transform,
hardening, point transforms) must reproduce what the backend reports.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import slicer  # slicer-core (the `slicer` extra, installed by scripts/run.sh): these tests must run, never skip
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from DeepRegistrationLib.core import errors, metrics, warp  # noqa: E402
from DeepRegistrationLib.methods import models, registry
from DeepRegistrationLib.frontends import job, worker
from DeepRegistrationLib.engine.evaluation import evaluate
from DeepRegistrationLib.engine.options import RegistrationOptions
from DeepRegistrationLib.engine.results import RegistrationResult, RunInfo  # noqa: E402
from DeepRegistrationLib.core.field import DisplacementField, apply_field  # noqa: E402
from DeepRegistrationLib.core.geometry import Grid  # noqa: E402
from DeepRegistrationLib.core.image import Image  # noqa: E402
from DeepRegistrationLib.frontends.mrml import (MRMLLogic, Outputs, grid_transform_from_field,  # noqa: E402
                                              image_from_volume_node, update_volume_node)

from conftest import ellipsoid_labels, phantom_image, smooth_field  # noqa: E402

SHAPE = (22, 24, 20)


def rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.radians(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


FIXED_GRID = Grid.from_spacing(SHAPE, (1.4, 1.1, 1.25), (-14.0, -12.0, -11.0), rotation((1, 2, 3), 20))
MOVING_GRID = Grid.from_spacing(SHAPE, (1.3, 1.2, 1.15), (-12.5, -13.0, -10.0), rotation((-2, 1, 1), 12))


# ------------------------------------------------------------------------------------------------ helpers


def add_volume(scene, data: np.ndarray, affine: np.ndarray, name: str, cls: str = "vtkMRMLScalarVolumeNode"):
    """A volume node built with plain VTK calls (independent of the code under test)."""
    node = scene.AddNewNodeByClass(cls, name)
    image = vtk.vtkImageData()
    image.SetDimensions(*data.shape)
    image.GetPointData().SetScalars(
        numpy_support.numpy_to_vtk(np.ascontiguousarray(data.transpose(2, 1, 0)).ravel(), deep=True))
    node.SetAndObserveImageData(image)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, affine[r, c])
    node.SetIJKToRASMatrix(matrix)
    node.CreateDefaultDisplayNodes()
    return node


def volume_array(node) -> np.ndarray:
    image = node.GetImageData()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
        image.GetDimensions()[::-1]).transpose(2, 1, 0)


def ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def add_segmentation(scene, labels: np.ndarray, affine: np.ndarray, name: str):
    """A segmentation imported by Slicer's own logic from a label map (segments named Label_N)."""
    labelmap = add_volume(scene, labels.astype(np.int16), affine, name + " labels", "vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    scene.RemoveNode(labelmap)
    return segmentation


def add_fiducials(scene, labels, points, name: str):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for label, p in zip(labels, points):
        node.AddControlPoint(vtk.vtkVector3d(*p), label)
    return node


def checksum(node) -> str:
    """Content digest of an input node: voxels and geometry, segments, or control points; parent transform."""
    h = hashlib.sha256()
    h.update(str(node.GetTransformNodeID()).encode())
    h.update(node.GetName().encode())
    if node.IsA("vtkMRMLVolumeNode"):
        h.update(volume_array(node).tobytes())
        h.update(ijk_to_ras(node).tobytes())
    elif node.IsA("vtkMRMLSegmentationNode"):
        segmentation = node.GetSegmentation()
        for i in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(i)
            h.update(segment.GetName().encode())
            labelmap = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
            h.update(numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).tobytes())
            h.update(str(labelmap.GetExtent()).encode())
            matrix = vtk.vtkMatrix4x4()
            labelmap.GetImageToWorldMatrix(matrix)
            h.update(str([matrix.GetElement(r, c) for r in range(4) for c in range(4)]).encode())
    elif node.IsA("vtkMRMLMarkupsNode"):
        for i in range(node.GetNumberOfControlPoints()):
            h.update(node.GetNthControlPointLabel(i).encode())
            h.update(np.array(node.GetNthControlPointPositionWorld(i)).tobytes())
    return h.hexdigest()


def node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def reslice(input_node, transform, output_grid: Grid) -> np.ndarray:
    """Resample `input_node` on `output_grid` with vtkImageReslice through `transform` (fixed RAS → input RAS)."""
    chain = vtk.vtkGeneralTransform()
    chain.PostMultiply()
    output_to_ras = vtk.vtkMatrix4x4()
    ras_to_input = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            output_to_ras.SetElement(r, c, output_grid.affine[r, c])
    input_node.GetRASToIJKMatrix(ras_to_input)
    chain.Concatenate(output_to_ras)
    if transform is not None:
        chain.Concatenate(transform)
    chain.Concatenate(ras_to_input)
    source = vtk.vtkImageData()
    source.DeepCopy(input_node.GetImageData())
    source.SetOrigin(0, 0, 0)
    source.SetSpacing(1, 1, 1)
    resample = vtk.vtkImageReslice()
    resample.SetInputData(source)
    resample.SetResliceTransform(chain)
    resample.SetInterpolationModeToLinear()
    resample.SetBackgroundLevel(0.0)
    resample.SetOutputOrigin(0, 0, 0)
    resample.SetOutputSpacing(1, 1, 1)
    resample.SetOutputExtent(0, output_grid.shape[0] - 1, 0, output_grid.shape[1] - 1, 0, output_grid.shape[2] - 1)
    resample.Update()
    out = resample.GetOutput()
    return numpy_support.vtk_to_numpy(out.GetPointData().GetScalars()).reshape(
        output_grid.shape[::-1]).transpose(2, 1, 0)


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A tiny LapIRN, untrained, with perturbed velocity heads so the field is a few millimetres."""
    torch.manual_seed(3)
    spec = registry.get_method("lapirn")
    net = spec.build(spec.config_class(start_channels=2, num_res_blocks=1, working_spacing=2.5, range_flow=0.4))
    for level in net.levels:
        torch.nn.init.normal_(level.head.out.weight, std=1.0)
    return models.save_model(net, "lapirn", tmp_path_factory.mktemp("model") / "tiny_lapirn.safetensors")


@pytest.fixture(scope="module")
def data():
    """The phantom pair as arrays: moving = fixed warped by a smooth known field (voxels of the shared shape)."""
    fixed_labels = ellipsoid_labels(SHAPE)
    inverse = warp.integrate_velocity(-smooth_field(SHAPE, 2.0, seed=1))
    fixed = phantom_image(fixed_labels) * 100.0
    moving = warp.warp_image(fixed, inverse)
    moving_labels = warp.warp_labels(fixed_labels, inverse)
    rng = np.random.default_rng(0)
    fixed_ijk = np.array([[6, 7, 6], [15, 8, 7], [11, 16, 9], [8, 12, 14], [14, 15, 12], [10, 10, 10]], float)
    fixed_points = FIXED_GRID.voxel_to_world(fixed_ijk)
    moving_points = fixed_points + rng.normal(0, 1.5, fixed_points.shape)
    return {"fixed": fixed[0, 0].numpy(), "moving": moving[0, 0].numpy(),
            "fixed_labels": fixed_labels[0, 0].numpy().astype(np.int16),
            "moving_labels": moving_labels[0, 0].numpy().astype(np.int16),
            "fixed_points": fixed_points, "moving_points": moving_points}


def build_scene(data):
    scene = slicer.vtkMRMLScene()
    nodes = {
        "fixed": add_volume(scene, data["fixed"], FIXED_GRID.affine, "fixed"),
        "moving": add_volume(scene, data["moving"], MOVING_GRID.affine, "moving"),
        "fixedSegmentation": add_segmentation(scene, data["fixed_labels"], FIXED_GRID.affine, "fixed seg"),
        "movingSegmentation": add_segmentation(scene, data["moving_labels"], MOVING_GRID.affine, "moving seg"),
        "fixedLandmarks": add_fiducials(scene, [f"P{i}" for i in range(6)], data["fixed_points"], "F"),
        # moving landmarks in another order: they must be matched by label
        "movingLandmarks": add_fiducials(scene, [f"P{i}" for i in (3, 1, 0, 5, 4, 2)],
                                         data["moving_points"][[3, 1, 0, 5, 4, 2]], "M"),
    }
    return scene, nodes


def lapirn(**options) -> RegistrationOptions:
    """The network alone (preset fast): these tests are about the MRML logic around the engine."""
    return RegistrationOptions(method="lapirn", preset="fast", **options)


def run(nodes, weights, **kwargs):
    return MRMLLogic().registerVolumes(
        nodes["fixed"], nodes["moving"], lapirn(weights=str(weights), device="cpu"),
        fixedSegmentation=nodes["fixedSegmentation"], movingSegmentation=nodes["movingSegmentation"],
        fixedLandmarks=nodes["fixedLandmarks"], movingLandmarks=nodes["movingLandmarks"], **kwargs)


@pytest.fixture(scope="module")
def registered(data, weights):
    scene, nodes = build_scene(data)
    before = {name: checksum(node) for name, node in nodes.items()}
    start = time.perf_counter()
    out = run(nodes, weights, outputs=Outputs(inverse=True), transformDisplay="glyph")
    print(f"register: {time.perf_counter() - start:.1f} s")
    return scene, nodes, out, before


# ------------------------------------------------------------------------------------------- conversions


def test_volume_node_roundtrip_keeps_oblique_geometry_and_axis_order(data):
    scene = slicer.vtkMRMLScene()
    node = add_volume(scene, data["fixed"], FIXED_GRID.affine, "fixed")
    image = image_from_volume_node(node)
    np.testing.assert_array_equal(image.data, data["fixed"])
    np.testing.assert_allclose(image.grid.affine, FIXED_GRID.affine, atol=1e-12)
    out = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "out")
    update_volume_node(out, image)
    np.testing.assert_array_equal(volume_array(out), data["fixed"])
    np.testing.assert_allclose(ijk_to_ras(out), FIXED_GRID.affine, atol=1e-12)


def test_linear_parent_transform_is_part_of_the_world_grid_and_nonlinear_is_refused(data):
    scene = slicer.vtkMRMLScene()
    node = add_volume(scene, data["fixed"], FIXED_GRID.affine, "fixed")
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    shift = np.eye(4)
    shift[:3, :3] = rotation((0, 0, 1), 30)
    shift[:3, 3] = (5.0, -2.0, 1.0)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, shift[r, c])
    parent.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(parent.GetID())
    np.testing.assert_allclose(image_from_volume_node(node).grid.affine, shift @ FIXED_GRID.affine, atol=1e-12)
    grid_node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    field = DisplacementField(np.zeros((*SHAPE, 3), np.float32), FIXED_GRID)
    grid_node.SetAndObserveTransformFromParent(grid_transform_from_field(field))
    node.SetAndObserveTransformNodeID(grid_node.GetID())
    with pytest.raises(errors.InputError, match="non-linear"):
        image_from_volume_node(node)


def test_grid_transform_from_field_evaluates_like_the_backend():
    """A smooth field on an oblique grid: Slicer's vtkOrientedGridTransform gives p + d(p) as the backend does."""
    rng = np.random.default_rng(1)
    u = smooth_field(SHAPE, 3.0, seed=4)
    field = DisplacementField.from_voxels(u, FIXED_GRID)
    transform = grid_transform_from_field(field)
    ijk = rng.uniform(1, np.array(SHAPE) - 2, size=(50, 3))
    points = FIXED_GRID.voxel_to_world(ijk)
    expected = field.map_points(points)
    got = np.array([transform.TransformPoint(*p) for p in points])
    np.testing.assert_allclose(got, expected, atol=1e-3)


# --------------------------------------------------------------------------------------- registration


def test_slicer_resampling_through_the_transform_node_reproduces_the_warped_volume(registered):
    scene, nodes, out, _ = registered
    result = out.result
    assert np.abs(result.field.data).max() > 1.0, "the test field should be non-trivial (mm)"
    transform = out.transform.GetTransformFromParent()
    resliced = reslice(nodes["moving"], transform, FIXED_GRID)
    warped = volume_array(out.warped)
    np.testing.assert_allclose(warped, result.warped.data, atol=1e-4)
    np.testing.assert_allclose(ijk_to_ras(out.warped), FIXED_GRID.affine, atol=1e-9)
    # Same trilinear interpolation and the same half-voxel border rule (ITK's, vtkImageReslice's Border on):
    # agreement to float32 rounding over the whole volume.
    error = np.abs(resliced - warped)
    print(f"vtkImageReslice vs backend: max {error.max():.2e}, intensity range {np.ptp(warped):.1f}")
    assert error.max() < 1e-5 * np.ptp(warped)
    # without the transform the reslice is just the identity resampling: the transform does matter
    identity = reslice(nodes["moving"], None, FIXED_GRID)
    assert np.abs(identity - warped).max() > 0.1 * np.ptp(warped)


def test_hardening_the_transform_on_a_clone_matches_the_backend(registered, data):
    scene, nodes, out, _ = registered
    clone = add_volume(scene, data["moving"], MOVING_GRID.affine, "moving clone")
    clone.SetAndObserveTransformNodeID(out.transform.GetID())
    assert slicer.vtkSlicerTransformLogic().hardenTransform(clone)
    assert clone.GetParentTransformNode() is None
    # Slicer resampled onto a grid of its own choosing; the backend resamples onto that grid through the same field.
    hardened = image_from_volume_node(clone)
    expected = apply_field(Image(data["moving"], MOVING_GRID), out.result.field.resampled(hardened.grid)).data
    # compare where the hardened grid lies inside the fixed grid (where the field is defined, not extrapolated)
    ijk = FIXED_GRID.world_to_voxel(hardened.grid.world_coordinates())
    inside = np.all((ijk >= 0) & (ijk <= np.array(SHAPE) - 1), axis=-1)
    error = np.abs(hardened.data - expected)[inside]
    print(f"hardened vs backend: {inside.sum()} voxels, max {error.max():.2e}, range {np.ptp(expected):.1f}")
    assert inside.sum() > 1000 and error.max() < 1e-3 * np.ptp(expected)
    scene.RemoveNode(clone)


def test_landmark_tre_equals_points_mapped_by_the_transform_node(registered, data):
    _, nodes, out, _ = registered
    transform = out.transform.GetTransformFromParent()
    report = out.landmarkReport
    assert report["matched_by"] == "label" and report["labels"] == [f"P{i}" for i in range(6)]
    mapped = np.array([transform.TransformPoint(*p) for p in data["fixed_points"]])
    tre = np.linalg.norm(mapped - data["moving_points"], axis=1)
    np.testing.assert_allclose(report["after"], tre, atol=1e-3)
    np.testing.assert_allclose(report["before"], np.linalg.norm(data["fixed_points"] - data["moving_points"], axis=1),
                               atol=1e-9)
    table = out.landmarkTable.GetTable()
    assert table.GetNumberOfRows() == 6 + 4
    np.testing.assert_allclose([table.GetValue(r, 2).ToDouble() for r in range(6)], tre, atol=1e-3)
    assert table.GetValue(6, 0).ToString() == "mean"
    np.testing.assert_allclose(table.GetValue(6, 2).ToDouble(), tre.mean(), atol=1e-3)
    assert len(out.residuals) == 6
    lengths = [np.linalg.norm(np.subtract(line.GetNthControlPointPositionWorld(1),
                                          line.GetNthControlPointPositionWorld(0))) for line in out.residuals]
    np.testing.assert_allclose(lengths, tre, atol=1e-3)


def expected_segment_metrics(data, field: DisplacementField):
    """Backend metrics on the original label arrays (before = identity resampling onto the fixed grid)."""
    fixed = data["fixed_labels"]
    moving = Image(data["moving_labels"], MOVING_GRID)
    warped = apply_field(moving, field, order=0).data
    before = apply_field(moving, DisplacementField(np.zeros_like(field.data), field.grid), order=0).data
    spacing = FIXED_GRID.spacing
    rows = {}
    for label in (1, 2, 3, 4):
        rows[label] = {
            "dice_before": metrics.dice_per_label(fixed, before, [label])[label],
            "dice_after": metrics.dice_per_label(fixed, warped, [label])[label],
            "hd95_before": metrics.hd95(fixed == label, before == label, spacing),
            "hd95_after": metrics.hd95(fixed == label, warped == label, spacing),
            "assd_before": metrics.assd(fixed == label, before == label, spacing),
            "assd_after": metrics.assd(fixed == label, warped == label, spacing),
            "volume_change": metrics.volume_change(moving.data, warped, [label], MOVING_GRID.spacing,
                                                   spacing)[label]}
    return rows


def table_rows(table_node):
    table = table_node.GetTable()
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    return [{name: table.GetValue(r, c) for c, name in enumerate(names)} for r in range(table.GetNumberOfRows())]


def test_segment_metrics_from_segmentation_nodes_match_the_backend(registered, data):
    _, _, out, _ = registered
    expected = expected_segment_metrics(data, out.result.field)
    rows = table_rows(out.segmentTable)
    assert [r["Segment"].ToString() for r in rows] == [f"Label_{i}" for i in (1, 2, 3, 4)]
    columns = {"Dice before": "dice_before", "Dice after": "dice_after", "HD95 before": "hd95_before",
               "HD95 after": "hd95_after", "ASSD before": "assd_before", "ASSD after": "assd_after",
               "Volume change": "volume_change"}
    for row, label in zip(rows, (1, 2, 3, 4)):
        for column, key in columns.items():
            assert row[column].ToDouble() == pytest.approx(expected[label][key], abs=1e-6), (label, column)
    assert out.segmentTable.GetColumnUnitLabel("HD95 after") == "mm"
    chart = out.segmentChart
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    series = chart.GetNthPlotSeriesNode(1)
    assert series.GetPlotType() == series.PlotTypeBar and series.GetYColumnName() == "Dice after"
    assert series.GetTableNode() is out.segmentTable


def test_label_map_inputs_give_the_same_segment_metrics(registered, data, weights):
    _, _, out, _ = registered
    scene = slicer.vtkMRMLScene()
    fixed = add_volume(scene, data["fixed"], FIXED_GRID.affine, "fixed")
    moving = add_volume(scene, data["moving"], MOVING_GRID.affine, "moving")
    fixed_labels = add_volume(scene, data["fixed_labels"], FIXED_GRID.affine, "fl", "vtkMRMLLabelMapVolumeNode")
    moving_labels = add_volume(scene, data["moving_labels"], MOVING_GRID.affine, "ml", "vtkMRMLLabelMapVolumeNode")
    logic = MRMLLogic()
    prepared = logic.prepareJob(fixed, moving, lapirn(weights=str(weights)), fixedSegmentation=fixed_labels,
                                movingSegmentation=moving_labels)
    np.testing.assert_array_equal(prepared.job.fixed_labels.data, data["fixed_labels"])
    np.testing.assert_array_equal(prepared.job.moving_labels.data, data["moving_labels"])
    # the same labels through segmentation export
    _, nodes = build_scene(data)
    from_segments = logic.prepareJob(nodes["fixed"], nodes["moving"], lapirn(),
                                     fixedSegmentation=nodes["fixedSegmentation"],
                                     movingSegmentation=nodes["movingSegmentation"])
    np.testing.assert_array_equal(from_segments.job.fixed_labels.data, data["fixed_labels"])
    np.testing.assert_array_equal(from_segments.job.moving_labels.data, data["moving_labels"])
    assert from_segments.labelNames == {1: "Label_1", 2: "Label_2", 3: "Label_3", 4: "Label_4"}


def test_jacobian_volume_colour_table_and_folding_segmentation(registered):
    scene, _, out, _ = registered
    np.testing.assert_allclose(volume_array(out.jacobian), out.result.jacobian.data, atol=1e-6)
    display = out.jacobian.GetDisplayNode()
    assert display.GetColorNode().GetName() == "DeepRegistration Jacobian"
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((0.0, 2.0))
    colors = display.GetColorNode()
    centre = [0.0] * 4
    colors.GetColor(colors.GetNumberOfColors() // 2, centre)
    assert min(centre[:3]) > 0.95  # white at det J = 1
    segmentation = out.folding.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1


def test_inverse_and_transform_node_references(registered):
    _, nodes, out, _ = registered
    assert out.transform.IsA("vtkMRMLGridTransformNode")
    assert out.transform.GetNodeReference("fixedVolume") is nodes["fixed"]
    assert out.transform.GetNodeReference("movingVolume") is nodes["moving"]
    forward = out.transform.GetTransformFromParent()
    inverse = out.inverse.GetTransformFromParent()
    ijk = np.array([[8, 9, 8], [12, 14, 10], [10, 10, 11]], float)
    points = FIXED_GRID.voxel_to_world(ijk)
    mapped = np.array([forward.TransformPoint(*p) for p in points])
    back = np.array([inverse.TransformPoint(*q) for q in mapped])
    # Slicer evaluates the inverse field as the backend does; the round trip is as good as the engine's inverse
    np.testing.assert_allclose(back, out.result.inverse.map_points(mapped), atol=1e-3)
    assert np.abs(back - points).max() < 0.25 * np.abs(mapped - points).max()
    display = out.transform.GetDisplayNode()
    assert display.GetVisualizationMode() == display.VIS_MODE_GLYPH
    assert display.GetRegionNode() is nodes["fixed"]


def test_inputs_unchanged_after_success(registered):
    _, nodes, _, before = registered
    assert {name: checksum(node) for name, node in nodes.items()} == before


def test_failure_and_cancel_leave_scene_and_inputs_unchanged(data, weights, tmp_path, monkeypatch):
    scene, nodes = build_scene(data)
    before = {name: checksum(node) for name, node in nodes.items()}
    ids = node_ids(scene)
    with pytest.raises(errors.InputError, match="no weights"):
        MRMLLogic().registerVolumes(nodes["fixed"], nodes["moving"], lapirn(weights=str(tmp_path / "x")))
    with pytest.raises(errors.Cancelled):
        run(nodes, weights, cancel=lambda: True)
    with pytest.raises(errors.InputError, match="is an input"):
        run(nodes, weights, outputs=Outputs(warped=nodes["moving"]))
    assert node_ids(scene) == ids

    # a failure while building the outputs removes every node that call had added
    from DeepRegistrationLib.frontends import mrml

    def broken(self, key, landmarks):
        raise RuntimeError("broken table")

    monkeypatch.setattr(mrml._OutputBuilder, "landmark_table", broken)
    prepared = MRMLLogic().prepareJob(nodes["fixed"], nodes["moving"], lapirn(),
                                      fixedLandmarks=nodes["fixedLandmarks"],
                                      movingLandmarks=nodes["movingLandmarks"])
    result = synthetic_result(prepared.job.fixed, prepared.job.moving, points=prepared.job)
    with pytest.raises(RuntimeError, match="broken table"):
        MRMLLogic().createOutputs(prepared, result)
    assert node_ids(scene) == ids
    assert {name: checksum(node) for name, node in nodes.items()} == before


# ------------------------------------------------------------------------- outputs without the engine


def synthetic_result(fixed: Image, moving: Image, affine: np.ndarray | None = None,
                     points=None) -> RegistrationResult:
    """A result with a folding field (a strong sinusoid along i) on the fixed grid; with `points` (a job), its
    landmarks are scored."""
    i = np.arange(fixed.grid.shape[0])[:, None, None]
    u = np.zeros((1, 3, *fixed.grid.shape), np.float32)
    u[0, 0] = 2.5 * np.sin(2 * np.pi * i / 8.0)
    field = DisplacementField.from_voxels(torch.from_numpy(u), fixed.grid)
    metrics, warped, _, det = evaluate(fixed, moving, field, fixed_points=getattr(points, "fixed_points", None),
                                       moving_points=getattr(points, "moving_points", None))
    metrics.run = RunInfo(lapirn(), None, "cpu", fixed.grid.shape, 1.0, None, {"total": 0.0})
    return RegistrationResult(field, field, affine, warped, Image(det.astype(np.float32), fixed.grid, "jacobian"),
                              None, metrics)


def test_chosen_output_nodes_are_overwritten_and_affine_is_listed_under_the_grid_transform(data):
    scene, nodes = build_scene(data)
    logic = MRMLLogic()
    prepared = logic.prepareJob(nodes["fixed"], nodes["moving"], lapirn())
    affine = np.eye(4)
    affine[:3, :3] = rotation((0, 1, 0), 5)
    affine[:3, 3] = (1.0, 2.0, -1.0)
    result = synthetic_result(prepared.job.fixed, prepared.job.moving, affine)
    chosen = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my output")
    volumes_before = scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems()
    out = logic.createOutputs(prepared, result, Outputs(warped=chosen, jacobian=False))
    assert out.warped is chosen and out.jacobian is None
    assert scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems() == volumes_before
    np.testing.assert_allclose(volume_array(chosen), result.warped.data)
    # the affine: fixed point -> moving point as "from parent", top of the transform hierarchy
    matrix = vtk.vtkMatrix4x4()
    out.affine.GetMatrixTransformFromParent(matrix)
    np.testing.assert_allclose([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], affine, atol=1e-12)
    assert out.affine.GetParentTransformNode() is None
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(out.affine)) == \
        hierarchy.GetItemByDataNode(out.transform)
    # folding: exactly the voxels with det J <= 0
    folded = (result.jacobian.data <= 0).sum()
    assert folded > 0
    labelmap = out.folding.GetSegmentation().GetSegment("folding").GetRepresentation(
        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    assert numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).sum() == folded


def test_output_choice_errors(data):
    scene, nodes = build_scene(data)
    logic = MRMLLogic()
    prepared = logic.prepareJob(nodes["fixed"], nodes["moving"], lapirn())
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "t")
    with pytest.raises(errors.InputError, match="not a vtkMRMLScalarVolumeNode"):
        logic.checkOutputs(prepared, Outputs(warped=table))
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "v")
    with pytest.raises(errors.InputError, match="same node"):
        logic.checkOutputs(prepared, Outputs(warped=volume, jacobian=volume))
    with pytest.raises(errors.InputError, match="both fixed and moving"):
        logic.prepareJob(nodes["fixed"], nodes["moving"], lapirn(), fixedLandmarks=nodes["fixedLandmarks"])
    # overwriting a transform above an input would move that input
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "parent")
    nodes["moving"].SetAndObserveTransformNodeID(parent.GetID())
    prepared = logic.prepareJob(nodes["fixed"], nodes["moving"], lapirn())
    with pytest.raises(errors.InputError, match="transforms the input"):
        logic.checkOutputs(prepared, Outputs(transform=parent))


def test_landmarks_without_common_labels_match_by_order(data):
    scene, nodes = build_scene(data)
    moving = add_fiducials(scene, [f"M-{i}" for i in range(6)], data["moving_points"], "M2")
    prepared = MRMLLogic().prepareJob(nodes["fixed"], nodes["moving"], lapirn(),
                                      fixedLandmarks=nodes["fixedLandmarks"], movingLandmarks=moving)
    assert prepared.landmarkMatch == "order"
    np.testing.assert_allclose(prepared.job.moving_points, data["moving_points"])


# --------------------------------------------------------------------------------------------- worker


def test_worker_files_roundtrip_and_subprocess_cancel(registered, tmp_path):
    scene, nodes, out, _ = registered
    prepared = MRMLLogic().prepareJob(nodes["fixed"], nodes["moving"], lapirn(device="cpu"),
                                      fixedLandmarks=nodes["fixedLandmarks"],
                                      movingLandmarks=nodes["movingLandmarks"])
    job.write_job(prepared.job, tmp_path)
    back_job = job.read_job(tmp_path)
    np.testing.assert_array_equal(back_job.moving.data, prepared.job.moving.data)
    np.testing.assert_allclose(back_job.moving.grid.affine, MOVING_GRID.affine, atol=1e-12)
    np.testing.assert_array_equal(back_job.fixed_points, prepared.job.fixed_points)
    assert back_job.options.device == "cpu" and back_job.fixed_labels is None

    job.write_result(out.result, tmp_path)
    back = job.read_result(tmp_path)
    np.testing.assert_array_equal(back.field.data, out.result.field.data)
    np.testing.assert_array_equal(back.warped.grid.affine, out.result.warped.grid.affine)
    assert back.metrics.landmarks.after == pytest.approx(out.result.metrics.landmarks.after)

    # The module's subprocess: a cancel request present from the start stops it before any work.
    (tmp_path / "result.json").unlink()
    (tmp_path / "cancel").touch()
    module_dir = Path(worker.__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "DeepRegistrationLib.frontends.worker", str(tmp_path)],
                          cwd=module_dir, capture_output=True, text=True, timeout=120)
    assert done.returncode == 4, done.stderr
    assert job.read_error(tmp_path)[0] == "Cancelled"
    assert not job.has_result(tmp_path)


def test_sample_ground_truth_through_slicer_readers_and_transform():
    """The bundled pair's true field as a grid transform node maps the fixed landmarks, read by Slicer's own .fcsv
    reader, onto the moving ones to the file's 0.01 mm storage step."""
    import nibabel

    from DeepRegistrationLib.core.image import read_image
    from DeepRegistrationLib.frontends.mrml import match_landmarks

    sample = Path(__file__).resolve().parents[1] / "Resources" / "SampleData"
    scene = slicer.vtkMRMLScene()
    markups = []
    for name in ("fixed", "moving"):
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        storage = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialStorageNode")
        storage.SetFileName(str(sample / f"{name}_landmarks.fcsv"))
        assert storage.ReadData(node)
        markups.append(node)
    labels, fixed_points, moving_points, rule = match_landmarks(*markups)
    assert rule == "label" and len(labels) == 30
    truth = np.asarray(nibabel.load(str(sample / "ground_truth_displacement.nii.gz")).dataobj, np.float32)
    field = DisplacementField(truth, read_image(sample / "fixed.nii.gz").grid)
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "truth")
    node.SetAndObserveTransformFromParent(grid_transform_from_field(field))
    transform = node.GetTransformFromParent()
    mapped = np.array([transform.TransformPoint(*p) for p in fixed_points])
    assert np.abs(mapped - moving_points).max() < 0.011
    assert np.abs(fixed_points - moving_points).max() > 1.0


def test_memory_estimate_and_method_config(weights):
    config = job.method_config("lapirn", {"int_steps": 5}, str(weights))
    assert (config.start_channels, config.int_steps) == (2, 5)  # the weights' architecture, the override applied
    with pytest.raises(errors.InputError, match="do not fit"):
        job.method_config("lapirn", {"no_such_field": 1}, str(weights))
    small = job.estimate_memory(lapirn(weights=str(weights)), FIXED_GRID)
    large = job.estimate_memory(lapirn(parameters={"working_spacing": 1.0}, weights=str(weights)), FIXED_GRID)
    assert 0 < small < large
