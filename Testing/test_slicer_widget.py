"""The Slicer module as a user meets it: its widget, job process and self-test run on slicer-core's real MRML scene
against the stand-ins of Testing/slicer_harness (Qt, CTK, slicer.util, ScriptedLoadableModule, parameterNodeWrapper,
SampleData, PyTorchUtils), the registration worker running in this process on tiny networks.

Each defect of issue 16 has a test here that failed before its fix (named in its docstring).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import slicer
import torch
import vtk
from vtk.util import numpy_support

from DeepRegistrationLib.frontends.mrml import COMPARISON_COLUMNS, table_values
from DeepRegistrationLib.methods import models, registry

from slicer_harness import SlicerHarness, pytorch_utils, qt, util

SAMPLE = "DeepRegistrationBrainPair"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """Untrained tiny LapIRN and VoxelMorph models at a 4 mm working grid (a registration takes about a second)."""
    folder = tmp_path_factory.mktemp("tiny-models")
    torch.manual_seed(1)
    lapirn = registry.get_method("lapirn")
    net = lapirn.build(lapirn.config_class(start_channels=2, num_res_blocks=1, working_spacing=4.0))
    for level in net.levels:
        torch.nn.init.normal_(level.head.out.weight, std=0.5)
    voxelmorph = registry.get_method("voxelmorph")
    vm = voxelmorph.build(voxelmorph.config_class(encoder_features=(4, 8), decoder_features=(8, 8, 4),
                                                  working_spacing=4.0))
    return {"lapirn": str(models.save_model(net, "lapirn", folder / "lapirn_tiny.safetensors")),
            "voxelmorph": str(models.save_model(vm, "voxelmorph", folder / "voxelmorph_tiny.safetensors"))}


@pytest.fixture
def harness(tmp_path):
    with SlicerHarness(tmp_path) as h:
        yield h
        assert not h.consoleTracebacks, "exceptions reached the Python console:\n" + "\n".join(h.consoleTracebacks)


def load_sample():
    """The bundled ICBM152 pair through the Sample Data module (80×96×80 voxels)."""
    import SampleData

    return SampleData.SampleDataLogic().downloadSamples(SAMPLE)


SMALL = (24, 26, 22)


@pytest.fixture(scope="module")
def small_arrays():
    """A phantom pair small enough for a registration per test: moving = fixed warped by a smooth known field."""
    from DeepRegistrationLib.core import warp

    from conftest import ellipsoid_labels, phantom_image, smooth_field

    labels = ellipsoid_labels(SMALL)
    inverse = warp.integrate_velocity(-smooth_field(SMALL, 1.5, seed=2))
    fixed = phantom_image(labels) * 100.0
    return {"fixed": fixed[0, 0].numpy(), "moving": warp.warp_image(fixed, inverse)[0, 0].numpy(),
            "fixed_labels": labels[0, 0].numpy().astype(np.int16),
            "moving_labels": warp.warp_labels(labels, inverse)[0, 0].numpy().astype(np.int16)}


def small_pair(arrays):
    """The phantom pair in the scene as a user would have it: two volumes (3 mm voxels), two segmentations made by
    Slicer's own label map import (segments Label_1…4), two landmark lists of 5 points."""
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = -30.0
    scene = slicer.mrmlScene

    def volume(data, name, cls="vtkMRMLScalarVolumeNode"):
        node = scene.AddNewNodeByClass(cls, name)
        image = vtk.vtkImageData()
        image.SetDimensions(*data.shape)
        image.GetPointData().SetScalars(
            numpy_support.numpy_to_vtk(np.ascontiguousarray(data.transpose(2, 1, 0)).ravel(), deep=True))
        node.SetAndObserveImageData(image)
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(affine))
        node.CreateDefaultDisplayNodes()
        return node

    def segmentation(labels, name):
        labelmap = volume(labels, name + " labels", "vtkMRMLLabelMapVolumeNode")
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node)
        scene.RemoveNode(labelmap)
        return node

    def points(name, shift):
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        for i, ijk in enumerate(((8, 9, 8), (15, 10, 9), (11, 16, 10), (9, 12, 14), (13, 13, 11))):
            node.AddControlPoint(vtk.vtkVector3d(*(affine[:3, :3] @ ijk + affine[:3, 3] + shift)), f"P{i}")
        return node

    return (volume(arrays["fixed"], "phantom fixed"), volume(arrays["moving"], "phantom moving"),
            segmentation(arrays["fixed_labels"], "fixed structures"),
            segmentation(arrays["moving_labels"], "moving structures"),
            points("fixed points", 0.0), points("moving points", 1.5))


