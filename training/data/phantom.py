"""Analytic label phantoms for tests and smoke runs: no downloads, any grid size."""

from __future__ import annotations

import torch

from DeepRegistrationLib.core import warp

PHANTOM_TABLE = {1: "head", 2: "blob A", 3: "blob B", 4: "core"}


def ellipsoid_labels(shape: tuple[int, int, int]) -> torch.Tensor:
    """[1, 1, I, J, K] int64 phantom: a head-like ellipsoid (1) holding two blobs (2, 3) and a core (4)."""
    g = warp.identity_grid(shape)[0]
    c = [(s - 1) / 2 for s in shape]
    r = [(g[a] - c[a]) / (shape[a] / 2) for a in range(3)]
    labels = torch.zeros(shape, dtype=torch.int64)
    labels[(r[0] ** 2 + r[1] ** 2 + r[2] ** 2) < 0.75**2] = 1
    labels[((r[0] - 0.3) ** 2 + r[1] ** 2 + r[2] ** 2) < 0.25**2] = 2
    labels[((r[0] + 0.3) ** 2 + (r[1] - 0.1) ** 2 + r[2] ** 2) < 0.22**2] = 3
    labels[(r[0] ** 2 + (r[1] + 0.35) ** 2 + (r[2] / 1.5) ** 2) < 0.15**2] = 4
    return labels[None, None]


def phantom_image(labels: torch.Tensor, intensities=(0.0, 0.5, 1.0, 0.25, 0.8)) -> torch.Tensor:
    """A smooth float image from a label phantom (per-label intensity, slightly blurred)."""
    lut = torch.tensor(intensities, dtype=torch.float32)
    return warp.gaussian_smooth(lut[labels], sigma=0.7)
