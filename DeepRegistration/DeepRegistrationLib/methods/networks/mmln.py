"""MMLN: the multi-strategy mutual learning network (Zheng, Cao, Duan, Cao & Lian, Neurocomputing 2022).

MMLN is LapIRN (module `lapirn`) with two training-only strategies added to its three-level pyramid:

* multi-dimensional joint strategy (§3.2, §3.4, Eq. 6-7), levels 1 and 2: a 2D registration network with the level
  CNN's structure (every 3D convolution replaced by its 2D counterpart, `PlanarLevelNet`) registers the 2D slices of
  the level's fixed image and of the moving image warped by the level's 3D transform φ_p; its slice velocities are
  stitched into a 3D velocity with a zero out-of-plane component (`stitch_slices`) and integrated to ψ_p. The 2D
  branch's transform is φ'_p = φ_p∘ψ_p (first φ_p, then the in-plane refinement ψ_p, docs/CONVENTIONS.md §5) and
  its similarity 1 − CC(F_p, M_p∘φ'_p) enters the level's loss with weight α (level 1) or β (level 2);
* core strengthening strategy (§3.3, §3.4, Eq. 8), level 3: the same level-3 CNN registers a second time the central
  core region (half of every axis: 80×96×112 of 160×192×224) of the level's inputs; its similarity on the core enters
  the loss with weight θ.

Mutual learning (§3.4: the final 3D feature map of each level, upsampled, fed to the next level's 3D network) is
LapIRN's feature embedding, inherited unchanged. The similarity is 1 − global correlation coefficient (Eq. 2-4) on
every branch; the regulariser k/2^(L−p)·||∇v||² (Eq. 5) acts on the 3D velocity only.

The 2D and core branches run only in training mode (`self.training`) and only at the finest active level, whose loss
uses them (each level is trained on its own loss, §3.5.3). In eval mode only the 3D pyramid runs: the test-time
transform is the 3D one (§3.5.2, §5.3).

Frames and units as in `lapirn`: tensors [B, C, I, J, K]; every velocity and displacement stored in the output is in
voxels of the grid it lives on, fixed → moving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ...core import losses, warp
from ...core.params import param
from .base import RegistrationOutput
from .lapirn import Config as LapIRNConfig, LapIRN, LevelNet, unit_to_voxels

PLANAR_LEVELS = (1, 2)
"""Pyramid levels with the multi-dimensional joint strategy (§5.3)."""
CORE_LEVEL = 3
"""The pyramid level with the core strengthening strategy (§5.2)."""


@dataclass
class Config(LapIRNConfig):
    """MMLN hyper-parameters; the 3D level CNNs and the regulariser keep LapIRN's fields (§3.1, §4.2)."""

    working_shape: tuple[int, int, int] = param(
        (160, 192, 224), "Network grid (I, J, K) in voxels; MMLN crops OASIS to 160×192×224 (§4.1)", low=8,
        high=1024)
    alpha: float = param(0.25, "α: weight of the 2D branch's similarity in the level-1 loss (Eq. 6)",
                         low=0.0, high=10.0)
    beta: float = param(0.5, "β: weight of the 2D branch's similarity in the level-2 loss (Eq. 7)",
                        low=0.0, high=10.0)
    theta: float = param(0.25, "θ: weight of the core branch's similarity in the level-3 loss (Eq. 8)",
                         low=0.0, high=10.0)
    core_fraction: float = param(0.5, "Extent of the centred core region as a fraction of each axis "
                                 "(80×96×112 of 160×192×224, §3.3)", low=0.25, high=1.0)
    slice_axis: int = param(2, "Voxel axis (0: i, 1: j, 2: k) across which the 2D sub-images are cut",
                            choices=(0, 1, 2), paper=False)
    planar_start_channels: int = param(7, "Start channels C of the 2D registration network (4C wide), as the "
                                       "3D level CNN", low=1, high=64, paper=False)


def slice_volume(volume: Tensor, axis: int) -> Tensor:
    """The 2D slices of `volume` [B, C, I, J, K] across voxel axis `axis` as a batch [B·S, C, P, Q].

    S is the size of axis `axis`; P, Q are the two remaining axes in their order. Slice s of batch item b is entry
    b·S + s.
    """
    moved = volume.movedim(2 + axis, 1)
    return moved.reshape(-1, *moved.shape[2:])


