"""macMIND: multi-sampling cascaded modality independent neighbourhood descriptor (Zhou et al. 2023, macJNet).

Two cascaded, fixed (non-learned) stages on a single-channel image [B, 1, I, J, K], all sizes in voxels:

1. msSSC (Eq. 8-10, 12): a central patch P0 and its six face neighbours P1..P6 at distance L. Every SSD between
   two patches of size R1³ is a box mean of a shifted squared difference (Eq. 12, `mind.shift` + `losses.box_mean`).
   The 18 connections are the 6 centre-neighbour pairs of MIND (3 orientations) and the 12 neighbour-neighbour
   pairs at distance √2·L of MIND-SSC (6 orientations): 9 orientations. Each connection gives one channel
   exp(−|e_p|·SSD / Σ SSD) = exp(−SSD / mean SSD); scale k uses distance k·L, and the K scales are summed with
   weights α_k (Eq. 10): M = 18 channels.
2. Aggregation (Eq. 11, 13): every msSSC channel is averaged over N bins of a local 3D log-polar space inside an
   R2³ window by N fixed R2³ convolution kernels, giving M·N channels ordered bin-major (Eq. 13's `cat`).

The log-polar space is cylindrical about voxel axis k (the slice axis): N_a = 8 azimuth sectors of 45° in the
(i, j) plane and N_r = 2 logarithmic in-plane radial intervals (the paper's Fig. 8), and N_h = 3 height intervals
(below, in, above the voxel's i-j plane). Voxels on the axis (in-plane radius 0) have no log-polar coordinate and
belong to no bin. Every value is invariant to affine intensity maps a·I + b (a ≠ 0, inversion included).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import box_mean
from .mind import SIX_NEIGHBOURS, SSC_PAIRS, mind_ssc, shift

CENTRE = (0, 0, 0)
MACMIND_CONNECTIONS = tuple((CENTRE, n) for n in SIX_NEIGHBOURS) + SSC_PAIRS
"""The 18 patch connections (unit offsets of the two patch centres): 6 centre-neighbour + 12 neighbour pairs."""

AZIMUTH_SECTORS = 8
RADIAL_INTERVALS = 2
HEIGHT_INTERVALS = 3


def self_similarity_context(image: Tensor, patch_size: int, distance: int) -> Tensor:
    """SSC of one scale (Eq. 8-9, 12): [B, 18, I, J, K] from [B, 1, I, J, K].

    `patch_size`: R1 (odd, voxels); `distance`: patch-centre distance L (voxels).
    """
    b = image.shape[0]
    shifted = {offset: shift(image, tuple(distance * c for c in offset)) for offset in (CENTRE, *SIX_NEIGHBOURS)}
    diffs = [(shifted[p] - shifted[q]) ** 2 for p, q in MACMIND_CONNECTIONS]
    # Connections stacked along the batch axis: one single-channel box filter (K_SSD) for all of them.
    ssd = box_mean(torch.cat(diffs, dim=0), patch_size)
    ssd = ssd.reshape(len(MACMIND_CONNECTIONS), b, *image.shape[2:]).transpose(0, 1)
    mean_ssd = ssd.mean(dim=1, keepdim=True)
    # Floor for flat regions (all SSD ≈ 0): relative to the image's mean, so that scaling the intensities leaves the
    # descriptor unchanged; the dtype's smallest normal number keeps a constant image finite (descriptor 1).
    floor = mean_ssd.mean(dim=(1, 2, 3, 4), keepdim=True).detach() * 1e-3 + torch.finfo(ssd.dtype).tiny
    return torch.exp(-ssd / torch.maximum(mean_ssd, floor))


def multiscale_ssc(image: Tensor, patch_size: int, distance: int, scale_weights: Sequence[float]) -> Tensor:
    """msSSC (Eq. 10): Σ_k α_k SSC at distance k·L, k = 1..K with K = len(scale_weights); [B, 18, I, J, K]."""
    return sum(w * self_similarity_context(image, patch_size, (k + 1) * distance)
               for k, w in enumerate(scale_weights))


def log_polar_kernels(window: int, device=None, dtype=torch.float32) -> Tensor:
    """The N = 8·2·3 averaging kernels K_agg of Eq. 13 as [N, 1, R2, R2, R2] (R2 = `window`, odd, ≥ 5).

    Bin n = (height, radius, sector) in that nesting order; each kernel is 1/|bin| on its voxels.
    """
    if window % 2 != 1 or window < 5:
        raise ValueError(f"log-polar window must be odd and at least 5 voxels, got {window}")
    h = window // 2
    d = torch.arange(-h, h + 1, dtype=torch.float64)
    di, dj, dk = torch.meshgrid(d, d, d, indexing="ij")
    rho = torch.sqrt(di**2 + dj**2)
    on_axis = rho == 0
    azimuth = torch.remainder(torch.atan2(dj, di), 2 * math.pi)
    sector = torch.floor(azimuth / (2 * math.pi / AZIMUTH_SECTORS) + 1e-6).long() % AZIMUTH_SECTORS
    log_rho = torch.log(rho.clamp(min=1.0)) / math.log(h * math.sqrt(2))
    radius = torch.floor(log_rho * RADIAL_INTERVALS).long().clamp(max=RADIAL_INTERVALS - 1)
    height = (torch.sign(dk) + 1).long()
    index = (height * RADIAL_INTERVALS + radius) * AZIMUTH_SECTORS + sector
    count = AZIMUTH_SECTORS * RADIAL_INTERVALS * HEIGHT_INTERVALS
    kernels = torch.stack([((index == n) & ~on_axis).to(torch.float64) for n in range(count)])
    kernels = kernels / kernels.sum(dim=(1, 2, 3), keepdim=True)
    return kernels.unsqueeze(1).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _bin_taps(window: int) -> tuple[tuple[float, tuple[tuple[int, int, int], ...]], ...]:
    """Per bin of `log_polar_kernels(window)`: its common weight and the indices of its non-zero taps."""
    out = []
    for kernel in log_polar_kernels(window, dtype=torch.float64)[:, 0]:
        taps = tuple(tuple(t) for t in kernel.nonzero().tolist())
        out.append((kernel[taps[0]].item(), taps))
    return tuple(out)


def _view(x: Tensor, offset: Sequence[int], size: Sequence[int]) -> Tensor:
    """x[:, :, a:a+I, b:b+J, c:c+K] for tap `offset` = (a, b, c) of a padded tensor and output `size` (I, J, K)."""
    a, b, c = offset
    return x[:, :, a : a + size[0], b : b + size[1], c : c + size[2]]


def _bin_average(padded: Tensor, weight: float, offsets: Sequence[Sequence[int]], out: Tensor) -> Tensor:
    """One K_agg convolution, evaluated sparsely into `out`: weight × Σ of the shifted views of its taps."""
    size = out.shape[2:]
    out.copy_(_view(padded, offsets[0], size))
    for offset in offsets[1:]:
        out.add_(_view(padded, offset, size))
    return out.mul_(weight)


def _scatter_bin(grad_padded: Tensor, weight: float, offsets: Sequence[Sequence[int]], grad_bin: Tensor) -> None:
    """Adjoint of `_bin_average`: accumulate weight × `grad_bin` into every tap's view of `grad_padded`."""
    for offset in offsets:
        _view(grad_padded, offset, grad_bin.shape[2:]).add_(grad_bin, alpha=weight)


