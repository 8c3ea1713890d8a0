"""The versioned benchmark suite: manifest parsing, and pairs materialised deterministically into a cache.

Frames (docs/CONVENTIONS.md): every pair lies on one RAS grid (`suite_grid`); images are `Image`s, the ground
truth is a `DisplacementField` (RAS mm, fixed point p ↦ moving point p + d(p)) and landmarks are RAS mm.

Pair kinds:
- `cross_subject`: two fetched subjects resampled on the suite grid (no pre-alignment: all lie in MNI-like space);
  scored on a label set both subjects define (`label_sets`, built from each subject's `structures`).
- `known_warp`: one subject and a seeded random diffeomorphism (`synth.known_warp_pair`): fixed = the subject with
  an intensity perturbation, moving = the subject ∘ φ⁻¹ with another perturbation; exact field and landmarks.
- `multimodal`: as `known_warp`, but the moving image is a synthetic contrast ("ct" in HU or "t2") rendered from the
  subject's tissue map (`synth.multimodal_pair`), the fixed image the subject's real T1 (perturbed).
- `head_ct` (suite v2): a whole head (skull and scalp kept: the subject's `head_image`) as a CT in HU rendered from
  its head tissue map (`training/data/head.py`: air, CSF, GM, WM, bone, scalp; partial volume, noise) and as its
  real T1, with a known warp; `ct_role` says whether the CT is the fixed or the moving image. The brain tissue
  comes from the subject's `tissue_classes` or, with `tissue_from_intensity`, from k-means of its skull-stripped
  T1 (`image`).

A pair directory holds fixed/moving images and label maps, the fixed brain mask, labels.tsv and pair.json; known
warps add ground_truth.nii.gz (ITK displacement, LPS) and fixed/moving_landmarks.fcsv. pair.json is written last,
so a directory without it is incomplete and is rebuilt.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.core.field import DisplacementField, read_itk_displacement, write_itk_displacement
from DeepRegistrationLib.core.geometry import Grid
from DeepRegistrationLib.core.image import Image, atomic_path, read_image, read_labels, write_image
from DeepRegistrationLib.core.landmarks import Landmarks, match_landmarks, read_landmarks, write_fcsv
from DeepRegistrationLib.core.resample import normalize_intensity, resample_array

from training.data import synth
from training.data.label_protocols import PROTOCOLS, read_label_table, write_label_table

ROOT = Path(__file__).resolve().parents[1]
SUITE_PATH = Path(__file__).with_name("suite_v2.json")
SUITE_V1_PATH = Path(__file__).with_name("suite_v1.json")
ANATOMY_DIR = ROOT / "data" / "anatomy"
CACHE_DIR = ROOT / "data" / "benchmark"
KINDS = ("cross_subject", "known_warp", "multimodal", "head_ct")
MOVING_CONTRASTS = ("ct", "t2")
_MULTIMODAL_FIXED_SEED = 1_000_003
"""Offset of the generator that perturbs a multimodal pair's real fixed T1 (independent of the warp's)."""


class ManifestError(InputError):
    """The suite manifest is malformed or names something it does not define."""


@dataclass(frozen=True)
class PairSpec:
    """One manifest pair; `fixed`/`moving` for cross-subject pairs, `subject` for synthetic ones."""

    id: str
    kind: str
    label_set: str
    fixed: str | None = None
    moving: str | None = None
    subject: str | None = None
    seed: int | None = None
    magnitude_mm: float = 6.0
    affine: bool = False
    boundary_landmarks: int = 4
    moving_contrast: str | None = None
    ct_role: str | None = None

    @property
    def multimodal(self) -> bool:
        return self.kind in ("multimodal", "head_ct")

    @property
    def subjects(self) -> list[str]:
        return [self.fixed, self.moving] if self.kind == "cross_subject" else [self.subject]

    @property
    def modalities(self) -> tuple[str, str]:
        """Intensity modality of (fixed, moving) for `resample.normalize_intensity` ("mr" or "ct")."""
        if self.kind == "head_ct":
            return ("ct", "mr") if self.ct_role == "fixed" else ("mr", "ct")
        return "mr", "ct" if self.moving_contrast == "ct" else "mr"


@dataclass
class Manifest:
    """A parsed, validated suite manifest (see suite_v1.json)."""

    raw: dict[str, Any]
    path: Path

    @property
    def version(self) -> int:
        return int(self.raw["version"])

    @property
    def resolution_mm(self) -> float:
        return float(self.raw["resolution_mm"])

    @property
    def pairs(self) -> dict[str, PairSpec]:
        return {p["id"]: PairSpec(**p) for p in self.raw["pairs"]}

    @property
    def subjects(self) -> dict[str, dict[str, Any]]:
        return self.raw["subjects"]

    @property
    def label_sets(self) -> dict[str, list[str]]:
        return self.raw["label_sets"]

    @property
    def classical(self) -> dict[str, dict[str, Any]]:
        return self.raw.get("classical", {})

    def select(self, names: list[str] | None) -> list[PairSpec]:
        """Pairs by subset name ("all" or a key of `subsets`) or pair id, in manifest order; default all."""
        pairs = self.pairs
        if not names:
            return list(pairs.values())
        chosen: list[str] = []
        for name in names:
            if name == "all":
                ids = list(pairs)
            elif name in self.raw.get("subsets", {}):
                ids = self.raw["subsets"][name]
            elif name in pairs:
                ids = [name]
            else:
                raise ManifestError(f"{self.path}: no pair or subset {name!r}; subsets: "
                                    f"{', '.join(['all', *self.raw.get('subsets', {})])}; pairs: {', '.join(pairs)}")
            chosen += [i for i in ids if i not in chosen]
        return [pairs[i] for i in pairs if i in chosen]


def load_manifest(path: str | Path = SUITE_PATH) -> Manifest:
    """Read and validate a manifest; ManifestError names the first problem."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    for key in ("version", "resolution_mm", "grid", "subjects", "label_sets", "pairs"):
        if key not in raw:
            raise ManifestError(f"{path}: missing key {key!r}")
    manifest = Manifest(raw, path)
    _validate(manifest)
    return manifest


