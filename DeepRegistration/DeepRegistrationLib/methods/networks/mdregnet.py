"""MDReg-Net (Li & Fan): multi-resolution diffeomorphic registration with deep self-supervision.

Three dedicated U-Nets S1, S2, S3 each see the full-resolution fixed image and the moving image warped by the
coarser levels' deformation, and predict a stationary-velocity increment v^l on a grid of 1/8, 1/4 and 1/2 of the
input size (voxels of that grid). Increments accumulate by summation (Eq. 3) after linear upsampling; the 1/2-grid
velocity is linearly upsampled to full resolution, smoothed by a fixed Gaussian layer and integrated by scaling and
squaring. Every field maps fixed voxels to moving voxels (docs/CONVENTIONS.md §3). Paper ↔ code:
docs/methods/mdregnet.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core import losses, warp
from ...core.params import param
from .base import MethodConfig, RegistrationNetwork, RegistrationOutput

ENCODER_CHANNELS = (16, 32, 32, 32)
"""Filters of the four stride-2 encoder convolutions (grids 1/2, 1/4, 1/8, 1/16 of the input)."""
DECONV_CHANNELS = 32
HEAD_CHANNELS = (32, 16)
LEVEL_DECONVS = (1, 2, 3)
"""Deconvolutions of S1, S2, S3: their outputs lie on grids of 1/8, 1/4 and 1/2 of the input."""


@dataclass
class Config(MethodConfig):
    working_shape: tuple[int, int, int] = param(
        (176, 192, 176), "Network grid (I, J, K) in voxels: the paper's 176×192×176 crop at 1 mm", low=8,
        high=1024, paper=True)
    reg_weight: float = param(0.35, "λ of Eq. 4: weight of the mean L1 norm of the velocity-increment gradients",
                              low=0.0, high=10.0)
    smoothing_sigma: float = param(1.732, "σ of the Gaussian smoothing layer on the full-resolution velocity, voxels",
                                   low=0.1, high=10.0)
    smoothing_kernel: int = param(3, "Kernel size of the Gaussian smoothing layer, voxels (odd)", low=3, high=15)
    ncc_window: int = param(9, "Window of the local NCC similarity, voxels of each level's grid", low=3, high=21,
                            paper=False)
    leaky_slope: float = param(0.2, "Negative slope of every LeakyReLU", low=0.0, high=1.0, paper=False)


def _conv(in_channels: int, out_channels: int, stride: int, slope: float) -> nn.Sequential:
    """3×3×3 convolution (padding 1) followed by LeakyReLU."""
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1), nn.LeakyReLU(slope))


def _deconv(in_channels: int, out_channels: int, slope: float) -> nn.Sequential:
    """3×3×3 stride-2 transposed convolution that doubles every size, followed by LeakyReLU."""
    return nn.Sequential(
        nn.ConvTranspose3d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1), nn.LeakyReLU(slope))


class SubNetwork(nn.Module):
    """One level's U-Net (Fig. 1b): input [fixed, warped moving] at full resolution, output a 3-channel velocity.

    Encoder: four stride-2 convolutions (16, 32, 32, 32 filters). Decoder: `num_deconvs` stride-2 deconvolutions of
    32 filters, each followed by concatenation with the encoder features of the same grid (U-Net skip), then
    convolutions of 32 and 16 filters and a linear 3-channel output convolution. The output grid is
    1 / 2^(4 − num_deconvs) of the input.
    """

    def __init__(self, num_deconvs: int, slope: float) -> None:
        super().__init__()
        channels = (2, *ENCODER_CHANNELS)
        self.encoder = nn.ModuleList(_conv(channels[i], channels[i + 1], 2, slope) for i in range(4))
        ups = []
        width = ENCODER_CHANNELS[-1]
        for n in range(num_deconvs):
            ups.append(_deconv(width, DECONV_CHANNELS, slope))
            width = DECONV_CHANNELS + ENCODER_CHANNELS[-2 - n]
        self.decoder = nn.ModuleList(ups)
        self.head = nn.Sequential(_conv(width, HEAD_CHANNELS[0], 1, slope), _conv(*HEAD_CHANNELS, 1, slope))
        self.output = nn.Conv3d(HEAD_CHANNELS[1], 3, 3, padding=1)
        # VoxelMorph's flow-layer initialisation (the paper is silent): tiny weights, zero bias.
        nn.init.normal_(self.output.weight, std=1e-5)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for layer in self.encoder:
            x = layer(x)
            skips.append(x)
        x = skips.pop()
        for up in self.decoder:
            x = torch.cat([up(x), skips.pop()], dim=1)
        return self.output(self.head(x))


def average_pool(image: Tensor) -> Tensor:
    """One pyramid step of the loss images: 3×3×3 average pooling with stride 2 (padding excluded from the mean)."""
    return F.avg_pool3d(image, 3, stride=2, padding=1, count_include_pad=False)


class Network(RegistrationNetwork):
    """MDReg-Net. `levels[l]` (l = 0, 1, 2 for the paper's l = 1, 2, 3) holds

    "increment": v^l on its own grid (1/8, 1/4, 1/2 of the input), voxels of that grid;
    "velocity": the accumulated velocity ṽ^l (Eq. 3) on the grid where its similarity is measured — 1/8 and 1/4 for
        the first two levels, the full grid (upsampled and Gaussian-smoothed) for the last;
    "displacement": Φ(ṽ^l) on that grid, fixed → moving, voxels of that grid.
    """

    multiple = 16

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.subnetworks = nn.ModuleList(SubNetwork(n, config.leaky_slope) for n in LEVEL_DECONVS)
        self.smoothing = warp.GaussianSmoothing(config.smoothing_sigma, config.smoothing_kernel)

    @property
    def output_layers(self) -> list[nn.Conv3d]:
        """The velocity output convolution of every level."""
        return [s.output for s in self.subnetworks]

    def forward(self, fixed: Tensor, moving: Tensor) -> RegistrationOutput:
        shape = fixed.shape[2:]
        steps = self.config.int_steps
        warped = moving
        accumulated: Tensor | None = None
        levels: list[dict[str, Tensor]] = []
        for index, subnetwork in enumerate(self.subnetworks):
            increment = subnetwork(torch.cat([fixed, warped], dim=1)).float()
            with torch.autocast(fixed.device.type, enabled=False):
                if accumulated is not None:
                    accumulated = warp.resize_field(accumulated, increment.shape[2:]) + increment
                else:
                    accumulated = increment
                last = index == len(self.subnetworks) - 1
                velocity = self.smoothing(warp.resize_field(accumulated, shape)) if last else accumulated
                displacement = warp.integrate_velocity(velocity, steps)
                if not last:
                    warped = warp.warp_image(moving, warp.resize_field(displacement, shape))
            levels.append({"increment": increment, "velocity": velocity, "displacement": displacement})
        return RegistrationOutput(displacement=displacement, velocity=velocity, levels=levels)

    def loss(self, output: RegistrationOutput, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Eq. 4: Σ_l [NCC loss(F^l, M^l∘Φ(ṽ^l)) + NCC loss(M^l, F^l∘Φ(−ṽ^l)) + λ R(v^l)].

        F^l, M^l: the input images average-pooled to each level's grid; NCC loss is 1 − mean squared local
        correlation; R is the mean L1 norm of the forward differences of the increment v^l. Computed in float32
        (autocast off).
        """
        with torch.autocast(batch["fixed"].device.type, enabled=False):
            return self._loss_terms(output, batch)

    def _loss_terms(self, output: RegistrationOutput, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        cfg = self.config
        fixed, moving = batch["fixed"].float(), batch["moving"].float()
        pyramid = {tuple(fixed.shape[2:]): (fixed, moving)}
        f, m = fixed, moving
        for _ in range(len(LEVEL_DECONVS)):
            f, m = average_pool(f), average_pool(m)
            pyramid[tuple(f.shape[2:])] = (f, m)
        terms: dict[str, Tensor] = {}
        total = fixed.new_zeros(())
        regularisation = fixed.new_zeros(())
        for index, level in enumerate(output.levels, start=1):
            f, m = pyramid[tuple(level["velocity"].shape[2:])]
            inverse = warp.integrate_velocity(-level["velocity"], cfg.int_steps)
            similarity = (losses.local_ncc_loss(f, warp.warp_image(m, level["displacement"]), cfg.ncc_window)
                          + losses.local_ncc_loss(m, warp.warp_image(f, inverse), cfg.ncc_window))
            terms[f"similarity_{index}"] = similarity
            regularisation = regularisation + losses.gradient_loss(level["increment"], "l1")
            total = total + similarity
        terms["regularisation"] = regularisation
        terms["total"] = total + cfg.reg_weight * regularisation
        return terms
