"""The Slicer module's logic on MRML nodes: inputs to backend types, registration, outputs back to nodes.

Needs only Slicer's MRML classes (`import slicer`, as in Slicer or PyPI's `slicer-core`) and VTK: no Qt and no
`slicer.util`, so it runs headless and in tests. Frames follow docs/CONVENTIONS.md: every node is read in world RAS
mm (a volume's IJK-to-RAS composed with its linear parent transforms), arrays are [i, j, k] (VTK stores [k, j, i]),
and the output transform maps fixed points to moving points, so it is set as the transform node's "from parent".

Input nodes are never modified: outputs are built only after the registration succeeded, into new nodes or into
nodes the caller chose (never an input). If building them fails, every node this call added is removed again.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..core.errors import InputError
from ..core.field import DisplacementField
from ..core.geometry import Grid
from ..core.image import Image
from ..core.resample import resample_image
from ..engine.options import RegistrationOptions
from .inputs import check_volume_pair, check_weights
from .job import RegistrationJob, run_job
from .outputs import OUTPUTS

TRANSFORM_DISPLAY_MODES = ("none", "glyph", "grid", "contour")
FOLDING_SEGMENT_ID = "folding"
JACOBIAN_COLOR_TAG = "DeepRegistrationJacobian"
JACOBIAN_RANGE = (0.0, 2.0)
"""det J shown from 0 (blue) through 1 (white, volume kept) to 2 (red); values beyond are clamped."""
COMPARISON_ATTRIBUTE = "DeepRegistration.comparison"
"""Marks the one table node of a scene that collects a row per registration (`comparison_table`)."""
COMPARISON_COLUMNS = (("Run", None), ("Moving", None), ("Fixed", None), ("Method", None), ("Model", None),
                      ("Preset", None), ("Dice", ""), ("HD95", "mm"), ("TRE", "mm"), ("Folding", "%"), ("SDlogJ", ""),
                      ("Time", "s"))
"""(name, unit; None for text) of the comparison table: Run is the transform node's name, Model the weights file
("shipped" for the method's shipped model); Dice, HD95 and TRE are the means after registration, NaN when the run
had no segmentations or landmarks; Preset is "—" where the result records no run options."""
COMPARE_MODES = ("overlay", "checkerboard", "difference", "flicker")
"""Views of the fixed volume against the warped one (`show_comparison`)."""
RESIDUAL_COLORS = {"improved": (0.1, 0.8, 0.2), "worse": (0.95, 0.2, 0.1)}
"""Landmark residual lines: green where registration reduced that landmark's error, red where it increased it."""


# --------------------------------------------------------------------------------------------- conversion


def matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """A vtkMatrix4x4 as a 4×4 float64 array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def array_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    """A 4×4 array as a new vtkMatrix4x4."""
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _to_world(node, affine: np.ndarray) -> np.ndarray:
    """Compose `affine` (node coordinates) with the node's parent transforms, which must be linear."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return affine
    if not parent.IsTransformToWorldLinear():
        raise InputError(f"{node.GetName()}: lies under the non-linear transform {parent.GetName()!r}; harden it "
                         "or take the node out of it (Transforms module) first")
    to_world = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(to_world)
    return matrix_to_array(to_world) @ affine


def volume_grid(node) -> Grid:
    """The world grid of a volume node: IJK-to-RAS, image extent start and linear parent transforms included."""
    image = node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise InputError(f"{node.GetName()}: the volume has no voxels")
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    start = np.eye(4)
    start[:3, 3] = image.GetExtent()[::2]
    return Grid(tuple(image.GetDimensions()), _to_world(node, matrix_to_array(ijk_to_ras) @ start))


def _scalar_image(node, role: str) -> Image:
    try:
        return image_from_volume_node(node)
    except InputError as exc:
        raise InputError(f"{role} volume {exc}") from exc


def image_from_volume_node(node) -> Image:
    """A scalar volume node as an `Image` (a copy of its voxels, [i, j, k], world RAS geometry)."""
    grid = volume_grid(node)
    image = node.GetImageData()
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f"{node.GetName()}: expected a scalar volume, got {image.GetNumberOfScalarComponents()} "
                         "components per voxel")
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    data = voxels.reshape(grid.shape[::-1]).transpose(2, 1, 0).copy()
    return Image(data, grid, node.GetName())


def update_volume_node(node, image: Image) -> None:
    """Replace `node`'s voxels and geometry by `image` (placed in world coordinates: no parent transform)."""
    data = image.data.astype(np.uint8) if image.data.dtype == bool else image.data
    voxels = numpy_support.numpy_to_vtk(np.ascontiguousarray(data.transpose(2, 1, 0)).ravel(), deep=True)
    vtk_image = vtk.vtkImageData()
    vtk_image.SetDimensions(*image.grid.shape)
    vtk_image.GetPointData().SetScalars(voxels)
    node.SetAndObserveTransformNodeID(None)
    node.SetIJKToRASMatrix(array_to_matrix(image.grid.affine))
    node.SetAndObserveImageData(vtk_image)


def grid_transform_from_field(displacement: DisplacementField) -> vtk.vtkAbstractTransform:
    """A vtkOrientedGridTransform holding `displacement` (RAS mm vectors on its grid; §7 of the conventions).

    The displacement image has the grid's origin and spacing; its direction is set on the transform. Evaluated at a
    fixed point p it returns p + d(p), so it is a transform node's "transform from parent".
    """
    grid = displacement.grid
    vectors = np.ascontiguousarray(displacement.data.astype(np.float32).transpose(2, 1, 0, 3)).reshape(-1, 3)
    image = vtk.vtkImageData()
    image.SetOrigin(*grid.origin)
    image.SetSpacing(*grid.spacing)
    image.SetDimensions(*grid.shape)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(vectors, deep=True))
    direction = np.eye(4)
    direction[:3, :3] = grid.direction
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(image)
    transform.SetGridDirectionMatrix(array_to_matrix(direction))
    transform.SetInterpolationModeToLinear()
    return transform


