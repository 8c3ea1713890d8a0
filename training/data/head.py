"""Synthetic head CT from anatomy that is not skull-stripped: a head tissue map and a CT rendered from it in HU.

`head_tissue_map(t1, tissue, spacing_mm)` segments a whole-head T1 (skull and scalp kept: fsaverage's `T1.nii.gz`,
Colin27's `ch2.nii.gz`) into air, CSF, grey and white matter (from the subject's brain tissue labels), bone and
scalp, by intensity and distance: inside the head mask (T1 above a low threshold, holes filled), outside the brain,
voxels darker than the brain's CSF/grey boundary are CSF within `csf_mm` of the brain and bone beyond it (cortical
bone is dark on T1); a closing of the bone takes in the marrow between its tables; the rest is scalp (skin, muscle,
fat). Computed at the image's own resolution (1 mm), then carried to a working grid as per-class fractions
(`class_fractions`: each class's indicator resampled with an anti-alias blur), which are the partial volumes the
CT is rendered from.

`render_ct(fractions, generator)`: per pair a random HU per class in the ranges of real head CT (`HU_RANGES`:
bone 700–1500 with smooth spatial variation of ±150, CSF 0–15, grey 35–45, white 25–30, scalp 20–60, air −1000),
mixed by the fractions (partial volume), a small blur (scanner PSF) and Gaussian noise of 3–8 HU.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from DeepRegistrationLib.core import warp

from . import synth

HEAD_CLASSES: dict[int, str] = {0: "air", 1: "csf", 2: "gm", 3: "wm", 4: "bone", 5: "soft_tissue"}
"""Head tissue map ids; 1–3 are the brain tissue classes of `synth.TISSUE_CLASSES`."""

HU_RANGES: dict[str, tuple[float, float]] = {
    "air": (-1000.0, -1000.0), "csf": (0.0, 15.0), "gm": (35.0, 45.0), "wm": (25.0, 30.0),
    "bone": (700.0, 1500.0), "soft_tissue": (20.0, 60.0)}
"""Per-class range of the mean HU drawn for each rendered CT."""


def head_tissue_map(t1: np.ndarray, tissue: np.ndarray, spacing_mm: float = 1.0, csf_mm: float = 2.0,
                    head_threshold: float = 0.06) -> np.ndarray:
    """Head tissue map (`HEAD_CLASSES`) of a whole-head T1 `t1` (normalised to [0, 1]) and the brain tissue labels
    `tissue` (0 outside, 1 CSF, 2 GM, 3 WM) on the same grid; see the module docstring."""
    t1 = np.asarray(t1, dtype=np.float32)
    tissue = np.asarray(tissue).astype(np.int16)
    head = t1 > head_threshold
    labelled, count = ndimage.label(head)
    if count == 0:
        raise ValueError("no head in the image (nothing above the head threshold)")
    sizes = ndimage.sum(head, labelled, range(1, count + 1))
    head = labelled == (1 + int(np.argmax(sizes)))
    head = ndimage.binary_closing(head, iterations=2)
    head = np.stack([ndimage.binary_fill_holes(s) for s in head])  # per slice: the mouth, nose and sinuses
    head = ndimage.binary_fill_holes(head) | (tissue > 0)
    brain = tissue > 0
    gm, csf = t1[tissue == 2], t1[tissue == 1]
    dark = (float(np.median(gm)) + float(np.median(csf))) / 2 if csf.size else 0.6 * float(np.median(gm))
    outside_brain = ndimage.distance_transform_edt(~brain) * spacing_mm
    extra = head & ~brain
    low = extra & (t1 < dark)
    out = np.zeros(t1.shape, np.int16)
    out[head] = 5
    out[brain] = tissue[brain]
    out[low & (outside_brain <= csf_mm)] = 1
    bone = low & (outside_brain > csf_mm)
    bone = ndimage.binary_closing(bone, iterations=max(1, int(round(2.0 / spacing_mm)))) & extra
    bone &= ~(low & (outside_brain <= csf_mm))
    out[bone] = 4
    return out


def class_fractions(head_map: np.ndarray, source_grid, target_grid) -> Tensor:
    """Per-class fractions [1, C, I, J, K] of a head map on `target_grid` (indicators resampled trilinearly after a
    Gaussian anti-alias blur matched to the spacing ratio), normalised to sum to 1."""
    from DeepRegistrationLib.core.resample import resample_array

    ratio = float(target_grid.spacing[0]) / float(source_grid.spacing[0])
    sigma = np.sqrt(max(ratio**2 - 1.0, 0.0)) / 2.355
    channels = []
    for c in HEAD_CLASSES:
        indicator = (head_map == c).astype(np.float32)
        if sigma > 0.1:
            indicator = ndimage.gaussian_filter(indicator, sigma)
        channels.append(resample_array(indicator, source_grid, target_grid))
    fractions = torch.from_numpy(np.stack(channels))[None].clamp_min(0)
    fractions[:, 0] += (fractions.sum(1) == 0).float()  # outside the source: air
    return fractions / fractions.sum(1, keepdim=True)


def brain_labels(fractions: Tensor) -> Tensor:
    """The brain tissue labels (0, CSF 1, GM 2, WM 3) of a fractions volume: the majority class where it is one of
    them, else 0. [1, 1, I, J, K] int64."""
    winner = fractions.argmax(1, keepdim=True)
    return torch.where((winner >= 1) & (winner <= 3), winner, 0).long()


def render_ct(fractions: Tensor, generator: torch.Generator, spacing=(1.0, 1.0, 1.0)) -> Tensor:
    """A head CT in HU [1, 1, I, J, K] from class fractions (module docstring)."""
    g = synth.make_generator(generator)
    shape = fractions.shape[2:]
    hu = torch.zeros(1, len(HEAD_CLASSES), *shape)
    for c, name in HEAD_CLASSES.items():
        low, high = HU_RANGES[name]
        hu[:, c] = low + (high - low) * float(torch.rand((), generator=g))
    hu[:, 4] += 150.0 * synth.smooth_noise(shape, spacing, 20.0, g)[0, 0]  # cortical vs marrow, thickness
    ct = (fractions * hu).sum(1, keepdim=True)
    ct = warp.gaussian_smooth(ct, 0.3 + 0.4 * float(torch.rand((), generator=g)))
    noise = 3.0 + 5.0 * float(torch.rand((), generator=g))
    return ct + noise * torch.randn(ct.shape, generator=g)


def render_mr(fractions: Tensor, modality: str, generator: torch.Generator) -> Tensor:
    """A synthetic MR head (`synth.CONTRASTS[modality]`, jittered per class) mixed by the fractions, with noise."""
    g = synth.make_generator(generator)
    jitter, noise = synth._CONTRAST_NOISE[modality]
    means = torch.tensor([synth.CONTRASTS[modality][name] + (0.0 if name == "air" else jitter * float(
        torch.randn((), generator=g))) for name in HEAD_CLASSES.values()])
    image = (fractions * means.view(1, -1, 1, 1, 1)).sum(1, keepdim=True)
    return (image + noise * torch.randn(image.shape, generator=g)).abs()


def head_pair(t1: Tensor, fractions: Tensor, spacing=(1.0, 1.0, 1.0), seed: synth.Seed = 0,
              fixed_modality: str = "ct", moving_modality: str = "t1", magnitude_mm: float = 6.0,
              affine: bool = False, velocity: Tensor | None = None,
              boundary_landmarks: int | None = None) -> synth.SyntheticPair:
    """A CT–MR (or MR–CT) pair of one head with a known warp: "ct" rendered from the fractions (`render_ct`),
    "t1" the real whole-head T1 perturbed (`synth.perturb_intensity`), "t2" rendered (`render_mr`). The moving
    image is rendered from the fractions (or T1) warped by u⁻¹; labels are the brain tissue classes."""
    generator = synth.make_generator(seed)
    t1 = synth._as_volume(t1).float()

    def image(modality: str, inverse: Tensor | None) -> Tensor:
        f = fractions if inverse is None else warp.warp_image(fractions, inverse)
        if modality == "ct":
            return render_ct(f, generator, spacing)
        if modality == "t1":
            source = t1 if inverse is None else warp.warp_image(t1, inverse)
            return synth.perturb_intensity(source, generator, spacing)
        return render_mr(f, modality, generator)

    def render(inverse: Tensor) -> tuple[Tensor, Tensor]:
        return image(fixed_modality, None), image(moving_modality, inverse)

    return synth._pair(t1.shape[2:], spacing, generator, brain_labels(fractions), render, magnitude_mm, affine,
                       boundary_landmarks, velocity)


def intensity_tissue(t1: np.ndarray, brain: np.ndarray, iterations: int = 20) -> np.ndarray:
    """CSF (1), GM (2), WM (3) of a skull-stripped T1 inside `brain` by 1-D k-means of the intensities (centres
    started at the 10th, 50th and 90th percentiles; deterministic), 0 outside: a tissue map for a subject whose
    atlas labels only the grey matter (Colin27's AAL)."""
    values = np.asarray(t1, np.float64)[brain]
    centres = np.percentile(values, [10, 50, 90])
    for _ in range(iterations):
        assign = np.abs(values[:, None] - centres[None]).argmin(1)
        centres = np.array([values[assign == k].mean() if np.any(assign == k) else centres[k] for k in range(3)])
    order = np.argsort(centres)
    out = np.zeros(np.shape(t1), np.int16)
    assign = np.abs(values[:, None] - centres[None]).argmin(1)
    out[brain] = (np.argsort(order)[assign] + 1).astype(np.int16)
    return out
