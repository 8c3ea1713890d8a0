"""JAD (Zhu et al. 2021): joint affine and deformable 3D networks with a shared encoder.

The affine subnetwork (four convolution blocks, three stride-2 downsampling convolutions, global average pooling,
a linear layer to 12 parameters) predicts an affine; the moving image resampled by it (A) and the fixed image go
through the same encoder, a dilated block and a U-Net decoder with residual modules to a dense displacement u.
The complete fixed → moving map is x ↦ T(x + u(x)) with T the affine: the moving image is warped by T, then by u
(docs/CONVENTIONS.md §3, §5). Paper ↔ code: docs/methods/jad.md.

Affine parameterisation: the linear layer outputs Δ ∈ R^{3×4} and the network applies θ = [I | 0] + Δ to
normalised voxel coordinates n_c = 2 x_c / (N_c − 1) − 1 in channel order (i, j, k): n' = θ [n; 1]. The voxel-index
affine x ↦ A x + b reported in RegistrationOutput.affine follows from `normalised_to_voxel_affine`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ...core import losses, warp
from ...core.params import param
from .base import MethodConfig, RegistrationNetwork, RegistrationOutput

ENCODER_CHANNELS = (16, 32, 32, 32)
"""Filters of the four convolution blocks (grids 1, 1/2, 1/4, 1/8 of the input)."""
DILATION_RATES = (1, 2, 4, 8)
DECODER_CHANNELS = (32, 32, 16)
"""Width after each upsampling (grids 1/4, 1/2, 1), mirroring the encoder."""


@dataclass
class Config(MethodConfig):
    working_shape: tuple[int, int, int] = param(
        (192, 192, 192), "Network grid (I, J, K) in voxels: the paper resizes every volume to 192³", low=8, high=1024,
        paper=True)
    int_steps: int = param(0, "Scaling-and-squaring steps for the deformable output; 0 (the paper): a displacement",
                           low=0, high=12)
    reg_weight: float = param(
        1000.0, "λ of Eq. 5 on the mean squared forward difference of the deformable displacement in normalised "
        "coordinates (2/(N−1) per voxel; see docs/methods/jad.md)", low=0.0, high=1e5)
    anat_weight: float = param(1.0, "Weight of L_anat in Eq. 5 (the paper: 1); 0 trains on the images alone",
                               low=0.0, high=100.0)
    ncc_window: int = param(9, "n of Eq. 2: side of the local cross-correlation window, voxels", low=3, high=21)
    leaky_slope: float = param(0.01, "Negative slope of every LeakyReLU (Maas et al., the paper's ref. 28)",
                               low=0.0, high=1.0, paper=False)
    group_norm_groups: int = param(8, "Groups of the GroupNorm layers in the dilated block (32 channels)",
                                   choices=(1, 2, 4, 8, 16, 32), paper=False)


class ConvBlock(nn.Module):
    """Convolution 3×3×3 stride 1 → LeakyReLU → batch normalisation (the paper's order, Sec. 2.A)."""

    def __init__(self, in_channels: int, out_channels: int, slope: float) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.act = nn.LeakyReLU(slope)
        self.norm = nn.BatchNorm3d(out_channels)

    def activation(self, x: Tensor) -> Tensor:
        """The block's output before batch normalisation."""
        return self.act(self.conv(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.activation(x))


class Encoder(nn.Module):
    """The shared encoder: blocks of 16, 32, 32, 32 filters alternating with three stride-2 3×3×3 convolutions.

    Returns the four blocks' outputs (grids 1, 1/2, 1/4, 1/8) and the global average of the last block's
    activation before its batch normalisation (the affine head's input, see docs/methods/jad.md).
    """

    def __init__(self, slope: float) -> None:
        super().__init__()
        channels = (2, *ENCODER_CHANNELS)
        self.blocks = nn.ModuleList(ConvBlock(channels[i], channels[i + 1], slope) for i in range(4))
        self.downsampling = nn.ModuleList(
            nn.Conv3d(c, c, 3, stride=2, padding=1) for c in ENCODER_CHANNELS[:3])

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        features = []
        for block, down in zip(self.blocks[:3], self.downsampling):
            x = block(x)
            features.append(x)
            x = down(x)
        last = self.blocks[3].activation(x)
        features.append(self.blocks[3].norm(last))
        return features, last.mean(dim=(2, 3, 4))


class DilatedBlock(nn.Sequential):
    """Four sub-blocks, dilation 1, 2, 4, 8: convolution 3×3×3 → ReLU → GroupNorm, applied in sequence."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__(*(nn.Sequential(nn.Conv3d(channels, channels, 3, padding=d, dilation=d), nn.ReLU(),
                                         nn.GroupNorm(groups, channels)) for d in DILATION_RATES))


class ResidualModule(nn.Module):
    """Two convolution blocks with an identity shortcut (1×1×1 convolution when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, slope: float) -> None:
        super().__init__()
        self.body = nn.Sequential(ConvBlock(in_channels, out_channels, slope),
                                  ConvBlock(out_channels, out_channels, slope))
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + self.shortcut(x)


def normalised_to_voxel_affine(theta: Tensor, shape: Sequence[int]) -> Tensor:
    """Convert θ [B, 3, 4] acting on normalised coordinates n = S x − 1 (S = diag(2/(N_c − 1))) to the voxel-index
    affine [A | b] (x ↦ A x + b): A = S⁻¹ M S, b = S⁻¹ (t + 1 − M 1), with θ = [M | t]."""
    s = torch.tensor([2.0 / (n - 1) for n in shape], device=theta.device, dtype=theta.dtype)
    m, t = theta[:, :, :3], theta[:, :, 3]
    a = m * s.view(1, 1, 3) / s.view(1, 3, 1)
    b = (t + 1 - m.sum(dim=2)) / s.view(1, 3)
    return torch.cat([a, b.unsqueeze(2)], dim=2)


def apply_affine(affine: Tensor, points: Tensor) -> Tensor:
    """Map voxel coordinates `points` [B, 3, I, J, K] through x ↦ A x + b, `affine` = [A | b] of shape [B, 3, 4]."""
    return torch.einsum("bij,bjxyz->bixyz", affine[:, :, :3], points) + affine[:, :, 3].view(-1, 3, 1, 1, 1)


def normalised_field(disp: Tensor) -> Tensor:
    """A voxel displacement expressed in normalised coordinates: component c times 2 / (N_c − 1)."""
    scale = [2.0 / (n - 1) for n in disp.shape[2:]]
    return disp * torch.tensor(scale, device=disp.device, dtype=disp.dtype).view(1, 3, 1, 1, 1)


def squared_global_cc_loss(a: Tensor, b: Tensor) -> Tensor:
    """Eq. 1 shifted by 1: 1 − ρ² with ρ the Pearson correlation of each pair over all voxels, batch mean."""
    rho = torch.stack([1 - losses.global_cc_loss(a[i:i + 1], b[i:i + 1]) for i in range(a.shape[0])])
    return 1 - (rho * rho).mean()


class Network(RegistrationNetwork):
    """JAD. `affine` is the voxel-index affine T; `levels[0]` holds

    "affine_displacement": T(x) − x; "affine_warped": the moving image resampled by T (the paper's A);
    "deformable": the deformable displacement u (fixed → A), voxels. `displacement` = T(x + u(x)) − x.
    """

    multiple = 8

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        slope = config.leaky_slope
        self.encoder = Encoder(slope)
        self.affine_head = nn.Linear(ENCODER_CHANNELS[-1], 12)
        nn.init.zeros_(self.affine_head.weight)  # θ = [I | 0] at initialisation
        nn.init.zeros_(self.affine_head.bias)
        self.dilated = DilatedBlock(ENCODER_CHANNELS[-1], config.group_norm_groups)
        ups, modules = [], []
        width = ENCODER_CHANNELS[-1]
        for out, skip in zip(DECODER_CHANNELS, ENCODER_CHANNELS[2::-1]):
            ups.append(nn.ConvTranspose3d(width, out, 2, stride=2))
            modules.append(ResidualModule(out + skip, out, slope))
            width = out
        self.upsampling = nn.ModuleList(ups)
        self.residual = nn.ModuleList(modules)
        self.flow = nn.Conv3d(width, 3, 3, padding=1)
        # VoxelMorph's flow-layer initialisation (the paper is silent): tiny weights, zero bias.
        nn.init.normal_(self.flow.weight, std=1e-5)
        nn.init.zeros_(self.flow.bias)

    @property
    def output_layers(self) -> list[nn.Module]:
        """The affine head and the displacement output convolution; zeroing both gives the identity."""
        return [self.affine_head, self.flow]

    def predict_affine(self, fixed: Tensor, moving: Tensor) -> Tensor:
        """The affine subnetwork: the voxel-index affine [A | b] ([B, 3, 4], float32) mapping fixed to moving."""
        _, pooled = self.encoder(torch.cat([fixed, moving], dim=1))
        delta = self.affine_head(pooled).float().view(-1, 3, 4)
        identity = torch.eye(3, 4, device=delta.device, dtype=delta.dtype)
        return normalised_to_voxel_affine(identity + delta, fixed.shape[2:])

    def forward(self, fixed: Tensor, moving: Tensor) -> RegistrationOutput:
        shape = fixed.shape[2:]
        affine = self.predict_affine(fixed, moving)
        with torch.autocast(fixed.device.type, enabled=False):
            affine_disp = warp.affine_displacement(affine, shape)
            affine_warped = warp.warp_image(moving, affine_disp)
        features, _ = self.encoder(torch.cat([fixed, affine_warped], dim=1))
        x = self.dilated(features[-1])
        for up, module, skip in zip(self.upsampling, self.residual, features[2::-1]):
            x = module(torch.cat([up(x), skip], dim=1))
        out = self.flow(x).float()
        with torch.autocast(fixed.device.type, enabled=False):
            deformable = warp.integrate_velocity(out, self.config.int_steps)
            grid = warp.identity_grid(shape, device=out.device, dtype=out.dtype)
            displacement = apply_affine(affine, grid + deformable) - grid
        return RegistrationOutput(
            displacement=displacement, velocity=out if self.config.int_steps > 0 else None, affine=affine,
            levels=[{"affine_displacement": affine_disp, "affine_warped": affine_warped, "deformable": deformable}])

    def loss(self, output: RegistrationOutput, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Eq. 5: L_aff + L_sim + L_anat + λ L_smooth (L_anat only when both label maps are in `batch`).

        L_aff: 1 − ρ² of F and A (Eq. 1); L_sim: 1 − mean squared local correlation of F and W = A∘(x + u) over
        n³ windows (Eq. 2); L_anat: 1 − mean soft Dice over the foreground labels of F's labels and the moving
        labels warped one-hot and trilinearly by T then u (Eq. 3); L_smooth: mean squared forward difference of u
        in normalised coordinates (Eq. 4). Computed in float32 (autocast off).
        """
        with torch.autocast(batch["fixed"].device.type, enabled=False):
            return self._loss_terms(output, batch)

    def _loss_terms(self, output: RegistrationOutput, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        cfg = self.config
        level = output.levels[0]
        fixed = batch["fixed"].float()
        warped = warp.warp_image(level["affine_warped"], level["deformable"])
        terms = {
            "affine": squared_global_cc_loss(fixed, level["affine_warped"]),
            "similarity": losses.local_ncc_loss(fixed, warped, cfg.ncc_window),
            "smoothness": losses.gradient_loss(normalised_field(level["deformable"]), "l2"),
        }
        total = terms["affine"] + terms["similarity"] + cfg.reg_weight * terms["smoothness"]
        values = []
        if cfg.anat_weight > 0 and "fixed_labels" in batch and "moving_labels" in batch:
            labels = torch.cat([batch["fixed_labels"].flatten(), batch["moving_labels"].flatten()])
            values = [int(v) for v in torch.unique(labels) if v != 0]
        if values:
            moving_onehot = losses.one_hot(batch["moving_labels"], values)
            moving_onehot = warp.warp_image(moving_onehot, level["affine_displacement"], padding_mode="zeros")
            moving_onehot = warp.warp_image(moving_onehot, level["deformable"], padding_mode="zeros")
            terms["anatomical"] = losses.soft_dice_loss(moving_onehot, losses.one_hot(batch["fixed_labels"], values))
            total = total + cfg.anat_weight * terms["anatomical"]
        terms["total"] = total
        return terms
