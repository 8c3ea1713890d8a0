"""DeepRegistration: learning-based deformable registration in 3D Slicer.

Module metadata, a thin widget and the self-test. The work is done by `DeepRegistrationLib.frontends.mrml` (MRML
nodes in and out, testable without the GUI) and, outside the GUI thread, by `DeepRegistrationLib.frontends.job`
running in a PythonSlicer subprocess. DeepRegistrationLib needs PyTorch and a few other packages; they are imported
only after the user agreed to install them, so this file loads in a fresh Slicer.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Union

import qt
import slicer
import vtk
from slicer import (vtkMRMLLabelMapVolumeNode, vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode, vtkMRMLTransformNode)
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

MODULE_DIR = Path(__file__).resolve().parent
REQUIRED_PACKAGES = {"torch": "torch>=2.1", "safetensors": "safetensors>=0.4", "nibabel": "nibabel>=5.0",
                     "scipy": "scipy>=1.10"}
"""Import name → pip requirement. NumPy and SimpleITK come with Slicer and are never reinstalled."""


class DeepRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Deep Registration")
        self.parent.categories = [_("Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepRegistration developers"]
        self.parent.helpText = _(
            "Fast learning-based deformable registration of a moving volume to a fixed one with one of seven "
            "published networks. Outputs a grid transform (applied to the moving volume it aligns it to the fixed "
            "one), the warped volume, a Jacobian determinant map with a folding overlay, and tables of segment "
            "overlap and landmark errors before and after registration. Input nodes are never modified.")
        self.parent.acknowledgementText = _(
            "The methods are those of the papers cited in the method selector; see the project's documentation.")


#
# Parameter node
#

LabelNode = Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]


@parameterNodeWrapper
class DeepRegistrationParameterNode:
    """Inputs, method settings and outputs. Output nodes left empty are created by the next Apply; a node chosen
    (or created by an earlier Apply) is overwritten."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedSegmentation: LabelNode
    movingSegmentation: LabelNode
    fixedLandmarks: vtkMRMLMarkupsFiducialNode
    movingLandmarks: vtkMRMLMarkupsFiducialNode
    mask: LabelNode
    method: str = "lapirn"  # registry.DEFAULT_METHOD (the backend is not importable before its install)
    preset: Annotated[str, Choice(["fast", "balanced", "accurate"])] = "balanced"  # refine_settings.PRESETS
    refinement: str = "{}"  # JSON {setting: value}: overrides of the preset's refinement settings
    methodParameters: str = "{}"  # JSON {method: {config field: value}}, edited through the generated panel
    weights: str = ""  # empty: the shipped model of the method
    device: str = "auto"
    fixedModality: Annotated[str, Choice(["mr", "ct"])] = "mr"
    movingModality: Annotated[str, Choice(["mr", "ct"])] = "mr"
    prealign: Annotated[str, Choice(["none", "moments", "jad"])] = "none"
    instanceOptimization: Annotated[int, WithinRange(0, 500)] = 0
    seed: Annotated[int, WithinRange(0, 2**31 - 1)] = 0
    outputTransform: vtkMRMLTransformNode
    createInverse: bool = False
    outputInverse: vtkMRMLTransformNode
    createAffine: bool = True
    createVolume: bool = True
    outputVolume: vtkMRMLScalarVolumeNode
    createJacobian: bool = True
    outputJacobian: vtkMRMLScalarVolumeNode
    createFolding: bool = True
    outputFolding: vtkMRMLSegmentationNode
    createResiduals: bool = True
    transformDisplay: Annotated[str, Choice(["none", "glyph", "grid", "contour"])] = "none"


#
# Dependencies
#


def missingPackages() -> list[str]:
    return [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]


