"""LapIRN: the diffeomorphic Laplacian pyramid image registration network (Mok & Chung, MICCAI 2020).

Three levels register the pair at 1/4, 1/2 and the full resolution of the input. Level p sees the fixed image and the
moving image warped by the (upsampled) transform of level p−1, plus the upsampled velocity of level p−1; its CNN
predicts a residual stationary velocity that is added to that upsampled velocity, and the sum is integrated by
scaling and squaring. The decoder features of level p−1 are added into the bottleneck of level p ("feature
embedding"). Training is progressive (level 1 alone, then 1+2, then 1+2+3, coarser levels frozen for the first
iterations of each stage); the trainer drives it through `LapIRN.active_levels` and `freeze_levels`/`unfreeze_levels`.

Frames and units: tensors [B, C, I, J, K]; every velocity and displacement that leaves a method of this module is in
voxels of the grid it lives on (fixed → moving, docs/CONVENTIONS.md §3). Inside a level CNN velocities are in
LapIRN's normalised units (the align_corners=True coordinate range [−1, 1]), which is what the network reads and
writes; `voxels_to_unit`/`unit_to_voxels` convert.

Extension points (golo_fscn, mmln and macjnet build on this module; subclass, do not copy):

* `LevelNet` — one pyramid level's CNN. Its parts are built by overridable factory methods called from `__init__`
  (a subclass that needs its own attributes in them sets those before calling `super().__init__`):
  - `make_encoder(in_channels, width)`: full-resolution feature extractor (its output is the skip connection);
  - `make_feature_block(width)`: the bottleneck body at half the level's resolution (LapIRN: 5 residual blocks);
    golo_fscn inserts its feature self-calibration module here;
  - `make_skip(width)`: a module `skip(decoded, encoded) -> Tensor` with attribute `out_channels` that merges the
    decoder features with the encoder skip (LapIRN: `ConcatSkip`); macjnet puts its attention gate here;
  - `make_head(in_channels)`: the velocity output (LapIRN: conv–LeakyReLU–conv–Softsign, × `range_flow`).
  `LevelNet.forward(fixed, warped, coarse_velocity, embedding)` returns `(velocity, features)`: the residual velocity
  in unit coordinates and the decoder features handed to the next level as its embedding.
* `LapIRN` — the pyramid, a `RegistrationNetwork`. It takes a level factory `(level, config) -> LevelNet`
  (default `lapirn_level`) and exposes:
  - `combine_velocity(coarse_up, residual)`: how a level's residual joins the upsampled coarser velocity (LapIRN:
    addition; golo_fscn: V = V2 + warp(V1, V2));
  - `predict_residual(level, fixed, warped, coarse_velocity, embedding)`: runs one level's CNN (golo_fscn runs its
    global and local branches here);
  - `similarity(fixed, warped, level)` and `smoothness(velocity, level)`: the two loss terms of one level, summed by
    `loss`; a subclass adds terms by overriding `loss` and calling `super().loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core import losses, warp
from ...core.params import param
from .base import MethodConfig, RegistrationNetwork, RegistrationOutput

NUM_LEVELS = 3
"""Pyramid levels: 1 at 1/4, 2 at 1/2, 3 at the full resolution of the network input."""


@dataclass
class Config(MethodConfig):
    """LapIRN hyper-parameters (defaults: the paper and the official code it was published with)."""

    working_shape: tuple[int, int, int] = param(
        (160, 192, 144), "Training crop (I, J, K) in voxels; LapIRN's official code trained on 160×192×144",
        low=8, high=1024, paper=False)
    int_steps: int = param(7, "Scaling-and-squaring steps at every level (official code: time_step=7)", low=0,
                           high=12, paper=False)
    start_channels: int = param(7, "Start channels C; each level CNN is 4C wide", low=1, high=64, paper=False)
    num_res_blocks: int = param(5, "Pre-activation residual blocks in each level's bottleneck", low=1, high=20,
                                paper=False)
    range_flow: float = param(0.4, "Bound of each level's residual velocity, in normalised [-1, 1] units "
                              "(Softsign output × range_flow)", low=0.01, high=2.0, paper=False)
    smooth_weight: float = param(3.5, "k in L_v = k/2^(L−p)·||∇v||², velocity in LapIRN units (normalised "
                                 "coordinates × grid size)", low=0.0, high=100.0, paper=False)
    ncc_window: int = param(7, "Local NCC window (odd, voxels) at full resolution; 2 smaller per halving of "
                            "resolution", low=5, high=15, paper=False)


def voxels_to_unit(velocity: Tensor) -> Tensor:
    """Voxel vectors [B, 3, I, J, K] to LapIRN's normalised units: component c times 2/(N_c − 1)."""
    return velocity * _axis_scale(velocity, lambda n: 2.0 / (n - 1) if n > 1 else 0.0)