def _validate(m: Manifest) -> None:
    where = str(m.path)
    for name, subject in m.subjects.items():
        for key in ("image", "labels"):
            if key not in subject:
                raise ManifestError(f"{where}: subject {name!r} lacks {key!r}")
        protocol = subject.get("protocol")
        if protocol is not None and protocol not in PROTOCOLS:
            raise ManifestError(f"{where}: subject {name!r}: unknown protocol {protocol!r}")
    ids = [p.get("id") for p in m.raw["pairs"]]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ManifestError(f"{where}: duplicate pair ids {duplicates}")
    fields = set(PairSpec.__dataclass_fields__)
    for p in m.raw["pairs"]:
        unknown = sorted(set(p) - fields)
        if unknown:
            raise ManifestError(f"{where}: pair {p.get('id')!r} has unknown keys {unknown}")
        try:
            spec = PairSpec(**p)
        except TypeError as exc:
            raise ManifestError(f"{where}: pair {p.get('id')!r}: {exc}") from exc
        if spec.kind not in KINDS:
            raise ManifestError(f"{where}: pair {spec.id!r}: kind {spec.kind!r} is not one of {KINDS}")
        if spec.label_set not in m.label_sets:
            raise ManifestError(f"{where}: pair {spec.id!r}: unknown label set {spec.label_set!r}")
        subjects = [spec.fixed, spec.moving] if spec.kind == "cross_subject" else [spec.subject]
        for s in subjects:
            if s not in m.subjects:
                raise ManifestError(f"{where}: pair {spec.id!r} names subject {s!r}, which the manifest does not "
                                    f"define (subjects: {', '.join(m.subjects)})")
            for structure in m.label_sets[spec.label_set]:
                if not _defines(m.subjects[s], structure):
                    raise ManifestError(f"{where}: pair {spec.id!r}: subject {s!r} does not define structure "
                                        f"{structure!r} of label set {spec.label_set!r}")
        if spec.kind != "cross_subject" and spec.seed is None:
            raise ManifestError(f"{where}: pair {spec.id!r}: synthetic pairs need a seed")
        if spec.kind == "head_ct":
            subject = m.subjects[spec.subject]
            if spec.ct_role not in ("fixed", "moving"):
                raise ManifestError(f"{where}: pair {spec.id!r}: ct_role must be 'fixed' or 'moving'")
            if "head_image" not in subject:
                raise ManifestError(f"{where}: pair {spec.id!r}: subject {spec.subject!r} has no head_image")
            if "tissue_classes" not in subject and not subject.get("tissue_from_intensity"):
                raise ManifestError(f"{where}: pair {spec.id!r}: subject {spec.subject!r} needs tissue_classes or "
                                    "tissue_from_intensity")
        if spec.kind == "multimodal":
            if spec.moving_contrast not in MOVING_CONTRASTS:
                raise ManifestError(f"{where}: pair {spec.id!r}: moving_contrast must be one of {MOVING_CONTRASTS}")
            if "tissue_classes" not in m.subjects[spec.subject]:
                raise ManifestError(f"{where}: pair {spec.id!r}: subject {spec.subject!r} has no tissue_classes")
    for name, members in m.raw.get("subsets", {}).items():
        missing = [i for i in members if i not in ids]
        if missing:
            raise ManifestError(f"{where}: subset {name!r} names missing pairs {missing}")
    speed = m.raw.get("speed")
    if speed is not None and speed.get("pair") not in ids:
        raise ManifestError(f"{where}: speed pair {speed.get('pair')!r} is not in the manifest")