def choose(widget, fixed, moving, segmentations=(None, None), landmarks=(None, None)):
    """Pick the inputs in the panel's node selectors, as a user does."""
    ui = widget.ui
    ui.fixedVolumeSelector.setCurrentNode(fixed)
    ui.movingVolumeSelector.setCurrentNode(moving)
    ui.fixedSegmentationSelector.setCurrentNode(segmentations[0])
    ui.movingSegmentationSelector.setCurrentNode(segmentations[1])
    ui.fixedLandmarksSelector.setCurrentNode(landmarks[0])
    ui.movingLandmarksSelector.setCurrentNode(landmarks[1])


def choose_method(widget, method: str, weights: str | None = None) -> None:
    ui = widget.ui
    ui.methodComboBox.setCurrentIndex(ui.methodComboBox.findData(method))
    if weights is not None:
        ui.weightsLineEdit.text = weights
        ui.weightsLineEdit.finishEditing()


def apply(h: SlicerHarness, widget) -> None:
    """Click Apply and return to the event loop until the job has ended."""
    widget.ui.applyButton.click()
    h.processEvents()


def grid_digest(transform_node) -> bytes:
    grid = transform_node.GetTransformFromParent().GetDisplacementGrid()
    return numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars()).tobytes()


def names(scene, cls: str) -> list[str]:
    nodes = scene.GetNodesByClass(cls)
    return sorted(nodes.GetItemAsObject(i).GetName() for i in range(nodes.GetNumberOfItems()))


# ------------------------------------------------------------------------------------ module and panel


def test_module_metadata_help_acknowledgement_and_sample_data(harness):
    module = harness.startApplication()
    parent = harness.moduleParent
    assert parent.categories == ["Registration"] and parent.title == "Deep Registration"
    assert all(c.endswith(")") and " (" in c for c in parent.contributors), "Slicer's 'Name (Organisation)' form"
    assert module.DOCUMENTATION_URL in parent.helpText and "<a href=" in parent.helpText
    for spec in (s for s in registry.METHODS.values() if s.is_network):  # optimise: no paper, ours
        assert f"({spec.name})" in parent.acknowledgementText
        first_author = spec.paper.split()[0]
        assert first_author in parent.acknowledgementText, spec.paper
    assert "ICBM152" in parent.acknowledgementText and "McGill" in parent.acknowledgementText
    # startupCompleted() registered the bundled pair with the Sample Data module
    [source] = slicer.modules.sampleDataSources["Registration"]
    assert source.sampleName == SAMPLE and len(source.uris) == 6
    assert all(Path(uri[len("file://"):]).is_file() for uri in source.uris)
    nodes = load_sample()
    assert [n.GetClassName() for n in nodes] == ["vtkMRMLScalarVolumeNode"] * 2 + \
        ["vtkMRMLSegmentationNode"] * 2 + ["vtkMRMLMarkupsFiducialNode"] * 2
    assert nodes[4].GetNumberOfControlPoints() == 30


