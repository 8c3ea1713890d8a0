"""Build the bundled demo pair in Resources/SampleData from the ICBM152 2009a template at 2 mm.

fixed = the template T1; moving = the T1 resampled by a known random warp (smooth non-linear + small affine, see
`synth`) with intensity perturbation. Both share one 2 mm RAS grid. The ground truth is written as a physical field:
fixed point p (RAS mm) corresponds to moving point p + d(p).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from DeepRegistrationLib.core import warp
from DeepRegistrationLib.core.landmarks import Landmarks, write_fcsv

from . import synth
from .fetch import ICBM152_NOTICE, TISSUE_TABLE, fetch, is_complete
from .label_protocols import validate_label_table, write_label_table

SHAPE = (80, 96, 80)
SPACING_MM = 2.0
DISPLACEMENT_STEP_MM = 0.01
"""Quantisation of the stored ground-truth field (int16 with scl_slope), to keep the sample small."""

README = """\
# Sample data: ICBM152 2009a with a known warp

Built by `python -m training.data sample` (training/data/sample.py) from the MNI ICBM152 non-linear symmetric
2009a template (licence: LICENSE-ICBM152.txt). All files share one {shape} grid of {spacing} mm voxels, RAS.

| file | content |
|---|---|
| fixed.nii.gz | the template T1, intensities normalised to [0, 1] (int16 with NIfTI scaling) |
| moving.nii.gz | the T1 resampled by the known warp, with random gamma, bias field, blur and noise |
| fixed_labels.nii.gz, moving_labels.nii.gz | tissue labels (labels.tsv: 1 CSF, 2 GM, 3 WM); moving = fixed labels warped (nearest) |
| fixed_landmarks.fcsv, moving_landmarks.fcsv | {n} Slicer fiducials, RAS mm, matched by label: per tissue the voxel nearest its centroid and random boundary voxels |
| ground_truth_displacement.nii.gz | the true field, see below |

`ground_truth_displacement.nii.gz` is a plain 4D NIfTI of shape [I, J, K, 3] on the fixed grid, stored as int16 with
scl_slope {step} (readers that apply the NIfTI scaling, like nibabel, ITK and Slicer, get float mm):
component c is the **RAS mm** displacement along axis x, y, z (not LPS, not an ITK vector image). Fixed point p maps
to moving point p + d(p); resampling the moving image at p + d(p) reproduces the fixed image (up to interpolation and
the intensity perturbation), and every fixed landmark plus d at its position gives its moving landmark (to the
0.01 mm storage step).