def markups_points(node) -> tuple[list[str], np.ndarray]:
    """Labels and world RAS mm positions [N, 3] of a markups node's placed control points."""
    labels, points = [], []
    for i in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(i) != slicer.vtkMRMLMarkupsNode.PositionDefined:
            continue
        position = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(i, position)
        labels.append(node.GetNthControlPointLabel(i))
        points.append(position)
    return labels, np.asarray(points, dtype=np.float64).reshape(-1, 3)


def match_landmarks(fixed_node, moving_node) -> tuple[list[str], np.ndarray, np.ndarray, str]:
    """(labels, fixed points, moving points, rule): pairs matched by label, else by order.

    Labels match when each list's labels are unique and they share at least one; unmatched points are dropped.
    Otherwise the two lists must have equal length and pair by order. Points are world RAS mm.
    """
    fixed_labels, fixed_points = markups_points(fixed_node)
    moving_labels, moving_points = markups_points(moving_node)
    for node, labels in ((fixed_node, fixed_labels), (moving_node, moving_labels)):
        if not labels:
            raise InputError(f"{node.GetName()}: no placed landmarks")
    unique = len(set(fixed_labels)) == len(fixed_labels) and len(set(moving_labels)) == len(moving_labels)
    common = [label for label in fixed_labels if label in set(moving_labels)]
    if unique and common:
        fixed_index = {label: i for i, label in enumerate(fixed_labels)}
        moving_index = {label: i for i, label in enumerate(moving_labels)}
        return (common, fixed_points[[fixed_index[c] for c in common]],
                moving_points[[moving_index[c] for c in common]], "label")
    if len(fixed_labels) != len(moving_labels):
        raise InputError(f"landmarks {fixed_node.GetName()!r} ({len(fixed_labels)}) and {moving_node.GetName()!r} "
                         f"({len(moving_labels)}) share no label and differ in number, so they cannot be matched")
    return fixed_labels, fixed_points, moving_points, "order"


@contextmanager
def _temporary_nodes(scene) -> Iterator[None]:
    """Remove every node added to `scene` inside the block (helper nodes of exports), even on error."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in reversed(added):
            if node.GetID() not in before:
                scene.RemoveNode(node)


def _segments(node) -> list[tuple[str, str]]:
    """(segment ID, name) of each segment of a segmentation node, in order."""
    segmentation = node.GetSegmentation()
    ids = vtk.vtkStringArray()
    segmentation.GetSegmentIDs(ids)
    return [(ids.GetValue(i), segmentation.GetSegment(ids.GetValue(i)).GetName())
            for i in range(ids.GetNumberOfValues())]


def _export_segments(node, segment_ids: list[str], reference_node, reference: Image) -> np.ndarray:
    """Segments `segment_ids` as one label map on `reference_node`'s grid, segment n → label n + 1."""
    if (node.GetParentTransformNode() is not reference_node.GetParentTransformNode()):
        raise InputError(f"{node.GetName()}: the segmentation and its volume {reference_node.GetName()!r} must lie "
                         "under the same transform")
    scene = node.GetScene()
    labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    with _temporary_nodes(scene):
        source = node
        if not node.GetSegmentation().ContainsRepresentation(labelmap_name):
            source = slicer.vtkMRMLSegmentationNode()
            scene.AddNode(source)
            source.GetSegmentation().DeepCopy(node.GetSegmentation())
            source.CreateBinaryLabelmapRepresentation()
        ids = vtk.vtkStringArray()
        for segment_id in segment_ids:
            ids.InsertNextValue(segment_id)
        labelmap = slicer.vtkMRMLLabelMapVolumeNode()
        scene.AddNode(labelmap)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(source, ids, labelmap,
                                                                                    reference_node):
            raise InputError(f"{node.GetName()}: its segments could not be exported as a label map")
        data = image_from_volume_node(labelmap).data
    if data.shape != reference.grid.shape:
        raise InputError(f"{node.GetName()}: exported label map {data.shape} does not match {reference.source}")
    return data.astype(np.int16)


def _labelmap_names(node, values: np.ndarray) -> dict[int, str]:
    """Names of label values from a label-map node's colour table, "Label N" where it has none."""
    display = node.GetDisplayNode()
    colors = display.GetColorNode() if display is not None else None
    names = {}
    for value in values:
        name = colors.GetColorName(int(value)) if colors is not None else ""
        names[int(value)] = name if name and name != "(none)" else f"Label {int(value)}"
    return names