def stitch_slices(planar: Tensor, batch: int, axis: int) -> Tensor:
    """Stitch per-slice 2D vector fields [B·S, 2, P, Q] (`slice_volume` order) into a 3D field [B, 3, I, J, K].

    The two in-plane components become the components along the two remaining voxel axes; the component along
    `axis` (out of plane) is zero.
    """
    per_item = planar.reshape(batch, -1, *planar.shape[1:])  # [B, S, 2, P, Q]
    components = list(per_item.movedim(1, 2 + axis).unbind(1))
    components.insert(axis, torch.zeros_like(components[0]))
    return torch.stack(components, dim=1)


def core_boxes(shape: Sequence[int], fraction: float) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """The centred core region of a grid of even sizes `shape`, at that grid and at half its resolution.

    Each axis of size N keeps round(fraction·N/2) voxels at half resolution, centred, and twice that at full
    resolution, so the core's embedding (half resolution) and images (full resolution) cover the same region; for
    fraction 0.5 and 160×192×224 the core is voxels 40:120, 48:144, 56:168 (80×96×112, §3.3).
    Returns (full-resolution slices, half-resolution slices) for the last three tensor axes.
    """
    full, half = [], []
    for n in shape:
        size = max(1, round(fraction * (n // 2)))
        start = (n // 2 - size) // 2
        half.append(slice(start, start + size))
        full.append(slice(2 * start, 2 * (start + size)))
    return (..., *full), (..., *half)


def _make_planar(module: nn.Module) -> None:
    """Replace, in place, every 3D convolution inside `module` by the 2D one with the same channels, kernel size,
    stride, padding and bias (freshly initialised). Other 3D-only layers are an error."""
    for name, child in module.named_children():
        if isinstance(child, nn.ConvTranspose3d):
            replacement: nn.Module = nn.ConvTranspose2d(
                child.in_channels, child.out_channels, child.kernel_size[:2], stride=child.stride[:2],
                padding=child.padding[:2], bias=child.bias is not None)
        elif isinstance(child, nn.Conv3d):
            replacement = nn.Conv2d(
                child.in_channels, child.out_channels, child.kernel_size[:2], stride=child.stride[:2],
                padding=child.padding[:2], dilation=child.dilation[:2], groups=child.groups,
                bias=child.bias is not None)
        elif type(child).__name__.endswith("3d"):
            raise TypeError(f"no 2D counterpart for {type(child).__name__}")
        else:
            _make_planar(child)
            continue
        setattr(module, name, replacement)


def _unit_scale(shape: Sequence[int], like: Tensor) -> Tensor:
    """[1, 3, 1, 1, 1] factors (N_c − 1)/2 turning normalised units of a grid of `shape` into its voxels."""
    return torch.tensor([(n - 1) / 2 for n in shape], device=like.device, dtype=like.dtype).view(1, 3, 1, 1, 1)


class PlanarLevelNet(LevelNet):
    """MMLN's 2D registration network: the level-1 CNN of LapIRN with 2D convolutions (§3.1: "the internal
    structure of the two-dimensional registration network is consistent with that of the three-dimensional").

    Input: a fixed and a moving slice [N, 1, P, Q]; output: the in-plane velocity [N, 2, P, Q] in normalised
    (align_corners=True) units of the slice grid, bounded by `range_flow`, and the decoder features.
    """

    def __init__(self, start_channels: int, num_res_blocks: int, range_flow: float) -> None:
        super().__init__(2, start_channels, num_res_blocks, range_flow)
        _make_planar(self)
        out = self.head.out
        self.head.out = nn.Conv2d(out.in_channels, 2, out.kernel_size, padding=out.padding, bias=False)


class MMLN(LapIRN):
    """LapIRN's pyramid plus MMLN's training-only 2D branches (levels 1, 2) and core branch (level 3).

    In training mode the finest active level's entry of `levels` also holds, at level 1 or 2:
    "planar_velocity" (stitched 2D velocity, voxels, zero along `slice_axis`), "planar_displacement" (ψ, its
    exponential) and "planar_warped" (M_p∘φ_p∘ψ_p); at level 3: "core_fixed", "core_moving" (the core of F_3, M_3),
    "core_velocity", "core_displacement" (voxels of the core grid) and "core_warped".
    """

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.planar_levels = nn.ModuleList(
            PlanarLevelNet(config.planar_start_channels, config.num_res_blocks, config.range_flow)
            for _ in PLANAR_LEVELS)
        self._core_inputs: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def forward(self, fixed: Tensor, moving: Tensor) -> RegistrationOutput:
        self._core_inputs = None
        try:
            output = super().forward(fixed, moving)
            if self.training:
                level = len(output.levels)
                last = output.levels[-1]
                if level in PLANAR_LEVELS:
                    last.update(self.planar_branch(level, last["fixed"], last["warped"]))
                else:
                    last.update(self.core_branch(last["moving"], *self._core_inputs))
        finally:
            self._core_inputs = None
        return output

    def predict_residual(self, level: int, fixed: Tensor, warped: Tensor, coarse_velocity: Tensor | None,
                         embedding: Tensor | None) -> tuple[Tensor, Tensor]:
        """LapIRN's level CNN; in training, the core level's inputs are kept for `core_branch`."""
        if self.training and level == CORE_LEVEL:
            self._core_inputs = (fixed, warped, coarse_velocity, embedding)
        return super().predict_residual(level, fixed, warped, coarse_velocity, embedding)

    def planar_branch(self, level: int, fixed: Tensor, warped: Tensor) -> dict[str, Tensor]:
        """The multi-dimensional joint strategy at `level` (1 or 2) on that level's grid.

        `fixed` is F_p and `warped` is M_p∘φ_p [B, 1, I, J, K]; the 2D network registers their slices across
        `slice_axis`, and the stitched in-plane velocity is integrated to ψ_p (scaling and squaring in 3D, which with
        a zero out-of-plane component is slice-wise 2D integration).
        """
        axis = self.config.slice_axis
        net = self.planar_levels[PLANAR_LEVELS.index(level)]
        planar_unit, _ = net(slice_volume(fixed, axis), slice_volume(warped, axis))
        velocity = unit_to_voxels(stitch_slices(planar_unit, fixed.shape[0], axis))
        displacement = warp.integrate_velocity(velocity, self.config.int_steps)
        return {"planar_velocity": velocity, "planar_displacement": displacement,
                "planar_warped": warp.warp_image(warped, displacement)}

    def core_branch(self, moving: Tensor, fixed: Tensor, warped: Tensor, coarse_unit: Tensor,
                    embedding: Tensor) -> dict[str, Tensor]:
        """The core strengthening strategy: level 3's CNN on the central core of its inputs (§3.3).

        `moving` is M_3; `fixed`, `warped` (M_3 warped by the upsampled level-2 transform), `coarse_unit` (upsampled
        level-2 velocity) and `embedding` (level-2 features, half resolution) are level 3's CNN inputs. Velocities
        keep the full level-3 grid's normalised units, so the shared CNN maps the same content to the same voxel
        velocity on the core as on the complete image. The core transform warps the core of M_3 (Eq. 8).
        """
        box, half_box = core_boxes(fixed.shape[2:], self.config.core_fraction)
        residual_unit, _ = super().predict_residual(CORE_LEVEL, fixed[box], warped[box], coarse_unit[box],
                                                    embedding[half_box])
        to_voxels = _unit_scale(fixed.shape[2:], fixed)
        velocity = self.combine_velocity(coarse_unit[box] * to_voxels, residual_unit * to_voxels)
        displacement = warp.integrate_velocity(velocity, self.config.int_steps)
        core_moving = moving[box]
        return {"core_fixed": fixed[box], "core_moving": core_moving, "core_velocity": velocity,
                "core_displacement": displacement, "core_warped": warp.warp_image(core_moving, displacement)}

    def similarity(self, fixed: Tensor, warped: Tensor, level: int) -> Tensor:
        """L_similarity = 1 − CorrCoef(F, M∘φ) over the whole image (Eq. 2-4), at every level."""
        return losses.global_cc_loss(fixed, warped)

    def loss(self, output: RegistrationOutput, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Loss_(p) of the finest level p that ran (Eq. 6-8).

        L_v(p) + L_sim(F_p, M_p∘φ_p) (LapIRN's `loss` with MMLN's similarity) plus α·L_sim(F_1, M_1∘φ'_1) at
        level 1, β·L_sim(F_2, M_2∘φ'_2) at level 2, or θ·L_sim(CoreF_3, CoreM_3∘Coreφ'_3) at level 3. The branch
        term is present only when the branch ran (training mode); in eval mode the loss is that of the 3D transform,
        the one used at test time.
        """
        terms = super().loss(output, batch)
        level = len(output.levels)
        last = output.levels[-1]
        if "planar_warped" in last:
            weight = self.config.alpha if level == 1 else self.config.beta
            terms["planar_similarity"] = self.similarity(last["fixed"], last["planar_warped"], level)
            terms["total"] = terms["total"] + weight * terms["planar_similarity"]
        elif "core_warped" in last:
            terms["core_similarity"] = self.similarity(last["core_fixed"], last["core_warped"], level)
            terms["total"] = terms["total"] + self.config.theta * terms["core_similarity"]
        return terms


Network = MMLN