def _output_size(padded: Tensor, window: int) -> list[int]:
    return [s - 2 * (window // 2) for s in padded.shape[2:]]


class _LogPolarAggregation(torch.autograd.Function):
    """The K_agg convolutions of a border-padded [B, M, I+2h, J+2h, K+2h] tensor → [B, N·M, I, J, K].

    Each kernel has 1-4 non-zero taps of one weight, so a bin is a weighted sum of shifted views; forward and
    backward accumulate in place, without per-tap temporaries.
    """

    @staticmethod
    def forward(ctx, padded: Tensor, window: int) -> Tensor:
        ctx.window, ctx.padded_shape = window, padded.shape
        b, m = padded.shape[:2]
        taps = _bin_taps(window)
        out = padded.new_empty(b, len(taps) * m, *_output_size(padded, window))
        for n, (weight, offsets) in enumerate(taps):
            _bin_average(padded, weight, offsets, out[:, n * m : (n + 1) * m])
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad_padded = grad.new_zeros(ctx.padded_shape)
        m = ctx.padded_shape[1]
        for n, (weight, offsets) in enumerate(_bin_taps(ctx.window)):
            _scatter_bin(grad_padded, weight, offsets, grad[:, n * m : (n + 1) * m])
        return grad_padded, None


class _LogPolarSquaredMean(torch.autograd.Function):
    """mean(aggregate(x)²) of a border-padded [B, M, ...] tensor, one bin at a time.

    Equal to squaring `_LogPolarAggregation`'s output, with memory for one bin (M channels) instead of N·M: the
    backward recomputes each bin.
    """

    @staticmethod
    def forward(ctx, padded: Tensor, window: int) -> Tensor:
        ctx.window = window
        ctx.save_for_backward(padded)
        taps = _bin_taps(window)
        buffer = padded.new_empty(*padded.shape[:2], *_output_size(padded, window))
        total = padded.new_zeros(())
        for weight, offsets in taps:
            total += torch.linalg.vector_norm(_bin_average(padded, weight, offsets, buffer)) ** 2
        ctx.count = len(taps) * buffer.numel()
        return total / ctx.count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (padded,) = ctx.saved_tensors
        grad_padded = torch.zeros_like(padded)
        buffer = padded.new_empty(*padded.shape[:2], *_output_size(padded, ctx.window))
        scale = 2 * grad.to(padded.dtype) / ctx.count
        for weight, offsets in _bin_taps(ctx.window):
            _scatter_bin(grad_padded, weight, offsets, _bin_average(padded, weight, offsets, buffer).mul_(scale))
        return grad_padded, None


def aggregate(features: Tensor, window: int) -> Tensor:
    """Log-polar bin averages (Eq. 13) of every channel: [B, M, I, J, K] → [B, N·M, I, J, K], bin-major.

    Equal to `F.conv3d` of each channel with the kernels of `log_polar_kernels` (cross-correlation) on the
    border-replicated msSSC, evaluated sparsely (`_LogPolarAggregation`).
    """
    return _LogPolarAggregation.apply(_pad(features, window), window)


def _pad(features: Tensor, window: int) -> Tensor:
    return F.pad(features, (window // 2,) * 6, mode="replicate")


def macmind(image: Tensor, patch_size: int = 5, distance: int = 2, scale_weights: Sequence[float] = (0.7, 0.3),
            window: int = 5) -> Tensor:
    """macMIND descriptor [B, 18·48, I, J, K] of a single-channel image [B, 1, I, J, K] (Eq. 11-13).

    `patch_size` R1, `distance` L, `window` R2 in voxels; `scale_weights` (α_1..α_K) for distances L..K·L.
    """
    return aggregate(multiscale_ssc(image, patch_size, distance, scale_weights), window)


def macmind_loss(a: Tensor, b: Tensor, patch_size: int = 5, distance: int = 2,
                 scale_weights: Sequence[float] = (0.7, 0.3), window: int = 5) -> Tensor:
    """E_sim of Eq. 14: mean over voxels and the M·N channels of the squared macMIND difference of two images.

    The aggregation is linear, so it is applied to the msSSC difference (equal to differencing two descriptors),
    bin by bin (`_LogPolarSquaredMean`), so that the M·N-channel descriptors are never held in memory. The reduction
    runs in at least float32 (as autocast runs `mse_loss`): a half-precision sum over ~10⁹ terms would overflow.
    """
    diff = multiscale_ssc(a, patch_size, distance, scale_weights) - multiscale_ssc(b, patch_size, distance,
                                                                                    scale_weights)
    diff = diff.to(torch.promote_types(diff.dtype, torch.float32))
    return _LogPolarSquaredMean.apply(_pad(diff, window), window)


def descriptor_loss(a: Tensor, b: Tensor, descriptor: str, patch_size: int, distance: int,
                    scale_weights: Sequence[float], window: int) -> Tensor:
    """Mean squared descriptor difference with `descriptor` "macmind" (Eq. 14) or "mind" (MIND-SSC ablation).

    MIND-SSC uses the same patch size R1 (radius (R1−1)/2) and neighbour distance L; it has no scales or bins.
    """
    if descriptor == "macmind":
        return macmind_loss(a, b, patch_size, distance, scale_weights, window)
    if descriptor == "mind":
        radius = patch_size // 2
        return F.mse_loss(mind_ssc(a, radius, distance), mind_ssc(b, radius, distance))
    raise ValueError(f"descriptor must be 'macmind' or 'mind', got {descriptor!r}")
