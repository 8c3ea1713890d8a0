"""The scene Slicer sets up at startup, on slicer-core: application logic with its colour, volumes, segmentations and
markups logics, the default colour tables and slice orientations, and the Red (axial), Yellow (sagittal) and Green
(coronal) slice views' logics with their slice and composite nodes. `SliceView` renders one of them offscreen with
Slicer's own displayable managers (segmentation outlines, transform grids, markups, colour legends)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

SLICE_VIEWS = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}
DISPLAYABLE_MANAGERS_2D = ("vtkMRMLSegmentationsDisplayableManager2D", "vtkMRMLTransformsDisplayableManager2D",
                           "vtkMRMLMarkupsDisplayableManager", "vtkMRMLColorLegendDisplayableManager",
                           "vtkMRMLScalarBarDisplayableManager")


class SlicerApplication:
    def __init__(self) -> None:
        scene = self.scene = slicer.vtkMRMLScene()
        crosshair = slicer.vtkMRMLCrosshairNode()
        crosshair.SetCrosshairName("default")
        scene.AddNode(crosshair)
        logic = self.applicationLogic = slicer.vtkSlicerApplicationLogic()
        logic.SetMRMLScene(scene)
        logic.GetColorLogic().SetMRMLScene(scene)
        logic.GetColorLogic().AddDefaultColorNodes()
        logic.SetSliceLogics(vtk.vtkCollection())
        logic.SetViewLogics(vtk.vtkCollection())
        slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(logic)
        self.moduleLogics = {}
        for name, cls in (("Colors", slicer.vtkSlicerColorLogic), ("Volumes", slicer.vtkSlicerVolumesLogic),
                          ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                          ("Markups", slicer.vtkSlicerMarkupsLogic), ("Transforms", slicer.vtkSlicerTransformLogic)):
            module_logic = cls()
            module_logic.SetMRMLApplicationLogic(logic)
            module_logic.SetMRMLScene(scene)
            logic.SetModuleLogic(name, module_logic)
            self.moduleLogics[name] = module_logic
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
        self.sliceLogics = {}
        for name, orientation in SLICE_VIEWS.items():
            slice_logic = slicer.vtkMRMLSliceLogic()
            slice_logic.SetMRMLApplicationLogic(logic)
            logic.GetSliceLogics().AddItem(slice_logic)
            slice_logic.SetMRMLScene(scene)
            node = slice_logic.AddSliceNode(name)
            node.SetOrientation(orientation)
            self.sliceLogics[name] = slice_logic

    def fitSliceViews(self) -> None:
        for slice_logic in self.sliceLogics.values():
            slice_logic.FitSliceToAll()

    def compositeNode(self, name: str = "Red"):
        return self.sliceLogics[name].GetSliceCompositeNode()


class SliceView:
    """One slice view rendered offscreen: the slice logic's blended layers plus Slicer's 2D displayable managers."""

    def __init__(self, app: SlicerApplication, name: str = "Red", size: tuple[int, int] = (480, 480)) -> None:
        self.app, self.name, self.size = app, name, size
        self.logic = app.sliceLogics[name]
        self.renderer = vtk.vtkRenderer()
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.window = vtk.vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.SetMultiSamples(0)
        self.window.AddRenderer(self.renderer)
        self.window.SetSize(*size)
        self.interactor = vtk.vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.window)
        self.interactor.Initialize()
        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        for manager in DISPLAYABLE_MANAGERS_2D:
            if not factory.IsDisplayableManagerRegistered(manager):
                factory.RegisterDisplayableManager(manager)
        self.managers = slicer.vtkMRMLDisplayableManagerGroup()
        self.managers.SetRenderer(self.renderer)
        self.managers.Initialize(factory, self.renderer)
        self.managers.SetMRMLDisplayableNode(self.logic.GetSliceNode())
        self.mapper = vtk.vtkImageMapper()
        self.mapper.SetColorWindow(255)
        self.mapper.SetColorLevel(127.5)
        self.actor = vtk.vtkActor2D()
        self.actor.SetMapper(self.mapper)
        self.actor.GetProperty().SetDisplayLocationToBackground()
        self.renderer.AddViewProp(self.actor)

    def fit(self) -> None:
        self.logic.ResizeSliceNode(*self.size)
        self.logic.FitSliceToAll()

    def setOffsetFraction(self, fraction: float) -> None:
        """Move the slice to `fraction` (0…1) of the background volume's range along the view's normal."""
        low_high, resolution = [0.0, 0.0], vtk.reference(1.0)
        if self.logic.GetSliceOffsetRangeResolution(low_high, resolution):
            self.logic.SetSliceOffset(low_high[0] + fraction * (low_high[1] - low_high[0]))

    def image(self) -> np.ndarray:
        """The rendered view as an RGB array [height, width, 3] (row 0 at the top)."""
        self.logic.ResizeSliceNode(*self.size)
        self.mapper.SetInputConnection(self.logic.GetImageDataConnection())
        self.managers.RequestUpdate() if hasattr(self.managers, "RequestUpdate") else None
        self.window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.window)
        grab.ReadFrontBufferOff()
        grab.Update()
        output = grab.GetOutput()
        width, height, _ = output.GetDimensions()
        pixels = numpy_support.vtk_to_numpy(output.GetPointData().GetScalars()).reshape(height, width, -1)
        return np.ascontiguousarray(pixels[::-1, :, :3])

    def close(self) -> None:
        self.managers.SetMRMLDisplayableNode(None)
        self.window.Finalize()


def write_png(pixels: np.ndarray, path: Path) -> None:
    """An RGB array [height, width, 3] (row 0 at the top) as a PNG file, with VTK's writer."""
    height, width, _ = pixels.shape
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(
        np.ascontiguousarray(pixels[::-1]).reshape(-1, 3).astype(np.uint8), deep=True))
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()