def _defines(subject: dict[str, Any], structure: str) -> bool:
    protocol = subject.get("protocol")
    return structure in subject.get("structures", {}) or (protocol is not None and structure in PROTOCOLS[protocol])


# ------------------------------------------------------------------------------------------------------- geometry


def suite_grid(manifest: Manifest, resolution_mm: float | None = None) -> Grid:
    """The RAS grid of every pair: the manifest's field of view at `resolution_mm` (default the manifest's)."""
    res = float(resolution_mm or manifest.resolution_mm)
    fov = np.asarray(manifest.raw["grid"]["fov_mm"], dtype=np.float64)
    centre = np.asarray(manifest.raw["grid"]["centre_ras_mm"], dtype=np.float64)
    shape = tuple(int(round(f / res)) for f in fov)
    origin = centre - (np.array(shape) - 1) / 2 * res
    return Grid.from_spacing(shape, (res,) * 3, tuple(origin), np.eye(3))


def _anti_aliased(data: np.ndarray, source: Grid, target_mm: float) -> np.ndarray:
    """Gaussian pre-blur for downsampling to `target_mm`: σ = √(t² − s²)/2.355 per axis (FWHM matching)."""
    sigma = np.sqrt(np.clip(target_mm**2 - source.spacing**2, 0, None)) / 2.355 / source.spacing
    return ndimage.gaussian_filter(data, sigma) if np.any(sigma > 0.1) else data


@dataclass
class SubjectOnGrid:
    """A subject resampled on the suite grid: T1 normalised to [0, 1], raw labels, brain mask."""

    image: np.ndarray
    labels: np.ndarray
    brain: np.ndarray
    spec: dict[str, Any]


def load_subject_on_grid(anatomy_dir: Path, spec: dict[str, Any], grid: Grid) -> SubjectOnGrid:
    """Read a fetched subject (training/data/fetch.py output) and resample it on `grid` (labels nearest)."""
    image_path, label_path = Path(anatomy_dir) / spec["image"], Path(anatomy_dir) / spec["labels"]
    for path in (image_path, label_path):
        if not path.is_file():
            raise InputError(f"{path}: missing; run `python -m training.data fetch` first")
    image = read_image(image_path)
    labels = read_labels(label_path, like=image)
    normalised = normalize_intensity(image.data, "mr", image.source)
    data = resample_array(_anti_aliased(normalised, image.grid, float(grid.spacing[0])), image.grid, grid)
    lab = resample_array(labels.data, labels.grid, grid, order=0)
    brain = resample_array((image.data > 0).astype(np.int16), image.grid, grid, order=0) > 0
    return SubjectOnGrid(data.astype(np.float32), lab.astype(np.int32), brain, spec)