def installDependencies() -> bool:
    """Install missing packages after the user's confirmation; True when all are importable afterwards.

    PyTorch comes from SlicerPyTorch's PyTorchUtils when that extension is installed (it picks the CUDA build that
    matches the driver), else from pip. A constraints file pins Slicer's own NumPy and SimpleITK.
    """
    missing = missingPackages()
    if not missing:
        return True
    if not slicer.util.confirmOkCancelDisplay(
            _("DeepRegistration needs these Python packages: {packages}.\nInstall them now? This downloads several "
              "hundred megabytes and may take a few minutes.").format(packages=", ".join(missing))):
        return False
    import numpy
    import SimpleITK

    constraints = Path(slicer.app.temporaryPath) / "DeepRegistration-constraints.txt"
    constraints.write_text(f"numpy=={numpy.__version__}\nSimpleITK=={SimpleITK.Version_VersionString()}\n")
    with slicer.util.WaitCursor():
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                PyTorchUtils = None
            if PyTorchUtils is not None:
                if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                                 torchVersionRequirement=">=2.1") is None:
                    slicer.util.errorDisplay(_("PyTorch could not be installed through the PyTorch extension."))
                    return False
            else:
                slicer.util.pip_install([REQUIRED_PACKAGES["torch"], "-c", str(constraints)])
        others = [REQUIRED_PACKAGES[name] for name in missing if name != "torch"]
        if others:
            slicer.util.pip_install([*others, "-c", str(constraints)])
    importlib.invalidate_caches()
    still = missingPackages()
    if still:
        slicer.util.errorDisplay(_("Installed, but {packages} cannot be imported yet. Restart Slicer and press "
                                   "Apply again.").format(packages=", ".join(still)))
        return False
    return True


#
# Widget
#


class DeepRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Inputs, method and device choice, outputs, Apply/Cancel, progress and result tables.

    Registration runs in a PythonSlicer subprocess (`DeepRegistrationLib.frontends.job`) reading a job folder; the
    scene is touched only when it finished successfully, so Cancel leaves the scene as it was.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._parameterWidgets = {}
        self._process = None
        self._prepared = None
        self._outputs = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepRegistrationLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.refreshDevicesButton.connect("clicked(bool)", self.refreshDevices)
        self.ui.estimateMemoryButton.connect("clicked(bool)", self.onEstimateMemory)
        self.ui.resetParametersButton.connect("clicked(bool)", self.onResetParameters)
        self.ui.weightsBrowseButton.connect("clicked(bool)", self.onBrowseWeights)
        self.ui.weightsLineEdit.connect("editingFinished()", self.onWeightsChanged)

        self.initializeParameterNode()
        self.populateBackendWidgets()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._process is not None:
            self._process.abandon()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        if self._process is not None:  # its inputs and outputs belong to the scene that closes
            self._process.abandon()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            self._parameterNode.fixedVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()
            combo = self.ui.methodComboBox
            if combo.count:  # backend widgets are filled: show this parameter node's method
                wasBlocked = combo.blockSignals(True)
                combo.setCurrentIndex(max(combo.findData(self._parameterNode.method), 0))
                combo.blockSignals(wasBlocked)
                self.onMethodChanged()

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._process is not None:
            return
        p = self._parameterNode
        ready = bool(p and p.fixedVolume and p.movingVolume and p.fixedVolume is not p.movingVolume)
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = _("Register the moving volume to the fixed one.") if ready else \
            _("Select two different fixed and moving volumes.")

    # ------------------------------------------------------------------------------------ method and device

    def populateBackendWidgets(self) -> None:
        """Fill the method, parameter and device widgets; they need the backend's packages."""
        available = not missingPackages()
        for widget in (self.ui.methodComboBox, self.ui.deviceComboBox, self.ui.estimateMemoryButton,
                       self.ui.resetParametersButton, self.ui.refreshDevicesButton):
            widget.enabled = available
        if not available:
            self.ui.methodDescriptionLabel.text = _(
                "PyTorch and a few other Python packages are needed; you will be asked to install them when you "
                "press Apply.")
            return
        from DeepRegistrationLib.methods.registry import METHODS

        combo = self.ui.methodComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for name, spec in METHODS.items():
            combo.addItem(f"{name} ({spec.modality}modal)", name)
        combo.setCurrentIndex(max(combo.findData(self._parameterNode.method), 0))
        combo.blockSignals(wasBlocked)
        self.onMethodChanged()
        self.refreshDevices()

    def onMethodChanged(self, index=None) -> None:
        method = self.ui.methodComboBox.currentData
        if not method:
            return
        self._parameterNode.method = method
        from DeepRegistrationLib.methods.models import read_metadata
        from DeepRegistrationLib.methods.registry import get_method

        spec = get_method(method)
        weights = Path(self._parameterNode.weights) if self._parameterNode.weights else spec.weights_path
        if weights.is_file():
            meta = read_metadata(weights)
            model = _("{file} (sha256 {sha}…)").format(file=weights.name, sha=str(meta.get("sha256"))[:12])
        else:
            model = _("no weights at {path}: train them or choose a weights file").format(path=weights)
        self.ui.methodDescriptionLabel.text = "<b>{}</b><br>{}<br>{}: {} · {}: {} · {}: {}".format(
            method, spec.paper, _("Modality"), _("multi-modal") if spec.modality == "multi" else _("mono-modal"),
            _("Diffeomorphic"), _("yes") if spec.diffeomorphic else _("no"), _("Model"), model)
        self.ui.createAffineCheckBox.enabled = spec.has_affine
        self.buildParameterPanel()

    def _overrides(self) -> dict:
        """All methods' parameter overrides, {method: {field: value}}."""
        try:
            return json.loads(self._parameterNode.methodParameters or "{}")
        except json.JSONDecodeError:
            return {}

    def methodOverrides(self) -> dict:
        return self._overrides().get(self._parameterNode.method, {})

    def buildParameterPanel(self) -> None:
        """One editor per field of the method's Config, with range, choices and help from its `param` metadata."""
        from DeepRegistrationLib.frontends.job import method_config

        layout = self.ui.parametersWidget.layout()
        while layout.rowCount():
            layout.removeRow(0)
        self._parameterWidgets = {}
        method = self._parameterNode.method
        weights = self._parameterNode.weights or None
        base = method_config(method, None, weights)
        current = method_config(method, self.methodOverrides(), weights)
        for f in fields(base):
            meta = f.metadata
            value, default = getattr(current, f.name), getattr(base, f.name)
            editor = self._editorFor(value, meta)
            source = _("from the paper") if meta.get("paper", True) else _("our choice where the paper is silent")
            editor.toolTip = f"{meta.get('help', '')}\n{_('Model value')}: {default} ({source})"
            label = f.name.replace("_", " ")
            layout.addRow(label + ("" if meta.get("paper", True) else " *"), editor)
            self._parameterWidgets[f.name] = (editor, default)

    def _editorFor(self, value, meta):
        low, high, choices = meta.get("low"), meta.get("high"), meta.get("choices")
        if choices:
            editor = qt.QComboBox()
            for choice in choices:
                editor.addItem(str(choice), choice)
            editor.setCurrentIndex(max(editor.findData(value), 0))
            editor.connect("currentIndexChanged(int)", self.onParameterEdited)
        elif isinstance(value, bool):
            editor = qt.QCheckBox()
            editor.checked = value
            editor.connect("toggled(bool)", self.onParameterEdited)
        elif isinstance(value, int):
            editor = qt.QSpinBox()
            editor.setRange(int(low) if low is not None else -10**6, int(high) if high is not None else 10**6)
            editor.value = value
            editor.connect("valueChanged(int)", self.onParameterEdited)
        elif isinstance(value, float):
            editor = qt.QDoubleSpinBox()
            editor.decimals = 4
            editor.setRange(low if low is not None else -1e6, high if high is not None else 1e6)
            editor.singleStep = (editor.maximum - editor.minimum) / 100 if low is not None and high is not None \
                else 0.1
            editor.value = value
            editor.connect("valueChanged(double)", self.onParameterEdited)
        else:
            editor = qt.QLineEdit(", ".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value))
            editor.connect("editingFinished()", self.onParameterEdited)
        return editor

    def _editorValue(self, editor, default):
        if isinstance(editor, qt.QComboBox):
            return editor.currentData
        if isinstance(editor, qt.QCheckBox):
            return bool(editor.checked)
        if isinstance(editor, (qt.QSpinBox, qt.QDoubleSpinBox)):
            return editor.value
        text = editor.text
        if isinstance(default, (tuple, list)):
            return [type(default[0])(v) for v in text.replace(" ", "").split(",") if v]
        return text

    def onParameterEdited(self, *args) -> None:
        """Store the fields that differ from the model's values as this method's overrides."""
        values = {}
        for name, (editor, default) in self._parameterWidgets.items():
            try:
                value = self._editorValue(editor, default)
            except ValueError:
                continue
            if _differs(value, default):
                values[name] = value
        overrides = self._overrides()
        overrides[self._parameterNode.method] = values
        self._parameterNode.methodParameters = json.dumps(overrides)

    def onResetParameters(self) -> None:
        overrides = self._overrides()
        overrides.pop(self._parameterNode.method, None)
        self._parameterNode.methodParameters = json.dumps(overrides)
        self.buildParameterPanel()

    def onBrowseWeights(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Model weights"), "", "Weights (*.safetensors)")
        if path:
            self.ui.weightsLineEdit.text = path
            self.onWeightsChanged()

    def onWeightsChanged(self) -> None:
        if not missingPackages():
            self.onMethodChanged()

    def refreshDevices(self) -> None:
        """Automatic, CPU, each CUDA device by index with its free memory, and MPS where PyTorch sees them."""
        import torch

        combo = self.ui.deviceComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("Automatic (CUDA, then MPS, then CPU)"), "auto")
        combo.addItem(_("CPU"), "cpu")
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            combo.addItem(f"cuda:{index} {torch.cuda.get_device_name(index)} "
                          f"({free / 2**30:.1f} / {total / 2**30:.1f} GiB free)", f"cuda:{index}")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            combo.addItem("MPS (Apple GPU)", "mps")
        combo.setCurrentIndex(max(combo.findData(self._parameterNode.device), 0))
        combo.blockSignals(wasBlocked)
        self._parameterNode.device = combo.currentData

    def onDeviceChanged(self, index=None) -> None:
        if self.ui.deviceComboBox.currentData:
            self._parameterNode.device = self.ui.deviceComboBox.currentData

    def onEstimateMemory(self) -> None:
        """Show the estimated peak memory of registering onto the fixed volume's grid, and what the device has."""
        p = self._parameterNode
        if not p.fixedVolume:
            self.ui.memoryLabel.text = _("Select the fixed volume first.")
            return
        with slicer.util.tryWithErrorDisplay(_("Memory estimate failed."), waitCursor=True):
            from DeepRegistrationLib.engine.registration import resolve_device
            from DeepRegistrationLib.engine.memory import available_bytes
            from DeepRegistrationLib.frontends.mrml import volume_grid
            from DeepRegistrationLib.frontends.job import estimate_memory

            need = estimate_memory(self.options(), volume_grid(p.fixedVolume))
            device = resolve_device(p.device)
            free = available_bytes(device) if device.type in ("cpu", "cuda") else None
            text = _("About {need:.1f} GiB on {device}").format(need=need / 2**30, device=device)
            if free is not None:
                text += _(" ({free:.1f} GiB free)").format(free=free / 2**30)
                if need > free:
                    text += _(": too much; the CPU or a coarser working grid will be used")
            self.ui.memoryLabel.text = text

    # ------------------------------------------------------------------------------------------ apply/cancel

    def onApplyButton(self) -> None:
        if self._process is not None:
            self.cancel()
            return
        if missingPackages():
            if not installDependencies():
                return
            self.populateBackendWidgets()
        with slicer.util.tryWithErrorDisplay(_("The registration could not be started."), waitCursor=True):
            self.start()

    def outputs(self):
        from DeepRegistrationLib.frontends.mrml import Outputs

        p = self._parameterNode

        def chosen(create, node):
            return (node or True) if create else False

        return Outputs(transform=p.outputTransform or True, inverse=chosen(p.createInverse, p.outputInverse),
                       affine=p.createAffine, warped=chosen(p.createVolume, p.outputVolume),
                       jacobian=chosen(p.createJacobian, p.outputJacobian),
                       folding=chosen(p.createFolding, p.outputFolding), residuals=p.createResiduals)

    def options(self):
        """The `RegistrationOptions` of the parameter node (one camelCase parameter per option)."""
        from DeepRegistrationLib.engine.options import RegistrationOptions

        p = self._parameterNode
        values = {name: getattr(p, _camel(name)) for name in RegistrationOptions.__dataclass_fields__
                  if name not in ("parameters", "refinement", "weights")}
        return RegistrationOptions(parameters=self.methodOverrides(), refinement=json.loads(p.refinement or "{}"),
                                   weights=p.weights or None, **values)

    def start(self) -> None:
        """Read the inputs, start the worker on them; nothing in the scene changes until it succeeded."""
        from DeepRegistrationLib.frontends.job_process import JobProcess

        p = self._parameterNode
        self._prepared = self.logic.mrmlLogic().prepareJob(
            p.fixedVolume, p.movingVolume, self.options(), fixedSegmentation=p.fixedSegmentation,
            movingSegmentation=p.movingSegmentation, fixedLandmarks=p.fixedLandmarks,
            movingLandmarks=p.movingLandmarks, mask=p.mask)
        self._outputs = self.outputs()
        self.logic.mrmlLogic().checkOutputs(self._prepared, self._outputs)
        python = shutil.which("PythonSlicer")
        if not python:
            raise RuntimeError(_("PythonSlicer was not found next to Slicer."))
        self.ui.logTextEdit.clear()
        backend = QProcessBackend()
        self._process = JobProcess(self._prepared.job, backend, python, MODULE_DIR, progress=self.onProgress,
                                   log=self.log, finished=self.onFinished,
                                   temporary_dir=slicer.app.temporaryPath)
        backend.connectTo(self._process)
        self._process.start()
        self.setRunning(True)
        self.log(_("Registering {moving} to {fixed} with {method} on {device}…").format(
            moving=p.movingVolume.GetName(), fixed=p.fixedVolume.GetName(), method=p.method, device=p.device))

    def cancel(self) -> None:
        """Ask the worker to stop at its next stage; kill it if it has not stopped after a grace period."""
        from DeepRegistrationLib.frontends.job_process import CANCEL_GRACE_S

        self._process.cancel()
        self.ui.statusLabel.text = _("Cancelling…")
        self.ui.applyButton.enabled = False
        qt.QTimer.singleShot(int(CANCEL_GRACE_S * 1000), self._process.kill_if_running)

    def setRunning(self, running: bool) -> None:
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = True
        for widget in (self.ui.inputsCollapsibleButton, self.ui.methodCollapsibleButton,
                       self.ui.outputsCollapsibleButton):
            widget.enabled = not running
        self.ui.progressBar.value = 0
        self.ui.progressBar.visible = running
        if not running:
            self._checkCanApply()

    def log(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)
        logging.info(text)

    def onProgress(self, stage: str, fraction: float) -> None:
        self.ui.progressBar.value = int(100 * fraction)
        self.ui.statusLabel.text = stage

    def onFinished(self, outcome) -> None:
        """The worker ended: build the outputs, or say why not (the scene is unchanged unless it succeeded)."""
        self._process = None
        self.setRunning(False)
        if outcome.status == "done":
            with slicer.util.tryWithErrorDisplay(_("The outputs could not be created."), waitCursor=True):
                nodes = self.logic.mrmlLogic().createOutputs(self._prepared, outcome.result, self._outputs,
                                                             self._parameterNode.transformDisplay)
                self.showResults(nodes)
        elif outcome.status == "cancelled":
            self.ui.statusLabel.text = _("Cancelled; the scene is unchanged.")
        elif outcome.status == "failed":
            self.ui.statusLabel.text = _("Failed; the scene is unchanged.")
            slicer.util.errorDisplay(_("Registration failed: {message}").format(message=outcome.message))

    def showResults(self, nodes) -> None:
        """Keep the created outputs selected (the next Apply overwrites them), show volumes, tables and a summary."""
        p = self._parameterNode
        for name, node in (("outputTransform", nodes.transform), ("outputInverse", nodes.inverse),
                           ("outputVolume", nodes.warped), ("outputJacobian", nodes.jacobian),
                           ("outputFolding", nodes.folding)):
            if node is not None:
                setattr(p, name, node)
        if nodes.warped is not None:
            slicer.util.setSliceViewerLayers(background=p.fixedVolume, foreground=nodes.warped,
                                             foregroundOpacity=0.5, fit=True)
        self.ui.segmentTableView.setMRMLTableNode(nodes.segmentTable)
        self.ui.segmentTableView.visible = nodes.segmentTable is not None
        self.ui.landmarkTableView.setMRMLTableNode(nodes.landmarkTable)
        self.ui.landmarkTableView.visible = nodes.landmarkTable is not None
        if nodes.segmentChart is not None:
            slicer.modules.plots.logic().ShowChartInLayout(nodes.segmentChart)
        self.ui.summaryLabel.text = summaryText(nodes)
        self.ui.statusLabel.text = _("Done.")
        self.ui.resultsCollapsibleButton.collapsed = False


