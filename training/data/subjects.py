"""The fetched subjects a training pair is drawn from: their files, their tissue classes, loading on a working grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.core.geometry import Grid
from DeepRegistrationLib.core.image import read_image, read_labels
from DeepRegistrationLib.core.resample import normalize_intensity, resample_array
from DeepRegistrationLib.methods.models import sha256_of

from .label_protocols import ASEG_TISSUE

SUBJECT_FILES = {
    "icbm152_2009a": ("t1.nii.gz", "tissue.nii.gz"),
    "colin27": ("ch2bet.nii.gz", "aal.nii.gz"),
    "fsaverage": ("brain.nii.gz", "aseg.nii.gz"),
}
"""Anatomy (training/data/fetch.py output) → (T1 image, label map) file names."""

HEAD_FILES = {"fsaverage": "T1.nii.gz", "colin27": "ch2.nii.gz"}
"""Subjects whose fetch has a whole-head T1 (skull and scalp kept), for `data.ct_head`."""


def centred_grid(image_grid: Grid, spacing: float, shape: tuple[int, int, int]) -> Grid:
    """RAS-aligned grid of `shape` and isotropic `spacing` mm centred on `image_grid`'s centre."""
    centre = image_grid.voxel_to_world((np.array(image_grid.shape) - 1) / 2)
    origin = centre - (np.array(shape) - 1) / 2 * spacing
    return Grid.from_spacing(shape, (spacing,) * 3, tuple(origin), np.eye(3))


def load_subject(anatomy_dir: Path, name: str, spacing: float, shape: tuple[int, int, int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A fetched subject's T1 (normalised to [0, 1]) and labels on the working grid, as [1, 1, I, J, K]."""
    if name not in SUBJECT_FILES:
        raise InputError(f"unknown subject {name!r}; known: {', '.join(SUBJECT_FILES)}")
    folder = Path(anatomy_dir) / name
    image_file, label_file = (folder / f for f in SUBJECT_FILES[name])
    if not image_file.is_file():
        raise InputError(f"{image_file}: missing; run `python -m training.data fetch` first")
    image = read_image(image_file)
    labels = read_labels(label_file)
    grid = centred_grid(image.grid, spacing, shape)
    data = resample_array(normalize_intensity(image.data, "mr", image.source), image.grid, grid)
    lab = resample_array(labels.data, labels.grid, grid, order=0)
    return torch.from_numpy(data)[None, None], torch.from_numpy(lab.astype(np.int64))[None, None]



def tissue_classes(name: str) -> dict[int, str]:
    """Label id → tissue class of a subject's label map (ICBM152 tissue map, fsaverage aseg)."""
    if name == "icbm152_2009a":
        return {1: "csf", 2: "gm", 3: "wm"}
    if name == "fsaverage":
        return dict(ASEG_TISSUE)
    raise InputError(f"subject {name!r} has no tissue classes here (icbm152_2009a, fsaverage)")


MANIFEST = "manifest.json"


def subject_files(anatomy_dir: str | Path, name: str, role: str = "training") -> dict[str, str]:
    """{file name: sha256} of every file a fetch wrote for subject `name` (its manifest lists them).

    InputError when the subject has no fetch manifest (unknown name, or not fetched)."""
    folder = Path(anatomy_dir) / name
    manifest = folder / MANIFEST
    if not manifest.is_file():
        known = sorted(p.parent.name for p in Path(anatomy_dir).glob(f"*/{MANIFEST}"))
        raise InputError(f"{role} subject {name!r}: no fetch manifest {manifest} (fetched subjects: "
                         f"{', '.join(known) or 'none'}); run `python -m training.data fetch` or fix the name")
    listed = json.loads(manifest.read_text()).get("files", {})
    missing = sorted(f for f in listed if not (folder / f).is_file())
    if missing:
        raise InputError(f"{role} subject {name!r}: files {missing} of {manifest} are missing; fetch again")
    return {f: sha256_of(folder / f) for f in sorted(listed)}
