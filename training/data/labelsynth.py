"""New anatomy without downloads: SynthMorph-style label maps made from the training subjects' label maps.

`synthesise_labels(maps, generator, spacing)` draws one new label map on the maps' (shared) grid:

1. a random subject's map, deformed by a large random diffeomorphism (`synth.random_velocity`, peak `warp_mm`,
   default 14 mm, with an affine part), nearest-neighbour;
2. structure-wise dilation and erosion: every label's indicator is smoothed (σ = `morph_sigma` voxels) and
   shifted by a random bias in [−`morph`, +`morph`] per label before the arg-max, so each structure grows or
   shrinks by up to about a voxel on its own while the map stays a partition;
3. left–right mixing with probability `mix`: the hemisphere on one side of a wavy mid-sagittal seam (the grid's
   first axis is left–right, RAS) comes from a second draw of steps 1–2 (another subject or another warp of the
   same one).

Label ids of different subjects never collide: `offset_labels` moves subject k's ids to k·`LABEL_OFFSET` + id
(SynthMorph too renders each label with its own random contrast, so ids carry no meaning beyond identity).
Images are then rendered with `synth.label_driven_image` (random contrast per label, bias, blur, noise) at a random
resolution (`random_resolution`: blurred and resampled through a coarser grid, up to `max_downsample`×).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from DeepRegistrationLib.core import warp

from . import synth

LABEL_OFFSET = 1000


def offset_labels(maps: list[Tensor]) -> list[Tensor]:
    """Subject k's non-zero ids become k·LABEL_OFFSET + id (k from 0), so ids of different subjects differ."""
    return [torch.where(m > 0, m + k * LABEL_OFFSET, 0) for k, m in enumerate(maps)]


def morph_labels(labels: Tensor, generator: torch.Generator, morph: float = 0.2, sigma: float = 1.0) -> Tensor:
    """Structure-wise dilation/erosion by arg-max of smoothed indicators plus a random bias per label."""
    values = torch.unique(labels)
    if len(values) < 2:
        return labels
    onehot = torch.cat([(labels == v).float() for v in values], dim=1)
    smooth = warp.gaussian_smooth(onehot, sigma)
    bias = morph * (2 * torch.rand(len(values), generator=generator) - 1)
    bias[values == 0] = 0.0  # the background keeps its place; structures grow into it or give way to it
    return values[(smooth + bias.view(1, -1, 1, 1, 1)).argmax(1, keepdim=True)]


def _draw(maps: list[Tensor], generator: torch.Generator, spacing, warp_mm: float, morph: float,
          morph_sigma: float) -> Tensor:
    labels = maps[int(torch.randint(len(maps), (), generator=generator))]
    shape = labels.shape[2:]
    velocity = synth.random_velocity(shape, generator, spacing, warp_mm, affine=True, rotation_deg=6.0,
                                     scale=0.06, shear=0.03, translation_mm=4.0)
    warped = warp.warp_labels(labels, warp.integrate_velocity(velocity), mode="nearest")
    return morph_labels(warped, generator, morph, morph_sigma)


def synthesise_labels(maps: list[Tensor], generator: synth.Seed, spacing=(1.0, 1.0, 1.0), warp_mm: float = 14.0,
                      morph: float = 0.2, morph_sigma: float = 1.0, mix: float = 0.5) -> Tensor:
    """One new label map [1, 1, I, J, K] int64 from `maps` (each [1, 1, I, J, K], ids already distinct across
    subjects, see `offset_labels`); module docstring."""
    g = synth.make_generator(generator)
    labels = _draw(maps, g, spacing, warp_mm, morph, morph_sigma)
    if float(torch.rand((), generator=g)) < mix:
        other = _draw(maps, g, spacing, warp_mm, morph, morph_sigma)
        shape = labels.shape[2:]
        x = torch.arange(shape[0], dtype=torch.float32).view(-1, 1, 1).expand(*shape)
        seam = (shape[0] - 1) / 2 + 3.0 * synth.smooth_noise(shape, spacing, 40.0, g)[0, 0]
        left = x < seam
        if float(torch.rand((), generator=g)) < 0.5:
            left = ~left
        labels = torch.where(left[None, None], labels, other)
    return labels


def random_resolution(image: Tensor, generator: torch.Generator, max_downsample: float = 2.0) -> Tensor:
    """The image seen at a random coarser resolution: blurred, resampled to up to `max_downsample`× fewer voxels
    per axis (independently) and back (trilinear)."""
    factors = 1.0 + (max_downsample - 1.0) * torch.rand(3, generator=generator)
    shape = image.shape[2:]
    coarse = [max(4, int(round(n / f))) for n, f in zip(shape, factors.tolist())]
    sigma = float((factors.mean() - 1.0) / 2.0)
    blurred = warp.gaussian_smooth(image, sigma) if sigma > 0.1 else image
    small = F.interpolate(blurred, size=coarse, mode="trilinear", align_corners=True)
    return F.interpolate(small, size=tuple(shape), mode="trilinear", align_corners=True)


def synth_pair(maps: list[Tensor], spacing=(1.0, 1.0, 1.0), seed: synth.Seed = 0, magnitude_mm: float = 6.0,
               affine: bool = False, velocity: Tensor | None = None,
               boundary_landmarks: int | None = None) -> synth.SyntheticPair:
    """A pair on a new label map (`synthesise_labels`): two independent renderings (`label_driven_image`, then
    `random_resolution`), the moving one of the map warped by u⁻¹ (exp of `velocity` or a random SVF)."""
    g = synth.make_generator(seed)
    labels = synthesise_labels(maps, g, spacing)

    def render(inverse: Tensor) -> tuple[Tensor, Tensor]:
        fixed = random_resolution(synth.label_driven_image(labels, g, spacing), g)
        moving = warp.warp_image(synth.label_driven_image(labels, g, spacing), inverse)
        return fixed, random_resolution(moving, g)

    return synth._pair(labels.shape[2:], spacing, g, labels, render, magnitude_mm, affine, boundary_landmarks,
                       velocity)
