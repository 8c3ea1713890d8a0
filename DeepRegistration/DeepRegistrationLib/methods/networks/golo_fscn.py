"""GoLo-FSCN: feature self-calibration network with a global-local strategy (Zheng et al. 2022, NCA).

Built on LapIRN (`networks/lapirn.py`; the paper's §3.1 base), with the paper's three changes:

* §3.3 — every level CNN gets a feature self-calibration module (`SelfCalibration`) in its bottleneck, before
  LapIRN's residual blocks (Fig. 1: encoder, self-calibration, residual module, decoder);
* §3.2 — levels 2 and 3 run a global branch on the whole level image and a local branch, a second CNN of the same
  architecture, on 2×2×2 blocks that carry 2 voxels of their neighbours' image ("redundant blocks", §6.5); the local
  velocity blocks are cropped back and stitched, and the global velocity is added to them (`GlobalLocalLevel`);
* §3.4 — a level's velocity joins the upsampled coarser one by V = V2 + warp(V1, V2) (Eq. 5, `combine_velocity`);
* §4 — the loss is 1 − CorrCoef (Eq. 6-8) + k/2^(L−p)·||∇v||² (Eq. 9) + mean(ReLU(−det J)) (Eq. 10-12).

Frames and units follow `lapirn`: tensors [B, C, I, J, K]; velocities and displacements leaving this module are in
voxels of their level's grid, fixed → moving (docs/CONVENTIONS.md §3); inside a level CNN velocities are in the
level grid's normalised units (`lapirn.voxels_to_unit`), for the local branch too (its blocks are crops of the level
grid, so the units of the global and local velocities agree and they add). Choices the paper leaves open are
recorded in docs/methods/golo_fscn.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core import losses, warp
from ...core.params import param
from . import lapirn
from .base import RegistrationOutput


@dataclass
class Config(lapirn.Config):
    """GoLo-FSCN hyper-parameters: the paper's where stated, LapIRN's (its base) otherwise."""

    working_shape: tuple[int, int, int] = param(
        (160, 192, 224), "Network grid (I, J, K) in voxels; the paper crops and scales OASIS to 160×192×224 (§5.1)",
        low=8, high=1024)
    calibration_rate: int = param(2, "r of Eq. 2: the self-calibration branches average-pool features by r and 2r",
                                  low=2, high=4)
    blocks: int = param(2, "Local-branch blocks per axis (2: the paper's eight blocks, §3.2)", choices=(2, 4))
    block_margin: int = param(2, "Redundant voxels each block takes from its neighbours per side (§3.2, §6.5)",
                              choices=(0, 2, 4))
    jacobian_weight: float = param(1.0, "Weight of L_jacc = mean(ReLU(−det J)) in L_reg = L_v + L_jacc (Eq. 12)",
                                   low=0.0, high=100.0)


# ----------------------------------------------------------------------------------------------------------------
# Redundant blocks (§3.2, §6.5)


def block_windows(size: int, blocks: int, margin: int) -> list[tuple[int, int]]:
    """(start, width) in voxels of each block's window along an axis of `size` voxels.

    Block b owns the core [b·s, (b+1)·s), s = size / blocks. Its window adds `margin` voxels of the neighbouring
    blocks on each side that has a neighbour; all windows have one width (s + margin for two blocks, s + 2·margin
    for more, where the end blocks reach further inwards), so the blocks batch through one CNN. No window leaves the
    image: the redundancy is real image content, never padding.
    """
    if size % blocks:
        raise ValueError(f"an axis of {size} voxels does not split into {blocks} equal blocks")
    core = size // blocks
    if margin > core:
        raise ValueError(f"margin {margin} exceeds the block size {core}")
    width = core + margin * min(blocks - 1, 2)
    return [(min(max(b * core - margin, 0), size - width), width) for b in range(blocks)]


def _block_indices(blocks: int) -> list[tuple[int, int, int]]:
    return [(a, b, c) for a in range(blocks) for b in range(blocks) for c in range(blocks)]


def split_blocks(x: Tensor, blocks: int = 2, margin: int = 2) -> Tensor:
    """Cut [B, C, I, J, K] into blocks³ overlapping windows (`block_windows` on each axis), stacked block-major.

    Returns [blocks³·B, C, w_I, w_J, w_K]; entry n·B + b is block n = (n_i·blocks + n_j)·blocks + n_k of batch
    item b. Voxel values (and voxel-unit vectors) are copied unchanged.
    """
    windows = [block_windows(s, blocks, margin) for s in x.shape[2:]]
    crops = []
    for bi, bj, bk in _block_indices(blocks):
        (si, wi), (sj, wj), (sk, wk) = windows[0][bi], windows[1][bj], windows[2][bk]
        crops.append(x[:, :, si:si + wi, sj:sj + wj, sk:sk + wk])
    return torch.cat(crops, dim=0)


def stitch_blocks(y: Tensor, shape: Sequence[int], blocks: int = 2, margin: int = 2) -> Tensor:
    """Inverse of `split_blocks` for a grid of `shape` (I, J, K): each block's core is cut out of its window (the
    redundant voxels are dropped) and the cores are laid side by side. Returns [B, C, I, J, K]."""
    windows = [block_windows(s, blocks, margin) for s in shape]
    cores = [s // blocks for s in shape]
    parts = y.chunk(blocks**3, dim=0)
    slabs_i = []
    for bi in range(blocks):
        slabs_j = []
        for bj in range(blocks):
            row = []
            for bk in range(blocks):
                part = parts[(bi * blocks + bj) * blocks + bk]
                o = [b * c - windows[a][b][0] for a, (b, c) in enumerate(zip((bi, bj, bk), cores))]
                row.append(part[:, :, o[0]:o[0] + cores[0], o[1]:o[1] + cores[1], o[2]:o[2] + cores[2]])
            slabs_j.append(torch.cat(row, dim=4))
        slabs_i.append(torch.cat(slabs_j, dim=3))
    return torch.cat(slabs_i, dim=2)


# ----------------------------------------------------------------------------------------------------------------
# Feature self-calibration (§3.3, Fig. 2, Eq. 1-4)


class SelfCalibration(nn.Module):
    """Feature self-calibration module on features X [B, C, ...] (C even); output [B, C, ...] of X's size.

    A 1³ convolution (+ LeakyReLU) splits X into X1, X2 of C/2 channels. Then, with F's 3³ convolutions without bias:
      Eq. 1  X2'  = F1(X2)                                             (original scale)
      Eq. 2  X1'' = X1 + Up(F2(AvgPool_r(X1))) + Up(F2'(AvgPool_2r(X1)))  (low scales, r = `rate`)
      Eq. 3  X1'  = F3(X1) ⊙ sigmoid(X1'')                             (low scales calibrate the original scale)
      Eq. 4  Y    = X + [F4(X1'), X2']                                 (channel concatenation, residual)
    Eq. 3-4 are missing from the paper's text; this is the self-calibrated convolution of Liu et al. (CVPR 2020,
    the paper's ref. 37) extended by the second pooling scale of Eq. 2 (docs/methods/golo_fscn.md). AvgPool_r
    averages to ⌈n/r⌉ voxels per axis (adaptive pooling: r×r×r windows when r divides n, no voxel dropped and no
    failure when it does not, e.g. in small blocks); Up is trilinear back to X's size (align_corners=True).
    """

    def __init__(self, channels: int, rate: int = 2) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"self-calibration needs an even channel count, got {channels}")
        half = channels // 2
        self.rate = rate
        self.split = nn.Conv3d(channels, channels, 1, bias=False)
        self.f1, self.f2, self.f2_coarse, self.f3, self.f4 = (
            nn.Conv3d(half, half, 3, padding=1, bias=False) for _ in range(5))

    def _low_scale(self, x: Tensor, conv: nn.Module, factor: int) -> Tensor:
        pooled = F.adaptive_avg_pool3d(x, [-(-n // factor) for n in x.shape[2:]])
        return F.interpolate(conv(pooled), size=tuple(x.shape[2:]), mode="trilinear", align_corners=True)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = F.leaky_relu(self.split(x), 0.2).chunk(2, dim=1)
        x2_out = F.leaky_relu(self.f1(x2), 0.2)
        context = x1 + self._low_scale(x1, self.f2, self.rate) + self._low_scale(x1, self.f2_coarse, 2 * self.rate)
        calibrated = self.f3(x1) * torch.sigmoid(context)
        x1_out = F.leaky_relu(self.f4(calibrated), 0.2)
        return x + torch.cat([x1_out, x2_out], dim=1)


class FSCNLevel(lapirn.LevelNet):
    """A LapIRN level CNN whose bottleneck starts with the feature self-calibration module (Fig. 1, red layer)."""

    def __init__(self, in_channels: int, start_channels: int = 7, num_res_blocks: int = 5, range_flow: float = 0.4,
                 calibration_rate: int = 2) -> None:
        self.calibration_rate = calibration_rate
        super().__init__(in_channels, start_channels, num_res_blocks, range_flow)

    def make_feature_block(self, width: int) -> nn.Module:
        """Self-calibration, then LapIRN's residual blocks."""
        return nn.Sequential(SelfCalibration(width, self.calibration_rate), super().make_feature_block(width))


# ----------------------------------------------------------------------------------------------------------------
# Global-local level (§3.2)


class GlobalLocalLevel(nn.Module):
    """Levels 2 and 3: a global FSCN on the whole level grid plus a local FSCN (same architecture, own weights) on
    redundant blocks; the residual velocity is global + stitched local (normalised units of the level grid).

    Same call as `lapirn.LevelNet`: `(fixed, warped, coarse_velocity, embedding) -> (velocity, features)`. The local
    branch sees the blocks of the inputs and of the coarser embedding (whose grid is half the level's, so its windows
    are the image windows halved); the features handed to the next level are the global branch's.
    """

    def __init__(self, global_net: FSCNLevel, local_net: FSCNLevel, blocks: int, margin: int) -> None:
        super().__init__()
        if margin % 2:
            raise ValueError(f"the block margin must be even (it is halved for the embedding), got {margin}")
        self.global_net = global_net
        self.local_net = local_net
        self.blocks = blocks
        self.margin = margin

    def forward(self, fixed: Tensor, warped: Tensor, coarse_velocity: Tensor | None = None,
                embedding: Tensor | None = None) -> tuple[Tensor, Tensor]:
        shape = tuple(fixed.shape[2:])
        if any(s % (2 * self.blocks) for s in shape):
            raise ValueError(f"a global-local level needs sizes that are multiples of {2 * self.blocks}, got {shape}")
        velocity, features = self.global_net(fixed, warped, coarse_velocity, embedding)
        split = [None if t is None else split_blocks(t, self.blocks, self.margin)
                 for t in (fixed, warped, coarse_velocity)]
        local_embedding = None if embedding is None else split_blocks(embedding, self.blocks, self.margin // 2)
        local, _ = self.local_net(*split, local_embedding)
        return velocity + stitch_blocks(local, shape, self.blocks, self.margin), features


def golo_level(level: int, config: Config) -> nn.Module:
    """Level 1: one FSCN (2 inputs: fixed, moving); levels 2 and 3: global and local FSCNs (5 inputs each)."""

    def fscn(in_channels: int) -> FSCNLevel:
        return FSCNLevel(in_channels, config.start_channels, config.num_res_blocks, config.range_flow,
                         config.calibration_rate)

    if level == 1:
        return fscn(2)
    return GlobalLocalLevel(fscn(5), fscn(5), config.blocks, config.block_margin)


# ----------------------------------------------------------------------------------------------------------------
# The pyramid


class GoLoFSCN(lapirn.LapIRN):
    """The three-level pyramid of LapIRN with FSCN level CNNs, global-local levels 2-3 and Eq. 5 superposition.

    Progressive training, freezing and the per-level outputs are LapIRN's (`lapirn.LapIRN`); freezing a level
    freezes both of its branches.
    """

    multiple = 16  # 1/4 resolution, its stride-2 conv, and level 2 split into blocks of even size (blocks ≤ 4)

    def __init__(self, config: Config) -> None:
        super().__init__(config, golo_level)

    def combine_velocity(self, coarse_up: Tensor, residual: Tensor) -> Tensor:
        """Eq. 5: V = V2 + warp(V1, V2) = V2(x) + V1(x + V2(x)), V1 the upsampled coarser velocity, V2 this level's
        (voxels, one grid) — `warp.compose(V1, V2)`, the displacement composition of RCN/VTN (ref. 15)."""
        return warp.compose(coarse_up, residual)

    def similarity(self, fixed: Tensor, warped: Tensor, level: int) -> Tensor:
        """Eq. 6-8: 1 − CorrCoef(fixed, warped) over all voxels of the level grid."""
        return losses.global_cc_loss(fixed, warped)

    def loss(self, output: RegistrationOutput, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """L = 1 − CorrCoef + k/2^(L−p)·||∇v_p||² (Eq. 9) + mean(ReLU(−det J_φp)) (Eq. 10-12) at the finest
        active level p (the level being trained, as in LapIRN's progressive scheme)."""
        terms = super().loss(output, batch)
        jacobian = self.config.jacobian_weight * losses.neg_jacobian_loss(output.levels[-1]["displacement"])
        return {**terms, "jacobian": jacobian, "total": terms["total"] + jacobian}


Network = GoLoFSCN
