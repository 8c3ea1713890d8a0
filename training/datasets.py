"""Training pairs on the method's working grid, as dicts of [1, ...] tensors: fixed, moving and (when known)
fixed_labels, moving_labels.

Synthetic pairs are drawn from a seed per index, so any pair is reproducible and a resumed run sees the same data;
validation pairs use seeds no training index reaches. A user's folder is read as described in training/README.md.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.core.image import read_image, read_labels
from DeepRegistrationLib.core.resample import normalize_intensity, resample_array

from .data import synth
from .data.phantom import ellipsoid_labels, phantom_image
from .data.subjects import HEAD_FILES, SUBJECT_FILES, centred_grid, load_subject, tissue_classes  # noqa: F401
from .recipe import DataSpec

VALIDATION_SEED = 10_000_000
"""Validation pair i uses seed VALIDATION_SEED + i; training pairs use seeds below it."""

def load_head(anatomy_dir: Path, name: str, spacing: float, shape: tuple[int, int, int]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A subject's whole-head T1 (normalised) and head tissue fractions (`head.class_fractions`) on the working
    grid, the head map computed at the image's 1 mm (`head.head_tissue_map`)."""
    from .data import head
    from .data.label_protocols import tissue_map

    if name not in HEAD_FILES:
        raise InputError(f"data.ct_head needs a subject with a whole-head T1 ({', '.join(HEAD_FILES)}), "
                         f"not {name!r}")
    folder = Path(anatomy_dir) / name
    path = folder / HEAD_FILES[name]
    if not path.is_file():
        raise InputError(f"{path}: missing; run `python -m training.data fetch` first")
    image = read_image(path)
    labels = read_labels(folder / SUBJECT_FILES[name][1], like=image)
    t1 = normalize_intensity(image.data, "mr", image.source)
    classes = tissue_classes(name) if name != "colin27" else None
    tissue = tissue_map(labels.data, classes) if classes else labels.data
    head_map = head.head_tissue_map(t1, tissue, float(image.grid.spacing[0]))
    grid = centred_grid(image.grid, spacing, shape)
    data = resample_array(t1, image.grid, grid)
    return torch.from_numpy(data)[None, None], head.class_fractions(head_map, image.grid, grid)


def _as_item(pair: synth.SyntheticPair, with_labels: bool, with_truth: bool = False) -> dict[str, torch.Tensor]:
    item = {"fixed": pair.fixed[0], "moving": pair.moving[0]}
    if with_labels and pair.fixed_labels is not None:
        item["fixed_labels"], item["moving_labels"] = pair.fixed_labels[0], pair.moving_labels[0]
    if with_truth:
        item["displacement"] = pair.displacement[0].float()
    return item


