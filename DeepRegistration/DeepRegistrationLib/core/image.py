"""Volumes with geometry, and their reading and writing (NIfTI, NRRD, MHA/MHD, MGZ; DICOM series read).

Arrays are indexed [i, j, k]; geometry is a `Grid` in RAS mm. ITK formats store LPS and are converted at this
boundary (docs/CONVENTIONS.md §1-§2). Writes go to a temporary file that is renamed into place. A gzip-compressed
input (.nii.gz, .mgz) is checked whole (CRC and length) before it is read: readers stop at the last voxel and
would not see a corrupt end.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from .dicom import DICOM_SUFFIXES, is_dicom_file, read_dicom
from .errors import InputError
from .geometry import Grid

ITK_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
MGH_SUFFIXES = (".mgz", ".mgh")
WRITE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mgz", ".mgh")
"""Single-file formats only, so a write can be made atomic."""


@dataclass
class Image:
    """A scalar volume `data` [I, J, K] on `grid`; `source` names where it came from (for error messages)."""

    data: np.ndarray
    grid: Grid
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if self.data.shape != self.grid.shape:
            raise InputError(f"{self.source}: array shape {self.data.shape} differs from grid {self.grid.shape}")


def suffix_of(path: str | os.PathLike) -> str:
    """The format suffix, double ones such as `.nii.gz` included, lower case."""
    name = Path(path).name.lower()
    for suffix in ITK_SUFFIXES + MGH_SUFFIXES + (".h5", ".hdf5", ".tfm"):
        if name.endswith(suffix):
            return suffix
    return Path(path).suffix.lower()


def _squeeze_to_3d(array: np.ndarray, source: str) -> np.ndarray:
    """Drop trailing singleton dimensions; anything but 3D is an error naming the file."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InputError(f"{source}: expected a 3D volume, got {array.ndim}D with shape {array.shape}")
    return array


def sitk_to_image(img: sitk.Image, source: str) -> Image:
    """A SimpleITK scalar 3D image (LPS) to an `Image` (RAS, [i, j, k])."""
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{source}: expected a scalar volume, got {img.GetNumberOfComponentsPerPixel()} "
                         "components per voxel")
    if img.GetDimension() != 3:
        if img.GetDimension() == 4 and img.GetSize()[3] == 1:
            img = img[:, :, :, 0]
        else:
            raise InputError(f"{source}: expected a 3D volume, got {img.GetDimension()}D of size {img.GetSize()}")
    data = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    grid = Grid.from_lps(img.GetSize(), img.GetOrigin(), img.GetSpacing(), img.GetDirection())
    return Image(np.ascontiguousarray(data), grid, source)


def image_to_sitk(image: Image) -> sitk.Image:
    """An `Image` to a SimpleITK image with LPS origin and direction."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(image.data.transpose(2, 1, 0)))
    origin, spacing, direction = image.grid.to_lps()
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetSpacing(tuple(float(v) for v in spacing))
    img.SetDirection(tuple(float(v) for v in direction.flatten()))
    return img


GZIP_SUFFIXES = (".gz", ".mgz")


def check_gzip(path: Path) -> None:
    """InputError naming `path` when its gzip stream is truncated or fails its CRC (the whole file is read)."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 22):
                pass
    except gzip.BadGzipFile as exc:
        if str(exc).startswith("Not a gzipped file"):
            raise InputError(f"{path}: cannot be read as an image: not gzip data although its name says so") \
                from None
        raise InputError(f"{path}: cannot be read as an image: corrupt gzip data ({exc}); the file is damaged") \
            from None
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: cannot be read as an image: corrupt gzip data ({exc}); the file is damaged or "
                         "was cut short") from None


