"""DeepRegistration: learning-based deformable registration in 3D Slicer.

Module metadata, the widget, the sample data and the self-test. The work is done by `DeepRegistrationLib.frontends.mrml`
(MRML nodes in and out, testable without the GUI) and, outside the GUI process, by the worker
`DeepRegistrationLib.frontends.worker` in a PythonSlicer subprocess. PyTorch is never imported when this file loads or
the panel is built: the installed packages are checked from their metadata (`frontends.environment`), PyTorch is
installed through the PyTorch extension on the first Apply, and whether it imports — and which devices it sees — is
asked of a separate process (`frontends.probe`), so a broken PyTorch cannot blank the panel and the GUI holds no CUDA
context.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Annotated, Union

import qt
import slicer
import vtk
from slicer import (vtkMRMLLabelMapVolumeNode, vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode, vtkMRMLTransformNode)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

MODULE_DIR = Path(__file__).resolve().parent
SAMPLE_DIR = MODULE_DIR.parent / "Resources" / "SampleData"
"""The bundled ICBM152 pair: the repository's Resources/SampleData, or lib/Slicer-X.Y/Resources/SampleData of a build."""
DOCUMENTATION_URL = "https://github.com/DeepRegistration/SlicerDeepRegistration/blob/main/docs/SLICER.md"
SAMPLE_NAME = "DeepRegistrationBrainPair"
SAMPLE_FILES = (("fixed.nii.gz", "ICBM152 fixed", "VolumeFile"),
                ("moving.nii.gz", "ICBM152 moving", "VolumeFile"),
                ("fixed_labels.nii.gz", "ICBM152 fixed tissues", "SegmentationFile"),
                ("moving_labels.nii.gz", "ICBM152 moving tissues", "SegmentationFile"),
                ("fixed_landmarks.fcsv", "ICBM152 fixed landmarks", "MarkupsFile"),
                ("moving_landmarks.fcsv", "ICBM152 moving landmarks", "MarkupsFile"))
"""(file in SAMPLE_DIR, node name, Slicer file type) of the sample, in the order SampleData returns the nodes."""
WORKER_MODULE = "DeepRegistrationLib.frontends.worker"
PROBE_MODULE = "DeepRegistrationLib.frontends.probe"
PROBE_TIMEOUT_S = 300
FLICKER_INTERVAL_MS = 500

CITATIONS = (
    "Zheng Z, Cao W, Lian D, Luo Y. Feature self-calibration network with global-local training strategy for "
    "multi-region deformable medical image registration. Neural Computing and Applications, 2022 (golo_fscn).",
    "Zheng Z, Cao W, Duan Y, Cao G, Lian D. Multi-strategy mutual learning network for deformable medical image "
    "registration. Neurocomputing, 2022 (mmln).",
    "Li H, Fan Y. MDReg-Net: multi-resolution diffeomorphic image registration using fully convolutional networks "
    "with deep self-supervision (mdregnet).",
    "Zhu Z, Cao Y, Qin C, Rao Y. Joint affine and deformable three-dimensional networks for brain MRI registration. "
    "Medical Physics, 2021, doi:10.1002/mp.14674 (jad).",
    "Zhou Z, Hong B, Qian X, Hu J, Shen M, Ji J, Dai Y. macJNet: weakly-supervised multimodal image deformable "
    "registration using joint learning framework and multi-sampling cascaded MIND, 2023 (macjnet).",
    "Mok TCW, Chung ACS. Large deformation diffeomorphic image registration with Laplacian pyramid networks. "
    "MICCAI 2020 (lapirn).",
    "Dalca AV, Balakrishnan G, Guttag J, Sabuncu MR. Unsupervised learning of probabilistic diffeomorphic "
    "registration for images and surfaces. Medical Image Analysis, 2019 (voxelmorph).",
)
ICBM152_ATTRIBUTION = (
    "The sample data is derived from the MNI ICBM152 non-linear symmetric 2009a template, Copyright (C) 1993-2009 "
    "Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University (Fonov et al., "
    "NeuroImage 54(1), 2011; Fonov et al., NeuroImage 47 Suppl 1, S102, 2009; Collins et al., IPMI 1999), used under "
    "its permissive licence (Resources/SampleData/LICENSE-ICBM152.txt).")


class DeepRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Deep Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepRegistration developers (DeepRegistration project)"]
        self.parent.helpText = _(
            "Fast learning-based deformable registration of a moving volume to a fixed one with one of seven "
            "published networks. Outputs a grid transform (applied to the moving volume it aligns it to the fixed "
            "one), the warped volume, a Jacobian determinant map with a colour legend and an outlined folding "
            "segmentation, tables of segment overlap and landmark errors before and after registration, and a "
            "table comparing every run. Input nodes are never modified. Try it on the sample pair: Sample Data "
            "module, Registration, DeepRegistrationBrainPair.") + \
            f' <a href="{DOCUMENTATION_URL}">' + _("Documentation") + "</a>"
        self.parent.acknowledgementText = _(
            "DeepRegistration implements the methods of these papers; please cite the one you use:") + \
            "<ul>" + "".join(f"<li>{c}</li>" for c in CITATIONS) + "</ul>" + ICBM152_ATTRIBUTION
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> None:
    """Add the bundled pair (volumes, tissue segmentations, landmarks) to the Sample Data module, category
    Registration. The files are read from SAMPLE_DIR through file:// URIs, so nothing is downloaded."""
    import SampleData

    if not SAMPLE_DIR.is_dir():
        logging.warning(f"DeepRegistration: no sample data at {SAMPLE_DIR}")
        return
    thumbnail = MODULE_DIR / "Resources" / "Icons" / "DeepRegistrationSampleData.png"
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Registration", sampleName=SAMPLE_NAME,
        thumbnailFileName=str(thumbnail) if thumbnail.is_file() else None,
        uris=[(SAMPLE_DIR / name).as_uri() for name, _, _ in SAMPLE_FILES],
        fileNames=[f"DeepRegistration-{name}" for name, _, _ in SAMPLE_FILES],
        nodeNames=[node for _, node, _ in SAMPLE_FILES],
        loadFileType=[kind for _, _, kind in SAMPLE_FILES])


