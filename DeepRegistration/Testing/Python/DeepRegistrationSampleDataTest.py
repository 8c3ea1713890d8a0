"""Inside Slicer: the bundled ICBM152 sample pair (Resources/SampleData) through Slicer's own readers and transforms.

1. The known ground-truth field, turned into a grid transform node by the module's logic, maps every fixed landmark
   onto its moving landmark (to the file's 0.01 mm storage step), and hardening it on a clone of the moving volume
   brings the moving image onto the fixed one.
2. With the shipped LapIRN model (skipped when the build has no Resources/Models/lapirn.safetensors), the
   module's logic improves Dice and TRE and leaves its inputs unchanged.
Both need the packages the module installs on its first Apply; without them the test is skipped with the reason.
"""

from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

SAMPLE_DIR = Path(__file__).resolve().parents[3] / "Resources" / "SampleData"


class DeepRegistrationSampleDataTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        # DeepRegistrationLib needs PyTorch, nibabel, SciPy and safetensors: install them as the module's first Apply
        # does (in testing mode without asking); where that is impossible the test is skipped, saying why.
        import DeepRegistration

        problems = []
        if not DeepRegistration.setupEnvironment(problems.append):
            self.skipTest("DeepRegistration's packages are not available: " + " ".join(problems))
        self.setUp()
        self.test_GroundTruthTransform()
        self.setUp()
        self.test_ShippedModel()

    def load(self):
        fixed = slicer.util.loadVolume(str(SAMPLE_DIR / "fixed.nii.gz"))
        moving = slicer.util.loadVolume(str(SAMPLE_DIR / "moving.nii.gz"))
        fixedLabels = slicer.util.loadLabelVolume(str(SAMPLE_DIR / "fixed_labels.nii.gz"))
        movingLabels = slicer.util.loadLabelVolume(str(SAMPLE_DIR / "moving_labels.nii.gz"))
        fixedPoints = slicer.util.loadMarkups(str(SAMPLE_DIR / "fixed_landmarks.fcsv"))
        movingPoints = slicer.util.loadMarkups(str(SAMPLE_DIR / "moving_landmarks.fcsv"))
        return fixed, moving, fixedLabels, movingLabels, fixedPoints, movingPoints

    def test_GroundTruthTransform(self):
        import nibabel
        from DeepRegistrationLib.core.field import DisplacementField
        from DeepRegistrationLib.core.metrics import ncc
        from DeepRegistrationLib.frontends.mrml import (grid_transform_from_field, image_from_volume_node,
                                                      match_landmarks)

        fixed, moving, _, _, fixedPoints, movingPoints = self.load()
        fixedImage = image_from_volume_node(fixed)
        truth = np.asarray(nibabel.load(str(SAMPLE_DIR / "ground_truth_displacement.nii.gz")).dataobj, np.float32)
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode", "ground truth")
        node.SetAndObserveTransformFromParent(grid_transform_from_field(DisplacementField(truth, fixedImage.grid)))

        labels, fixedRas, movingRas, rule = match_landmarks(fixedPoints, movingPoints)
        self.assertEqual(rule, "label")
        transform = node.GetTransformFromParent()
        mapped = np.array([transform.TransformPoint(*p) for p in fixedRas])
        self.assertLess(np.abs(mapped - movingRas).max(), 0.011)

        clone = slicer.modules.volumes.logic().CloneVolume(slicer.mrmlScene, moving, "moving hardened")
        clone.SetAndObserveTransformNodeID(node.GetID())
        slicer.vtkSlicerTransformLogic().hardenTransform(clone)
        # bring the hardened clone onto the fixed grid for a voxelwise comparison
        resample = vtk.vtkImageReslice()
        chain = vtk.vtkGeneralTransform()
        chain.PostMultiply()
        fixedToRas, rasToClone = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        fixed.GetIJKToRASMatrix(fixedToRas)
        clone.GetRASToIJKMatrix(rasToClone)
        chain.Concatenate(fixedToRas)
        chain.Concatenate(rasToClone)
        source = vtk.vtkImageData()
        source.DeepCopy(clone.GetImageData())
        source.SetOrigin(0, 0, 0)  # the node's IJK-to-RAS holds the geometry
        source.SetSpacing(1, 1, 1)
        resample.SetInputData(source)
        resample.SetResliceTransform(chain)
        resample.SetInterpolationModeToLinear()
        resample.SetOutputExtent(fixed.GetImageData().GetExtent())
        resample.Update()
        onFixed = numpy_support.vtk_to_numpy(resample.GetOutput().GetPointData().GetScalars())
        fixedArray = slicer.util.arrayFromVolume(fixed).ravel()
        before = ncc(fixedArray, slicer.util.arrayFromVolume(moving).ravel())
        after = ncc(fixedArray, onFixed)
        self.assertLess(1.0 - after, 0.3 * (1.0 - before))  # headless check with slicer-core: 0.968 -> 0.996
        self.delayDisplay(f"Ground truth: landmarks within 0.011 mm; NCC {before:.3f} -> {after:.3f}")

    def test_ShippedModel(self):
        from DeepRegistrationLib.methods.registry import get_method

        if not get_method("lapirn").weights_path.is_file():
            self.skipTest("no shipped lapirn model in Resources/Models")
        import DeepRegistration
        from DeepRegistrationLib.engine.options import RegistrationOptions

        fixed, moving, fixedLabels, movingLabels, fixedPoints, movingPoints = self.load()
        movingBefore = slicer.util.arrayFromVolume(moving).copy()
        nodes = DeepRegistration.DeepRegistrationLogic().mrmlLogic().registerVolumes(
            fixed, moving, RegistrationOptions(method="lapirn"), fixedSegmentation=fixedLabels,
            movingSegmentation=movingLabels, fixedLandmarks=fixedPoints, movingLandmarks=movingPoints)
        labels = nodes.metrics.labels
        self.assertGreater(labels.after.mean_dice, labels.before.mean_dice)
        summary = nodes.landmarkReport["summary"]
        self.assertLess(summary["mean"][1], summary["mean"][0])
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(moving), movingBefore))
        self.delayDisplay(f"Shipped LapIRN: Dice {labels.before.mean_dice:.3f} -> "
                          f"{labels.after.mean_dice:.3f}, TRE {summary['mean'][0]:.2f} -> "
                          f"{summary['mean'][1]:.2f} mm")