The warp is exp(v) of a random stationary velocity v (multi-scale smooth, peak {magnitude} mm, plus a small
affine part), seed {seed}; the moving image is T1 ∘ exp(−v).
"""


def _resample(volume: np.ndarray, affine: np.ndarray, grid_affine: np.ndarray, shape: tuple[int, int, int],
              sigma_vox: float) -> torch.Tensor:
    """Trilinear resampling of a 1 mm volume onto `grid_affine`/`shape` after a Gaussian anti-alias blur."""
    source = warp.gaussian_smooth(torch.from_numpy(volume.astype(np.float32))[None, None], sigma_vox)
    index = np.linalg.inv(affine) @ grid_affine  # target voxel → source voxel
    grid = warp.identity_grid(shape, dtype=torch.float64)
    coords = torch.einsum("rc,bcijk->brijk", torch.from_numpy(index[:3, :3]), grid)
    coords = coords + torch.from_numpy(index[:3, 3]).view(1, 3, 1, 1, 1)
    return warp.sample(source, coords.float(), padding_mode="zeros")


def _save(path: Path, data: np.ndarray, affine: np.ndarray, dtype: type, step: float | None = None) -> None:
    """Write `data` stored as `dtype`. Float data stored as an integer type gets NIfTI scl_slope scaling: `step`
    (quantisation step in the data's units) or, by default, one chosen by nibabel to fit the type's range."""
    if step is None:
        image = nib.Nifti1Image(np.asarray(data), affine)
        image.set_data_dtype(dtype)
    else:
        image = nib.Nifti1Image(np.round(np.asarray(data) / step).astype(dtype), affine)
        image.header.set_slope_inter(step, 0.0)
    nib.save(image, str(path))


def build_sample(anatomy: Path, out: Path, seed: int = 2009, magnitude_mm: float = 6.0) -> dict[str, float]:
    """Write the sample pair into `out` (fetching ICBM152 into `anatomy` if needed); returns summary numbers."""
    source = Path(anatomy) / "icbm152_2009a"
    if not is_complete(source):
        fetch(anatomy, ["icbm152_2009a"])
    images = {k: nib.load(str(source / f"{k}.nii.gz")) for k in ("t1", "csf", "gm", "wm")}
    affine = images["t1"].affine
    mask = np.asanyarray(nib.load(str(source / "mask.nii.gz")).dataobj) > 0
    idx = np.argwhere(mask)
    centre_ras = (affine @ np.r_[(idx.min(0) + idx.max(0)) / 2.0, 1.0])[:3]
    grid_affine = np.diag([SPACING_MM] * 3 + [1.0])
    grid_affine[:3, 3] = centre_ras - SPACING_MM * (np.array(SHAPE) - 1) / 2.0

    sigma = 0.85 * SPACING_MM / 2.0  # anti-alias blur of the 1 mm sources, in their voxels
    t1 = _resample(images["t1"].get_fdata(), affine, grid_affine, SHAPE, sigma)
    probs = torch.cat([_resample(images[k].get_fdata(), affine, grid_affine, SHAPE, sigma)
                       for k in ("csf", "gm", "wm")], dim=1)
    tissue = torch.where(probs.sum(1, keepdim=True) >= 0.5, probs.argmax(1, keepdim=True) + 1, 0)
    fixed_image = synth.robust_normalise(t1)

    pair = synth.known_warp_pair(fixed_image, tissue, spacing=(SPACING_MM,) * 3, seed=seed,
                                 magnitude_mm=magnitude_mm, affine=True, perturb_fixed=False,
                                 boundary_landmarks=9)
    moving = synth.robust_normalise(pair.moving)
    validate_label_table(pair.fixed_labels, TISSUE_TABLE, "sample fixed labels")
    validate_label_table(pair.moving_labels, TISSUE_TABLE, "sample moving labels")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _save(out / "fixed.nii.gz", pair.fixed[0, 0].numpy(), grid_affine, np.int16)
    _save(out / "moving.nii.gz", moving[0, 0].numpy(), grid_affine, np.int16)
    _save(out / "fixed_labels.nii.gz", pair.fixed_labels[0, 0].numpy().astype(np.int16), grid_affine, np.int16)
    _save(out / "moving_labels.nii.gz", pair.moving_labels[0, 0].numpy().astype(np.int16), grid_affine, np.int16)
    write_label_table(out / "labels.tsv", TISSUE_TABLE)

    linear = torch.from_numpy(grid_affine[:3, :3]).float()
    disp_ras = torch.einsum("rc,cijk->ijkr", linear, pair.displacement[0]).numpy()
    _save(out / "ground_truth_displacement.nii.gz", disp_ras, grid_affine, np.int16, DISPLACEMENT_STEP_MM)

    names = []
    for n, label in enumerate(pair.landmark_labels.tolist()):
        first = n == 0 or pair.landmark_labels[n - 1] != label
        names.append(f"{TISSUE_TABLE[label]}-centre" if first else f"{TISSUE_TABLE[label]}-{len(names)}")
    to_ras = lambda p: (grid_affine[:3, :3] @ p.numpy().T.astype(np.float64)).T + grid_affine[:3, 3]  # noqa: E731
    write_fcsv(out / "fixed_landmarks.fcsv", Landmarks(names, to_ras(pair.fixed_landmarks)))
    write_fcsv(out / "moving_landmarks.fcsv", Landmarks(names, to_ras(pair.moving_landmarks)))
    (out / "LICENSE-ICBM152.txt").write_text(ICBM152_NOTICE)
    (out / "README.md").write_text(README.format(shape="×".join(map(str, SHAPE)), spacing=SPACING_MM,
                                                 n=len(names), magnitude=magnitude_mm, seed=seed,
                                                 step=DISPLACEMENT_STEP_MM))

    norm = np.linalg.norm(disp_ras, axis=-1)
    brain = (pair.fixed_labels[0, 0] > 0).numpy()
    summary = {"max_displacement_mm": float(norm.max()), "mean_displacement_mm_in_brain": float(norm[brain].mean()),
               "min_jacobian": float(warp.jacobian_determinant(pair.displacement).min()),
               "landmarks": len(names), "bytes": sum(p.stat().st_size for p in out.iterdir())}
    print(", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    return summary

