"""Stand-ins for the MRML widgets of Slicer's `slicer` namespace that DeepRegistration's .ui uses, on a real scene."""

from __future__ import annotations

from typing import Any

import slicer
import vtk

from .qt import QWidget


class qMRMLWidget(QWidget):
    """A widget holding a scene; `setMRMLScene` emits mrmlSceneChanged(vtkMRMLScene*) (the .ui forwards it)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._scene = None

    def setMRMLScene(self, scene) -> None:
        self._scene = scene
        self.emit("mrmlSceneChanged(vtkMRMLScene*)", scene)

    def mrmlScene(self):
        return self._scene

    def _delete(self) -> None:
        """A deleted MRML widget no longer observes its scene (its C++ destructor removes the observers, and a
        destroyed object emits nothing)."""
        if self._scene is not None and not self.deleted:
            self.blockSignals(True)
            self.setMRMLScene(None)
        super()._delete()


class qSlicerWidget(qMRMLWidget):
    pass


class qMRMLNodeComboBox(qMRMLWidget):
    """Lists the scene's nodes of `nodeTypes` (subclasses too when `showChildNodeTypes`, hidden nodes never).

    The current node is None ("None" item) or a listed node: setting a node that is not listed selects None. When
    `noneEnabled` is false, the first listed node is selected as soon as there is one (when the scene is set or a
    node is added). A removed current node is deselected. Each change emits currentNodeChanged(vtkMRMLNode*),
    currentNodeChanged(bool) and currentNodeIDChanged(QString).
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.nodeTypes: list[str] = []
        self.showChildNodeTypes = True
        self.noneEnabled = False
        self.addEnabled = True
        self.removeEnabled = True
        self.editEnabled = False
        self.renameEnabled = False
        self.noneDisplay = "None"
        self.baseName = ""
        self._current = None
        self._observations: list[int] = []

    def setMRMLScene(self, scene) -> None:
        if self._scene is not None:
            for tag in self._observations:
                self._scene.RemoveObserver(tag)
        self._observations = []
        super().setMRMLScene(scene)
        if scene is not None:
            self._observations = [scene.AddObserver(slicer.vtkMRMLScene.NodeAddedEvent, self._onNodeAdded),
                                  scene.AddObserver(slicer.vtkMRMLScene.NodeRemovedEvent, self._onNodeRemoved),
                                  scene.AddObserver(slicer.vtkMRMLScene.EndCloseEvent, self._onSceneClosed)]
        if self._current is not None and (scene is None or self._current.GetScene() is not scene):
            self._setCurrent(None)
        self._selectDefault()

    def listed(self, node) -> bool:
        if node is None or node.GetHideFromEditors() or not node.GetScene():
            return False
        for kind in self.nodeTypes:
            if node.IsA(kind) and (self.showChildNodeTypes or node.GetClassName() == kind):
                return True
        return False

    def nodes(self) -> list:
        if self._scene is None:
            return []
        found = []
        for i in range(self._scene.GetNumberOfNodes()):
            node = self._scene.GetNthNode(i)
            if self.listed(node):
                found.append(node)
        return found

    def _selectDefault(self) -> None:
        if not self.noneEnabled and self._current is None:
            nodes = self.nodes()
            if nodes:
                self._setCurrent(nodes[0])

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _onNodeAdded(self, scene, event, node) -> None:
        if not self.noneEnabled and self._current is None and self.listed(node):
            self._setCurrent(node)

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _onNodeRemoved(self, scene, event, node) -> None:
        if node is self._current:
            self._setCurrent(None)
            self._selectDefault()

    def _onSceneClosed(self, *args: Any) -> None:
        if self._current is not None and self._current.GetScene() is None:
            self._setCurrent(None)
        self._selectDefault()

    def currentNode(self):
        return self._current

    @property
    def currentNodeID(self) -> str:
        return self._current.GetID() if self._current is not None else ""

    def setCurrentNode(self, node) -> None:
        self._setCurrent(node if self.listed(node) else None)
        if self._current is None:
            self._selectDefault()

    def setCurrentNodeID(self, node_id: str) -> None:
        self.setCurrentNode(self._scene.GetNodeByID(node_id) if self._scene is not None and node_id else None)

    def _setCurrent(self, node) -> None:
        if node is self._current:
            return
        self._current = node
        self.emit("currentNodeChanged(vtkMRMLNode*)", node)
        self.emit("currentNodeChanged(bool)", node is not None)
        self.emit("currentNodeIDChanged(QString)", node.GetID() if node is not None else "")


class qMRMLTableView(qMRMLWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._table = None

    def setMRMLTableNode(self, node) -> None:
        self._table = node

    def mrmlTableNode(self):
        return self._table