#
# Parameter node
#

LabelNode = Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]


@parameterNodeWrapper
class DeepRegistrationParameterNode:
    """Inputs, method settings and output choices. An output selector left empty makes each Apply create new nodes
    named after its method; a node the user picks there is overwritten."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedSegmentation: LabelNode
    movingSegmentation: LabelNode
    fixedLandmarks: vtkMRMLMarkupsFiducialNode
    movingLandmarks: vtkMRMLMarkupsFiducialNode
    fixedGuidance: vtkMRMLMarkupsFiducialNode
    movingGuidance: vtkMRMLMarkupsFiducialNode
    fixedMask: LabelNode
    movingMask: LabelNode
    method: str = "lapirn"  # registry.DEFAULT_METHOD (the backend is not importable before its install)
    preset: Annotated[str, Choice(["fast", "balanced", "accurate"])] = "balanced"  # refine_settings.PRESETS
    refinement: str = "{}"  # JSON {setting: value}: overrides of the preset's refinement settings
    methodParameters: str = "{}"  # JSON {method: {config field: value}}, edited through the generated panel
    weights: str = ""  # empty: the shipped model of the method
    methodWeights: str = "{}"  # JSON {method: weights file}: each method keeps its own choice
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
# Environment: packages, PyTorch, devices
#


def pythonSlicer() -> str | None:
    """PythonSlicer, which Slicer's launcher puts on PATH (as slicer.util's own subprocess helpers find it)."""
    return shutil.which("PythonSlicer")


def setupEnvironment(report) -> bool:
    """Make the packages DeepRegistration needs available; True when nothing is missing any more.

    PyTorch comes only from the PyTorch extension (PyTorchUtils picks the build for the graphics driver; a plain pip
    install can bring a CPU-only build on Windows); too old a PyTorch, or one built for NumPy 1 under NumPy 2, is
    upgraded the same way. The other packages are pip-installed with Slicer's NumPy and SimpleITK pinned. Each
    refusal or failure is passed to `report(text)`. Nothing here imports PyTorch.
    """
    import importlib

    from DeepRegistrationLib.frontends import environment

    problems = environment.check()
    torch_problems = [p for p in problems if p.fix == "pytorch"]
    if torch_problems:
        problem = torch_problems[0]
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            report(_("{problem} DeepRegistration installs PyTorch through the PyTorch extension: install it "
                     "(View > Extensions Manager > PyTorch), restart Slicer and press Apply again.").format(
                         problem=problem.message))
            return False
        try:
            with slicer.util.WaitCursor():
                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=True, torchVersionRequirement=problem.requirement)
        except Exception as exc:  # the PyTorch extension's installer failed: say so, keep the panel usable
            report(_("{problem} Installing PyTorch {requirement} through the PyTorch extension failed: {error}. "
                     "Use the PyTorch Utils module to install it, restart Slicer and press Apply again.").format(
                         problem=problem.message, requirement=problem.requirement, error=exc))
            return False
        if torch is None:
            report(_("{problem} PyTorch was not installed (declined or failed); press Apply to try again, or use "
                     "the PyTorch Utils module.").format(problem=problem.message))
            return False
    pip_problems = [p for p in problems if p.fix == "pip"]
    if pip_problems:
        names = ", ".join(p.requirement for p in pip_problems)
        if not slicer.util.confirmOkCancelDisplay(
                _("DeepRegistration needs these Python packages: {packages}. Install them now with pip? Slicer's "
                  "NumPy and SimpleITK are kept.").format(packages=names)):
            report(_("Not installed: {packages}. Press Apply to be asked again.").format(packages=names))
            return False
        constraints = Path(slicer.app.temporaryPath) / "DeepRegistration-constraints.txt"
        pins = [f"{name}=={version}" for name in ("numpy", "SimpleITK")
                if (version := environment.installed_version(name))]
        constraints.write_text("\n".join(pins) + "\n")
        try:
            with slicer.util.WaitCursor():
                slicer.util.pip_install([p.requirement for p in pip_problems] + ["-c", str(constraints)])
        except Exception as exc:  # pip failed (offline, no permission): say so
            report(_("Installing {packages} failed: {error}").format(packages=names, error=exc))
            return False
    importlib.invalidate_caches()
    remaining = environment.check()
    if remaining:
        report(_("Still not usable after installing: {problems} Restart Slicer and press Apply again.").format(
            problems=" ".join(p.message for p in remaining)))
        return False
    return True


def probe(arguments: list[str]) -> dict:
    """Ask a separate PythonSlicer process (`frontends.probe`); its JSON answer, or {"error": ...} saying why not."""
    python = pythonSlicer()
    if not python:
        return {"error": _("PythonSlicer was not found next to Slicer")}
    try:
        done = subprocess.run([python, "-m", PROBE_MODULE, *arguments], cwd=str(MODULE_DIR), capture_output=True,
                              text=True, timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}
    lines = [line for line in done.stdout.splitlines() if line.strip().startswith("{")]
    try:
        answer = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return {"error": tail}
    return answer


def deviceProblem(device: str, devices: dict) -> str | None:
    """Why `device` cannot be used on this computer (from a probe's device list), or None."""
    if device in ("auto", "cpu"):
        return None
    if device == "mps":
        return None if devices.get("mps") else _("device 'mps' is not available on this computer")
    if device == "cuda" or device.startswith("cuda:"):
        try:
            index = int(device.split(":")[1]) if ":" in device else 0
        except ValueError:
            return _("device {device!r} is not a device name").format(device=device)
        count = len(devices.get("cuda", []))
        if index >= count:
            return _("device {device!r} is not available: PyTorch {version} sees {count} CUDA device(s) on this "
                     "computer. Choose another device (Refresh lists them).").format(
                         device=device, version=devices.get("torch", "?"), count=count)
        return None
    return _("device {device!r} is not a device name").format(device=device)


#
# Widget
#


class DeepRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Inputs, method and device choice, outputs, Apply/Cancel, progress, results, comparison views.

    Registration runs in a PythonSlicer subprocess (`frontends.worker`) on a job folder, followed by a
    `frontends.job_process.JobProcess`; the scene is touched only when it finished successfully, so Cancel, a
    failure or a closed scene leave it as it was.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._parameterWidgets = {}
        self._refinementWidgets = {}  # setting name: (editor, preset value)
        self._refinementPreset = None  # the preset whose settings the refinement section shows
        self._job = None  # the JobProcess of the running registration
        self._backend = None  # its QProcessBackend
        self._prepared = None
        self._outputs = None
        self._devices = None  # the probe's answer, once asked
        self._lastNodes = None  # RegistrationNodes of the last run (for the comparison views and Refine)
        self._refining = None  # the RegistrationNodes the running job writes over (Refine), else None
        self._flickerTimer = None

    # ----------------------------------------------------------------------------------------- lifecycle

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepRegistrationLogic()
        self._flickerTimer = qt.QTimer()
        self._flickerTimer.setInterval(FLICKER_INTERVAL_MS)
        self._flickerTimer.connect("timeout()", self.onFlickerTimeout)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.refineButton.connect("clicked(bool)", self.onRefineButton)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.refreshDevicesButton.connect("clicked(bool)", self.onRefreshDevices)
        self.ui.estimateMemoryButton.connect("clicked(bool)", self.onEstimateMemory)
        self.ui.resetParametersButton.connect("clicked(bool)", self.onResetParameters)
        self.ui.weightsBrowseButton.connect("clicked(bool)", self.onBrowseWeights)
        self.ui.weightsLineEdit.connect("editingFinished()", self.onWeightsChanged)
        self.ui.parametersCollapsibleButton.connect("contentsCollapsed(bool)", self.onParametersCollapsed)
        self.ui.refinementCollapsibleButton.connect("contentsCollapsed(bool)", self.onRefinementCollapsed)
        self.ui.resetRefinementButton.connect("clicked(bool)", self.onResetRefinement)
        for mode, button in (("overlay", self.ui.overlayButton), ("checkerboard", self.ui.checkerboardButton),
                             ("difference", self.ui.differenceButton), ("flicker", self.ui.flickerButton)):
            button.connect("clicked(bool)", lambda checked=False, mode=mode: self.onCompare(mode))

        self.populateMethods()
        self.initializeParameterNode()
        self.showEnvironment()
        self.setComparisonEnabled(False)

    def cleanup(self) -> None:
        """The widget goes away (reload, application exit): stop the worker and free its process."""
        self.removeObservers()
        if self._flickerTimer is not None:
            self._flickerTimer.stop()
        if self._job is not None:
            backend = self._backend
            self._job.abandon(finished=lambda outcome: backend.release())
            self._job = self._backend = None

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._flickerTimer is not None:
            self._flickerTimer.stop()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self.onParameterNodeModified)
            self._parameterNode = None

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:  # its inputs and outputs belong to the scene that closes
            self._job.abandon()
        self._flickerTimer.stop()
        self._lastNodes = None
        self.ui.refineButton.enabled = False
        self.setComparisonEnabled(False)
        for view in (self.ui.segmentTableView, self.ui.landmarkTableView, self.ui.comparisonTableView):
            view.setMRMLTableNode(None)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first is not None and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.fixedVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent,
                             self.onParameterNodeModified)
            combo = self.ui.methodComboBox
            wasBlocked = combo.blockSignals(True)
            combo.setCurrentIndex(max(combo.findData(self._parameterNode.method), 0))
            combo.blockSignals(wasBlocked)
            self.onMethodChanged()
            self.fillDevices()
            self._checkCanApply()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        """The parameter node changed (panel, script or loaded scene): the widgets not bound to it follow."""
        combo = self.ui.deviceComboBox
        if self._parameterNode and combo.currentData != self._parameterNode.device:
            self.fillDevices()
        if self._parameterNode and self._refinementPreset != self._parameterNode.preset:
            self.updateRefinementPanel()
        self._checkCanApply()

    # ------------------------------------------------------------------------------------------- inputs

    def inputProblem(self) -> str | None:
        """Why Apply cannot run with the selected inputs (None when it can), from the nodes alone."""
        from DeepRegistrationLib.core.errors import InputError
        from DeepRegistrationLib.frontends.inputs import check_volume_pair

        p = self._parameterNode
        if not p or not p.fixedVolume or not p.movingVolume:
            return _("Select the fixed and the moving volume.")
        try:
            check_volume_pair(p.fixedVolume, p.movingVolume)
        except InputError as exc:
            return str(exc)
        if (p.fixedSegmentation is None) != (p.movingSegmentation is None):
            return _("Select both segmentations (fixed and moving) or neither.")
        if (p.fixedLandmarks is None) != (p.movingLandmarks is None):
            return _("Select both landmark lists (fixed and moving) or neither.")
        return None

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._job is not None:
            return
        problem = self.inputProblem()
        self.ui.applyButton.enabled = problem is None
        self.ui.applyButton.toolTip = problem or _("Register the moving volume to the fixed one.")
        p = self._parameterNode
        if problem and p and p.fixedVolume and p.movingVolume:
            self.ui.inputProblemLabel.text = problem
            self.ui.inputProblemLabel.visible = True
        else:
            self.ui.inputProblemLabel.text = ""
            self.ui.inputProblemLabel.visible = False

    def showEnvironment(self) -> None:
        """The packages still to be installed, in the panel (read from package metadata; nothing is imported)."""
        try:
            from DeepRegistrationLib.frontends import environment

            text = environment.describe(environment.check())
        except Exception as exc:  # a broken installation of the module itself: say it, keep the panel
            text = _("The DeepRegistration backend cannot be read: {error}").format(error=exc)
        self.ui.environmentLabel.text = text
        self.ui.environmentLabel.visible = bool(text)

    def report(self, text: str) -> None:
        """A problem for the user: in the panel (status line) and the log; never a traceback."""
        self.ui.statusLabel.text = text
        self.ui.statusLabel.visible = True
        self.log(text)

    # ------------------------------------------------------------------------------------ method and device

    def populateMethods(self) -> None:
        """The method list, from the registry (which imports no network code, so no PyTorch)."""
        combo = self.ui.methodComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        try:
            from DeepRegistrationLib.methods.registry import METHODS

            for name, spec in METHODS.items():
                combo.addItem(f"{name} ({spec.modality}modal)", name)
        except Exception as exc:  # a broken installation of the module itself
            self.ui.methodDescriptionLabel.text = _("The method list cannot be read: {error}").format(error=exc)
        combo.blockSignals(wasBlocked)

    def _methodWeights(self) -> dict:
        try:
            value = json.loads(self._parameterNode.methodWeights or "{}")
            return value if isinstance(value, dict) else {}
        except json.JSONDecodeError:
            return {}

    def onMethodChanged(self, index=None) -> None:
        """Another method: its own weights choice and parameters come back; never raises."""
        p = self._parameterNode
        method = self.ui.methodComboBox.currentData
        if not method or not p:
            return
        if method != p.method:
            weights = self._methodWeights()
            weights[p.method] = p.weights
            wasModified = p.StartModify()
            p.methodWeights = json.dumps(weights)
            p.method = method
            p.weights = weights.get(method, "")
            p.EndModify(wasModified)
        self.updateMethodDescription()
        self.updateParameterPanel()

    def weightsProblem(self) -> str | None:
        """Why the chosen weights file cannot be used with the chosen method (read without PyTorch), or None."""
        from DeepRegistrationLib.core.errors import InputError
        from DeepRegistrationLib.engine.options import RegistrationOptions
        from DeepRegistrationLib.frontends.inputs import check_weights

        p = self._parameterNode
        try:
            check_weights(RegistrationOptions(method=p.method, weights=p.weights or None))
        except InputError as exc:
            return str(exc)
        return None

    def updateMethodDescription(self) -> None:
        from DeepRegistrationLib.methods.registry import get_method

        p = self._parameterNode
        try:
            spec = get_method(p.method)
        except Exception as exc:
            self.ui.methodDescriptionLabel.text = str(exc)
            return
        problem = self.weightsProblem()
        weights = Path(p.weights) if p.weights else spec.weights_path
        if problem:
            model = f'<span style="color:#c00">{problem}</span>'
        elif weights.is_file():
            try:
                sha = str(json.loads(weights.with_suffix(".json").read_text()).get("sha256"))[:12]
            except (OSError, json.JSONDecodeError, AttributeError):
                sha = "?"
            model = _("{file} (sha256 {sha}…)").format(file=weights.name, sha=sha)
        else:
            model = _("no weights at {path}: train them or choose a weights file").format(path=weights)
        self.ui.methodDescriptionLabel.text = "<b>{}</b><br>{}<br>{}: {} · {}: {} · {}: {}".format(
            p.method, spec.paper, _("Modality"), _("multi-modal") if spec.modality == "multi" else _("mono-modal"),
            _("Diffeomorphic"), _("yes") if spec.diffeomorphic else _("no"), _("Model"), model)
        self.ui.createAffineCheckBox.enabled = spec.has_affine

    def _overrides(self) -> dict:
        """All methods' parameter overrides, {method: {field: value}}."""
        return _json_dict(self._parameterNode.methodParameters)

    def methodOverrides(self) -> dict:
        return self._overrides().get(self._parameterNode.method, {})

    def onParametersCollapsed(self, collapsed: bool) -> None:
        if not collapsed:
            self.updateParameterPanel()

    def _clearParameterPanel(self, message: str = "") -> None:
        layout = self.ui.parametersWidget.layout()
        while layout.rowCount():
            layout.removeRow(0)
        self._parameterWidgets = {}
        if message:
            label = qt.QLabel(message)
            label.wordWrap = True
            layout.addRow(label)

    def updateParameterPanel(self) -> None:
        """One editor per field of the method's Config (range, choices, help from its `param` metadata), built when
        the section is open: the configurations live in the network modules, which import PyTorch, so this needs
        a working PyTorch (checked in a separate process first). Problems are shown in the section."""
        if self.ui.parametersCollapsibleButton.collapsed:
            self._clearParameterPanel()
            return
        from DeepRegistrationLib.frontends import environment

        if environment.check():
            self._clearParameterPanel(_("The method's parameters are listed once PyTorch and the other packages "
                                        "are installed (press Apply)."))
            return
        devices = self.probeDevices()
        if "error" in devices:
            self._clearParameterPanel(_("PyTorch cannot be used: {error}").format(error=devices["error"]))
            return
        p = self._parameterNode
        weights = p.weights or None if self.weightsProblem() is None else None
        try:
            from DeepRegistrationLib.frontends.job import method_config

            base = method_config(p.method, None, weights)
            current = method_config(p.method, self.methodOverrides(), weights)
        except Exception as exc:  # an override that no longer fits, an unreadable model description
            self._clearParameterPanel(_("The parameters of {method} cannot be read: {error}").format(
                method=p.method, error=exc))
            return
        from dataclasses import fields

        self._clearParameterPanel()
        layout = self.ui.parametersWidget.layout()
        for f in fields(base):
            meta = f.metadata
            value, default = getattr(current, f.name), getattr(base, f.name)
            editor = self._editorFor(value, meta, self.onParameterEdited)
            source = _("from the paper") if meta.get("paper", True) else _("our choice where the paper is silent")
            editor.toolTip = f"{meta.get('help', '')}\n{_('Model value')}: {default} ({source})"
            label = f.name.replace("_", " ")
            layout.addRow(label + ("" if meta.get("paper", True) else " *"), editor)
            self._parameterWidgets[f.name] = (editor, default)

    def onRefinementCollapsed(self, collapsed: bool) -> None:
        if not collapsed:
            self.updateRefinementPanel()

    def updateRefinementPanel(self) -> None:
        """One editor per refinement setting of the chosen preset (unit, range and choices from its declaration in
        `engine/refine_settings.py`, which needs no PyTorch), built when the section is open."""
        layout = self.ui.refinementWidget.layout()
        while layout.rowCount():
            layout.removeRow(0)
        self._refinementWidgets, self._refinementPreset = {}, None
        if self.ui.refinementCollapsibleButton.collapsed or not self._parameterNode:
            return
        from dataclasses import fields

        from DeepRegistrationLib.core.errors import InputError
        from DeepRegistrationLib.engine.refine_settings import preset_settings

        p = self._parameterNode
        self._refinementPreset = p.preset
        if p.preset == "fast":
            label = qt.QLabel(_("Preset fast runs the network alone: there is no refinement to set."))
            label.wordWrap = True
            layout.addRow(label)
            return
        base = preset_settings(p.preset)
        try:
            current = preset_settings(p.preset, self.refinementOverrides())
        except InputError as exc:  # an edit that no longer fits (e.g. levels and steps of different lengths)
            current = base
            self.report(_("Refinement settings: {error}").format(error=exc))
        for f in fields(base):
            value, default = getattr(current, f.name), getattr(base, f.name)
            editor = self._editorFor(value, f.metadata, self.onRefinementEdited)
            editor.toolTip = f"{f.metadata['help']}\n{_('Preset value')}: {default}"
            layout.addRow(f.name.replace("_", " "), editor)
            self._refinementWidgets[f.name] = (editor, default)

    def onRefinementEdited(self, *args) -> None:
        """Store the settings that differ from the preset's as the refinement overrides."""
        self._parameterNode.refinement = json.dumps(self._editedValues(self._refinementWidgets))

    def onResetRefinement(self) -> None:
        self._parameterNode.refinement = "{}"
        self.updateRefinementPanel()

    def _editorFor(self, value, meta, edited):
        """An editor of `value` (range, choices from the field's `meta`) that calls `edited` when changed."""
        low, high, choices = meta.get("low"), meta.get("high"), meta.get("choices")
        if choices:
            editor = qt.QComboBox()
            for choice in choices:
                editor.addItem(str(choice), choice)
            editor.setCurrentIndex(max(editor.findData(value), 0))
            editor.connect("currentIndexChanged(int)", edited)
        elif isinstance(value, bool):
            editor = qt.QCheckBox()
            editor.checked = value
            editor.connect("toggled(bool)", edited)
        elif isinstance(value, int):
            editor = qt.QSpinBox()
            editor.setRange(int(low) if low is not None else -10**6, int(high) if high is not None else 10**6)
            editor.value = value
            editor.connect("valueChanged(int)", edited)
        elif isinstance(value, float):
            editor = qt.QDoubleSpinBox()
            editor.decimals = 4
            editor.setRange(low if low is not None else -1e6, high if high is not None else 1e6)
            editor.singleStep = (editor.maximum - editor.minimum) / 100 if low is not None and high is not None \
                else 0.1
            editor.value = value
            editor.connect("valueChanged(double)", edited)
        else:
            editor = qt.QLineEdit(", ".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value))
            editor.connect("editingFinished()", edited)
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

    def _editedValues(self, widgets: dict) -> dict:
        """{name: value} of the editors in `widgets` ({name: (editor, default)}) whose value differs from the
        default; an editor whose text does not parse is left out."""
        values = {}
        for name, (editor, default) in widgets.items():
            try:
                value = self._editorValue(editor, default)
            except ValueError:
                continue
            if _differs(value, default):
                values[name] = value
        return values

    def onParameterEdited(self, *args) -> None:
        """Store the fields that differ from the model's values as this method's overrides."""
        overrides = self._overrides()
        overrides[self._parameterNode.method] = self._editedValues(self._parameterWidgets)
        self._parameterNode.methodParameters = json.dumps(overrides)

    def onResetParameters(self) -> None:
        overrides = self._overrides()
        overrides.pop(self._parameterNode.method, None)
        self._parameterNode.methodParameters = json.dumps(overrides)
        self.updateParameterPanel()

    def onBrowseWeights(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Model weights"), "", "Weights (*.safetensors)")
        if path:
            self._parameterNode.weights = path
            self.onWeightsChanged()

    def onWeightsChanged(self) -> None:
        self.updateMethodDescription()
        self.updateParameterPanel()

    def probeDevices(self, refresh: bool = False) -> dict:
        """PyTorch's devices, asked of a separate process once (again with `refresh`); {"error"} when it failed."""
        if self._devices is None or refresh:
            with slicer.util.WaitCursor():
                self._devices = probe(["devices"])
            self.fillDevices()
        return self._devices

    def fillDevices(self) -> None:
        """Automatic, CPU, each CUDA device with its free memory and MPS (once probed); a stored device that is not
        (or not yet known to be) there is listed as such."""
        p = self._parameterNode
        if not p:
            return
        combo = self.ui.deviceComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("Automatic (CUDA, then MPS, then CPU)"), "auto")
        combo.addItem(_("CPU"), "cpu")
        devices = self._devices if self._devices and "error" not in self._devices else None
        if devices:
            for device in devices.get("cuda", []):
                combo.addItem(f"cuda:{device['index']} {device['name']} ({device['free'] / 2**30:.1f} / "
                              f"{device['total'] / 2**30:.1f} GiB free)", f"cuda:{device['index']}")
            if devices.get("mps"):
                combo.addItem("MPS (Apple GPU)", "mps")
        if combo.findData(p.device) < 0:
            note = _("not found") if devices else _("press Refresh to check")
            combo.addItem(f"{p.device} ({note})", p.device)
        combo.setCurrentIndex(combo.findData(p.device))
        combo.blockSignals(wasBlocked)

    def onRefreshDevices(self) -> None:
        if not self.ensureEnvironment():
            return
        devices = self.probeDevices(refresh=True)
        if "error" not in devices:
            self.ui.statusLabel.text = _("PyTorch {version}: {count} CUDA device(s){mps}.").format(
                version=devices["torch"], count=len(devices["cuda"]), mps=", MPS" if devices["mps"] else "")

    def onDeviceChanged(self, index=None) -> None:
        if self._parameterNode and self.ui.deviceComboBox.currentData:
            self._parameterNode.device = self.ui.deviceComboBox.currentData

    def onEstimateMemory(self) -> None:
        """The expected peak memory for the method on the fixed volume's grid and what the device has free (asked
        of a separate process, like the device list)."""
        p = self._parameterNode
        if not p.fixedVolume:
            self.ui.memoryLabel.text = _("Select the fixed volume first.")
            return
        if not self.ensureEnvironment():
            return
        from DeepRegistrationLib.core.errors import InputError
        from DeepRegistrationLib.frontends.mrml import volume_grid

        try:
            grid = volume_grid(p.fixedVolume)
        except InputError as exc:
            self.ui.memoryLabel.text = str(exc)
            return
        request = Path(tempfile.mkdtemp(prefix="DeepRegistration-memory-", dir=slicer.app.temporaryPath))
        (request / "request.json").write_text(json.dumps({"options": self.options().to_dict(),
                                                          "shape": list(grid.shape),
                                                          "affine": grid.affine.tolist()}))
        with slicer.util.WaitCursor():
            answer = probe(["memory", str(request / "request.json")])
        shutil.rmtree(request, ignore_errors=True)
        if "error" in answer:
            self.ui.memoryLabel.text = _("Memory estimate failed: {error}").format(error=answer["error"])
            return
        text = _("About {need:.1f} GiB on {device}").format(need=answer["bytes"] / 2**30, device=answer["device"])
        if answer.get("free") is not None:
            text += _(" ({free:.1f} GiB free)").format(free=answer["free"] / 2**30)
            if answer["bytes"] > answer["free"]:
                text += _(": too much; the CPU or a coarser working grid will be used")
        self.ui.memoryLabel.text = text

    # ------------------------------------------------------------------------------------------ apply/cancel

    def ensureEnvironment(self) -> bool:
        """Install what is missing (first Apply), then check that PyTorch imports, in a separate process."""
        ready = setupEnvironment(self.report)
        self.showEnvironment()
        if not ready:
            return False
        devices = self.probeDevices(refresh=self._devices is not None and "error" in self._devices)
        if "error" in devices:
            self.report(_("PyTorch is installed but cannot be used: {error}. Reinstall it with the PyTorch Utils "
                          "module (uninstall, restart Slicer, install), then press Apply again.").format(
                              error=devices["error"]))
            return False
        return True

    def onApplyButton(self) -> None:
        if self._job is not None:
            self.cancel()
            return
        self.ui.statusLabel.text = ""
        problem = self.inputProblem()
        if problem:
            self.report(problem)
            return
        if not self.ensureEnvironment():
            return
        problem = deviceProblem(self._parameterNode.device, self._devices) or self.weightsProblem()
        if not problem and not pythonSlicer():
            problem = _("PythonSlicer was not found next to Slicer; the registration cannot be started.")
        if problem:
            self.report(problem)
            return
        from DeepRegistrationLib.core.errors import InputError, ResourceError

        try:
            with slicer.util.WaitCursor():
                self.start()
        except (InputError, ResourceError) as exc:  # bad input: said in the panel; nothing was created
            self.report(str(exc))

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
        """The `RegistrationOptions` of the parameter node (one camelCase parameter per option; an option the
        parameter node does not have yet keeps its default)."""
        from dataclasses import fields

        from DeepRegistrationLib.engine.options import RegistrationOptions

        p = self._parameterNode
        values = {f.name: getattr(p, _camel(f.name)) for f in fields(RegistrationOptions)
                  if f.name not in ("parameters", "refinement", "weights")}
        return RegistrationOptions(parameters=self.methodOverrides(), refinement=self.refinementOverrides(),
                                   weights=p.weights or None, **values)

    def refinementOverrides(self) -> dict:
        """The edited refinement settings ({setting: value}); none with preset fast, which has no refinement (the
        edits are kept for when a refining preset is chosen again)."""
        if self._parameterNode.preset == "fast":
            return {}
        return _json_dict(self._parameterNode.refinement)

    def onRefineButton(self) -> None:
        """Run the last registration again with the guidance points pulling the warp where it is wrong, into the
        last run's own nodes (updated in place; the scene is unchanged if it fails)."""
        p = self._parameterNode
        if self._job is not None or self._lastNodes is None:
            return
        if not (p.fixedGuidance and p.movingGuidance):
            self.report(_("Place guidance points in the fixed and the moving image (two point lists, matched by "
                          "label or order) and choose them under Inputs, then press Refine."))
            return
        from DeepRegistrationLib.core.errors import InputError, ResourceError

        try:
            with slicer.util.WaitCursor():
                self.start(refine=self._lastNodes)
        except (InputError, ResourceError) as exc:
            self.report(str(exc))

    def outputsOf(self, nodes):
        """The outputs that write over the nodes of an earlier run (and new residual lines, which replace its own
        once the run succeeded)."""
        from DeepRegistrationLib.frontends.mrml import NODE_OUTPUTS, Outputs

        keep = {spec.key: (getattr(nodes, spec.key) or False) for spec in NODE_OUTPUTS if spec.chosen}
        return Outputs(**keep, segmentChart=False, residuals=bool(nodes.residuals))

    def start(self, refine=None) -> None:
        """Read the inputs and start the worker on them; nothing in the scene changes until it succeeded. With
        `refine` (the `RegistrationNodes` of an earlier run), its nodes are the outputs."""
        from DeepRegistrationLib.frontends.job_process import JobProcess

        p = self._parameterNode
        mrml = self.logic.mrmlLogic()
        prepared = mrml.prepareJob(p.fixedVolume, p.movingVolume, self.options(),
                                   fixedSegmentation=p.fixedSegmentation, movingSegmentation=p.movingSegmentation,
                                   fixedLandmarks=p.fixedLandmarks, movingLandmarks=p.movingLandmarks,
                                   fixedGuidance=p.fixedGuidance, movingGuidance=p.movingGuidance,
                                   fixedMask=p.fixedMask, movingMask=p.movingMask)
        outputs = self.outputs() if refine is None else self.outputsOf(refine)
        mrml.checkOutputs(prepared, outputs)
        python = pythonSlicer()
        self.ui.logTextEdit.clear()
        backend = QProcessBackend()
        job = JobProcess(prepared.job, backend, python, MODULE_DIR, progress=self.onProgress, log=self.log,
                         finished=self.onFinished, temporary_dir=slicer.app.temporaryPath)
        backend.connectTo(job)
        self._job, self._backend, self._prepared, self._outputs = job, backend, prepared, outputs
        self._refining = refine
        self.setRunning(True)
        self.log(_("Registering {moving} to {fixed} with {method} on {device}…").format(
            moving=p.movingVolume.GetName(), fixed=p.fixedVolume.GetName(), method=p.method, device=p.device))
        job.start()

    def cancel(self) -> None:
        """Ask the worker to stop at its next stage; kill it if it has not stopped after a grace period."""
        from DeepRegistrationLib.frontends.job_process import CANCEL_GRACE_S

        job = self._job
        job.cancel()
        self.ui.statusLabel.text = _("Cancelling…")
        self.ui.applyButton.enabled = False
        qt.QTimer.singleShot(int(CANCEL_GRACE_S * 1000), job.kill_if_running)

    def setRunning(self, running: bool) -> None:
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = True
        self.ui.refineButton.enabled = not running and self._lastNodes is not None
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
        """The worker ended (this runs inside the QProcess's own signal): free the process once control is back in
        the event loop, then build the outputs or say why not — the scene is unchanged unless it succeeded."""
        backend = self._backend
        self._job = self._backend = None
        if backend is not None:
            backend.release()
        self.setRunning(False)
        if outcome.status == "abandoned":  # the scene closed: its nodes are gone, nothing is built
            self.ui.statusLabel.text = _("Stopped: the scene was closed.")
            return
        if outcome.status == "cancelled":
            self.ui.statusLabel.text = _("Cancelled; the scene is unchanged.")
            return
        if outcome.status == "failed":
            self.report(_("Registration failed; the scene is unchanged: {message}").format(message=outcome.message))
            return
        from DeepRegistrationLib.core.errors import InputError

        try:
            nodes = self.logic.mrmlLogic().createOutputs(self._prepared, outcome.result, self._outputs,
                                                         self._parameterNode.transformDisplay
                                                         if self._parameterNode else "none")
        except InputError as exc:  # an input or chosen output was removed meanwhile; nothing was created
            self.report(str(exc))
            return
        if self._refining is not None:  # the earlier run's residual lines describe the warp it replaced
            for line in self._refining.residuals:
                if line.GetScene() is not None:
                    slicer.mrmlScene.RemoveNode(line)
        self.showResults(nodes)

    def showResults(self, nodes) -> None:
        """Show the fixed volume with the warped one over it, the tables and a summary. The created nodes are not
        put into the output selectors: the next Apply (another method, say) creates its own."""
        from DeepRegistrationLib.frontends.mrml import show_comparison

        self._lastNodes = nodes
        self.ui.refineButton.enabled = True
        if nodes.warped is not None:
            show_comparison(self._prepared.fixedVolumeNode, nodes.warped, "overlay")
            slicer.util.resetSliceViews()
        self.setComparisonEnabled(nodes.warped is not None)
        self.ui.segmentTableView.setMRMLTableNode(nodes.segmentTable)
        self.ui.segmentTableView.visible = nodes.segmentTable is not None
        self.ui.landmarkTableView.setMRMLTableNode(nodes.landmarkTable)
        self.ui.landmarkTableView.visible = nodes.landmarkTable is not None
        self.ui.comparisonTableView.setMRMLTableNode(nodes.comparison)
        self.ui.comparisonTableView.visible = nodes.comparison is not None
        if nodes.segmentChart is not None:
            slicer.modules.plots.logic().ShowChartInLayout(nodes.segmentChart)
        self.ui.summaryLabel.text = summaryText(nodes)
        self.ui.statusLabel.text = _("Done: {transform}.").format(transform=nodes.transform.GetName())
        self.ui.resultsCollapsibleButton.collapsed = False

    # ------------------------------------------------------------------------------------ comparison views

    def setComparisonEnabled(self, enabled: bool) -> None:
        for button in (self.ui.overlayButton, self.ui.checkerboardButton, self.ui.differenceButton,
                       self.ui.flickerButton):
            button.enabled = enabled

    def onCompare(self, mode: str) -> None:
        """One click: overlay, checkerboard, difference, or flicker (started and stopped by its button)."""
        from DeepRegistrationLib.core.errors import InputError
        from DeepRegistrationLib.frontends.mrml import show_comparison

        flickering = self._flickerTimer.isActive()
        self._flickerTimer.stop()
        nodes = self._lastNodes
        if nodes is None or nodes.warped is None or nodes.warped.GetScene() is None or \
                self._prepared.fixedVolumeNode.GetScene() is None:
            self.report(_("Register first: the comparison views need the fixed and the warped volume."))
            self.setComparisonEnabled(False)
            return
        if mode == "flicker" and flickering:
            mode = "overlay"
        try:
            show_comparison(self._prepared.fixedVolumeNode, nodes.warped, mode)
        except InputError as exc:
            self.report(str(exc))
            return
        if mode == "flicker":
            self._flickerTimer.start()
        self.ui.statusLabel.text = {
            "overlay": _("Overlay: the warped volume at 50 % over the fixed one."),
            "checkerboard": _("Checkerboard: blocks of the fixed and the warped volume alternate."),
            "difference": _("Difference: fixed minus warped (slice views' subtract compositing)."),
            "flicker": _("Flicker: the warped volume shown and hidden twice a second; click Flicker to stop."),
        }[mode]

    def onFlickerTimeout(self) -> None:
        from DeepRegistrationLib.frontends.mrml import flicker_step

        flicker_step(slicer.mrmlScene)


