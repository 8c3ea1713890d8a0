"""`SlicerHarness`: installs the stand-ins, builds Slicer's startup scene, opens the DeepRegistration module and drives
it as a user would, and removes everything again on exit.

The module's registration worker runs in this process: the harness puts an executable `PythonSlicer` on PATH (a
shim to this Python, so the module's probe subprocess really runs) and registers it with the `QProcess` stand-in, so
starting `PythonSlicer -m DeepRegistrationLib.frontends.worker FOLDER` calls `frontends.worker.main` here, its
standard output delivered line by line while it runs. `whenStage(stage, action)` runs an action (Cancel, closing the
scene) when the worker reports that stage; a killed process stops the worker at its next output, as SIGKILL would.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.metadata
import importlib.util
import io
import json
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Any, Callable

import slicer

from . import app as app_module
from . import ctk, i18n, mrml_widgets, parameter_node, pytorch_utils, qt, sample_data, scripted, util

ROOT = Path(__file__).resolve().parents[2]
MODULE_FILE = ROOT / "DeepRegistration" / "DeepRegistration.py"
WORKER_MODULE = "DeepRegistrationLib.frontends.worker"

STAND_INS = {"qt": qt, "ctk": ctk, "slicer.util": util, "slicer.ScriptedLoadableModule": scripted,
             "slicer.parameterNodeWrapper": parameter_node, "slicer.i18n": i18n, "SampleData": sample_data,
             "PyTorchUtils": pytorch_utils}
SLICER_ATTRIBUTES = ("util", "app", "mrmlScene", "modules", "selfTests", "qMRMLWidget", "qMRMLNodeComboBox",
                     "qMRMLTableView", "qSlicerWidget", "ScriptedLoadableModule", "parameterNodeWrapper", "i18n",
                     "harness")
_MISSING = object()


class _App(qt.QObject):
    """`slicer.app`: temporary folder, testing mode, cursors, event processing, startupCompleted()."""

    def __init__(self, temporary: Path, applicationLogic) -> None:
        super().__init__()
        self.temporaryPath = str(temporary)
        self.applicationName = "Slicer"
        self.testing = False
        self._applicationLogic = applicationLogic

    def testingEnabled(self) -> bool:
        return self.testing

    def commandOptions(self):
        return types.SimpleNamespace(noMainWindow=True, testingEnabled=self.testing)

    def setOverrideCursor(self, cursor) -> None:
        qt.QApplication.setOverrideCursor(cursor)

    def restoreOverrideCursor(self) -> None:
        qt.QApplication.restoreOverrideCursor()

    def processEvents(self, *args) -> None:
        qt.EVENT_LOOP.process_events()

    def applicationLogic(self):
        return self._applicationLogic


class _PlotsLogic:
    def __init__(self) -> None:
        self.shown: list = []

    def ShowChartInLayout(self, chart) -> None:
        self.shown.append(chart)


class _ModuleParent(qt.QObject):
    """What Slicer passes to a scripted module's constructor (qSlicerScriptedLoadableModule)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = str(path)


class _ModulePanel(qt.QWidget):
    """The module panel (qSlicerScriptedLoadableModuleWidget): a layout and `isEntered`."""

    def __init__(self) -> None:
        super().__init__()
        self.setLayout(qt.QVBoxLayout())
        self.isEntered = False