def _differs(value, default) -> bool:
    if isinstance(default, (tuple, list)):
        return list(value) != list(default)
    return value != default


def summaryText(nodes) -> str:
    """A few lines of the most telling numbers of a registration (`RegistrationNodes`)."""
    metrics = nodes.metrics
    jacobian = metrics.jacobian
    lines = [_("Folding (det J ≤ 0): {p:.3f} % of voxels; SDlogJ {s:.3f}; det J {lo:.2f}…{hi:.2f}").format(
        p=jacobian.percent_nonpositive, s=jacobian.sdlogj, lo=jacobian.min, hi=jacobian.max)]
    if metrics.mask is not None:
        lines.append(_("Inside the mask: folding {p:.3f} %, SDlogJ {s:.3f}").format(
            p=metrics.mask.percent_nonpositive, s=metrics.mask.sdlogj))
    lines.append(_("NCC {a:.3f} → {b:.3f}; MI {c:.3f} → {d:.3f}").format(
        a=metrics.similarity_before.ncc, b=metrics.similarity_after.ncc, c=metrics.similarity_before.mi,
        d=metrics.similarity_after.mi))
    labels = metrics.labels
    if labels is not None:
        lines.append(_("Mean Dice {a:.3f} → {b:.3f}; mean HD95 {c:.2f} → {d:.2f} mm").format(
            a=labels.before.mean_dice, b=labels.after.mean_dice, c=labels.before.mean_hd95,
            d=labels.after.mean_hd95))
    report = nodes.landmarkReport
    if report:
        lines.append(_("Mean TRE {a:.2f} → {b:.2f} mm over {n} landmarks (matched by {rule})").format(
            a=report["summary"]["mean"][0], b=report["summary"]["mean"][1], n=len(report["labels"]),
            rule=report["matched_by"]))
    if metrics.run is not None:
        lines.append(_("{t:.1f} s on {device}").format(t=metrics.run.time_s["total"], device=metrics.run.device))
    return "<br>".join(lines)


