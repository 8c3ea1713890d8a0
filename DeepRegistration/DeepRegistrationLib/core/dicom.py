"""DICOM series: a directory of single-slice files (one series, or several told apart by their Series Instance
UID), or one slice file standing for its series, read through SimpleITK/GDCM into one LPS volume.

Geometry comes from every slice (GDCM reads Image Position/Orientation (Patient) and Pixel Spacing, classic or
in functional groups): slices are ordered by their position along the slice normal (not by file name or instance
number), the slice spacing is the distance between neighbours, and each slice's voxels are rescaled by its own
Rescale Slope/Intercept (float32 volume). Refused with an InputError naming the path: no image series; several
series and none chosen (`AmbiguousSeries` lists them); a single slice; multi-frame (enhanced) objects; slices of
different size, orientation or pixel spacing; two slices at one position (echoes, time points); slices not stacked
along their normal (gantry tilt); non-uniform slice spacing (missing slices); colour images.

Only `errors` is imported here, so that `core.image` can call this module (it converts the result to RAS).
"""

from __future__ import annotations

import locale
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from .errors import InputError

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
MAX_FILES = 20_000
"""A directory scan stops (InputError) beyond this many files: not a series folder but a whole archive."""
SPACING_TOLERANCE = 0.01
"""Relative tolerance of the slice spacing (and 0.01 mm absolute) before a series is called non-uniform."""

_SERIES, _DESCRIPTION, _MODALITY, _FRAMES, _INSTANCE = "0020|000e", "0008|103e", "0008|0060", "0028|0008", "0020|0013"


class AmbiguousSeries(InputError):
    """A directory holds several image series and none was chosen; `series` lists (uid, description) of each."""

    def __init__(self, message: str, series: list["Series"]) -> None:
        super().__init__(message)
        self.series = series


@dataclass
class _Slice:
    path: Path
    size: tuple[int, ...]
    origin: np.ndarray
    direction: np.ndarray  # 3×3, columns: row, column, normal (LPS)
    spacing: np.ndarray
    frames: int
    components: int
    instance: str


