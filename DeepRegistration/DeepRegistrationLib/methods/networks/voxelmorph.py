"""Diffeomorphic VoxelMorph (VoxelMorph-diff; Dalca et al., MICCAI 2018 / MedIA 2019), deterministic NCC variant.

A U-Net (encoder 16-32-32-32, decoder 32-32-32-32-32-16-16, 3³ convolutions with LeakyReLU(0.2), max pooling and
nearest upsampling) reads the fixed and moving images and a 3³ convolution outputs a full-resolution field. That field
is resized to half resolution, which is the stationary velocity v; exp(v) by 7 scaling-and-squaring steps at half
resolution is upsampled to the input grid. The loss is local NCC (window 9) between the fixed image and the warped
moving image (and, bidirectionally, between the moving image and the fixed image warped by exp(−v)) plus
λ·‖∇v‖² on the half-resolution velocity.

Frames and units: tensors [B, C, I, J, K]; the velocity is in voxels of the half-resolution grid and the
displacement in voxels of the input grid, fixed → moving (docs/CONVENTIONS.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core import losses, warp
from ...core.params import param
from .base import MethodConfig, RegistrationNetwork, RegistrationOutput


@dataclass
class Config(MethodConfig):
    """VoxelMorph-diff hyper-parameters."""

    working_shape: tuple[int, int, int] = param(
        (160, 192, 224), "Training crop (I, J, K) in voxels; VoxelMorph's brain MRI crop 160×192×224",
        low=8, high=1024)
    encoder_features: tuple[int, ...] = param((16, 32, 32, 32), "U-Net encoder widths, one conv per scale",
                                                  low=1, high=1024)
    decoder_features: tuple[int, ...] = param(
        (32, 32, 32, 32, 32, 16, 16), "U-Net decoder widths: one per encoder scale, the rest at full resolution",
        low=1, high=1024)
    int_downsize: int = param(2, "Velocity grid = input grid / int_downsize (integration at half resolution)",
                              choices=(1, 2))
    bidirectional: bool = param(True, "Also warp the fixed image by exp(−v) and compare it with the moving image")
    ncc_window: int = param(9, "Local NCC window (voxels)", low=3, high=21)
    reg_weight: float = param(1.0, "λ of the ‖∇v‖² regulariser (VoxelMorph's value for the NCC loss)",
                              low=0.0, high=100.0)


class ConvBlock(nn.Module):
    """3³ convolution with bias, then LeakyReLU(0.2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(self.conv(x), 0.2)


class UNet(nn.Module):
    """VoxelMorph's U-Net: an encoder conv then 2× max pooling per encoder width; per encoder scale a decoder conv,
    nearest 2× upsampling and concatenation with the encoder output of that scale; the remaining decoder widths are
    convs at full resolution. Input sizes must be multiples of 2^len(encoder).
    """

    def __init__(self, in_channels: int, encoder: tuple[int, ...], decoder: tuple[int, ...]) -> None:
        super().__init__()
        if len(decoder) < len(encoder):
            raise ValueError(f"need at least {len(encoder)} decoder widths, got {len(decoder)}")
        self.encoder = nn.ModuleList()
        skips, prev = [], in_channels
        for width in encoder:
            self.encoder.append(ConvBlock(prev, width))
            skips.append(width)
            prev = width
        self.decoder = nn.ModuleList()
        for width, skip in zip(decoder, reversed(skips)):
            self.decoder.append(ConvBlock(prev, width))
            prev = width + skip
        self.remaining = nn.ModuleList()
        for width in decoder[len(encoder):]:
            self.remaining.append(ConvBlock(prev, width))
            prev = width
        self.out_channels = prev

    def forward(self, x: Tensor) -> Tensor:
        history = []
        for block in self.encoder:
            x = block(x)
            history.append(x)
            x = F.max_pool3d(x, 2)
        for block in self.decoder:
            x = F.interpolate(block(x), scale_factor=2, mode="nearest")
            x = torch.cat([x, history.pop()], dim=1)
        for block in self.remaining:
            x = block(x)
        return x


class VoxelMorph(RegistrationNetwork):
    """VoxelMorph-diff: `velocity` on the 1/`int_downsize` grid, `displacement` = exp(velocity) on the input grid."""

    multiple = 16  # four 2× poolings

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.unet = UNet(2, tuple(config.encoder_features), tuple(config.decoder_features))
        self.flow = nn.Conv3d(self.unet.out_channels, 3, 3, padding=1)
        nn.init.normal_(self.flow.weight, 0.0, 1e-5)
        nn.init.zeros_(self.flow.bias)

    def velocity_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(s // self.config.int_downsize for s in shape)

    def exp(self, velocity: Tensor, shape: tuple[int, ...]) -> Tensor:
        """exp(velocity) by scaling and squaring on the velocity grid, resized to `shape` (voxels of `shape`)."""
        return warp.resize_field(warp.integrate_velocity(velocity, self.config.int_steps), shape)

    def forward(self, fixed: Tensor, moving: Tensor) -> RegistrationOutput:
        shape = tuple(fixed.shape[2:])
        if any(s % self.multiple for s in shape):
            raise ValueError(f"VoxelMorph needs sizes that are multiples of {self.multiple}, got {shape}")
        field = self.flow(self.unet(torch.cat([moving, fixed], dim=1))).float()  # fields in float32 under autocast
        velocity = warp.resize_field(field, self.velocity_shape(shape))
        return RegistrationOutput(displacement=self.exp(velocity, shape), velocity=velocity)

    def loss(self, output: RegistrationOutput, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """NCC_9(F, M∘φ) (bidirectional: the mean with NCC_9(M, F∘φ⁻¹)) + λ·int_downsize·‖∇v‖²."""
        cfg = self.config
        fixed, moving = batch["fixed"].float(), batch["moving"].float()
        velocity, displacement = output.velocity.float(), output.displacement.float()
        with torch.autocast(fixed.device.type, enabled=False):  # local variances need float32
            similarity = losses.local_ncc_loss(fixed, warp.warp_image(moving, displacement), cfg.ncc_window)
            if cfg.bidirectional:
                inverse = self.exp(-velocity, tuple(fixed.shape[2:]))
                backward = losses.local_ncc_loss(moving, warp.warp_image(fixed, inverse), cfg.ncc_window)
                similarity = 0.5 * similarity + 0.5 * backward
            smoothness = cfg.reg_weight * cfg.int_downsize * losses.gradient_loss(velocity)
        return {"similarity": similarity, "smoothness": smoothness, "total": similarity + smoothness}


Network = VoxelMorph