def test_panel_loads_without_pytorch_and_apply_names_the_missing_extension(tmp_path, small_arrays):
    """Defect: setup() imported torch (a blank panel when it is absent or broken) and the pip fallback installed
    PyTorch without the PyTorch extension. Now the panel loads without importing it, says what is missing, and
    Apply asks for the PyTorch extension instead of pip-installing a CPU-only build."""
    with SlicerHarness(tmp_path, pytorchExtension=False) as h:
        h.setTorch("absent")
        widget = h.openModule()
        ui = widget.ui
        assert "torch" not in sys.modules
        assert "PyTorch is not installed" in ui.environmentLabel.text and ui.environmentLabel.visible
        assert ui.methodComboBox.count == len(registry.METHODS)
        assert "Laplacian pyramid" in ui.methodDescriptionLabel.text
        ui.parametersCollapsibleButton.collapsed = False  # the generated parameters need PyTorch: said, not raised
        assert "PyTorch" in ui.parametersWidget.layout().rowWidgets()[0][1].text
        fixed, moving = small_pair(small_arrays)[:2]
        choose(widget, fixed, moving)
        before = h.nodeIDs()
        apply(h, widget)
        assert "PyTorch extension" in ui.statusLabel.text and "Extensions Manager" in ui.statusLabel.text
        assert not any("torch" in " ".join(args) for args in util.PIP_INSTALLS)
        assert h.nodeIDs() == before and ui.applyButton.text == "Apply"
        assert "torch" not in sys.modules
        assert not h.consoleTracebacks, h.consoleTracebacks


def test_first_apply_installs_pytorch_through_the_extension_with_the_version_it_needs(tmp_path, tiny,
                                                                                      monkeypatch, small_arrays):
    """Defect: an installed PyTorch was never version-checked and NumPy 2 compatibility not at all. Now a missing
    PyTorch is installed through PyTorchUtils on the first Apply (not in setup), and one built for NumPy 1 is
    upgraded to >=2.3 the same way."""
    with SlicerHarness(tmp_path) as h:
        h.setTorch("absent")

        def install(requirement):
            h.setTorch("ok")
            import torch as installed
            return installed

        pytorch_utils.INSTALL_HOOK = install
        widget = h.openModule()
        assert pytorch_utils.INSTALLS == [], "nothing is installed when the module opens"
        fixed, moving = small_pair(small_arrays)[:2]
        choose(widget, fixed, moving)
        choose_method(widget, "lapirn", tiny["lapirn"])
        apply(h, widget)
        assert pytorch_utils.INSTALLS == [{"torchVersionRequirement": ">=2.1", "forceComputationBackend": None}]
        assert any("PyTorch will be downloaded" in q for q in util.QUESTIONS)
        assert ui_done(widget), widget.ui.statusLabel.text
        assert not any("torch" in " ".join(args) for args in util.PIP_INSTALLS)
        assert not h.consoleTracebacks, h.consoleTracebacks

        # PyTorch 2.2 under NumPy 2: the extension is asked for >=2.3; declining leaves everything as it was
        import importlib.metadata

        real = importlib.metadata.version
        monkeypatch.setattr(importlib.metadata, "version",
                            lambda name: "2.2.2" if name == "torch" else ("2.1.0" if name == "numpy" else real(name)))
        pytorch_utils.INSTALL_HOOK = lambda requirement: None
        before = h.nodeIDs()
        apply(h, widget)
        assert pytorch_utils.INSTALLS[-1]["torchVersionRequirement"] == ">=2.3"
        assert "built for NumPy 1" in widget.ui.statusLabel.text and h.nodeIDs() == before


def ui_done(widget) -> bool:
    return widget.ui.statusLabel.text.startswith("Done") and widget.ui.applyButton.text == "Apply"


def test_a_broken_pytorch_is_explained_and_never_imported_by_the_gui(tmp_path, small_arrays):
    """Defect: an installed-but-broken PyTorch gave a blank panel (setup imported it). Now the panel loads; Apply
    asks a separate process, whose failure is shown in the panel; the GUI process never imports torch."""
    with SlicerHarness(tmp_path) as h:
        h.setTorch("broken")
        widget = h.openModule()
        fixed, moving = small_pair(small_arrays)[:2]
        choose(widget, fixed, moving)
        before = h.nodeIDs()
        apply(h, widget)
        text = widget.ui.statusLabel.text
        assert "PyTorch is installed but cannot be used" in text and "libtorch_cpu.so" in text, text
        assert "PyTorch Utils" in text
        assert h.nodeIDs() == before and "torch" not in sys.modules
        assert not h.consoleTracebacks, h.consoleTracebacks