def _json_dict(text: str) -> dict:
    """The JSON object a parameter-node string holds; {} when it is empty, not JSON or not an object."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


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
    """`frontends.job_process.ProcessBackend` on Qt's QProcess: its signals drive a `JobProcess`.

    A QProcess that fails to start emits errorOccurred(FailedToStart) and never finished(); one that ends emits
    finished() (after errorOccurred(Crashed) when it crashed or was killed). `release()` disconnects and deletes the
    QProcess with deleteLater(): it is called from inside the process's own signal, where deleting the sender is not
    allowed, and without it the connected slots (which refer to the process) keep it alive forever.
    """

    def __init__(self) -> None:
        self.process = qt.QProcess()
        self._connections = []

    def connectTo(self, job) -> None:
        process = self.process

        def text(data) -> str:
            return bytes(data.data()).decode(errors="replace")

        self._connections = [
            ("readyReadStandardOutput()", lambda: job.output(text(process.readAllStandardOutput()))),
            ("readyReadStandardError()", lambda: job.errors(text(process.readAllStandardError()))),
            ("finished(int,QProcess::ExitStatus)",
             lambda code, status: job.exited(code, status == qt.QProcess.CrashExit)),
            ("errorOccurred(QProcess::ProcessError)",
             lambda error: job.failed_to_start(process.errorString()) if error == qt.QProcess.FailedToStart
             else None),
        ]
        for signal, slot in self._connections:
            process.connect(signal, slot)

    def start(self, program: str, arguments: list[str], working_directory: str) -> None:
        self.process.setWorkingDirectory(working_directory)
        self.process.start(program, arguments)

    def kill(self) -> None:
        self.process.kill()

    def release(self) -> None:
        for signal, slot in self._connections:
            self.process.disconnect(signal, slot)
        self._connections = []
        self.process.deleteLater()


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
    """Inside Slicer ("Reload and Test", or ctest): the bundled pair loaded through the Sample Data module and
    registered with the shipped LapIRN model, then a synthetic oblique pair through an untrained tiny LapIRN whose
    transform Slicer's own resampling must reproduce. When the packages cannot be installed, the test says so and
    stops without an error (it tests the module, not the network connection)."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear(0)

    def runTest(self) -> None:
        self.setUp()
        problems = []
        if not setupEnvironment(problems.append):
            self.delayDisplay(_("DeepRegistration self-test not run: {reason}").format(reason=" ".join(problems)))
            return
        self.test_SampleData()
        self.setUp()
        self.test_SyntheticPairGeometry()

    def test_SampleData(self) -> None:
        import numpy as np
        import SampleData
        from DeepRegistrationLib.engine.options import RegistrationOptions
        from DeepRegistrationLib.frontends.mrml import table_values
        from DeepRegistrationLib.methods.registry import get_method

        self.delayDisplay("Loading the sample pair through the Sample Data module")
        registerSampleData()
        fixed, moving, fixedTissues, movingTissues, fixedPoints, movingPoints = \
            SampleData.SampleDataLogic().downloadSamples(SAMPLE_NAME)
        self.assertEqual(fixed.GetName(), "ICBM152 fixed")
        self.assertTrue(get_method("lapirn").weights_path.is_file(), "the shipped lapirn model is missing")
        movingBefore = slicer.util.arrayFromVolume(moving).copy()
        self.delayDisplay("Registering it with the shipped LapIRN model")
        nodes = DeepRegistrationLogic().mrmlLogic().registerVolumes(
            fixed, moving, RegistrationOptions(method="lapirn", device="cpu"), fixedSegmentation=fixedTissues,
            movingSegmentation=movingTissues, fixedLandmarks=fixedPoints, movingLandmarks=movingPoints)
        labels = nodes.metrics.labels
        self.assertGreater(labels.after.mean_dice, labels.before.mean_dice)
        summary = nodes.landmarkReport["summary"]
        self.assertLess(summary["mean"][1], summary["mean"][0])
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(moving), movingBefore))
        [row] = table_values(nodes.comparison)
        self.assertEqual(row["Method"], "lapirn")
        self.delayDisplay(f"Sample pair: Dice {labels.before.mean_dice:.3f} -> {labels.after.mean_dice:.3f}, "
                          f"TRE {summary['mean'][0]:.2f} -> {summary['mean'][1]:.2f} mm")

    def test_SyntheticPairGeometry(self) -> None:
        import numpy as np
        import torch
        from DeepRegistrationLib.core.field import apply_field
        from DeepRegistrationLib.core.geometry import Grid
        from DeepRegistrationLib.core.image import Image
        from DeepRegistrationLib.engine.options import RegistrationOptions
        from DeepRegistrationLib.frontends.mrml import image_from_volume_node
        from DeepRegistrationLib.methods import models, registry

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
        options = RegistrationOptions(method="lapirn", weights=str(weights), device="cpu")
        nodes = DeepRegistrationLogic().mrmlLogic().registerVolumes(fixed, moving, options)
        warped = image_from_volume_node(nodes.warped)
        self.assertTrue(np.allclose(warped.data, nodes.result.warped.data, atol=1e-4))

        self.delayDisplay("Hardening the transform on a clone of the moving volume")
        clone = slicer.modules.volumes.logic().CloneVolume(slicer.mrmlScene, moving, "moving clone")
        clone.SetAndObserveTransformNodeID(nodes.transform.GetID())
        slicer.vtkSlicerTransformLogic().hardenTransform(clone)
        hardened = image_from_volume_node(clone)
        field = nodes.result.field.resampled(hardened.grid)
        expected = apply_field(Image(movingArray, grid), field).data
        # Compare where both resamplings interpolate inside the moving image: the blob is not zero at the image
        # border, where ITK-style zero padding and vtkImageReslice's half-voxel border legitimately differ.
        points = hardened.grid.world_coordinates()
        inFixed = grid.world_to_voxel(points)
        inMoving = grid.world_to_voxel(points + field.data)
        inside = np.all((inFixed >= 0) & (inFixed <= np.array(grid.shape) - 1), axis=-1) & \
            np.all((inMoving >= 1) & (inMoving <= np.array(grid.shape) - 2), axis=-1)
        self.assertGreater(inside.sum(), 1000)
        self.assertLess(np.abs(hardened.data - expected)[inside].max(), 1e-3 * np.ptp(expected))
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(moving), movingBefore))
        matrix = vtk.vtkMatrix4x4()
        moving.GetIJKToRASMatrix(matrix)
        self.assertTrue(np.allclose(slicer.util.arrayFromVTKMatrix(matrix), grid.affine))
        self.assertIsNone(moving.GetParentTransformNode())
        shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Test passed")