def label_set_map(labels: np.ndarray, subject: dict[str, Any], structures: list[str]) -> np.ndarray:
    """Relabel a subject's map to a label set: structure n (0-based) of `structures` becomes id n + 1."""
    out = np.zeros(labels.shape, dtype=np.int16)
    for n, name in enumerate(structures):
        ids = subject.get("structures", {}).get(name)
        if ids is None:
            ids = [PROTOCOLS[subject["protocol"]][name]]
        mask = labels > 0 if ids == "nonzero" else np.isin(labels, ids)
        out[mask & (out == 0)] = n + 1
    return out


# ------------------------------------------------------------------------------------------------- materialise


@dataclass
class Pair:
    """A materialised pair, loaded from its cache directory."""

    spec: PairSpec
    directory: Path
    fixed: Image
    moving: Image
    fixed_labels: Image
    moving_labels: Image
    label_names: dict[int, str]
    fixed_mask: np.ndarray
    truth: DisplacementField | None
    fixed_points: np.ndarray | None
    moving_points: np.ndarray | None


def pair_dir(manifest: Manifest, spec: PairSpec, resolution_mm: float | None = None,
             cache_dir: Path = CACHE_DIR) -> Path:
    res = float(resolution_mm or manifest.resolution_mm)
    return Path(cache_dir) / f"suite_v{manifest.version}" / f"{res:g}mm" / spec.id


def _record(manifest: Manifest, spec: PairSpec, grid: Grid) -> dict[str, Any]:
    """What pair.json stores and what a cached pair must match to be reused."""
    subjects = [spec.fixed, spec.moving] if spec.kind == "cross_subject" else [spec.subject]
    return {"suite": manifest.raw.get("suite"), "version": manifest.version,
            "pair": {k: v for k, v in spec.__dict__.items()},
            "subjects": {s: manifest.subjects[s] for s in subjects},
            "structures": manifest.label_sets[spec.label_set],
            "grid": {"shape": list(grid.shape), "affine": np.round(grid.affine, 6).tolist()},
            "modalities": list(spec.modalities), "multimodal": spec.multimodal}