class _TorchBlocker(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import torch` (and its submodules) raises `error` while it runs, as with a PyTorch whose import fails."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        raise self.error


class _Pipe(io.TextIOBase):
    """Standard output/error of the in-process worker: each write goes to the QProcess while the worker runs."""

    def __init__(self, harness: "SlicerHarness", process: qt.QProcess, errors: bool = False) -> None:
        super().__init__()
        self.harness, self.process, self.isErrorPipe = harness, process, errors

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        (self.process.write_errors if self.isErrorPipe else self.process.write_output)(text)
        if not self.isErrorPipe:
            for line in text.splitlines():
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(message, dict) and message.get("stage") in self.harness.stageActions:
                    self.harness.stageActions.pop(message["stage"])()
        if self.process._killed:
            raise qt._Killed()
        return len(text)


class SlicerHarness:
    def __init__(self, folder: Path, pytorchExtension: bool = True) -> None:
        self.folder = Path(folder)
        self.pytorchExtension = pytorchExtension
        self.widget = None
        self.module = None
        self.panel: _ModulePanel | None = None
        self.stageActions: dict[str, Callable[[], None]] = {}
        self.workerRuns: list[list[str]] = []
        self._saved_modules: dict[str, Any] = {}
        self._saved_attributes: dict[str, Any] = {}
        self._saved_environ: dict[str, str | None] = {}
        self._torch_saved: dict[str, Any] | None = None
        self._blocker: _TorchBlocker | None = None
        self._metadata_version = None
        self._started = False
        self.torchState = "ok"
        self.probeCalls = 0

    # ------------------------------------------------------------------------------------------ install

    def __enter__(self) -> "SlicerHarness":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def install(self) -> None:
        names = [*STAND_INS, "DeepRegistration"]
        self._saved_modules = {name: sys.modules.get(name, _MISSING) for name in names}
        self._saved_attributes = {name: getattr(slicer, name, _MISSING) for name in SLICER_ATTRIBUTES}
        for name, module in STAND_INS.items():
            sys.modules[name] = module
        if not self.pytorchExtension:
            sys.modules["PyTorchUtils"] = None  # `import PyTorchUtils` raises ModuleNotFoundError
        sys.modules.pop("DeepRegistration", None)
        self.application = app_module.SlicerApplication()
        temporary = self.folder / "SlicerTemporary"
        temporary.mkdir(parents=True, exist_ok=True)
        slicer.util = util
        slicer.app = _App(temporary, self.application.applicationLogic)
        slicer.mrmlScene = self.application.scene
        volumes = types.SimpleNamespace(logic=lambda: self.application.moduleLogics["Volumes"])
        self.plots = _PlotsLogic()
        slicer.modules = types.SimpleNamespace(plots=types.SimpleNamespace(logic=lambda: self.plots),
                                               volumes=volumes)
        slicer.selfTests = {}
        for cls in (mrml_widgets.qMRMLWidget, mrml_widgets.qMRMLNodeComboBox, mrml_widgets.qMRMLTableView,
                    mrml_widgets.qSlicerWidget):
            setattr(slicer, cls.__name__, cls)
        slicer.ScriptedLoadableModule = scripted
        slicer.parameterNodeWrapper = parameter_node
        slicer.i18n = i18n
        slicer.harness = self
        qt.EVENT_LOOP.reset()
        qt.CONSOLE.tracebacks.clear()
        qt.QFileDialog.answers = []
        qt.QProcess.instances = []
        qt.QProcess.unable_to_start = None
        util.reset()
        util.PIP_HOOK = None
        pytorch_utils.INSTALLS.clear()
        pytorch_utils.INSTALL_HOOK = None
        # an executable PythonSlicer on PATH, as Slicer's launcher provides
        bin_dir = self.folder / "bin"
        bin_dir.mkdir(exist_ok=True)
        self.pythonSlicer = bin_dir / "PythonSlicer"
        self.pythonSlicer.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        self.pythonSlicer.chmod(0o755)
        qt.QProcess.programs = {str(self.pythonSlicer): self._runWorker}
        self._setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        self._setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "DeepRegistration"), str(ROOT),
                                                    os.environ.get("PYTHONPATH", "")]))

    def _setenv(self, name: str, value: str | None) -> None:
        if name not in self._saved_environ:
            self._saved_environ[name] = os.environ.get(name)
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    def uninstall(self) -> None:
        self.setTorch("ok")
        if self.widget is not None:
            with contextlib.suppress(Exception):
                self.widget.cleanup()
            self.widget = None
        if self.panel is not None:  # the application closes: its widgets are destroyed
            self.panel._delete()
            self.panel = None
        for name, value in self._saved_environ.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for name, module in self._saved_modules.items():
            if module is _MISSING:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name, value in self._saved_attributes.items():
            if value is _MISSING:
                if hasattr(slicer, name):
                    delattr(slicer, name)
            else:
                setattr(slicer, name, value)
        qt.EVENT_LOOP.reset()
        qt.QProcess.programs = {}

    # ------------------------------------------------------------------------------------------ PyTorch

    def setTorch(self, state: str) -> None:
        """"ok"; "absent" (not in the package metadata, and importing it fails with ModuleNotFoundError); "broken"
        (installed, but importing it raises OSError as a PyTorch with a missing library does) — in this process,
        where every torch and DeepRegistrationLib module is unloaded until the state is "ok" again, and in
        subprocesses, through a failing `torch` package first on PYTHONPATH."""
        if self._blocker is not None:
            sys.meta_path.remove(self._blocker)
            self._blocker = None
            for name in [n for n in sys.modules if n.split(".")[0] in ("torch", "DeepRegistrationLib")]:
                del sys.modules[name]
            sys.modules.update(self._torch_saved)
            self._torch_saved = None
        if self._metadata_version is not None:
            importlib.metadata.version = self._metadata_version
            self._metadata_version = None
        self._setenv("PYTHONPATH", os.pathsep.join(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                   if p and not p.endswith("broken-torch")) or None)
        self.torchState = state
        if state == "ok":
            return
        if state == "absent":
            error: Exception = ModuleNotFoundError("No module named 'torch'", name="torch")
            code = 'raise ModuleNotFoundError("No module named \'torch\'", name="torch")\n'
            real = importlib.metadata.version

            def version(distribution):
                if distribution.lower() == "torch":
                    raise importlib.metadata.PackageNotFoundError(distribution)
                return real(distribution)

            self._metadata_version = real
            importlib.metadata.version = version
        elif state == "broken":
            message = "libtorch_cpu.so: cannot open shared object file: No such file or directory"
            error = OSError(message)
            code = f"raise OSError({message!r})\n"
        else:
            raise ValueError(state)
        broken = self.folder / "broken-torch"
        (broken / "torch").mkdir(parents=True, exist_ok=True)
        (broken / "torch" / "__init__.py").write_text(code)
        self._setenv("PYTHONPATH", os.pathsep.join([str(broken), os.environ.get("PYTHONPATH", "")]))
        self._torch_saved = {n: m for n, m in sys.modules.items()
                             if n.split(".")[0] in ("torch", "DeepRegistrationLib")}
        for name in self._torch_saved:
            del sys.modules[name]
        self._blocker = _TorchBlocker(error)
        sys.meta_path.insert(0, self._blocker)

    # ------------------------------------------------------------------------------------------- module

    _deviceAnswers: dict = {}
    """The module's device probe answers by PyTorch state, shared by all harnesses: the first ask of each state
    really runs `PythonSlicer -m DeepRegistrationLib.frontends.probe devices`; asking again gives the same answer
    without paying for another PyTorch import in a subprocess."""

    def _importModule(self):
        spec = importlib.util.spec_from_file_location("DeepRegistration", MODULE_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["DeepRegistration"] = module
        spec.loader.exec_module(module)
        real_probe = module.probe

        def probe(arguments):
            if arguments != ["devices"]:
                return real_probe(arguments)
            self.probeCalls += 1
            if self.torchState not in SlicerHarness._deviceAnswers:
                SlicerHarness._deviceAnswers[self.torchState] = real_probe(arguments)
            return dict(SlicerHarness._deviceAnswers[self.torchState])

        module.probe = probe
        return module

    def startApplication(self):
        """Slicer's start: the module class is instantiated, then startupCompleted() is emitted."""
        self.module = self._importModule()
        self.moduleParent = _ModuleParent(MODULE_FILE)
        self.moduleInstance = self.module.DeepRegistration(self.moduleParent)
        slicer.app.emit("startupCompleted()")
        self._started = True
        return self.module

    def openModule(self):
        """The user selects the module for the first time: its widget is created, set up and entered."""
        if not self._started:
            self.startApplication()
        self.panel = _ModulePanel()
        self.widget = self.module.DeepRegistrationWidget(self.panel)
        self.widget.setup()
        self.enterModule()
        return self.widget

    def enterModule(self) -> None:
        self.panel.isEntered = True
        self.widget.enter()

    def exitModule(self) -> None:
        self.widget.exit()
        self.panel.isEntered = False

    def reloadModule(self, name: str = "DeepRegistration"):
        """Slicer's Reload (slicer.util.reloadScriptedModule): the old widget is cleaned up, its GUI hidden and taken
        out of the panel's layout (it stays a child of the panel), the module file is executed again and a new
        widget is set up in the same panel (and entered again if the module was shown)."""
        entered = self.panel.isEntered
        self.widget.cleanup()
        for child in list(self.panel.layout().widgets()):
            child.hide()
        self.panel.layout()._items.clear()
        self.module = self._importModule()
        self.moduleInstance = self.module.DeepRegistration(self.moduleParent)
        self.widget = self.module.DeepRegistrationWidget(self.panel)
        self.widget.setup()
        if entered:
            self.widget.enter()
        return self.widget

    # ------------------------------------------------------------------------------------------- events

    def processEvents(self, ms: float = 0.0) -> None:
        """Return to the event loop: run what is due (and `ms` more virtual milliseconds of timers)."""
        qt.EVENT_LOOP.advance(ms)

    def whenStage(self, stage: str, action: Callable[[], None]) -> None:
        self.stageActions[stage] = action

    def closeScene(self) -> None:
        """File → Close Scene."""
        slicer.mrmlScene.Clear(0)

    def _runWorker(self, process: qt.QProcess, arguments: list[str]) -> int:
        if arguments[:2] != ["-m", WORKER_MODULE]:
            raise RuntimeError(f"the harness runs only the worker, not {arguments}")
        from DeepRegistrationLib.frontends import worker

        self.workerRuns.append(list(arguments))
        showwarning = warnings.showwarning
        try:
            with contextlib.redirect_stdout(_Pipe(self, process)), \
                    contextlib.redirect_stderr(_Pipe(self, process, errors=True)):
                return worker.main(arguments[2:])
        finally:
            warnings.showwarning = showwarning

    # ------------------------------------------------------------------------------------------- checks

    @property
    def consoleTracebacks(self) -> list[str]:
        return qt.CONSOLE.tracebacks

    @property
    def popups(self) -> list[tuple[str, str, str]]:
        return util.POPUPS

    def nodeIDs(self) -> set[str]:
        scene = slicer.mrmlScene
        return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