def _camel(name: str) -> str:
    """A `RegistrationOptions` field's parameter-node name: instance_optimization → instanceOptimization."""
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


class QProcessBackend:
    """`frontends.job_process.ProcessBackend` on Qt's QProcess: its signals drive a `JobProcess`."""

    def __init__(self) -> None:
        self.process = qt.QProcess()

    def connectTo(self, job) -> None:
        process = self.process
        process.connect("readyReadStandardOutput()",
                        lambda: job.output(bytes(process.readAllStandardOutput().data()).decode(errors="replace")))
        process.connect("readyReadStandardError()",
                        lambda: job.errors(bytes(process.readAllStandardError().data()).decode(errors="replace")))
        process.connect("finished(int,QProcess::ExitStatus)",
                        lambda code, status: job.exited(code, status == qt.QProcess.CrashExit))
        process.connect("errorOccurred(QProcess::ProcessError)",
                        lambda error: job.failed_to_start(process.errorString())
                        if error == qt.QProcess.FailedToStart else None)

    def start(self, program: str, arguments: list[str], working_directory: str) -> None:
        self.process.setWorkingDirectory(working_directory)
        self.process.start(program, arguments)

    def kill(self) -> None:
        self.process.kill()


#
# Logic
#


class DeepRegistrationLogic(ScriptedLoadableModuleLogic):
    """The module's logic: the parameter node, and `mrmlLogic()`, the `DeepRegistrationLib.frontends.mrml.MRMLLogic`
    that registers volume nodes (`registerVolumes`), available once the backend's packages are installed."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._mrmlLogic = None

    def getParameterNode(self):
        return DeepRegistrationParameterNode(super().getParameterNode())

    def mrmlLogic(self):
        if self._mrmlLogic is None:
            from DeepRegistrationLib.frontends.mrml import MRMLLogic

            self._mrmlLogic = MRMLLogic()
        return self._mrmlLogic


#
# Self-test
#


class DeepRegistrationTest(ScriptedLoadableModuleTest):
    """Inside Slicer: a synthetic oblique pair registered by an untrained tiny LapIRN; Slicer's own resampling
    through the output transform must reproduce the backend's warped volume, and inputs must stay unchanged."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_SyntheticPairGeometry()

    def test_SyntheticPairGeometry(self) -> None:
        if missingPackages():
            self.skipTest(f"DeepRegistration packages missing: {', '.join(missingPackages())}")
        import numpy as np
        import torch
        from DeepRegistrationLib.methods import models, registry
        from DeepRegistrationLib.core.geometry import Grid
        from DeepRegistrationLib.core.image import Image
        from DeepRegistrationLib.frontends.mrml import image_from_volume_node

        self.delayDisplay("Building a synthetic pair and a tiny network")
        angle = np.radians(20)
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        grid = Grid.from_spacing((24, 26, 22), (1.4, 1.1, 1.25), (-15.0, -13.0, -12.0), rotation)
        points = grid.world_coordinates()
        fixedArray = np.exp(-(points**2).sum(-1) / 150.0).astype(np.float32) * 100
        movingArray = np.exp(-((points - (2.0, -1.0, 1.0))**2 * (1.2, 0.9, 1.0)).sum(-1) / 150.0).astype(
            np.float32) * 100
        fixed = slicer.util.addVolumeFromArray(np.ascontiguousarray(fixedArray.transpose(2, 1, 0)), grid.affine,
                                               "fixed")
        moving = slicer.util.addVolumeFromArray(np.ascontiguousarray(movingArray.transpose(2, 1, 0)), grid.affine,
                                                "moving")
        torch.manual_seed(0)
        spec = registry.get_method("lapirn")
        net = spec.build(spec.config_class(start_channels=2, num_res_blocks=1, working_spacing=2.5))
        for level in net.levels:
            torch.nn.init.normal_(level.head.out.weight, std=1.0)
        folder = Path(tempfile.mkdtemp(dir=slicer.app.temporaryPath))
        weights = models.save_model(net, "lapirn", folder / "tiny.safetensors")
        movingBefore = slicer.util.arrayFromVolume(moving).copy()

        self.delayDisplay("Registering")
        from DeepRegistrationLib.engine.options import RegistrationOptions

        options = RegistrationOptions(method="lapirn", weights=str(weights), device="cpu")
        nodes = DeepRegistrationLogic().mrmlLogic().registerVolumes(fixed, moving, options)
        warped = image_from_volume_node(nodes.warped)
        self.assertTrue(np.allclose(warped.data, nodes.result.warped.data, atol=1e-4))

        self.delayDisplay("Hardening the transform on a clone of the moving volume")
        clone = slicer.modules.volumes.logic().CloneVolume(slicer.mrmlScene, moving, "moving clone")
        clone.SetAndObserveTransformNodeID(nodes.transform.GetID())
        slicer.vtkSlicerTransformLogic().hardenTransform(clone)
        hardened = image_from_volume_node(clone)
        from DeepRegistrationLib.core.field import apply_field

        expected = apply_field(Image(movingArray, grid), nodes.result.field.resampled(hardened.grid)).data
        ijk = grid.world_to_voxel(hardened.grid.world_coordinates())
        inside = np.all((ijk >= 0) & (ijk <= np.array(grid.shape) - 1), axis=-1)
        self.assertLess(np.abs(hardened.data - expected)[inside].max(), 1e-3 * np.ptp(expected))
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(moving), movingBefore))
        matrix = vtk.vtkMatrix4x4()
        moving.GetIJKToRASMatrix(matrix)
        self.assertTrue(np.allclose(slicer.util.arrayFromVTKMatrix(matrix), grid.affine))
        self.assertIsNone(moving.GetParentTransformNode())
        shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Test passed")