def test_weights_for_one_method_then_another_method(harness, tiny, small_arrays):
    """Defect: choosing a weights file and then another method raised InputError in onMethodChanged →
    buildParameterPanel, and again each time the module was entered. Now each method keeps its own weights, the
    parameter panel follows the method, and weights of another method are refused by name."""
    widget = harness.openModule()
    ui = widget.ui
    ui.parametersCollapsibleButton.collapsed = False
    choose_method(widget, "lapirn", tiny["lapirn"])
    rows = [label.text.rstrip(" *") for label, _ in ui.parametersWidget.layout().rowWidgets()]
    assert "start channels" in rows
    choose_method(widget, "voxelmorph")
    p = widget._parameterNode
    assert p.method == "voxelmorph" and p.weights == "" and ui.weightsLineEdit.text == ""
    rows = [label.text.rstrip(" *") for label, _ in ui.parametersWidget.layout().rowWidgets()]
    assert "encoder features" in rows
    harness.exitModule()
    harness.enterModule()
    choose_method(widget, "jad")
    choose_method(widget, "lapirn")
    assert widget._parameterNode.weights == tiny["lapirn"], "lapirn's own weights come back"
    # the lapirn weights typed in for voxelmorph: named in the method description and refused on Apply
    fixed, moving = small_pair(small_arrays)[:2]
    choose(widget, fixed, moving)
    choose_method(widget, "voxelmorph", tiny["lapirn"])
    assert "'lapirn' model, not 'voxelmorph'" in ui.methodDescriptionLabel.text
    before = harness.nodeIDs()
    apply(harness, widget)
    assert "lapirn_tiny.safetensors" in ui.statusLabel.text and h_ok(harness, before)


def h_ok(h: SlicerHarness, before: set[str]) -> bool:
    """Nothing was created or removed, and no traceback reached the console."""
    return h.nodeIDs() == before and not h.consoleTracebacks