def labels_from_nodes(fixed_node, moving_node, fixed_volume, moving_volume, fixed: Image,
                      moving: Image) -> tuple[Image, Image, dict[int, str]]:
    """Two segmentations (matched by segment name, else by order) or two label maps (matched by value) as label
    maps on the grids of `fixed`/`moving`, with a name per label value."""
    kinds = {n.IsA("vtkMRMLSegmentationNode") for n in (fixed_node, moving_node)}
    if len(kinds) != 1:
        raise InputError("give two segmentations or two label-map volumes, not one of each")
    if kinds == {True}:
        fixed_segments, moving_segments = _segments(fixed_node), _segments(moving_node)
        for node, segments in ((fixed_node, fixed_segments), (moving_node, moving_segments)):
            if not segments:
                raise InputError(f"{node.GetName()}: the segmentation has no segments")
        moving_by_name = {name: segment_id for segment_id, name in moving_segments}
        pairs = [(fid, moving_by_name[name], name) for fid, name in fixed_segments if name in moving_by_name]
        if not pairs:
            if len(fixed_segments) != len(moving_segments):
                raise InputError(f"segmentations {fixed_node.GetName()!r} and {moving_node.GetName()!r} share no "
                                 "segment name and differ in number, so they cannot be matched")
            pairs = [(f[0], m[0], f[1]) for f, m in zip(fixed_segments, moving_segments)]
        fixed_data = _export_segments(fixed_node, [p[0] for p in pairs], fixed_volume, fixed)
        moving_data = _export_segments(moving_node, [p[1] for p in pairs], moving_volume, moving)
        names = {n + 1: pair[2] for n, pair in enumerate(pairs)}
        return (Image(fixed_data, fixed.grid, fixed_node.GetName()), Image(moving_data, moving.grid,
                                                                           moving_node.GetName()), names)
    images = []
    for node, reference in ((fixed_node, fixed), (moving_node, moving)):
        labels = image_from_volume_node(node)
        if not np.issubdtype(labels.data.dtype, np.integer):
            if not np.allclose(labels.data, np.round(labels.data)):
                raise InputError(f"{node.GetName()}: label map has non-integer values")
        labels = Image(np.round(labels.data).astype(np.int32), labels.grid, labels.source)
        if not labels.grid.same_as(reference.grid, tol=1e-3):
            labels = resample_image(labels, reference.grid, order=0)
        images.append(labels)
    values = np.union1d(np.unique(images[0].data), np.unique(images[1].data))
    return images[0], images[1], _labelmap_names(fixed_node, values[values != 0])


def mask_from_node(node, fixed_volume, fixed: Image) -> Image:
    """A mask (segmentation: union of its segments; label map: nonzero voxels) on the fixed grid."""
    if node.IsA("vtkMRMLSegmentationNode"):
        segments = _segments(node)
        if not segments:
            raise InputError(f"{node.GetName()}: the mask segmentation has no segments")
        data = _export_segments(node, [s[0] for s in segments], fixed_volume, fixed) != 0
        return Image(data.astype(np.uint8), fixed.grid, node.GetName())
    labels = image_from_volume_node(node)
    if not labels.grid.same_as(fixed.grid, tol=1e-3):
        labels = resample_image(labels, fixed.grid, order=0)
    return Image((labels.data != 0).astype(np.uint8), fixed.grid, node.GetName())


# -------------------------------------------------------------------------------------------------- API


NODE_OUTPUTS = tuple(spec for spec in OUTPUTS if spec.node_class)
"""The outputs that become MRML nodes, in build order."""


class Outputs:
    """Which outputs to produce, by `OUTPUTS` key: True = a new node, False = none, a node = overwrite that node.

    Unset keys take each output's `slicer_default`. `affine` applies to methods with an affine part (jad), the tables
    when segmentations/landmarks are given; `segmentChart` and `residuals` always create new nodes; `comparison`
    appends a row to the scene's comparison table (`comparison_table`), creating it on the first run.
    """

    def __init__(self, **choices: Any) -> None:
        known = {spec.key: spec for spec in NODE_OUTPUTS}
        unknown = set(choices) - set(known)
        if unknown:
            raise InputError(f"unknown output(s) {sorted(unknown)}; known: {', '.join(known)}")
        for key, choice in choices.items():
            if not isinstance(choice, bool) and choice is not None and not known[key].chosen:
                raise InputError(f"output {key}: always a new node; give True or False")
        self.choices = {spec.key: spec.slicer_default for spec in NODE_OUTPUTS} | choices

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["choices"][key]
        except KeyError:
            raise AttributeError(key) from None


@dataclass
class PreparedJob:
    """A job read from the scene, with what is needed to turn its result back into nodes."""

    job: RegistrationJob
    fixedVolumeNode: Any
    movingVolumeNode: Any
    inputNodes: list
    labelNames: dict[int, str] = field(default_factory=dict)
    landmarkLabels: list[str] = field(default_factory=list)
    landmarkMatch: str = ""


@dataclass
class RegistrationNodes:
    """The nodes a registration produced, by `OUTPUTS` key (attribute access; None where not requested or not
    applicable; `residuals` a list of line nodes), its result and metrics, and the rows of its tables:
    `segmentRows` (one dict per segment) and `landmarkReport` (labels, matching rule, TRE before/after, mapped
    points, summary statistics)."""

    result: Any
    nodes: dict[str, Any] = field(default_factory=dict)
    segmentRows: list[dict[str, Any]] = field(default_factory=list)
    landmarkReport: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self):
        return self.result.metrics

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__") or key not in {spec.key for spec in NODE_OUTPUTS}:
            raise AttributeError(key)
        return self.__dict__["nodes"].get(key, [] if key == "residuals" else None)


