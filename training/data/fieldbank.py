"""A bank of real inter-subject deformations: ANTs SyN fields between training subjects, as stationary velocities.

`python -m training.data fieldbank [--subjects icbm152_2009a fsaverage] [--synthetic N] [--spacing 4]` registers
every ordered pair of the given (fetched, training) subjects and of N synthesised subjects (new label maps of
`labelsynth`, rendered T1-like) against each real subject with antspyx `SyN` (affine + SyN, Mattes MI) on one RAS
grid (the benchmark's field of view, 192×224×192 mm, at `--spacing` mm), composes each result into one
displacement u (fixed point ↦ moving point), takes its logarithm v (exp(v) ≈ u, fixed-point iteration
v ← v + (u − exp(v))), and writes `<out>/<fixed>__<moving>.nii.gz` (v as [I, J, K, 3] RAS mm) with
`<out>/manifest.json`: the grid, per field the subjects, sha256, 95th-percentile and peak |u| in the brain and the
logarithm's residual, the sha256 of every source anatomy file (held-out subjects are refused), the settings and
the antspyx version. `--measure` prints the 95th percentiles of the bank's fields, of draws from it and of the
old random SVFs (docs/MODELS.md, "Realistic deformations").

`FieldBank(path, spacing, shape).velocity(generator, ...)` draws a training warp on a working grid: a bank field
resampled onto the working shape (centred on the bank grid's centre, all subjects lying in MNI-like space),
mirrored left–right with probability ½, inverted (−v) with probability ½ (so the draws have no mean field a
network could learn instead of registering), scaled by a factor in `scale`, plus a random SVF of peak
`magnitude_mm` (and the random affine part): v = s·v_bank + v_random, whose exponential is the ground truth
(the sum of velocities is the first-order composition of the two warps).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import nibabel as nib
import numpy as np
import torch

from DeepRegistrationLib.core import warp
from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.core.geometry import Grid

from . import synth
from DeepRegistrationLib.methods.models import sha256_of

from .subjects import tissue_classes

MANIFEST = "manifest.json"
FOV_MM = (192.0, 224.0, 192.0)
CENTRE_RAS_MM = (0.0, -18.0, 10.0)


def bank_grid(spacing: float) -> Grid:
    """The bank's RAS grid: the benchmark's field of view at `spacing` mm."""
    shape = tuple(int(round(f / spacing)) for f in FOV_MM)
    origin = np.array(CENTRE_RAS_MM) - (np.array(shape) - 1) / 2 * spacing
    return Grid.from_spacing(shape, (spacing,) * 3, tuple(origin), np.eye(3))


def log_field(u: torch.Tensor, steps: int = 7, iterations: int = 20) -> tuple[torch.Tensor, float]:
    """v with exp(v) ≈ u (voxels, [1, 3, I, J, K]) by v ← v + (u − exp(v)); returns v and max |exp(v) − u|."""
    v = u.clone()
    for _ in range(iterations):
        v = v + (u - warp.integrate_velocity(v, steps))
    return v, float((warp.integrate_velocity(v, steps) - u).norm(dim=1).amax())


def _on_grid(anatomy_dir: Path, name: str, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """A fetched subject's T1 (normalised, anti-aliased) and labels on `grid`."""
    from DeepRegistrationLib.core.image import read_image, read_labels
    from DeepRegistrationLib.core.resample import normalize_intensity, resample_array
    from scipy import ndimage

    from .subjects import SUBJECT_FILES

    if name not in SUBJECT_FILES:
        raise InputError(f"unknown subject {name!r}; known: {', '.join(SUBJECT_FILES)}")
    folder = Path(anatomy_dir) / name
    image = read_image(folder / SUBJECT_FILES[name][0])
    labels = read_labels(folder / SUBJECT_FILES[name][1], like=image)
    data = normalize_intensity(image.data, "mr", image.source)
    sigma = np.sqrt(max(float(grid.spacing[0]) ** 2 - float(image.grid.spacing[0]) ** 2, 0.0)) / 2.355
    data = ndimage.gaussian_filter(data, sigma / float(image.grid.spacing[0]))
    return (resample_array(data, image.grid, grid).astype(np.float32),
            resample_array(labels.data, labels.grid, grid, order=0).astype(np.int64))


