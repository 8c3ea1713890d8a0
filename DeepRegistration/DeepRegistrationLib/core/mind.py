"""MIND-SSC modality-independent neighbourhood descriptor (Heinrich et al. 2013) and its loss.

The self-similarity context compares patches around the six face neighbours of a voxel pairwise: the 12 pairs
of neighbours at distance √2·d. Descriptors are invariant to intensity inversion and to linear intensity maps.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import box_mean

SIX_NEIGHBOURS = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
SSC_PAIRS = tuple(
    (p, q) for p, q in itertools.combinations(SIX_NEIGHBOURS, 2) if sum((a - b) ** 2 for a, b in zip(p, q)) == 2
)
"""The 12 neighbour pairs of the self-similarity context."""


def shift(x: Tensor, offset: tuple[int, int, int]) -> Tensor:
    """y(v) = x(v + offset) for [B, C, I, J, K], replicating the border."""
    r = max(abs(o) for o in offset)
    if r == 0:
        return x
    padded = F.pad(x, (r, r, r, r, r, r), mode="replicate")
    i, j, k = (r + o for o in offset)
    return padded[:, :, i : i + x.shape[2], j : j + x.shape[3], k : k + x.shape[4]]


def mind_ssc(image: Tensor, radius: int = 1, dilation: int = 2, eps: float = 1e-6) -> Tensor:
    """MIND-SSC descriptor [B, 12, I, J, K] of a single-channel image [B, 1, I, J, K].

    `radius`: patch radius (patch size 2r+1) in voxels; `dilation`: neighbour distance in voxels.
    """
    distances = []
    for p, q in SSC_PAIRS:
        a = shift(image, tuple(dilation * c for c in p))
        b = shift(image, tuple(dilation * c for c in q))
        distances.append(box_mean((a - b) ** 2, 2 * radius + 1))
    dist = torch.cat(distances, dim=1)
    dist = dist - dist.min(dim=1, keepdim=True).values
    variance = dist.mean(dim=1, keepdim=True)
    variance = torch.clamp(variance, min=variance.mean().item() * 1e-3 + eps)
    descriptor = torch.exp(-dist / variance)
    return descriptor / descriptor.max(dim=1, keepdim=True).values


def mind_loss(a: Tensor, b: Tensor, radius: int = 1, dilation: int = 2) -> Tensor:
    """Mean squared difference of the MIND-SSC descriptors of two images."""
    return F.mse_loss(mind_ssc(a, radius, dilation), mind_ssc(b, radius, dilation))
