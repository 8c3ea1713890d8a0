"""Bad input gets a specific error naming the file; nothing is written on failure."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.core.geometry import Grid
from DeepRegistrationLib.core.image import Image, read_image, read_labels, write_image
from DeepRegistrationLib.core.resample import normalize_intensity


def save(path, data, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="nothere.nii.gz: no such file"):
        read_image(tmp_path / "nothere.nii.gz")


def test_unreadable_file(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="broken.nii.gz: cannot be read"):
        read_image(path)


@pytest.mark.parametrize("shape, dims", [((8, 9), "2D"), ((8, 9, 10, 2), "4D")])
def test_wrong_dimensionality(tmp_path, shape, dims):
    path = save(tmp_path / "img.nii.gz", np.zeros(shape, np.float32))
    with pytest.raises(InputError, match=f"img.nii.gz: expected a 3D volume, got {dims}"):
        read_image(path)


def test_trailing_singleton_is_3d(tmp_path):
    assert read_image(save(tmp_path / "img.nii.gz", np.zeros((4, 5, 6, 1), np.float32))).data.shape == (4, 5, 6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_voxels(tmp_path, bad):
    data = np.zeros((4, 5, 6), np.float32)
    data[1, 2, 3] = bad
    with pytest.raises(InputError, match="nan.nii.gz: 1 voxel"):
        read_image(save(tmp_path / "nan.nii.gz", data))


def test_label_grid_must_match_image(tmp_path):
    image = read_image(save(tmp_path / "img.nii.gz", np.zeros((4, 5, 6), np.float32)))
    labels = save(tmp_path / "lab.nii.gz", np.zeros((4, 5, 7), np.int16))
    with pytest.raises(InputError, match="lab.nii.gz: label map grid .* differs from its image .*img.nii.gz"):
        read_labels(labels, like=image)
    shifted = save(tmp_path / "lab2.nii.gz", np.zeros((4, 5, 6), np.int16), np.diag([2.0, 1, 1, 1]))
    with pytest.raises(InputError, match="lab2.nii.gz"):
        read_labels(shifted, like=image)


def test_non_integer_labels(tmp_path):
    with pytest.raises(InputError, match="non-integer"):
        read_labels(save(tmp_path / "lab.nii.gz", np.full((4, 5, 6), 0.5, np.float32)))


def test_failed_write_leaves_nothing(tmp_path):
    image = Image(np.zeros((4, 5, 6), np.float32), Grid((4, 5, 6), np.eye(4)))
    with pytest.raises(InputError, match="unsupported output format"):
        write_image(image, tmp_path / "out.mhd")
    assert list(tmp_path.iterdir()) == []


def test_ct_map_keeps_the_brain_contrast_visible():
    """Grey (40 HU) against white matter (27 HU) and CSF (8 HU) stay apart by more than CT noise after the map
    (a linear [-1000, 2000] window leaves them 0.004 apart), while air and bone stay at the ends."""
    csf, wm, gm, air, bone = normalize_intensity(np.array([8.0, 27.0, 40.0, -1000.0, 1200.0]), "ct")
    assert gm - wm > 0.05 and wm - csf > 0.05
    assert air == 0.0 and bone > 0.85


def test_constant_ct_cannot_be_normalised():
    with pytest.raises(InputError, match="ct.nii: image is constant"):
        normalize_intensity(np.full((4, 4, 4), 40.0), "ct", "ct.nii")


def test_constant_image_cannot_be_normalised():
    with pytest.raises(InputError, match="fixed.nii: image is constant"):
        normalize_intensity(np.ones((4, 4, 4)), "mr", "fixed.nii")


def test_normalisation_ranges():
    ct = normalize_intensity(np.array([-2000.0, -1000.0, 0.0, 100.0, 1050.0, 3000.0]), "ct")
    assert np.allclose(ct, [0.0, 0.0, 0.2, 0.8, 0.9, 1.0])
    mr = normalize_intensity(np.linspace(0, 100, 1001), "mr")
    assert mr.min() == 0.0 and mr.max() == 1.0