def _syn(fixed: np.ndarray, moving: np.ndarray, grid: Grid, workdir: Path, seed: int) -> np.ndarray:
    """antspyx SyN (affine + SyN, Mattes MI) of two images on `grid`; the composed field in RAS mm [I, J, K, 3]."""
    import ants

    from DeepRegistrationLib.core.field import read_itk_displacement
    from DeepRegistrationLib.core.image import Image, write_image

    paths = []
    for name, data in (("fixed", fixed), ("moving", moving)):
        paths.append(workdir / f"{name}.nii.gz")
        write_image(Image(data.astype(np.float32), grid, name), paths[-1])
    f, m = ants.image_read(str(paths[0])), ants.image_read(str(paths[1]))
    ants.config._random_seed = seed
    result = ants.registration(f, m, type_of_transform="SyN", outprefix=str(workdir / "syn_"))
    composed = ants.apply_transforms(f, m, list(result["fwdtransforms"]), compose=str(workdir / "syn_forward_"))
    field = read_itk_displacement(composed)
    if not field.grid.same_as(grid, tol=1e-3):
        field = field.resampled(grid)
    return field.data


def build_bank(anatomy_dir: Path, out: Path, subjects: Sequence[str] = ("icbm152_2009a", "fsaverage"),
               synthetic: int = 4, spacing: float = 4.0, seed: int = 0, held_out: Sequence[str] = ("colin27",),
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Compute the bank into `out` (module docstring); returns its manifest."""
    import tempfile

    import ants

    from .subjects import subject_files
    from . import labelsynth

    leaked = sorted(set(subjects) & set(held_out))
    if leaked:
        raise InputError(f"the field bank would carry held-out anatomy {leaked}; drop it from --subjects")
    if len(subjects) < 1 or len(subjects) + synthetic < 2:
        raise InputError("a field bank needs at least two subjects (real or synthetic)")
    grid = bank_grid(spacing)
    sources = {name: subject_files(anatomy_dir, name) for name in subjects}
    images, labels = {}, {}
    for name in subjects:
        images[name], labels[name] = _on_grid(anatomy_dir, name, grid)
    maps = [torch.from_numpy(labels[n])[None, None] for n in subjects]
    classes: dict[int, str] = {0: "background"}
    for k, name in enumerate(subjects):
        classes.update({k * labelsynth.LABEL_OFFSET + i: c for i, c in tissue_classes(name).items()})
    offset = labelsynth.offset_labels(maps)
    for n in range(synthetic):
        g = synth.make_generator(seed * 1000 + n)
        new = labelsynth.synthesise_labels(offset, g, (spacing,) * 3)
        new = torch.where(torch.isin(new, torch.tensor(sorted(classes))), new, 0)
        image = synth.multimodal_contrast(new, "t1", g, classes)
        images[f"synthetic{n}"] = synth.robust_normalise(image)[0, 0].numpy()
    pairs = [(a, b) for a in subjects for b in subjects if a != b]
    pairs += [(s, r) for s in images if s.startswith("synthetic") for r in subjects]
    pairs += [(r, s) for s in images if s.startswith("synthetic") for r in subjects]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    brain = np.zeros(grid.shape, bool)
    for name in subjects:
        brain |= labels[name] > 0
    to_vox = torch.from_numpy(np.linalg.inv(grid.affine[:3, :3])).float()
    fields = []
    start = time.perf_counter()
    for fixed, moving in pairs:
        with tempfile.TemporaryDirectory(prefix="fieldbank_") as tmp:
            d_mm = _syn(images[fixed], images[moving], grid, Path(tmp), seed + 1)
        u = torch.einsum("ij,xyzj->ixyz", to_vox, torch.from_numpy(d_mm).float())[None]
        v, residual = log_field(u)
        v_mm = torch.einsum("ij,jxyz->xyzi", torch.from_numpy(grid.affine[:3, :3]).float(), v[0]).numpy()
        name = f"{fixed}__{moving}.nii.gz"
        nib.save(nib.Nifti1Image(v_mm.astype(np.float32), grid.affine), str(out / name))
        norm = np.linalg.norm(d_mm, axis=-1)[brain]
        fields.append({"file": name, "fixed": fixed, "moving": moving, "sha256": sha256_of(out / name),
                       "p95_mm": round(float(np.percentile(norm, 95)), 3), "max_mm": round(float(norm.max()), 3),
                       "log_residual_max_vox": round(residual, 4)})
        log(f"{name}: 95th percentile {fields[-1]['p95_mm']:.2f} mm, peak {fields[-1]['max_mm']:.2f} mm, "
            f"log residual {residual:.3f} voxels ({time.perf_counter() - start:.0f} s)")
    manifest = {"grid": {"shape": list(grid.shape), "affine": grid.affine.tolist(), "spacing_mm": spacing},
                "subjects": list(subjects), "synthetic": synthetic, "seed": seed, "held_out": list(held_out),
                "sources": sources, "fields": fields, "antspyx": ants.__version__,
                "registration": "ants.registration(type_of_transform='SyN'): affine + SyN, Mattes MI",
                "seconds": round(time.perf_counter() - start, 1)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise InputError(f"{manifest}: no field bank; build it with `python -m training.data fieldbank --out "
                         f"{path}` (or use data.warps 'random')")
    return json.loads(manifest.read_text())


def bank_record(path: str | Path) -> dict[str, Any]:
    """What a model's data manifest records of the bank: its manifest's sha256, each field's sha256 and the
    hashes of the anatomy the fields were computed from (checked against the files)."""
    manifest = read_manifest(path)
    for entry in manifest["fields"]:
        file = Path(path) / entry["file"]
        if not file.is_file() or sha256_of(file) != entry["sha256"]:
            raise InputError(f"{file}: missing or changed since the bank was built; rebuild the field bank")
    return {"manifest_sha256": sha256_of(Path(path) / MANIFEST), "sources": manifest["sources"],
            "fields": {e["file"]: e["sha256"] for e in manifest["fields"]}}


class FieldBank:
    """The bank's velocities on a working grid of `shape` and `spacing` mm (voxels), loaded once."""

    def __init__(self, path: str | Path, spacing: float, shape: Sequence[int]) -> None:
        from DeepRegistrationLib.core.resample import resample_array

        manifest = read_manifest(path)
        source = Grid(tuple(manifest["grid"]["shape"]), np.array(manifest["grid"]["affine"]))
        centre = source.voxel_to_world((np.array(source.shape) - 1) / 2)
        origin = centre - (np.array(shape) - 1) / 2 * spacing
        target = Grid.from_spacing(tuple(shape), (spacing,) * 3, tuple(origin), np.eye(3))
        self.fields = []
        for entry in manifest["fields"]:
            v_mm = np.asarray(nib.load(str(Path(path) / entry["file"])).dataobj, dtype=np.float32)
            v = resample_array(v_mm, source, target) / spacing
            self.fields.append(torch.from_numpy(np.ascontiguousarray(v)).permute(3, 0, 1, 2)[None].float())
        if not self.fields:
            raise InputError(f"{path}: the field bank holds no fields")
        self.spacing, self.shape = spacing, tuple(shape)

    def velocity(self, generator: torch.Generator, scale: Sequence[float] = (0.6, 1.0), magnitude_mm: float = 4.0,
                 affine: bool = False) -> torch.Tensor:
        """A training velocity [1, 3, I, J, K] in voxels (module docstring)."""
        v = self.fields[int(torch.randint(len(self.fields), (), generator=generator))]
        if float(torch.rand((), generator=generator)) < 0.5:  # left–right mirror: x ↦ −x, v_x ↦ −v_x
            v = torch.flip(v, dims=[2]) * torch.tensor([-1.0, 1.0, 1.0]).view(1, 3, 1, 1, 1)
        s = scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=generator))
        if float(torch.rand((), generator=generator)) < 0.5:  # the inverse warp, −v: the draws have no mean field
            s = -s
        spacing = (self.spacing,) * 3
        return s * v + synth.random_velocity(self.shape, generator, spacing, magnitude_mm, affine=affine)