class MRMLLogic:
    """Registration of two volume nodes with a DeepRegistration method, usable without the GUI.

    Example::

        options = RegistrationOptions(method="lapirn")
        nodes = MRMLLogic().registerVolumes(fixedNode, movingNode, options, fixedSegmentation=segF,
                                            movingSegmentation=segM)
        movingNode.SetAndObserveTransformNodeID(nodes.transform.GetID())   # shows moving aligned to fixed
    """

    def registerVolumes(self, fixedVolumeNode, movingVolumeNode, options: RegistrationOptions | None = None, *,
                        outputs: Outputs | None = None, transformDisplay: str = "none",
                        progress: Callable[[str, float], None] | None = None,
                        cancel: Callable[[], bool] | None = None, **inputs) -> RegistrationNodes:
        """Register in this process and create the outputs; `inputs` are the keyword inputs of `prepareJob`.

        Raises InputError (bad input or output choice), ResourceError, or Cancelled when `cancel()` turns True; in
        each case the scene is left as it was.
        """
        outputs = outputs or Outputs()
        prepared = self.prepareJob(fixedVolumeNode, movingVolumeNode, options, **inputs)
        self.checkOutputs(prepared, outputs)
        result = run_job(prepared.job, progress, cancel)
        return self.createOutputs(prepared, result, outputs, transformDisplay)

    def prepareJob(self, fixedVolumeNode, movingVolumeNode, options: RegistrationOptions | None = None, *,
                   fixedSegmentation=None, movingSegmentation=None, fixedLandmarks=None, movingLandmarks=None,
                   fixedGuidance=None, movingGuidance=None, fixedMask=None, movingMask=None) -> PreparedJob:
        """Read the inputs from the scene into a `RegistrationJob` (copies; the nodes are only read).

        Segmentations: two `vtkMRMLSegmentationNode`s or two `vtkMRMLLabelMapVolumeNode`s. Landmarks (scored) and
        guidance points (steering the refinement, never scored): two markups fiducial nodes each, matched by label,
        else by order. `fixedMask`/`movingMask`: a segmentation or label map on its image, where the refinement
        compares the images; Jacobian statistics are also reported inside the fixed one.
        """
        check_volume_pair(fixedVolumeNode, movingVolumeNode)
        options = options or RegistrationOptions()
        check_weights(options)
        fixed, moving = (_scalar_image(fixedVolumeNode, "fixed"), _scalar_image(movingVolumeNode, "moving"))
        job = RegistrationJob(fixed, moving, options)
        prepared = PreparedJob(job, fixedVolumeNode, movingVolumeNode, [fixedVolumeNode, movingVolumeNode])
        if (fixedSegmentation is None) != (movingSegmentation is None):
            raise InputError("give both fixed and moving segmentations, or neither")
        if fixedSegmentation is not None:
            job.fixed_labels, job.moving_labels, prepared.labelNames = labels_from_nodes(
                fixedSegmentation, movingSegmentation, fixedVolumeNode, movingVolumeNode, fixed, moving)
            prepared.inputNodes += [fixedSegmentation, movingSegmentation]
        if (fixedLandmarks is None) != (movingLandmarks is None):
            raise InputError("give both fixed and moving landmarks, or neither")
        if fixedLandmarks is not None:
            labels, job.fixed_points, job.moving_points, prepared.landmarkMatch = match_landmarks(fixedLandmarks,
                                                                                                  movingLandmarks)
            prepared.landmarkLabels = labels
            prepared.inputNodes += [fixedLandmarks, movingLandmarks]
        if (fixedGuidance is None) != (movingGuidance is None):
            raise InputError("give both fixed and moving guidance points, or neither")
        if fixedGuidance is not None:
            _, job.guidance_fixed_points, job.guidance_moving_points, _ = match_landmarks(fixedGuidance,
                                                                                          movingGuidance)
            prepared.inputNodes += [fixedGuidance, movingGuidance]
        for node, volume, image, name in ((fixedMask, fixedVolumeNode, fixed, "fixed_mask"),
                                          (movingMask, movingVolumeNode, moving, "moving_mask")):
            if node is not None:
                setattr(job, name, mask_from_node(node, volume, image))
                prepared.inputNodes.append(node)
        return prepared

    def checkOutputs(self, prepared: PreparedJob, outputs: Outputs) -> None:
        """InputError when a chosen output node is an input, is chosen twice, or has the wrong class."""
        chosen = {}
        for spec in NODE_OUTPUTS:
            node = getattr(outputs, spec.key)
            if isinstance(node, bool) or node is None:
                continue
            kind = spec.accepts or spec.node_class
            if node.GetScene() is None:
                raise InputError(f"output {spec.key}: {node.GetName()!r} is no longer in the scene; choose another "
                                 "node or create a new one")
            if not node.IsA(kind) or (kind == "vtkMRMLScalarVolumeNode" and node.IsA("vtkMRMLLabelMapVolumeNode")):
                raise InputError(f"output {spec.key}: {node.GetName()!r} is not a {kind}")
            if any(node is n for n in prepared.inputNodes):
                raise InputError(f"output {spec.key}: {node.GetName()!r} is an input; choose another node or create "
                                 "a new one")
            for input_node in prepared.inputNodes:
                parent = input_node.GetParentTransformNode()
                while parent is not None:
                    if parent is node:
                        raise InputError(f"output {spec.key}: {node.GetName()!r} transforms the input "
                                         f"{input_node.GetName()!r}; choose another node or create a new one")
                    parent = parent.GetParentTransformNode()
            if id(node) in chosen:
                raise InputError(f"outputs {chosen[id(node)]} and {spec.key} are the same node {node.GetName()!r}")
            chosen[id(node)] = spec.key

    def createOutputs(self, prepared: PreparedJob, result, outputs: Outputs | None = None,
                      transformDisplay: str = "none") -> RegistrationNodes:
        """Turn an engine result into nodes; all-or-nothing for the nodes this call adds."""
        outputs = outputs or Outputs()
        if transformDisplay not in TRANSFORM_DISPLAY_MODES:
            raise InputError(f"unknown transform display {transformDisplay!r}; use one of "
                             f"{', '.join(TRANSFORM_DISPLAY_MODES)}")
        for node in prepared.inputNodes:
            if node.GetScene() is None:
                raise InputError(f"{node.GetName()!r} was removed from the scene during the registration; nothing "
                                 "was created")
        self.checkOutputs(prepared, outputs)
        scene = prepared.fixedVolumeNode.GetScene()
        before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        folders_before = _folder_items(hierarchy)
        try:
            nodes = _OutputBuilder(prepared, result, outputs, scene, hierarchy).build(transformDisplay)
        except BaseException:
            for folder in _folder_items(hierarchy) - folders_before:
                hierarchy.RemoveItem(folder, False, False)
            for node in [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())][::-1]:
                if node.GetID() not in before:
                    scene.RemoveNode(node)
            raise
        return nodes


