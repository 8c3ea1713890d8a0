"""A stand-in for `slicer.ScriptedLoadableModule` following Slicer's Base/Python/slicer/ScriptedLoadableModule.py.

- `ScriptedLoadableModule(parent)`: metadata on `parent`; `runTest(msec)` instantiates `<ModuleName>Test` from the
  module and calls its `runTest()` (registered in `slicer.selfTests`, which "Reload and Test" calls).
- `ScriptedLoadableModuleWidget(parent)`: `self.parent`, `self.layout`, `resourcePath(name)` (the module's
  Resources folder), `onReloadAndTest` (an exception is shown as "Reload and Test: Exception!" and printed).
- `ScriptedLoadableModuleLogic.getParameterNode()`: the scene's singleton vtkMRMLScriptedModuleNode tagged with the
  module name, created on first use.
- `ScriptedLoadableModuleTest`: a `unittest.TestCase` whose `delayDisplay` goes to `slicer.util.delayDisplay`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
import unittest

import slicer

from . import qt


class ScriptedLoadableModule:
    def __init__(self, parent) -> None:
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = ""
        parent.categories = []
        parent.dependencies = []
        parent.contributors = []
        parent.helpText = ""
        parent.acknowledgementText = ""
        parent.hidden = False
        slicer.selfTests[self.moduleName] = self.runTest

    def getDefaultModuleDocumentationLink(self, docPage=None) -> str:
        return f'<p>For more information see the <a href="https://slicer.readthedocs.io/en/latest/user_guide/modules/{self.moduleName.lower()}.html">online documentation</a>.</p>'

    def runTest(self, msec=100, **kwargs) -> None:
        module = importlib.import_module(self.__module__)
        testCase = getattr(module, self.moduleName + "Test")()
        testCase.messageDelay = msec
        testCase.runTest(**kwargs)


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None) -> None:
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Widget"):
            self.moduleName = self.moduleName[: -len("Widget")]
        self.developerMode = False
        if not parent:
            self.parent = slicer.qMRMLWidget()
            self.parent.setLayout(qt.QVBoxLayout())
            self.parent.setMRMLScene(slicer.mrmlScene)
        else:
            self.parent = parent
        self.layout = self.parent.layout()
        if not parent:
            self.setup()
            self.parent.show()

    def resourcePath(self, filename: str) -> str:
        scriptedModulesPath = os.path.dirname(sys.modules[type(self).__module__].__file__)
        return os.path.join(scriptedModulesPath, "Resources", filename)

    def setup(self) -> None:
        pass

    def cleanup(self) -> None:
        pass

    def enter(self) -> None:
        pass

    def exit(self) -> None:
        pass

    def onReload(self) -> None:
        slicer.harness.reloadModule(self.moduleName)

    def onReloadAndTest(self, **kwargs) -> None:
        try:
            self.onReload()
            test = slicer.selfTests[self.moduleName]
            test(msec=0, **kwargs)
        except Exception:
            traceback.print_exc()
            errorMessage = "Reload and Test: Exception!\n\n" + str(sys.exc_info()[0]) + ": " + str(sys.exc_info()[1])
            slicer.util.errorDisplay(errorMessage)


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None) -> None:
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Logic"):
            self.moduleName = self.moduleName[: -len("Logic")]

    def getParameterNode(self):
        parameterNode = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if parameterNode:
            return parameterNode
        return slicer.mrmlScene.AddNode(self.createParameterNode())

    def createParameterNode(self):
        node = slicer.vtkMRMLScriptedModuleNode()
        node.SetSingletonTag(self.moduleName)
        node.SetModuleName(self.moduleName)
        node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.messageDelay = 100

    def delayDisplay(self, message, requestedDelay=None, msec=None) -> None:
        logging.info(message)
        slicer.util.delayDisplay(message, msec if msec is not None else self.messageDelay)