def p95_mm(velocity: torch.Tensor, spacing: float, mask: torch.Tensor | None = None) -> float:
    """95th percentile of |exp(v)| in mm (inside `mask` [I, J, K] when given)."""
    u = warp.integrate_velocity(velocity).norm(dim=1)[0] * spacing
    values = u[mask] if mask is not None else u.flatten()
    return float(torch.quantile(values.flatten()[:: max(1, values.numel() // 200_000)], 0.95))


def measure(path: str | Path | None, anatomy_dir: Path, spacing: float = 4.0, shape=(48, 56, 48), draws: int = 20,
            scale: Sequence[float] = (0.6, 1.0), magnitude_mm: float = 4.0) -> dict[str, float]:
    """Mean 95th-percentile |u| (mm, inside the ICBM152 brain) of random SVFs (peak 6 and 10 mm, with the
    affine part) and, with a bank, of the bank's fields and of `draws` training draws from it."""
    from .subjects import load_subject

    labels = load_subject(anatomy_dir, "icbm152_2009a", spacing, tuple(shape))[1][0, 0] > 0
    out: dict[str, float] = {}
    for peak in (6.0, 10.0):
        values = [p95_mm(synth.random_velocity(shape, synth.make_generator(i), (spacing,) * 3, peak, affine=True),
                         spacing, labels) for i in range(draws)]
        out[f"random_svf_peak{peak:g}mm_affine"] = float(np.mean(values))
    if path is not None:
        bank = FieldBank(path, spacing, shape)
        out["bank_fields"] = float(np.mean([p95_mm(v, spacing, labels) for v in bank.fields]))
        values = [p95_mm(bank.velocity(synth.make_generator(i), scale, magnitude_mm, True), spacing, labels)
                  for i in range(draws)]
        out[f"bank_draws_scale{scale[0]:g}-{scale[1]:g}_plus_svf{magnitude_mm:g}mm"] = float(np.mean(values))
    return out