def _folder_items(hierarchy) -> set[int]:
    items = vtk.vtkIdList()
    hierarchy.GetItemChildren(hierarchy.GetSceneItemID(), items, True)
    return {items.GetId(i) for i in range(items.GetNumberOfIds())
            if hierarchy.GetItemDataNode(items.GetId(i)) is None}


def setup_transform_display(transformNode, mode: str, regionNode=None) -> None:
    """Show a transform as "glyph" (arrows), "grid" (deformed grid) or "contour" (displacement iso-lines) in slice
    and 3D views, over `regionNode` (normally the fixed volume); "none" hides it."""
    if mode not in TRANSFORM_DISPLAY_MODES:
        raise InputError(f"unknown transform display {mode!r}; use one of {', '.join(TRANSFORM_DISPLAY_MODES)}")
    transformNode.CreateDefaultDisplayNodes()
    display = transformNode.GetDisplayNode()
    if mode == "none":
        display.SetVisibility(False)
        return
    modes = {"glyph": display.VIS_MODE_GLYPH, "grid": display.VIS_MODE_GRID, "contour": display.VIS_MODE_CONTOUR}
    display.SetVisualizationMode(modes[mode])
    if regionNode is not None:
        display.SetAndObserveRegionNode(regionNode)
    display.SetVisibility(True)
    display.SetVisibility2D(True)
    display.SetVisibility3D(True)


def jacobian_color_node(scene):
    """The shared diverging colour table (blue < 1 < red, white at the centre) for det J volumes."""
    existing = scene.GetSingletonNode(JACOBIAN_COLOR_TAG, "vtkMRMLColorTableNode")
    if existing is not None:
        return existing
    node = slicer.vtkMRMLColorTableNode()
    node.SetName("DeepRegistration Jacobian")
    node.SetSingletonTag(JACOBIAN_COLOR_TAG)
    node.SetTypeToUser()
    count = 256
    node.SetNumberOfColors(count)
    blue, white, red = np.array([0.23, 0.30, 0.75]), np.ones(3), np.array([0.71, 0.02, 0.15])
    for i in range(count):
        t = i / (count - 1)
        rgb = blue + (white - blue) * (2 * t) if t <= 0.5 else white + (red - white) * (2 * t - 1)
        node.SetColor(i, f"{JACOBIAN_RANGE[0] + t * (JACOBIAN_RANGE[1] - JACOBIAN_RANGE[0]):.3f}", *rgb, 1.0)
    scene.AddNode(node)
    return node


def add_jacobian_legend(node):
    """A colour legend (Slicer's vtkMRMLColorLegendDisplayNode) for a det J volume, shown in slice views, titled and
    labelled over `JACOBIAN_RANGE`; the existing one is reused."""
    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(node)
    if legend is None:
        legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(node)
    if legend is None:
        return None
    legend.SetTitleText("det J")
    legend.SetLabelFormat("%.2f")
    legend.SetNumberOfLabels(5)
    legend.SetVisibility(True)
    legend.SetVisibility2D(True)
    return legend


def comparison_table(scene, create: bool = False):
    """The scene's comparison table (one row per registration), created with `COMPARISON_COLUMNS` if `create`."""
    tables = scene.GetNodesByClass("vtkMRMLTableNode")
    for i in range(tables.GetNumberOfItems()):
        node = tables.GetItemAsObject(i)
        if node.GetAttribute(COMPARISON_ATTRIBUTE):
            return node
    if not create:
        return None
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName("DeepRegistration comparison"))
    node.SetAttribute(COMPARISON_ATTRIBUTE, "1")
    _fill_table(node, [(name, [], unit) for name, unit in COMPARISON_COLUMNS])
    return node


def comparison_row(result, run: str, moving: str, fixed: str, landmark_report: dict | None = None) -> dict:
    """The comparison-table values of one registration (`COMPARISON_COLUMNS`), by column name."""
    metrics = result.metrics
    run_info = metrics.run
    preset = run_info.options.preset if run_info is not None else None
    labels, marks = metrics.labels, metrics.landmarks
    nan = float("nan")
    weights = run_info.options.weights if run_info is not None else None
    return {"Run": run, "Moving": moving, "Fixed": fixed, "Method": result.method,
            "Model": Path(weights).name if weights else "shipped", "Preset": str(preset) if preset else "—",
            "Dice": labels.after.mean_dice if labels is not None else nan,
            "HD95": labels.after.mean_hd95 if labels is not None else nan,
            "TRE": marks.mean_after if marks is not None else nan,
            "Folding": metrics.jacobian.percent_nonpositive, "SDlogJ": metrics.jacobian.sdlogj,
            "Time": run_info.time_s.get("total", nan) if run_info is not None else nan}


def add_comparison_row(table_node, row: dict) -> None:
    """Append `row` (from `comparison_row`) to a comparison table."""
    table = table_node.GetTable()
    index = table.GetNumberOfRows()
    table.InsertNextBlankRow()
    for column, (name, unit) in enumerate(COMPARISON_COLUMNS):
        value = row[name]
        table.SetValue(index, column, vtk.vtkVariant(str(value) if unit is None else float(value)))
    table_node.Modified()