@dataclass
class Series:
    """One DICOM series found in a directory: its UID, description, modality and slice files."""

    uid: str
    description: str = ""
    modality: str = ""
    slices: list[_Slice] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.uid} ({self.modality or '?'}, {len(self.slices)} file(s)"
        return text + (f", {self.description!r})" if self.description else ")")


@contextmanager
def _locale_kept() -> Iterator[None]:
    """GDCM may switch the process to the C locale (seen when it formats decimal strings); put it back, so that
    Python's text I/O keeps its encoding."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        if locale.setlocale(locale.LC_ALL) != saved:
            locale.setlocale(locale.LC_ALL, saved)


def has_dicom_preamble(path: Path) -> bool:
    """True for a file with the DICOM Part 10 marker "DICM" at byte 128."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_file(path: str | os.PathLike) -> bool:
    """A regular file with a DICOM suffix or the DICOM preamble."""
    path = Path(path)
    return path.is_file() and (path.suffix.lower() in DICOM_SUFFIXES or has_dicom_preamble(path))


def _meta(reader: sitk.ImageFileReader, key: str) -> str:
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""


def _read_header(path: Path) -> tuple[str, str, str, _Slice] | None:
    """(series UID, description, modality, slice) of a DICOM file; None when GDCM cannot read it as an image."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    dims = reader.GetDimension()
    direction = np.asarray(reader.GetDirection(), np.float64).reshape(dims, dims)
    if dims == 2:
        full = np.eye(3)
        full[:2, :2] = direction
        direction = full
    frames_text = _meta(reader, _FRAMES)
    try:
        frames = int(float(frames_text)) if frames_text else 1
    except ValueError:
        frames = 1
    size = tuple(reader.GetSize())
    if len(size) == 3 and size[2] > 1:
        frames = max(frames, size[2])
    spacing = np.asarray(reader.GetSpacing(), np.float64)[:2]
    return (_meta(reader, _SERIES), _meta(reader, _DESCRIPTION), _meta(reader, _MODALITY),
            _Slice(path, size[:2], np.asarray(reader.GetOrigin(), np.float64)[:3], direction[:3, :3], spacing,
                   frames, reader.GetNumberOfComponents(), _meta(reader, _INSTANCE)))


def find_series(directory: str | os.PathLike) -> list[Series]:
    """Every DICOM image series under `directory` (its files and subfolders), in order of their first file."""
    directory = Path(directory)
    found: dict[str, Series] = {}
    count = 0
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            count += 1
            if count > MAX_FILES:
                raise InputError(f"{directory}: more than {MAX_FILES} files; give the folder of one series")
            path = Path(root) / name
            if not (path.suffix.lower() in DICOM_SUFFIXES or has_dicom_preamble(path)):
                continue
            header = _read_header(path)
            if header is None:
                continue
            uid, description, modality, one = header
            series = found.setdefault(uid or "(no series UID)", Series(uid, description, modality))
            series.slices.append(one)
    return list(found.values())


def choose_series(path: Path, series: list[Series], uid: str | None) -> Series:
    """The series of `uid` (or the only one); InputError naming `path` and listing the series otherwise."""
    if not series:
        raise InputError(f"{path}: no DICOM image series found (give an image file, or a folder of DICOM slices)")
    listing = "; ".join(s.summary() for s in series)
    if uid is not None:
        for s in series:
            if s.uid == uid:
                return s
        raise InputError(f"{path}: no DICOM series with UID {uid!r}; found: {listing}")
    if len(series) > 1:
        raise AmbiguousSeries(f"{path}: {len(series)} DICOM series found, choose one by its series UID: {listing}",
                              series)
    return series[0]


def _check_and_order(path: Path, series: Series) -> tuple[list[_Slice], float]:
    """The slices sorted along their normal and the slice spacing (mm); InputError for what cannot be a volume."""
    slices = series.slices
    multi = [s for s in slices if s.frames > 1]
    if multi:
        raise InputError(f"{path}: {multi[0].path.name} is a multi-frame (enhanced) DICOM object with "
                         f"{multi[0].frames} frames; only single-frame slice series are read (convert it, e.g. with "
                         "dcm2niix, to NIfTI)")
    if any(s.components != 1 for s in slices):
        raise InputError(f"{path}: a colour (RGB) DICOM series, not a scalar volume")
    if len(slices) < 2:
        raise InputError(f"{path}: the DICOM series {series.uid} has a single slice; expected a 3D volume")
    first = slices[0]
    for s in slices[1:]:
        if s.size != first.size:
            raise InputError(f"{path}: slices of different size ({first.path.name} {first.size}, {s.path.name} "
                             f"{s.size}) in series {series.uid}")
        if not np.allclose(s.direction[:, :2], first.direction[:, :2], atol=1e-4):
            raise InputError(f"{path}: slices of different orientation in series {series.uid} ({first.path.name}, "
                             f"{s.path.name}); export one volume per orientation")
        if not np.allclose(s.spacing, first.spacing, rtol=1e-4, atol=1e-5):
            raise InputError(f"{path}: slices of different pixel spacing in series {series.uid}")
    normal = np.cross(first.direction[:, 0], first.direction[:, 1])
    positions = np.array([s.origin for s in slices])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    steps = np.diff(along)
    if np.any(steps < 1e-3):
        k = int(np.argmin(steps))
        raise InputError(f"{path}: two slices at one position ({slices[order[k]].path.name}, "
                         f"{slices[order[k + 1]].path.name}: several echoes, phases or acquisitions in one series?); "
                         "export one volume")
    offsets = positions - positions[0] - np.outer(along - along[0], normal)
    if np.abs(offsets).max() > max(0.01, 0.01 * steps.min()):
        raise InputError(f"{path}: the slices are not stacked along their normal (gantry tilt or a sheared "
                         f"acquisition, up to {np.abs(offsets).max():.2f} mm off); resample it to a regular grid first")
    spacing = float(steps.mean())
    if steps.max() - steps.min() > max(0.01, SPACING_TOLERANCE * spacing):
        raise InputError(f"{path}: non-uniform slice spacing ({steps.min():.3f} to {steps.max():.3f} mm) in series "
                         f"{series.uid}: missing slices or a variable-spacing acquisition")
    return [slices[i] for i in order], spacing


def read_dicom(path: str | os.PathLike, series_uid: str | None = None) -> tuple[sitk.Image, str]:
    """A 3D float32 SimpleITK image (LPS geometry) of the DICOM series at `path` (a folder, or one of its slice
    files), and a description of what was read for messages. `series_uid` chooses among several series."""
    with _locale_kept():
        return _read_dicom(Path(path), series_uid)


def _read_dicom(path: Path, series_uid: str | None) -> tuple[sitk.Image, str]:
    if path.is_dir():
        series = choose_series(path, find_series(path), series_uid)
    else:
        header = _read_header(path)
        if header is None:
            raise InputError(f"{path}: cannot be read as DICOM")
        uid, _, _, one = header
        if one.frames > 1:
            _check_and_order(path, Series(uid, slices=[one]))
        if series_uid is not None and series_uid != uid:
            raise InputError(f"{path}: this file belongs to series {uid}, not {series_uid}")
        series = next((s for s in find_series(path.parent) if s.uid == uid), Series(uid, slices=[one]))
    slices, spacing = _check_and_order(path, series)
    planes = []
    for s in slices:
        try:
            plane = sitk.ReadImage(str(s.path), sitk.sitkFloat32)
        except RuntimeError as exc:
            raise InputError(f"{s.path}: GDCM cannot read the pixels ({str(exc).strip().splitlines()[-1]})") from None
        array = sitk.GetArrayFromImage(plane)
        planes.append(array.reshape(array.shape[-2:]))
    volume = sitk.GetImageFromArray(np.stack(planes))  # [slice, row, column] = ITK (x, y, z) reversed
    first = slices[0]
    volume.SetOrigin(tuple(float(v) for v in first.origin))
    volume.SetSpacing((float(first.spacing[0]), float(first.spacing[1]), spacing))
    normal = np.cross(first.direction[:, 0], first.direction[:, 1])
    direction = np.column_stack([first.direction[:, 0], first.direction[:, 1], normal])
    volume.SetDirection(tuple(float(v) for v in direction.flatten()))
    return volume, f"{path} (DICOM series {series.uid}, {len(slices)} slices)"
