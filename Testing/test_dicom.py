"""DICOM series written here with SimpleITK/GDCM read as the same volume as its NIfTI twin (geometry and voxels),
oblique and with rescaled voxels, and a DICOM pair registers as the NIfTI pair does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from DeepRegistrationLib.core.dicom import AmbiguousSeries, find_series
from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.core.geometry import Grid
from DeepRegistrationLib.core.image import Image, read_image, write_image
from DeepRegistrationLib.frontends import cli
from DeepRegistrationLib.methods import models, registry

from conftest import ellipsoid_labels, phantom_image, write_dicom_series


def rotation(a: float, b: float, c: float) -> np.ndarray:
    def axis(i, t):
        m = np.eye(3)
        j, k = [x for x in range(3) if x != i]
        m[j, j] = m[k, k] = np.cos(t)
        m[j, k], m[k, j] = -np.sin(t), np.sin(t)
        return m

    return axis(0, a) @ axis(1, b) @ axis(2, c)


OBLIQUE = rotation(0.25, -0.15, 0.35)


def oblique_image(shape=(12, 10, 9), seed=0, values="float") -> Image:
    grid = Grid.from_spacing(shape, (0.9, 1.2, 2.5), (12.0, -31.0, 40.0), OBLIQUE)
    rng = np.random.default_rng(seed)
    if values == "float":  # on the lattice of slope 0.5, intercept -1024
        data = (rng.integers(0, 4000, shape) * 0.5 - 1024).astype(np.float32)
    else:
        data = rng.integers(-1000, 3000, shape).astype(np.int16)
    return Image(data, grid, "volume")


def assert_same_volume(a: Image, b: Image) -> None:
    assert a.data.shape == b.data.shape
    assert np.abs(a.grid.affine - b.grid.affine).max() < 1e-4, (a.grid.affine, b.grid.affine)
    assert np.array_equal(a.data.astype(np.float64), b.data.astype(np.float64))


def test_oblique_rescaled_series_reads_as_its_nifti_twin(tmp_path):
    """Oblique in all three angles, anisotropic, files named against slice order, Rescale Slope 0.5 and
    Intercept −1024: geometry (ijk → RAS) and voxels equal the NIfTI file of the same volume."""
    image = oblique_image()
    write_dicom_series(image, tmp_path / "series", slopes=0.5, intercept=-1024)
    nifti = read_image(write_image(image, tmp_path / "volume.nii.gz"))
    dicom = read_image(tmp_path / "series")
    assert_same_volume(dicom, nifti)
    assert "DICOM series" in dicom.source and "9 slices" in dicom.source
    one_file = read_image(tmp_path / "series" / "IM0004.dcm")  # a slice file stands for its series
    assert_same_volume(one_file, nifti)


def test_each_slice_keeps_its_own_rescale_and_integer_series_are_exact(tmp_path):
    image = oblique_image(values="int", shape=(8, 7, 6))
    write_dicom_series(image, tmp_path / "ints", modality="CT")
    assert_same_volume(read_image(tmp_path / "ints"), read_image(write_image(image, tmp_path / "i.nii.gz")))
    slopes = [1.0, 2.0, 0.5, 1.0, 2.0, 4.0]
    data = np.stack([np.random.default_rng(k).integers(0, 500, (8, 7)) * slopes[k] - 100 for k in range(6)], -1)
    varied = Image(data.astype(np.float32), image.grid, "varied")
    write_dicom_series(varied, tmp_path / "varied", slopes=slopes, intercept=-100)
    assert np.array_equal(read_image(tmp_path / "varied").data, varied.data)


def test_slice_order_comes_from_positions_not_file_names(tmp_path):
    """Files named in a shuffled order (and instance numbers with them) still give the volume in space order."""
    image = oblique_image(shape=(6, 5, 7))
    names = [f"{name}.dcm" for name in ("c", "a", "g", "e", "b", "f", "d")]
    write_dicom_series(image, tmp_path / "s", slopes=0.5, intercept=-1024, names=names)
    assert_same_volume(read_image(tmp_path / "s"), read_image(write_image(image, tmp_path / "v.nii.gz")))


def test_several_series_are_listed_and_chosen_by_uid(tmp_path):
    a, b = oblique_image(seed=1, shape=(6, 5, 4)), oblique_image(seed=2, shape=(6, 5, 4))
    write_dicom_series(a, tmp_path / "study" / "one", uid="1.2.3.4.1", slopes=0.5, intercept=-1024)
    write_dicom_series(b, tmp_path / "study" / "two", uid="1.2.3.4.2", slopes=0.5, intercept=-1024)
    assert [s.uid for s in find_series(tmp_path / "study")] == ["1.2.3.4.1", "1.2.3.4.2"]
    with pytest.raises(AmbiguousSeries, match=r"2 DICOM series found.*1\.2\.3\.4\.1 \(MR, 4 file\(s\).*1\.2\.3\.4\.2"):
        read_image(tmp_path / "study")
    assert np.array_equal(read_image(tmp_path / "study", series="1.2.3.4.2").data, b.data)
    with pytest.raises(InputError, match="no DICOM series with UID '9.9'"):
        read_image(tmp_path / "study", series="9.9")


@pytest.mark.parametrize("fault, message", [
    ("gap", "non-uniform slice spacing"),
    ("duplicate", "two slices at one position"),
    ("tilt", "not stacked along their normal"),
])
def test_broken_series_are_refused(tmp_path, fault, message):
    image = oblique_image(shape=(6, 5, 6))
    from DeepRegistrationLib.core.image import image_to_sitk

    volume = image_to_sitk(image)
    positions = [volume.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(6)]
    if fault == "gap":
        positions[3] = volume.TransformContinuousIndexToPhysicalPoint((0, 0, 3.5))
    elif fault == "duplicate":
        positions[4] = positions[3]
    else:
        positions = [volume.TransformContinuousIndexToPhysicalPoint((0.4 * k, 0, k)) for k in range(6)]
    write_dicom_series(image, tmp_path / "s", slopes=0.5, intercept=-1024, positions=positions)
    with pytest.raises(InputError, match=message):
        read_image(tmp_path / "s")


def test_multi_frame_and_single_slice_objects_are_refused(tmp_path):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.uint16)), str(tmp_path / "multi.dcm"))
    with pytest.raises(InputError, match="multi-frame .* 4 frames"):
        read_image(tmp_path / "multi.dcm")
    single = oblique_image(shape=(6, 5, 1))
    write_dicom_series(single, tmp_path / "one", slopes=0.5, intercept=-1024)
    with pytest.raises(InputError, match="single slice"):
        read_image(tmp_path / "one")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="no DICOM image series found"):
        read_image(tmp_path / "empty")


def test_a_dicom_pair_registers_as_the_nifti_pair(tmp_path):
    """The same integer-valued volumes as NIfTI files and as DICOM series (the fixed one oblique): the command
    line gives the same displacement and metrics."""
    shape = (24, 26, 20)
    grid_f = Grid.from_spacing(shape, (2.0, 1.8, 2.2), (-24.0, -23.0, -22.0), rotation(0.0, 0.0, 0.28))
    grid_m = Grid.from_spacing(shape, (2.0, 2.0, 2.0), (-23.0, -25.0, -20.0), np.eye(3))
    labels = ellipsoid_labels(shape)
    fixed = Image(np.round(phantom_image(labels)[0, 0].numpy() * 1000).astype(np.int16), grid_f, "f")
    moving_data = np.roll(fixed.data, 1, axis=0)
    moving = Image(moving_data, grid_m, "m")
    spec = registry.get_method("lapirn")
    torch.manual_seed(5)
    net = spec.build(spec.config_class(working_spacing=3.0, start_channels=2, num_res_blocks=1))
    weights = models.save_model(net, "lapirn", tmp_path / "lapirn.safetensors")
    write_image(fixed, tmp_path / "f.nii.gz")
    write_image(moving, tmp_path / "m.nii.gz")
    write_dicom_series(fixed, tmp_path / "fixed_dicom", uid="1.2.3.5.1", modality="CT")
    write_dicom_series(moving, tmp_path / "moving_dicom", uid="1.2.3.5.2", modality="CT")
    results = {}
    for kind, f, m in (("nifti", "f.nii.gz", "m.nii.gz"), ("dicom", "fixed_dicom", "moving_dicom/IM0010.dcm")):
        out = tmp_path / f"out_{kind}"
        assert cli.main(["register", "--quiet", "--preset", "fast", "--weights", str(weights), "--fixed",
                         str(tmp_path / f), "--moving", str(tmp_path / m), "--output-dir", str(out)]) == 0
        results[kind] = (read_image(out / "warped.nii.gz"), json.loads((out / "metrics.json").read_text()))
    (warped_n, metrics_n), (warped_d, metrics_d) = results["nifti"], results["dicom"]
    assert np.abs(warped_n.grid.affine - warped_d.grid.affine).max() < 1e-4
    assert np.abs(warped_n.data - warped_d.data).max() < 1e-2 * np.abs(warped_n.data).max()
    for key in ("ncc", "mi"):
        assert metrics_d["similarity"]["after"][key] == pytest.approx(metrics_n["similarity"]["after"][key], abs=1e-4)
    assert metrics_d["jacobian"]["sdlogj"] == pytest.approx(metrics_n["jacobian"]["sdlogj"], abs=1e-4)