def table_values(table_node) -> list[dict[str, Any]]:
    """The rows of a table node as dicts of Python values (text columns as str, numeric ones as float)."""
    table = table_node.GetTable()
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    rows = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for c, name in enumerate(names):
            value = table.GetValue(r, c)
            row[name] = value.ToString() if value.IsString() else value.ToDouble()
        rows.append(row)
    return rows


def _slice_composite_nodes(scene) -> list:
    nodes = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]


def _unit_intensities(node) -> np.ndarray:
    """A volume's voxels mapped from its 1st…99th percentile to [0, 1], so two volumes of different intensity scales
    (or modalities) can be shown side by side."""
    data = image_from_volume_node(node).data.astype(np.float32)
    low, high = np.percentile(data, (1.0, 99.0))
    return np.clip((data - low) / max(float(high - low), 1e-12), 0.0, 1.0)


def checkerboard_volume(fixedNode, warpedNode, tiles: int = 8):
    """A volume alternating blocks of the fixed and the warped volume (each scaled by `_unit_intensities`, so the
    blocks are comparable), `tiles` blocks along each axis; one per warped volume, updated when shown again."""
    fixed, warped = image_from_volume_node(fixedNode), image_from_volume_node(warpedNode)
    if not fixed.grid.same_as(warped.grid, tol=1e-3):
        raise InputError(f"{warpedNode.GetName()!r} does not lie on the grid of {fixedNode.GetName()!r}; the "
                         "checkerboard compares a warped volume with its fixed volume")
    a, b = _unit_intensities(fixedNode), _unit_intensities(warpedNode)
    blocks = [np.arange(n) * tiles // max(n, 1) for n in fixed.grid.shape]
    parity = (blocks[0][:, None, None] + blocks[1][None, :, None] + blocks[2][None, None, :]) % 2 == 0
    scene = warpedNode.GetScene()
    node = warpedNode.GetNodeReference("DeepRegistration.checkerboard")
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                       scene.GenerateUniqueName(f"{warpedNode.GetName()} checkerboard"))
        warpedNode.SetNodeReferenceID("DeepRegistration.checkerboard", node.GetID())
    update_volume_node(node, Image(np.where(parity, a, b).astype(np.float32), fixed.grid, node.GetName()))
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    return node


def show_comparison(fixedNode, warpedNode, mode: str):
    """Show the fixed volume against the warped one in every slice view of the scene:

    - "overlay": warped over fixed at 50 % opacity;
    - "checkerboard": alternating blocks of both (`checkerboard_volume`) as the background;
    - "difference": fixed minus warped, by the slice views' own "subtract" layer compositing;
    - "flicker": warped over fixed at full opacity; `flicker_step` toggles it (the widget calls it on a timer).
    Returns the checkerboard volume for "checkerboard", else None.
    """
    if mode not in COMPARE_MODES:
        raise InputError(f"unknown comparison {mode!r}; use one of {', '.join(COMPARE_MODES)}")
    scene = fixedNode.GetScene()
    board = checkerboard_volume(fixedNode, warpedNode) if mode == "checkerboard" else None
    for composite in _slice_composite_nodes(scene):
        wasModified = composite.StartModify()
        if board is not None:
            composite.SetBackgroundVolumeID(board.GetID())
            composite.SetForegroundVolumeID(None)
        else:
            composite.SetBackgroundVolumeID(fixedNode.GetID())
            composite.SetForegroundVolumeID(warpedNode.GetID())
        composite.SetForegroundOpacity(0.5 if mode == "overlay" else 1.0)
        composite.SetCompositing(composite.Subtract if mode == "difference" else composite.Alpha)
        composite.EndModify(wasModified)
    return board


def flicker_step(scene) -> float:
    """Toggle the foreground layer of every slice view between hidden and shown; returns the new opacity."""
    composites = _slice_composite_nodes(scene)
    opacity = 0.0 if composites and composites[0].GetForegroundOpacity() > 0.5 else 1.0
    for composite in composites:
        composite.SetForegroundOpacity(opacity)
    return opacity


def _fill_table(table_node, columns: list[tuple[str, list, str]]) -> None:
    """Replace a table's columns by `columns`: (name, values, unit); string columns have unit None."""
    table_node.RemoveAllColumns()
    for name, values, unit in columns:
        array = vtk.vtkStringArray() if unit is None else vtk.vtkDoubleArray()
        array.SetName(name)
        for value in values:
            array.InsertNextValue(str(value) if unit is None else float(value))
        table_node.AddColumn(array)
        if unit:
            table_node.SetColumnUnitLabel(name, unit)
    table_node.Modified()