def test_two_methods_each_get_their_own_outputs_and_a_row_of_the_comparison_table(harness, tiny, small_arrays):
    """Defect: a second Apply overwrote the first run's nodes under the first method's names. Now each run creates
    its own named outputs (only a node the user picked is reused), the comparison table gains a row per run, and the
    visual checks are one click each."""
    widget = harness.openModule()
    ui = widget.ui
    fixed, moving, fixed_seg, moving_seg, fixed_pts, moving_pts = small_pair(small_arrays)
    choose(widget, fixed, moving, (fixed_seg, moving_seg), (fixed_pts, moving_pts))
    ui.transformDisplayComboBox.setCurrentIndex(ui.transformDisplayComboBox.findData("grid"))
    choose_method(widget, "lapirn", tiny["lapirn"])
    apply(harness, widget)
    assert ui_done(widget), ui.statusLabel.text
    history = ui.progressBar.history
    assert len(set(history)) > 3 and history[1:-1] == sorted(history[1:-1]), history
    first = widget._lastNodes
    assert first.transform.GetName() == "phantom moving to phantom fixed (lapirn)"
    digest = grid_digest(first.transform)
    p = widget._parameterNode
    assert p.outputTransform is None and p.outputVolume is None, "created nodes are not put into the selectors"

    picked = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my warped volume")
    ui.outputVolumeSelector.setCurrentNode(picked)
    choose_method(widget, "voxelmorph", tiny["voxelmorph"])
    apply(harness, widget)
    assert ui_done(widget), ui.statusLabel.text
    second = widget._lastNodes
    assert second.transform is not first.transform and second.warped is picked
    assert second.transform.GetName() == "phantom moving to phantom fixed (voxelmorph)"
    assert second.jacobian.GetName() == "phantom moving Jacobian (voxelmorph)"
    assert first.transform.GetAttribute("DeepRegistration.method") == "lapirn"
    assert grid_digest(first.transform) == digest, "the first run's transform is unchanged"
    assert names(slicer.mrmlScene, "vtkMRMLGridTransformNode") == [
        "phantom moving to phantom fixed (lapirn)", "phantom moving to phantom fixed (voxelmorph)"]

    rows = table_values(second.comparison)
    assert second.comparison is first.comparison and ui.comparisonTableView.mrmlTableNode() is second.comparison
    assert [r["Method"] for r in rows] == ["lapirn", "voxelmorph"]
    assert list(rows[0]) == [name for name, _ in COMPARISON_COLUMNS]
    assert all(r["Preset"] == "balanced" and 0 <= r["Dice"] <= 1 and r["TRE"] > 0 and r["Time"] > 0 for r in rows)

    # visual QA of the second run: legend, outlined folding, coloured residuals, one-click comparison views
    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(second.jacobian)
    assert legend is not None and legend.GetTitleText() == "det J" and legend.GetVisibility()
    folding = second.folding.GetDisplayNode()
    assert folding.GetVisibility2DOutline() and not folding.GetVisibility2DFill()
    assert len(second.residuals) == 5 and all("mm (before" in line.GetName() for line in second.residuals)
    red = harness.application.compositeNode("Red")
    assert red.GetBackgroundVolumeID() == fixed.GetID() and red.GetForegroundVolumeID() == picked.GetID()
    assert red.GetForegroundOpacity() == pytest.approx(0.5)
    ui.differenceButton.click()
    assert red.GetCompositing() == red.Subtract
    ui.checkerboardButton.click()
    board = slicer.mrmlScene.GetNodeByID(red.GetBackgroundVolumeID())
    assert board.GetName() == "my warped volume checkerboard" and red.GetCompositing() == red.Alpha
    ui.flickerButton.click()
    opacities = []
    for _ in range(4):
        harness.processEvents(widget._flickerTimer.interval)
        opacities.append(red.GetForegroundOpacity())
    assert opacities == [0.0, 1.0, 0.0, 1.0]
    ui.flickerButton.click()  # stops, back to the overlay
    harness.processEvents(2000)
    assert red.GetForegroundOpacity() == pytest.approx(0.5) and not widget._flickerTimer.isActive()
    assert second.transform.GetDisplayNode().GetVisualizationMode() == \
        second.transform.GetDisplayNode().VIS_MODE_GRID


def test_cancel_during_the_run_stops_the_worker_and_leaves_the_scene_unchanged(harness, tiny, small_arrays):
    widget = harness.openModule()
    ui = widget.ui
    fixed, moving = small_pair(small_arrays)[:2]
    choose(widget, fixed, moving)
    choose_method(widget, "lapirn", tiny["lapirn"])
    harness.whenStage("network", lambda: ui.applyButton.click())  # the button reads "Cancel" while running
    before = harness.nodeIDs()
    ui.applyButton.click()
    assert ui.applyButton.text == "Cancel" and not ui.inputsCollapsibleButton.enabled
    harness.processEvents()
    assert ui.statusLabel.text == "Cancelled; the scene is unchanged." and ui.applyButton.text == "Apply"
    assert harness.nodeIDs() == before
    assert not list(Path(slicer.app.temporaryPath).glob("DeepRegistration-*")), "the job folder is removed"
    harness.processEvents(20_000)  # the kill timer of the grace period finds nothing to kill
    assert all(p.deleted for p in qt.QProcess.instances)