def unit_to_voxels(velocity: Tensor) -> Tensor:
    """Normalised-unit vectors [B, 3, I, J, K] to voxels: component c times (N_c − 1)/2."""
    return velocity * _axis_scale(velocity, lambda n: (n - 1) / 2.0)


def _axis_scale(field: Tensor, factor: Callable[[int], float]) -> Tensor:
    scale = [factor(n) for n in field.shape[2:]]
    return torch.tensor(scale, device=field.device, dtype=field.dtype).view(1, 3, 1, 1, 1)


def downsample_image(image: Tensor, shape: Sequence[int]) -> Tensor:
    """An image pyramid level: a 3³ box average (LapIRN's pooling kernel) then a trilinear resize to `shape`.

    The resize keeps the field of view with align_corners=True, so a voxel field on `shape` upsampled by
    `warp.resize_field` lines up with the finer grid.
    """
    if tuple(image.shape[2:]) == tuple(shape):
        return image
    smoothed = F.avg_pool3d(image, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    return warp.resize_image(smoothed, shape)


class PreActBlock(nn.Module):
    """Pre-activation residual block: x + conv(LeakyReLU(conv(LeakyReLU(x)))), 3³ convolutions without bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.leaky_relu(x, 0.2))
        return x + self.conv2(F.leaky_relu(out, 0.2))


class ConcatSkip(nn.Module):
    """U-Net skip connection: channel concatenation of decoder and encoder features."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.out_channels = 2 * width

    def forward(self, decoded: Tensor, encoded: Tensor) -> Tensor:
        return torch.cat([decoded, encoded], dim=1)


class VelocityHead(nn.Module):
    """conv 3³ (→ in/2) – LeakyReLU(0.2) – conv 3³ (→ 3) – Softsign, times `range_flow` (normalised units)."""

    def __init__(self, in_channels: int, range_flow: float) -> None:
        super().__init__()
        self.hidden = nn.Conv3d(in_channels, in_channels // 2, 3, padding=1, bias=False)
        self.out = nn.Conv3d(in_channels // 2, 3, 3, padding=1, bias=False)
        self.range_flow = range_flow

    def forward(self, x: Tensor) -> Tensor:
        return F.softsign(self.out(F.leaky_relu(self.hidden(x), 0.2))) * self.range_flow


class LevelNet(nn.Module):
    """One pyramid level's CNN (LapIRN Fig. 1): encoder, stride-2 conv, + coarser embedding, residual blocks,
    transposed conv back to the level's resolution, skip connection, velocity head.

    Input channels: fixed, warped moving and, for levels 2 and 3, the upsampled coarser velocity (3, unit
    coordinates). The level's spatial sizes must be even.
    """

    def __init__(self, in_channels: int, start_channels: int = 7, num_res_blocks: int = 5,
                 range_flow: float = 0.4) -> None:
        super().__init__()
        width = 4 * start_channels
        self.width = width
        self.num_res_blocks = num_res_blocks
        self.encoder = self.make_encoder(in_channels, width)
        self.down = nn.Conv3d(width, width, 3, stride=2, padding=1, bias=False)
        self.features = self.make_feature_block(width)
        self.up = nn.ConvTranspose3d(width, width, 2, stride=2, bias=False)
        self.skip = self.make_skip(width)
        self.head = self.make_head(self.skip.out_channels, range_flow)

    def make_encoder(self, in_channels: int, width: int) -> nn.Module:
        """conv 3³ – LeakyReLU(0.2) – conv 3³, no bias (LapIRN's input feature extractor)."""
        return nn.Sequential(
            nn.Conv3d(in_channels, width, 3, padding=1, bias=False),
            nn.LeakyReLU(0.2),
            nn.Conv3d(width, width, 3, padding=1, bias=False),
        )

    def make_feature_block(self, width: int) -> nn.Module:
        """`num_res_blocks` pre-activation residual blocks, each followed by LeakyReLU(0.2)."""
        layers: list[nn.Module] = []
        for _ in range(self.num_res_blocks):
            layers += [PreActBlock(width), nn.LeakyReLU(0.2)]
        return nn.Sequential(*layers)

    def make_skip(self, width: int) -> nn.Module:
        return ConcatSkip(width)

    def make_head(self, in_channels: int, range_flow: float) -> nn.Module:
        return VelocityHead(in_channels, range_flow)

    def forward(self, fixed: Tensor, warped: Tensor, coarse_velocity: Tensor | None = None,
                embedding: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(residual velocity [B, 3, ...] in unit coordinates, decoder features [B, 4C, ...] for the next level).

        `coarse_velocity` (unit coordinates) and `embedding` (the coarser level's decoder features, at half this
        level's resolution) are None at level 1.
        """
        inputs = [fixed, warped] if coarse_velocity is None else [fixed, warped, coarse_velocity]
        encoded = self.encoder(torch.cat(inputs, dim=1))
        x = self.down(encoded)
        if embedding is not None:
            x = x + embedding
        decoded = self.up(self.features(x))
        return self.head(self.skip(decoded, encoded)), decoded


LevelFactory = Callable[[int, Config], LevelNet]


def lapirn_level(level: int, config: Config) -> LevelNet:
    """LapIRN's level CNN for pyramid level `level` (1-based): 2 input channels at level 1, 5 above."""
    return LevelNet(2 if level == 1 else 5, config.start_channels, config.num_res_blocks, config.range_flow)


class LapIRN(RegistrationNetwork):
    """The three-level diffeomorphic Laplacian pyramid.

    `active_levels` (1..3, default 3) sets how many levels run; the output is the finest active level's transform:
    `velocity` on that level's grid and `displacement` = exp(velocity) upsampled to the input grid (`resize_field`).
    `levels[p − 1]` holds, on level p's grid: "fixed", "moving" (pyramid images), "residual" (CNN output, voxels),
    "velocity" (combined, voxels), "displacement" (exp of velocity, voxels) and "warped" (moving warped by it).
    """

    multiple = 2 ** NUM_LEVELS  # 1/4 resolution, then a stride-2 conv inside level 1

    def __init__(self, config: Config, level_factory: LevelFactory = lapirn_level) -> None:
        super().__init__(config)
        self.levels = nn.ModuleList(level_factory(p, config) for p in range(1, NUM_LEVELS + 1))
        self._active_levels = NUM_LEVELS

    @property
    def active_levels(self) -> int:
        return self._active_levels

    @active_levels.setter
    def active_levels(self, value: int) -> None:
        if not 1 <= value <= NUM_LEVELS:
            raise ValueError(f"active_levels must be in 1..{NUM_LEVELS}, got {value}")
        self._active_levels = int(value)

    def freeze_levels(self, levels: Iterable[int]) -> None:
        """Stop gradients to the parameters of the given levels (1-based)."""
        self._set_trainable(levels, False)

    def unfreeze_levels(self, levels: Iterable[int]) -> None:
        """Train the parameters of the given levels (1-based) again."""
        self._set_trainable(levels, True)

    def _set_trainable(self, levels: Iterable[int], trainable: bool) -> None:
        for p in levels:
            if not 1 <= p <= NUM_LEVELS:
                raise ValueError(f"level {p} outside 1..{NUM_LEVELS}")
            self.levels[p - 1].requires_grad_(trainable)

    @staticmethod
    def level_shape(shape: Sequence[int], level: int) -> tuple[int, ...]:
        """Grid of pyramid level `level` for an input grid `shape` (a multiple of `multiple`)."""
        factor = 2 ** (NUM_LEVELS - level)
        return tuple(s // factor for s in shape)

    def combine_velocity(self, coarse_up: Tensor, residual: Tensor) -> Tensor:
        """LapIRN: the level's velocity is the upsampled coarser velocity plus the residual (voxels, same grid)."""
        return coarse_up + residual

    def predict_residual(self, level: int, fixed: Tensor, warped: Tensor, coarse_velocity: Tensor | None,
                         embedding: Tensor | None) -> tuple[Tensor, Tensor]:
        """Run level `level`'s CNN; velocities in unit coordinates (see `LevelNet.forward`)."""
        return self.levels[level - 1](fixed, warped, coarse_velocity, embedding)

    def forward(self, fixed: Tensor, moving: Tensor) -> RegistrationOutput:
        shape = tuple(fixed.shape[2:])
        if any(s % self.multiple for s in shape):
            raise ValueError(f"LapIRN needs sizes that are multiples of {self.multiple}, got {shape}")
        steps = self.config.int_steps
        velocity = displacement = embedding = None
        levels: list[dict[str, Tensor]] = []
        for p in range(1, self.active_levels + 1):
            grid = self.level_shape(shape, p)
            fixed_p, moving_p = downsample_image(fixed, grid), downsample_image(moving, grid)
            if velocity is None:
                coarse_up, warped_in, coarse_unit = None, moving_p, None
            else:
                coarse_up = warp.resize_field(velocity, grid)
                warped_in = warp.warp_image(moving_p, warp.resize_field(displacement, grid))
                coarse_unit = voxels_to_unit(coarse_up)
            residual_unit, embedding = self.predict_residual(p, fixed_p, warped_in, coarse_unit, embedding)
            residual = unit_to_voxels(residual_unit.float())  # fields in float32 under autocast
            velocity = residual if coarse_up is None else self.combine_velocity(coarse_up, residual)
            displacement = warp.integrate_velocity(velocity, steps)
            levels.append({"fixed": fixed_p, "moving": moving_p, "residual": residual, "velocity": velocity,
                           "displacement": displacement, "warped": warp.warp_image(moving_p, displacement)})
        return RegistrationOutput(displacement=warp.resize_field(displacement, shape), velocity=velocity,
                                  levels=levels)

    def similarity(self, fixed: Tensor, warped: Tensor, level: int) -> Tensor:
        """LapIRN's multi-resolution local NCC at level p: Σ_{i<p} 2^−i · NCC_{w−2i} on images halved i times.

        The window at level p is `ncc_window` − 2(L − p) (7, 5, 3 at full, 1/2, 1/4 resolution); halving is LapIRN's
        3³ average pooling with stride 2. Each NCC term is 1 − mean local CC² (`losses.local_ncc_loss`).
        """
        window = self.config.ncc_window - 2 * (NUM_LEVELS - level)
        total = fixed.new_zeros(())
        for i in range(level):
            total = total + losses.local_ncc_loss(fixed, warped, window=window - 2 * i) / 2**i
            if i + 1 < level:
                fixed = F.avg_pool3d(fixed, 3, stride=2, padding=1, count_include_pad=False)
                warped = F.avg_pool3d(warped, 3, stride=2, padding=1, count_include_pad=False)
        return total

    def smoothness(self, velocity: Tensor, level: int) -> Tensor:
        """k/2^(L−p)·||∇v||² on level p's velocity, in LapIRN's units (unit coordinates × grid size ≈ 2 voxels).

        ||∇v||² is the mean squared forward difference averaged over the three axes (`losses.gradient_loss`).
        """
        lapirn_units = voxels_to_unit(velocity) * _axis_scale(velocity, float)
        return self.config.smooth_weight * losses.pyramid_weight(level, NUM_LEVELS) * losses.gradient_loss(
            lapirn_units)

    def loss(self, output: RegistrationOutput, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """L_p = multi-resolution NCC(F_p, M_p∘φ_p) + k/2^(L−p)·||∇v_p||² for the finest active level p."""
        p = len(output.levels)
        last = output.levels[-1]
        with torch.autocast(last["velocity"].device.type, enabled=False):  # local variances need float32
            similarity = self.similarity(last["fixed"].float(), last["warped"].float(), p)
            smoothness = self.smoothness(last["velocity"].float(), p)
        return {"similarity": similarity, "smoothness": smoothness, "total": similarity + smoothness}


Network = LapIRN