def read_image(path: str | os.PathLike, *, allow_nonfinite: bool = False, series: str | None = None) -> Image:
    """Read a 3D scalar volume: an image file, or a DICOM series (a folder, or one of its slice files; `series`
    chooses a Series Instance UID when the folder holds several, `core.dicom`). Errors (InputError) name the file:
    missing, unreadable, corrupt, not 3D, NaN/inf voxels."""
    path = Path(path)
    source = str(path)
    if path.is_dir() or is_dicom_file(path):
        img, source = read_dicom(path, series)
        return _finite(sitk_to_image(img, source), allow_nonfinite)
    if series is not None:
        raise InputError(f"{source}: a DICOM series UID was given, but this is not a DICOM folder or file")
    if not path.exists():
        raise InputError(f"{source}: no such file")
    if not path.is_file():
        raise InputError(f"{source}: not a regular file")
    suffix = suffix_of(path)
    if path.name.lower().endswith(GZIP_SUFFIXES):
        check_gzip(path)
    try:
        if suffix in MGH_SUFFIXES:
            mgh = nib.load(str(path))
            data = _squeeze_to_3d(np.asarray(mgh.dataobj), source)
            image = Image(np.ascontiguousarray(data), Grid(data.shape, mgh.affine), source)
        elif suffix in (".nii", ".nii.gz"):
            image = _read_nifti(path, source)
        elif suffix in ITK_SUFFIXES:
            image = sitk_to_image(sitk.ReadImage(str(path)), source)
        else:
            raise InputError(f"{source}: unsupported format {suffix!r}; use one of "
                             f"{', '.join(ITK_SUFFIXES + MGH_SUFFIXES)}, or a DICOM series folder or "
                             f"{'/'.join(DICOM_SUFFIXES)} slice")
    except InputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # readers raise many types; report the file and the reader's words
        words = " ".join(str(exc).split())
        raise InputError(f"{source}: cannot be read as an image ({words[-200:]})") from None
    return _finite(image, allow_nonfinite)


def _finite(image: Image, allow_nonfinite: bool) -> Image:
    if not allow_nonfinite and np.issubdtype(image.data.dtype, np.floating) and not np.isfinite(image.data).all():
        bad = int((~np.isfinite(image.data)).sum())
        raise InputError(f"{image.source}: {bad} voxel(s) are NaN or infinite")
    return image


def _read_nifti(path: Path, source: str) -> Image:
    """NIfTI: geometry as ITK (and so Slicer) reads it, voxels through nibabel (ITK's reader turns NaN into 0)."""
    data = _squeeze_to_3d(np.asarray(nib.load(str(path)).dataobj), source)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size = reader.GetSize()[:3]
    if tuple(size) != data.shape:
        raise InputError(f"{source}: header size {size} disagrees with voxel array {data.shape}")
    dims = len(reader.GetSize())
    direction = np.asarray(reader.GetDirection()).reshape(dims, dims)[:3, :3]
    grid = Grid.from_lps(size, reader.GetOrigin()[:3], reader.GetSpacing()[:3], direction)
    return Image(np.ascontiguousarray(data), grid, source)


def read_labels(path: str | os.PathLike, like: Image | None = None) -> Image:
    """Read an integer label map (values ≥ 0, 0 the background); with `like`, its grid must match that image's
    (InputError otherwise)."""
    labels = read_image(path)
    data = labels.data
    if not np.issubdtype(data.dtype, np.integer):
        if not np.allclose(data, np.round(data)):
            raise InputError(f"{labels.source}: label map has non-integer values")
        data = np.round(data)
    if data.size and data.min() < 0:
        raise InputError(f"{labels.source}: label map has negative values (min {data.min():g}); labels are "
                         "integers ≥ 0 with 0 the background")
    if data.size and data.max() > np.iinfo(np.int32).max:
        raise InputError(f"{labels.source}: label values beyond the 32-bit range")
    labels.data = data.astype(np.int32)
    if like is not None and not labels.grid.same_as(like.grid, tol=1e-3):
        raise InputError(f"{labels.source}: label map grid (shape {labels.grid.shape}, spacing "
                         f"{np.round(labels.grid.spacing, 4).tolist()}) differs from its image {like.source} (shape "
                         f"{like.grid.shape}, spacing {np.round(like.grid.spacing, 4).tolist()})")
    return labels


def atomic_path(path: str | os.PathLike):
    """Context manager yielding a temporary path beside `path` that is renamed to `path` on success."""
    return _AtomicPath(Path(path))


class _AtomicPath:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=suffix_of(self.path), dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def write_image(image: Image, path: str | os.PathLike) -> Path:
    """Write `image` (format from the suffix); the file appears whole or not at all."""
    path = Path(path)
    suffix = suffix_of(path)
    if suffix not in WRITE_SUFFIXES:
        raise InputError(f"{path}: unsupported output format {suffix!r}; use one of {', '.join(WRITE_SUFFIXES)}")
    with atomic_path(path) as tmp:
        if suffix in MGH_SUFFIXES:
            data = image.data if image.data.dtype != np.float64 else image.data.astype(np.float32)
            nib.save(nib.MGHImage(data, image.grid.affine), str(tmp))
        else:
            sitk.WriteImage(image_to_sitk(image), str(tmp), True)
    return path