def test_a_worker_that_fails_to_start_gives_the_button_back(harness, tiny, small_arrays):
    """Defect: only QProcess.finished was connected, so a worker that failed to start (errorOccurred, never
    finished) left the button on "Cancel" for good."""
    widget = harness.openModule()
    ui = widget.ui
    fixed, moving = small_pair(small_arrays)[:2]
    choose(widget, fixed, moving)
    choose_method(widget, "lapirn", tiny["lapirn"])
    qt.QProcess.unable_to_start = "Resource temporarily unavailable"
    before = harness.nodeIDs()
    ui.applyButton.click()
    assert ui.applyButton.text == "Cancel"
    harness.processEvents()
    assert ui.applyButton.text == "Apply" and ui.applyButton.enabled
    assert "could not be started" in ui.statusLabel.text and "Resource temporarily" in ui.statusLabel.text
    assert harness.nodeIDs() == before
    [process] = qt.QProcess.instances
    assert process.deleted
    qt.QProcess.unable_to_start = None
    apply(harness, widget)
    assert ui_done(widget), ui.statusLabel.text


def test_the_finished_process_is_released_after_its_own_signal(harness, tiny, small_arrays):
    """Defect: the widget dropped its process inside the process's own finished slot and never released it (in
    PythonQt the connected slots keep it alive: one leaked QProcess per run). Now it is disconnected and deleted
    with deleteLater, which Qt runs after the slot has returned."""
    widget = harness.openModule()
    fixed, moving = small_pair(small_arrays)[:2]
    choose(widget, fixed, moving)
    choose_method(widget, "lapirn", tiny["lapirn"])
    apply(harness, widget)
    assert ui_done(widget), widget.ui.statusLabel.text
    [process] = qt.QProcess.instances
    assert process.deleteLaterCalled and process.deleted and process.receivers("finished(int,QProcess::ExitStatus)") == 0
    assert widget._job is None and widget._backend is None


def test_closing_the_scene_during_a_run_kills_the_worker_and_builds_nothing(harness, tiny, small_arrays):
    """Defect: closing the scene during a run was not handled: the worker kept going and its finish handler
    touched deleted nodes."""
    widget = harness.openModule()
    ui = widget.ui
    fixed, moving = small_pair(small_arrays)[:2]
    choose(widget, fixed, moving)
    choose_method(widget, "lapirn", tiny["lapirn"])
    harness.whenStage("network", harness.closeScene)
    apply(harness, widget)
    [process] = qt.QProcess.instances
    assert process.exitStatus() == qt.QProcess.CrashExit, "the worker was killed"
    assert ui.applyButton.text == "Apply" and "scene was closed" in ui.statusLabel.text
    assert names(slicer.mrmlScene, "vtkMRMLScalarVolumeNode") == []
    assert names(slicer.mrmlScene, "vtkMRMLGridTransformNode") == []
    assert names(slicer.mrmlScene, "vtkMRMLTableNode") == []
    assert not list(Path(slicer.app.temporaryPath).glob("DeepRegistration-*"))
    assert process.deleted
    # the module goes on working in the new scene
    fixed, moving = small_pair(small_arrays)[:2]
    choose(widget, fixed, moving)
    assert widget._parameterNode.method == "lapirn"  # the parameter node was re-created with its defaults
    choose_method(widget, "lapirn", tiny["lapirn"])
    apply(harness, widget)
    assert ui_done(widget), ui.statusLabel.text


def test_reload_during_a_run_and_after(harness, tiny, small_arrays):
    """Reload (developer mode) while a registration runs: the old widget's worker is killed and freed without
    touching the old panel; the new widget shows the parameter node as it was and registers."""
    widget = harness.openModule()
    fixed, moving = small_pair(small_arrays)[:2]
    choose(widget, fixed, moving)
    choose_method(widget, "voxelmorph", tiny["voxelmorph"])
    harness.whenStage("network", lambda: harness.reloadModule())
    before = harness.nodeIDs()
    apply(harness, widget)
    new = harness.widget
    assert new is not widget and harness.nodeIDs() == before
    [process] = qt.QProcess.instances
    assert process.deleted and process.exitStatus() == qt.QProcess.CrashExit
    assert new.ui.methodComboBox.currentData == "voxelmorph" and new.ui.weightsLineEdit.text == tiny["voxelmorph"]
    assert new.ui.fixedVolumeSelector.currentNode() is fixed
    apply(harness, new)
    assert ui_done(new), new.ui.statusLabel.text