class _OutputBuilder:
    """Creates or fills the output nodes of one registration (see `MRMLLogic.createOutputs`): for each output of
    `NODE_OUTPUTS` that the result has, the method named by its `build` fills the node `node()` gives it."""

    def __init__(self, prepared: PreparedJob, result, outputs: Outputs, scene, hierarchy) -> None:
        self.prepared, self.result, self.outputs, self.scene, self.hierarchy = prepared, result, outputs, scene, \
            hierarchy
        self.method = result.method
        self.fixedName = prepared.fixedVolumeNode.GetName()
        self.movingName = prepared.movingVolumeNode.GetName()
        self.tag = f"{self.movingName} to {self.fixedName} ({self.method})"
        self.names = {"transform": self.tag, "inverse": f"{self.fixedName} to {self.movingName} ({self.method})",
                      "affine": f"{self.tag} affine", "warped": f"{self.movingName} warped ({self.method})",
                      "jacobian": f"{self.movingName} Jacobian ({self.method})",
                      "folding": f"{self.movingName} folding ({self.method})",
                      "segmentTable": f"{self.movingName} segment metrics ({self.method})",
                      "segmentChart": f"{self.movingName} Dice ({self.method})",
                      "landmarkTable": f"{self.movingName} landmark TRE ({self.method})",
                      "residuals": f"{self.movingName} landmark residuals ({self.method})",
                      "comparison": "DeepRegistration comparison"}
        self.built = RegistrationNodes(result)
        self.transformDisplay = "none"

    def node(self, key: str):
        """The output node for `key`: the chosen one, a new one, or None when not requested."""
        choice = getattr(self.outputs, key)
        if choice is False or choice is None:
            return None
        if choice is True:
            spec = next(s for s in NODE_OUTPUTS if s.key == key)
            return self.scene.AddNewNodeByClass(spec.node_class, self.scene.GenerateUniqueName(self.names[key]))
        return choice

    def item(self, node) -> int:
        """The subject hierarchy item of `node` (created where no subject hierarchy plugin made one)."""
        item = self.hierarchy.GetItemByDataNode(node)
        return item or self.hierarchy.CreateItem(self.hierarchy.GetSceneItemID(), node)

    def build(self, transformDisplay: str) -> RegistrationNodes:
        self.transformDisplay = transformDisplay
        if self.result.metrics.labels is not None and self.prepared.labelNames:
            self.built.segmentRows = self.segment_rows()
        if self.result.metrics.landmarks is not None and self.prepared.landmarkLabels:
            self.built.landmarkReport = self.landmark_report()
        for spec in NODE_OUTPUTS:
            value = spec.value(self.result)
            if value is None:
                continue
            built = getattr(self, spec.build)(spec.key, value)
            if built is not None:
                self.built.nodes[spec.key] = built
        return self.built

    def reference(self, node) -> None:
        node.SetNodeReferenceID("fixedVolume", self.prepared.fixedVolumeNode.GetID())
        node.SetNodeReferenceID("movingVolume", self.prepared.movingVolumeNode.GetID())
        node.SetAttribute("DeepRegistration.method", self.method)
        node.SetAttribute("DeepRegistration.modelSha256", str(self.result.model_sha256))

    def transform(self, key: str, displacement: DisplacementField):
        node = self.node(key)
        if node is None:
            return None
        node.SetAndObserveTransformNodeID(None)
        node.SetAndObserveTransformFromParent(grid_transform_from_field(displacement))
        self.reference(node)
        if key == "transform":
            setup_transform_display(node, self.transformDisplay, self.prepared.fixedVolumeNode)
        return node

    def affine(self, key: str, affine_ras: np.ndarray):
        """jad's affine stage alone, as a linear transform (fixed point → moving point, "from parent").

        It is informational: the grid transform already contains it. It sits at the top of the transform hierarchy
        (nesting it would apply the affine twice) and under the grid transform in the subject hierarchy.
        """
        node = self.node(key)
        if node is None:
            return None
        node.SetAndObserveTransformNodeID(None)
        node.SetMatrixTransformFromParent(array_to_matrix(affine_ras))
        self.reference(node)
        grid_node = self.built.nodes.get("transform")
        if grid_node is not None:
            self.hierarchy.SetItemParent(self.item(node), self.item(grid_node))
        return node

    def volume(self, key: str, image: Image):
        node = self.node(key)
        if node is None:
            return None
        update_volume_node(node, Image(image.data.astype(np.float32), image.grid, image.source))
        node.CreateDefaultDisplayNodes()
        return node

    def warped(self, key: str, image: Image):
        """The warped moving volume, shown with the moving volume's colour map and window/level."""
        node = self.volume(key, image)
        if node is None:
            return None
        source_display, target_display = self.prepared.movingVolumeNode.GetDisplayNode(), node.GetDisplayNode()
        if source_display is not None and target_display is not None:
            target_display.SetAndObserveColorNodeID(source_display.GetColorNodeID())
            target_display.SetAutoWindowLevel(source_display.GetAutoWindowLevel())
            if not source_display.GetAutoWindowLevel():
                target_display.SetWindowLevel(source_display.GetWindow(), source_display.GetLevel())
        return node

    def jacobian(self, key: str, image: Image):
        """det J on the fixed grid, in the diverging Jacobian colour table over `JACOBIAN_RANGE`."""
        node = self.volume(key, image)
        if node is None:
            return None
        display = node.GetDisplayNode()
        display.SetAndObserveColorNodeID(jacobian_color_node(self.scene).GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(*JACOBIAN_RANGE)
        add_jacobian_legend(node)
        return node

    def folding(self, key: str, folding: Image):
        """A segmentation with one segment: the fixed-grid voxels where det J ≤ 0 (empty when nothing folds)."""
        node = self.node(key)
        if node is None:
            return None
        node.SetAndObserveTransformNodeID(None)
        segmentation = node.GetSegmentation()
        segmentation.RemoveAllSegments()
        segmentation.SetSourceRepresentationName(
            slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
        mask = np.ascontiguousarray(folding.data.astype(np.uint8).transpose(2, 1, 0)).ravel()
        labelmap = slicer.vtkOrientedImageData()
        labelmap.SetDimensions(*folding.grid.shape)
        labelmap.GetPointData().SetScalars(numpy_support.numpy_to_vtk(mask, deep=True))
        labelmap.SetImageToWorldMatrix(array_to_matrix(folding.grid.affine))
        segment = slicer.vtkSegment()
        segment.SetName("Folding (det J ≤ 0)")
        segment.SetColor(1.0, 0.9, 0.0)
        segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), labelmap)
        segmentation.AddSegment(segment, FOLDING_SEGMENT_ID)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetVisibility2DFill(False)  # outlined, so the anatomy under a folded region stays visible
        display.SetVisibility2DOutline(True)
        display.SetSliceIntersectionThickness(2)
        return node

    def segment_rows(self) -> list[dict[str, Any]]:
        """Per-segment Dice, HD95, ASSD before/after and volume change, for the segments the inputs named."""
        labels = self.result.metrics.labels
        rows = []
        for value in sorted(self.prepared.labelNames):
            before = labels.before.per_label.get(str(value))
            after = labels.after.per_label.get(str(value))
            if before is None or after is None:
                continue
            rows.append({"segment": self.prepared.labelNames[value], "label": value,
                         "dice_before": before.dice, "dice_after": after.dice,
                         "hd95_before": before.hd95, "hd95_after": after.hd95,
                         "assd_before": before.assd, "assd_after": after.assd,
                         "volume_change": labels.volume_change.get(str(value), float("nan"))})
        return rows

    def segment_table(self, key: str, labels):
        rows = self.built.segmentRows
        table = self.node(key) if rows else None
        if table is None:
            return None
        columns = [("Segment", [r["segment"] for r in rows], None), ("Label", [r["label"] for r in rows], "")]
        for name, title, unit in (("dice_before", "Dice before", ""), ("dice_after", "Dice after", ""),
                                  ("hd95_before", "HD95 before", "mm"), ("hd95_after", "HD95 after", "mm"),
                                  ("assd_before", "ASSD before", "mm"), ("assd_after", "ASSD after", "mm"),
                                  ("volume_change", "Volume change", "after/before")):
            columns.append((title, [r[name] for r in rows], unit))
        _fill_table(table, columns)
        return table

    def dice_chart(self, key: str, labels):
        """A bar chart of Dice before and after per segment, from the segment table (none without the table)."""
        table = self.built.nodes.get("segmentTable")
        if table is None:
            return None
        chart = self.node(key)
        if chart is None:
            return None
        chart.SetTitle(f"Dice per segment, {self.method}")
        chart.SetXAxisTitle("Segment")
        chart.SetYAxisTitle("Dice")
        for column, color in (("Dice before", (0.6, 0.6, 0.6)), ("Dice after", (0.2, 0.5, 0.9))):
            series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode",
                                                  self.scene.GenerateUniqueName(f"{column} ({self.method})"))
            series.SetAndObserveTableNodeID(table.GetID())
            series.SetXColumnName("Label")
            series.SetYColumnName(column)
            series.SetLabelColumnName("Segment")
            series.SetPlotType(series.PlotTypeBar)
            series.SetColor(*color)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        return chart

    def landmark_report(self) -> dict[str, Any]:
        """TRE per landmark before/after, the fixed landmarks mapped into moving space, and summary statistics."""
        marks = self.result.metrics.landmarks
        mapped = self.result.field.map_points(self.prepared.job.fixed_points)
        return {"labels": self.prepared.landmarkLabels, "matched_by": self.prepared.landmarkMatch,
                "before": list(marks.before), "after": list(marks.after), "mapped_fixed_points": mapped.tolist(),
                "summary": marks.summary()}

    def landmark_table(self, key: str, landmarks):
        """TRE per landmark and summary (mean, std, median, max) in a table."""
        report = self.built.landmarkReport
        table = self.node(key) if report else None
        if table is None:
            return None
        summary = report["summary"]
        _fill_table(table, [("Landmark", list(report["labels"]) + list(summary), None),
                            ("TRE before", report["before"] + [v[0] for v in summary.values()], "mm"),
                            ("TRE after", report["after"] + [v[1] for v in summary.values()], "mm")])
        return table

    def residuals(self, key: str, landmarks):
        """One locked line per landmark from its mapped fixed position to its moving position, in a folder."""
        report = self.built.landmarkReport
        if not getattr(self.outputs, key) or not report:
            return None
        folder = self.hierarchy.CreateFolderItem(self.hierarchy.GetSceneItemID(),
                                                 self.hierarchy.GenerateUniqueItemName(self.names[key]))
        lines = []
        for label, start, end, before, after in zip(report["labels"], report["mapped_fixed_points"],
                                                    self.prepared.job.moving_points, report["before"],
                                                    report["after"]):
            name = f"residual {label}: {after:.1f} mm (before {before:.1f})"
            line = self.scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", self.scene.GenerateUniqueName(name))
            line.AddControlPoint(vtk.vtkVector3d(*start), f"{label} mapped")
            line.AddControlPoint(vtk.vtkVector3d(*end), f"{label} moving")
            line.SetLocked(True)
            line.SetAttribute("DeepRegistration.treBefore", f"{before:.4f}")
            line.SetAttribute("DeepRegistration.treAfter", f"{after:.4f}")
            line.CreateDefaultDisplayNodes()
            color = RESIDUAL_COLORS["improved" if after <= before else "worse"]
            line.GetDisplayNode().SetSelectedColor(*color)
            line.GetDisplayNode().SetColor(*color)
            self.hierarchy.SetItemParent(self.item(line), folder)
            lines.append(line)
        return lines

    def comparison(self, key: str, metrics):
        """One row for this run in the scene's comparison table (created by the first run)."""
        if not getattr(self.outputs, key):
            return None
        table = comparison_table(self.scene, create=True)
        add_comparison_row(table, comparison_row(self.result, self.names["transform"], self.movingName,
                                                 self.fixedName, self.built.landmarkReport))
        return table