class SyntheticPairs(Dataset):
    """`length` synthetic pairs (training) or the held-out validation pairs, per `DataSpec.kind`."""

    def __init__(self, spec: DataSpec, spacing: float, shape: tuple[int, int, int], length: int, seed: int,
                 validation: bool = False, labelled: set[int] | None = None, with_truth: bool = False) -> None:
        spec = replace(spec, pool=0, synth_fraction=0.0) if validation else spec  # validation: the real kind
        self.spec, self.spacing, self.length = spec, spacing, length
        self.seed = VALIDATION_SEED + seed * 1000 if validation else seed * VALIDATION_SEED // 100
        self.labelled, self.with_truth = labelled, with_truth
        self._cache: dict[int, dict[str, torch.Tensor]] = {}
        self.bank = None
        if spec.warps == "bank" and spec.kind != "phantom":
            from .data.fieldbank import FieldBank

            self.bank = FieldBank(spec.fieldbank, spacing, shape)
        if spec.kind == "phantom":
            labels = ellipsoid_labels(shape)
            self.subjects = [(phantom_image(labels), labels)]
        elif spec.kind == "multimodal" and spec.ct_head:
            self.subjects = [load_head(Path(spec.anatomy_dir), n, spacing, shape) for n in spec.subjects]
        elif spec.kind == "multimodal":
            from .data.label_protocols import tissue_map

            self.subjects = []
            for n in spec.subjects:
                image, labels = load_subject(Path(spec.anatomy_dir), n, spacing, shape)
                self.subjects.append((image, tissue_map(labels, tissue_classes(n))))
        else:
            self.subjects = [load_subject(Path(spec.anatomy_dir), n, spacing, shape) for n in spec.subjects]
        if spec.kind == "synth" or spec.synth_fraction > 0:
            from .data.labelsynth import offset_labels

            self.label_maps = offset_labels([labels for _, labels in self.subjects])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.spec.pool:
            key = index % self.spec.pool
            if key not in self._cache:
                self._cache[key] = self._draw(key)
            item = self._cache[key]
            if self.labelled is not None and index not in self.labelled:
                item = {k: v for k, v in item.items() if "labels" not in k}
            return item
        return self._draw(index)

    def _is_synth(self, seed: int) -> bool:
        return _is_synth_draw(self.spec, seed)

    def _draw(self, index: int) -> dict[str, torch.Tensor]:
        image, labels = self.subjects[index % len(self.subjects)]
        seed = self.seed + index
        spacing = (self.spacing,) * 3
        kind, spec = self.spec.kind, self.spec
        velocity = None
        if self.bank is not None:  # its own generator, so the rest of the pair is drawn as with random warps
            velocity = self.bank.velocity(synth.make_generator(seed + VALIDATION_SEED // 2), spec.bank_scale,
                                          spec.magnitude_mm, spec.affine)
        if kind in ("known_warp", "phantom") and not self._is_synth(seed):
            pair = synth.known_warp_pair(image, labels, spacing, seed, spec.magnitude_mm, spec.affine,
                                         boundary_landmarks=None, velocity=velocity)
        elif kind == "label_driven" and not self._is_synth(seed):
            pair = synth.label_driven_pair(labels, spacing, seed, spec.magnitude_mm, spec.affine,
                                           boundary_landmarks=None, velocity=velocity)
        elif kind == "synth" or self._is_synth(seed):
            from .data.labelsynth import synth_pair

            pair = synth_pair(self.label_maps, spacing, seed, spec.magnitude_mm, spec.affine, velocity)
        elif spec.ct_head:
            from .data.head import head_pair

            pair = head_pair(image, labels, spacing, seed, spec.fixed_modality, spec.moving_modality,
                             spec.magnitude_mm, spec.affine, velocity)
            pair.fixed, pair.moving = _unit_range(pair.fixed, spec.fixed_modality), _unit_range(
                pair.moving, spec.moving_modality)
        else:
            pair = synth.multimodal_pair(labels, spacing, seed, spec.fixed_modality, spec.moving_modality,
                                         magnitude_mm=spec.magnitude_mm, affine=spec.affine, boundary_landmarks=None,
                                         velocity=velocity)
            pair.fixed, pair.moving = _unit_range(pair.fixed, spec.fixed_modality), _unit_range(
                pair.moving, spec.moving_modality)
        return _as_item(pair, self.labelled is None or self.spec.pool or index in self.labelled, self.with_truth)


def _is_synth_draw(spec: DataSpec, seed: int) -> bool:
    """Whether the pair of `seed` is a synth pair mixed into another kind (`data.synth_fraction`)."""
    return spec.synth_fraction > 0 and float(torch.rand((), generator=synth.make_generator(
        seed + VALIDATION_SEED // 4))) < spec.synth_fraction


def _unit_range(image: torch.Tensor, modality: str) -> torch.Tensor:
    """Synthetic contrasts to the engine's normalised intensities (CT: the HU map of `normalize_intensity`)."""
    return torch.from_numpy(normalize_intensity(image.numpy(), "ct" if modality == "ct" else "mr"))


class FolderPairs(Dataset):
    """Pairs from a user's folder: `pairs.csv` (fixed,moving[,fixed_labels,moving_labels]) or `images/*.nii.gz`
    with optional `labels/<same name>` (every ordered pair of distinct images). Images are resampled on the
    working grid centred on each fixed image."""

    def __init__(self, folder: str | Path, spacing: float, shape: tuple[int, int, int], validation: bool,
                 validation_pairs: int, require_labels: bool) -> None:
        folder = Path(folder)
        rows = self._rows(folder)
        if require_labels and any(len(r) < 4 or not r[2] or not r[3] for r in rows):
            raise InputError(f"{folder}: this recipe needs label maps for every pair")
        if len(rows) <= validation_pairs:
            raise InputError(f"{folder}: {len(rows)} pairs, need more than the {validation_pairs} held out")
        self.rows = rows[-validation_pairs:] if validation else rows[:-validation_pairs]
        self.spacing, self.shape = spacing, shape

    @staticmethod
    def _rows(folder: Path) -> list[list[str]]:
        if (folder / "pairs.csv").is_file():
            with open(folder / "pairs.csv", newline="") as f:
                rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
            if rows and rows[0][0].strip().lower() == "fixed":
                rows = rows[1:]
            rows = [[str(folder / c) if c else "" for c in r] for r in rows]
        else:
            images = sorted((folder / "images").glob("*.nii*"))
            if not images:
                raise InputError(f"{folder}: no pairs.csv and no images/*.nii.gz")
            def label_of(p):
                lab = folder / "labels" / p.name
                return str(lab) if lab.is_file() else ""
            rows = [[str(a), str(b), label_of(a), label_of(b)] for a, b in itertools.permutations(images, 2)]
        for r in rows:
            for c in r:
                if c and not Path(c).is_file():
                    raise InputError(f"{folder}: listed file {c} does not exist")
        if not rows:
            raise InputError(f"{folder}: no training pairs")
        _check_label_grids(rows)
        return rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        fixed, moving = read_image(row[0]), read_image(row[1])
        grid = centred_grid(fixed.grid, self.spacing, self.shape)
        item = {"fixed": torch.from_numpy(resample_array(normalize_intensity(fixed.data, "mr", fixed.source),
                                                          fixed.grid, grid))[None],
                "moving": torch.from_numpy(resample_array(normalize_intensity(moving.data, "mr", moving.source),
                                                           moving.grid, grid))[None]}
        if len(row) >= 4 and row[2] and row[3]:
            for key, path, like in (("fixed_labels", row[2], fixed), ("moving_labels", row[3], moving)):
                lab = read_labels(path, like=like)
                item[key] = torch.from_numpy(resample_array(lab.data, lab.grid, grid, order=0).astype(np.int64))[None]
        return item


def _check_label_grids(rows: list[list[str]]) -> None:
    """Every label map must lie on its image's grid (shape and affine, from the headers alone)."""
    import nibabel as nib

    headers: dict[str, tuple[tuple[int, ...], np.ndarray]] = {}

    def grid(path: str) -> tuple[tuple[int, ...], np.ndarray]:
        if path not in headers:
            try:
                image = nib.load(path)
            except Exception as exc:  # nibabel raises many types for unreadable files
                raise InputError(f"{path}: not a readable NIfTI image ({exc})") from exc
            headers[path] = (tuple(image.shape[:3]), image.affine)
        return headers[path]

    for row in rows:
        if len(row) < 4:
            continue
        for image, labels in ((row[0], row[2]), (row[1], row[3])):
            if not labels:
                continue
            (si, ai), (sl, al) = grid(image), grid(labels)
            if si != sl or not np.allclose(ai, al, atol=1e-3):
                raise InputError(f"{labels}: label map grid (shape {list(sl)}, spacing "
                                 f"{np.round(np.linalg.norm(al[:3, :3], axis=0), 3).tolist()} mm) differs from its "
                                 f"image {image} (shape {list(si)}, spacing "
                                 f"{np.round(np.linalg.norm(ai[:3, :3], axis=0), 3).tolist()} mm); resample the labels "
                                 "onto the image grid (nearest neighbour) first")