def test_bad_input_is_named_in_the_panel_and_changes_nothing(harness, tiny, small_arrays):
    """A label map or vector volume chosen as an input, segmentations without shared segments, landmark lists of
    different lengths, a device that is no longer there: a message in the panel naming the input, no traceback in
    the console, and no node created or changed."""
    widget = harness.openModule()
    ui = widget.ui
    fixed, moving, fixed_seg, moving_seg, fixed_pts, moving_pts = small_pair(small_arrays)
    choose_method(widget, "lapirn", tiny["lapirn"])
    scene = slicer.mrmlScene

    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "tissue labels")
    labels.SetAndObserveImageData(fixed.GetImageData())
    choose(widget, labels, moving)
    assert ui.fixedVolumeSelector.currentNode() is labels
    assert "fixed volume 'tissue labels' is a label map" in ui.inputProblemLabel.text and ui.inputProblemLabel.visible
    assert not ui.applyButton.enabled

    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour photo")
    rgb = vtk.vtkImageData()
    rgb.SetDimensions(4, 4, 4)
    rgb.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    vector.SetAndObserveImageData(rgb)
    choose(widget, fixed, vector)
    assert "moving volume 'colour photo' is a vector" in ui.inputProblemLabel.text and not ui.applyButton.enabled

    def refused(expected: list[str]) -> None:
        before = harness.nodeIDs()
        apply(harness, widget)
        for text in expected:
            assert text in ui.statusLabel.text, (text, ui.statusLabel.text)
        assert h_ok(harness, before), ui.statusLabel.text
        assert ui.applyButton.text == "Apply" and ui.applyButton.enabled

    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other structures")
    other.GetSegmentation().AddEmptySegment("tumour", "tumour")
    choose(widget, fixed, moving, (fixed_seg, other))
    refused(["'fixed structures'", "'other structures'", "share no segment name"])

    few = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "three points")
    for i in range(3):
        few.AddControlPoint(vtk.vtkVector3d(i, 0.0, 0.0), f"Q{i}")
    choose(widget, fixed, moving, landmarks=(fixed_pts, few))
    refused(["'fixed points' (5)", "'three points' (3)"])

    choose(widget, fixed, moving)
    widget._parameterNode.device = "cuda:3"
    assert ui.deviceComboBox.currentData == "cuda:3"
    refused(["device 'cuda:3' is not available"])
    assert not [p for p in harness.popups if "Traceback" in p[1]]


def test_reload_and_test_runs_the_self_test_on_the_sample_data(harness):
    """The self-test (developer mode: Reload and Test) loads the sample pair through the Sample Data module and
    registers it with the shipped LapIRN model, then checks Slicer's resampling on a synthetic pair."""
    widget = harness.openModule()
    widget.onReloadAndTest()
    assert not [p for p in harness.popups if "Reload and Test" in p[1]], harness.popups
    assert any(m.startswith("Sample pair: Dice") for m in util.DELAY_DISPLAYS), util.DELAY_DISPLAYS
    assert "Test passed" in util.DELAY_DISPLAYS


def test_reload_and_test_without_pytorch_says_why_instead_of_failing(tmp_path):
    """Defect: the self-test's skipTest() under Reload and Test reported an exception. Now, when the packages cannot
    be installed, it says so and returns."""
    with SlicerHarness(tmp_path, pytorchExtension=False) as h:
        h.setTorch("absent")
        widget = h.openModule()
        widget.onReloadAndTest()
        assert not [p for p in h.popups if "Reload and Test" in p[1]], h.popups
        assert any("self-test not run" in m and "PyTorch extension" in m for m in util.DELAY_DISPLAYS)
        assert not h.consoleTracebacks