def materialise(manifest: Manifest, spec: PairSpec, resolution_mm: float | None = None,
                anatomy_dir: Path = ANATOMY_DIR, cache_dir: Path = CACHE_DIR, force: bool = False) -> Path:
    """Build `spec` into its cache directory unless an identical build is there; returns the directory."""
    grid = suite_grid(manifest, resolution_mm)
    out = pair_dir(manifest, spec, resolution_mm, cache_dir)
    record = _record(manifest, spec, grid)
    if not force and (out / "pair.json").is_file():
        if json.loads((out / "pair.json").read_text()).get("record") == record:
            return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        _build(manifest, spec, grid, Path(anatomy_dir), out)
        with atomic_path(out / "pair.json") as tmp:
            tmp.write_text(json.dumps({"record": record}, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def _build(manifest: Manifest, spec: PairSpec, grid: Grid, anatomy_dir: Path, out: Path) -> None:
    structures = manifest.label_sets[spec.label_set]
    write_label_table(out / "labels.tsv", {n + 1: name for n, name in enumerate(structures)})
    if spec.kind == "cross_subject":
        fixed = load_subject_on_grid(anatomy_dir, manifest.subjects[spec.fixed], grid)
        moving = load_subject_on_grid(anatomy_dir, manifest.subjects[spec.moving], grid)
        _write_volumes(out, grid, fixed.image, moving.image,
                       label_set_map(fixed.labels, fixed.spec, structures),
                       label_set_map(moving.labels, moving.spec, structures), fixed.brain)
        return
    if spec.kind == "head_ct":
        _build_head_ct(manifest, spec, grid, anatomy_dir, out, structures)
        return
    subject = load_subject_on_grid(anatomy_dir, manifest.subjects[spec.subject], grid)
    spacing = tuple(float(s) for s in grid.spacing)
    image = torch.from_numpy(subject.image)[None, None]
    if spec.kind == "known_warp":
        labels = torch.from_numpy(label_set_map(subject.labels, subject.spec, structures).astype(np.int64))[None, None]
        pair = synth.known_warp_pair(image, labels, spacing, spec.seed, spec.magnitude_mm, spec.affine,
                                     boundary_landmarks=spec.boundary_landmarks)
        fixed_labels, moving_labels = pair.fixed_labels, pair.moving_labels
    else:
        classes = {int(k): v for k, v in subject.spec["tissue_classes"].items()}
        tissue = np.where(np.isin(subject.labels, list(classes)), subject.labels, 0)
        pair = synth.multimodal_pair(torch.from_numpy(tissue.astype(np.int64))[None, None], spacing, spec.seed,
                                     "t1", spec.moving_contrast, {0: "background", **classes}, spec.magnitude_mm,
                                     spec.affine, spec.boundary_landmarks)
        generator = synth.make_generator(spec.seed + _MULTIMODAL_FIXED_SEED)
        pair.fixed = synth.perturb_intensity(image, generator, spacing)
        remap = lambda t: torch.from_numpy(  # noqa: E731
            label_set_map(t[0, 0].numpy(), subject.spec, structures).astype(np.int64))[None, None]
        fixed_labels, moving_labels = remap(pair.fixed_labels), remap(pair.moving_labels)
        keep = fixed_labels[0, 0][tuple(pair.fixed_landmarks.long().T)] > 0
        pair.fixed_landmarks, pair.moving_landmarks = pair.fixed_landmarks[keep], pair.moving_landmarks[keep]
        pair.landmark_labels = fixed_labels[0, 0][tuple(pair.fixed_landmarks.long().T)]
    _write_volumes(out, grid, pair.fixed[0, 0].numpy(), pair.moving[0, 0].numpy(), fixed_labels[0, 0].numpy(),
                   moving_labels[0, 0].numpy(), subject.brain)
    _write_truth(out, grid, pair, structures)


def _write_truth(out: Path, grid: Grid, pair: "synth.SyntheticPair", structures: list[str]) -> None:
    write_itk_displacement(DisplacementField.from_voxels(pair.displacement, grid), out / "ground_truth.nii.gz")
    names = [f"p{n:03d}_{structures[int(lab) - 1]}" for n, lab in enumerate(pair.landmark_labels.tolist())]
    for role, points in (("fixed", pair.fixed_landmarks), ("moving", pair.moving_landmarks)):
        ras = grid.voxel_to_world(points.double().numpy())
        write_fcsv(out / f"{role}_landmarks.fcsv", Landmarks(names, ras))


def _build_head_ct(manifest: Manifest, spec: PairSpec, grid: Grid, anatomy_dir: Path, out: Path,
                   structures: list[str]) -> None:
    """A `head_ct` pair (module docstring): head map at the subject's 1 mm, fractions and T1 on the suite grid."""
    from training.data import head

    subject = manifest.subjects[spec.subject]
    brain_image = read_image(Path(anatomy_dir) / subject["image"])
    head_image = read_image(Path(anatomy_dir) / subject["head_image"])
    labels = read_labels(Path(anatomy_dir) / subject["labels"], like=head_image)
    if not brain_image.grid.same_as(head_image.grid, tol=1e-3):
        raise InputError(f"{head_image.source}: head image and brain image lie on different grids")
    brain = brain_image.data > 0
    if subject.get("tissue_from_intensity"):
        tissue = head.intensity_tissue(brain_image.data, brain)
    else:
        classes = {int(k): v for k, v in subject["tissue_classes"].items()}
        ids = {"csf": 1, "gm": 2, "wm": 3}
        tissue = np.zeros(labels.data.shape, np.int16)
        for label, name in classes.items():
            tissue[labels.data == label] = ids[name]
    t1 = normalize_intensity(head_image.data, "mr", head_image.source)
    head_map = head.head_tissue_map(t1, tissue, float(head_image.grid.spacing[0]))
    fractions = head.class_fractions(head_map, head_image.grid, grid)
    t1_grid = resample_array(_anti_aliased(t1, head_image.grid, float(grid.spacing[0])), head_image.grid, grid)
    spacing = tuple(float(s) for s in grid.spacing)
    modalities = ("ct", "t1") if spec.ct_role == "fixed" else ("t1", "ct")
    pair = head.head_pair(torch.from_numpy(t1_grid)[None, None], fractions, spacing, spec.seed, *modalities,
                          spec.magnitude_mm, spec.affine, boundary_landmarks=spec.boundary_landmarks)
    tissue_names = {"csf": 1, "gray_matter": 2, "white_matter": 3}
    remap = lambda t: _structure_map(t[0, 0].numpy(), structures, tissue_names)  # noqa: E731
    fixed_labels, moving_labels = remap(pair.fixed_labels), remap(pair.moving_labels)
    keep = fixed_labels[tuple(pair.fixed_landmarks.long().T)] > 0
    pair.fixed_landmarks, pair.moving_landmarks = pair.fixed_landmarks[keep], pair.moving_landmarks[keep]
    pair.landmark_labels = torch.from_numpy(fixed_labels[tuple(pair.fixed_landmarks.long().T.numpy())])
    brain_grid = resample_array(brain.astype(np.int16), brain_image.grid, grid, order=0) > 0
    _write_volumes(out, grid, pair.fixed[0, 0].numpy(), pair.moving[0, 0].numpy(), fixed_labels, moving_labels,
                   brain_grid)
    _write_truth(out, grid, pair, structures)


def _structure_map(tissue: np.ndarray, structures: list[str], ids: dict[str, int]) -> np.ndarray:
    """Tissue ids (1 CSF, 2 GM, 3 WM) to a label set's ids (structure n → n + 1)."""
    out = np.zeros(tissue.shape, np.int16)
    for n, name in enumerate(structures):
        out[tissue == ids[name]] = n + 1
    return out


def _write_volumes(out: Path, grid: Grid, fixed: np.ndarray, moving: np.ndarray, fixed_labels: np.ndarray,
                   moving_labels: np.ndarray, fixed_mask: np.ndarray) -> None:
    for name, data in (("fixed", fixed.astype(np.float32)), ("moving", moving.astype(np.float32)),
                       ("fixed_labels", fixed_labels.astype(np.int16)),
                       ("moving_labels", moving_labels.astype(np.int16)),
                       ("fixed_mask", fixed_mask.astype(np.uint8))):
        write_image(Image(np.ascontiguousarray(data), grid, name), out / f"{name}.nii.gz")


def load_pair(directory: str | Path) -> Pair:
    """Load a materialised pair; InputError if it is missing or incomplete."""
    directory = Path(directory)
    if not (directory / "pair.json").is_file():
        raise InputError(f"{directory}: not a materialised pair (no pair.json); run `python -m benchmark "
                         "materialise`")
    record = json.loads((directory / "pair.json").read_text())["record"]
    spec = PairSpec(**record["pair"])
    fixed, moving = read_image(directory / "fixed.nii.gz"), read_image(directory / "moving.nii.gz")
    fixed_labels = read_labels(directory / "fixed_labels.nii.gz", like=fixed)
    moving_labels = read_labels(directory / "moving_labels.nii.gz", like=moving)
    mask = read_labels(directory / "fixed_mask.nii.gz", like=fixed).data > 0
    truth = fixed_points = moving_points = None
    if (directory / "ground_truth.nii.gz").is_file():
        truth = read_itk_displacement(directory / "ground_truth.nii.gz")
        _, fixed_points, moving_points = match_landmarks(read_landmarks(directory / "fixed_landmarks.fcsv"),
                                                         read_landmarks(directory / "moving_landmarks.fcsv"))
    return Pair(spec, directory, fixed, moving, fixed_labels, moving_labels,
                read_label_table(directory / "labels.tsv"), mask, truth, fixed_points, moving_points)