def test_refine_with_guidance_points_updates_the_last_run_in_place(harness, tiny, small_arrays):
    """The issue-15 correction loop: register, place a guidance pair where the warp is wrong, press Refine; the same
    transform, warped volume and Jacobian nodes are rewritten (no new ones), the mapped fixed guidance point moves
    towards its partner, and the comparison table gains the refined run."""
    widget = harness.openModule()
    ui = widget.ui
    fixed, moving = small_pair(small_arrays)[:2]
    choose(widget, fixed, moving)
    choose_method(widget, "lapirn", tiny["lapirn"])
    assert not ui.refineButton.enabled, "nothing to refine before a run"
    apply(harness, widget)
    assert ui_done(widget), ui.statusLabel.text
    first = widget._lastNodes
    digest, transform, warped = grid_digest(first.transform), first.transform, first.warped
    rows = first.comparison.GetTable().GetNumberOfRows()

    ui.refineButton.click()  # no guidance points chosen yet: said in the panel, nothing run
    assert "guidance points" in ui.statusLabel.text and widget._lastNodes is first

    scene = slicer.mrmlScene
    target_fixed, target_moving = np.array([-4.0, 3.0, 2.0]), np.array([2.0, 7.0, -1.0])
    for name, point in (("fixed guidance", target_fixed), ("moving guidance", target_moving)):
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        node.AddControlPoint(vtk.vtkVector3d(*point), "G1")
        (ui.fixedGuidanceSelector if name.startswith("fixed") else ui.movingGuidanceSelector).setCurrentNode(node)
    before = np.linalg.norm(np.array(transform.GetTransformFromParent().TransformPoint(*target_fixed)) - target_moving)
    volumes = names(scene, "vtkMRMLScalarVolumeNode")
    ui.refineButton.click()
    harness.processEvents()
    assert ui_done(widget), ui.statusLabel.text
    refined = widget._lastNodes
    assert refined.transform is transform and refined.warped is warped, "the last run's nodes, updated in place"
    assert names(scene, "vtkMRMLScalarVolumeNode") == volumes, "no new volumes"
    assert grid_digest(transform) != digest
    after = np.linalg.norm(np.array(transform.GetTransformFromParent().TransformPoint(*target_fixed)) - target_moving)
    assert after < before - 1.0, (before, after)
    assert refined.comparison.GetTable().GetNumberOfRows() == rows + 1


def test_refinement_settings_panel_edits_the_presets_knobs(harness):
    """The refinement section lists every knob of the chosen preset (engine/refine_settings.py, no PyTorch needed);
    an edit becomes a refinement override of the options, preset fast takes none, Reset forgets the edits."""
    from dataclasses import fields

    from DeepRegistrationLib.engine.refine_settings import PRESETS, RefineSettings

    widget = harness.openModule()
    ui, p = widget.ui, widget._parameterNode
    ui.refinementCollapsibleButton.collapsed = False

    def editors() -> dict:
        return {label.text if label else "": editor for label, editor in ui.refinementWidget.layout().rowWidgets()}

    assert set(editors()) == {f.name.replace("_", " ") for f in fields(RefineSettings)}
    assert editors()["iterations"].text == ", ".join(str(n) for n in PRESETS["balanced"].iterations)
    editors()["iterations"].text = "30, 10"
    editors()["iterations"].finishEditing()
    editors()["regulariser weight"].value = 5.0
    assert widget.options().refinement == {"iterations": [30, 10], "regulariser_weight": 5.0}
    ui.presetComboBox.setCurrentIndex(ui.presetComboBox.findText("accurate"))
    assert editors()["levels mm"].text == ", ".join(str(v) for v in PRESETS["accurate"].levels_mm)
    ui.presetComboBox.setCurrentIndex(ui.presetComboBox.findText("fast"))
    assert widget.options().refinement == {} and len(editors()) == 1, "fast: no refinement, one explaining line"
    ui.presetComboBox.setCurrentIndex(ui.presetComboBox.findText("balanced"))
    assert editors()["iterations"].text == "30, 10", "the edits come back with a refining preset"
    ui.resetRefinementButton.click()
    assert p.refinement == "{}" and widget.options().refinement == {}
    assert editors()["iterations"].text == ", ".join(str(n) for n in PRESETS["balanced"].iterations)
