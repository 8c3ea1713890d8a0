"""macJNet: weakly-supervised multimodal registration with a joint learning framework and macMIND (Zhou et al. 2023).

Three sub-networks, alternately optimised (Methodology, "Joint learning framework"):

* Reg-SubNet — LapIRN (`networks/lapirn.py`) whose level CNNs gate their encoder skip connection with an attention
  gate (Oktay et al. 2018; `AttentionSkip`, Fig. 7a-b). Its loss is the dual similarity
  E_reg = λ_sim·E_sim(macMIND) + λ_label·(1 − Dice(L_F, L_M∘φ)) + λ_smo·||∇φ||² (Eq. 14-15).
* Two Seg-SubNets — nnU-Net-style 3D U-Nets with scSE blocks in the decoder (Roy et al. 2018; `SegSubNet`,
  Fig. 7c-d), one per modality: `seg_fixed` segments the fixed image (CT in the paper), `seg_moving` the moving
  image (MR). Their loss is Eq. 16: Dice to the ground truth where it exists, Dice between the fixed segmentation
  and the moving segmentation warped by φ where it does not.

`set_stage("registration" | "segmentation")` picks which loss `loss` returns and which sub-networks build a graph;
`alternating_stage(iteration)` is the schedule; `registration_parameters()`/`segmentation_parameters()` are the two
parameter groups (the registration stage's loss reaches only the first, the segmentation stage's only the second).

Frames and units follow `lapirn`: tensors [B, C, I, J, K]; displacements in voxels of their level's grid,
fixed → moving (docs/CONVENTIONS.md §3). Segmentations are logits [B, seg_classes, I, J, K] on the input grid;
label value v is class v. Choices the paper leaves open are recorded in docs/methods/macjnet.md.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core import losses, warp
from ...core.macmind import descriptor_loss
from ...core.params import param
from . import lapirn
from .base import RegistrationOutput

STAGES = ("registration", "segmentation")


@dataclass
class Config(lapirn.Config):
    """macJNet hyper-parameters: the paper's where stated, LapIRN's/nnU-Net's (its bases) otherwise."""

    working_shape: tuple[int, int, int] = param(
        (128, 128, 96), "Network grid (I, J, K) in voxels; the paper resamples the liver images to 128×128×96 "
        "(Implementation), read as (x, y, z) = (i, j, k)", low=8, high=1024)
    smooth_weight: float = param(0.5, "λ_smo: weight of the diffusion regulariser ||∇φ||² (Eq. 15), LapIRN units "
                                 "and per-level factor 1/2^(L−p)", low=0.0, high=100.0)
    sim_weight: float = param(20.0, "λ_sim: weight of E_sim, the descriptor similarity (Eq. 14)", low=0.0,
                              high=1000.0)
    label_weight: float = param(2.0, "λ_label: weight of E_label = 1 − Dice(L_F, L_M∘φ)", low=0.0, high=100.0)
    descriptor: str = param("macmind", "E_sim descriptor: macMIND, or MIND-SSC for the paper's MIND ablation "
                            "(Tables 3, 4, 6)", choices=("macmind", "mind"))
    patch_size: int = param(5, "R1: patch size of the self-similarity context, voxels", low=3, high=9)
    patch_distance: int = param(2, "L: distance of the six neighbour patches from the central one at the first "
                                "scale, voxels (scale k uses k·L)", low=1, high=8)
    scale_weights: tuple[float, float] = param(
        (0.7, 0.3), "α_1, α_2 of Eq. 10 for distances L and 2L: the optimal ratio α_1/α_2 = 7/3 of Fig. 3 (the "
        "Implementation section lists 0.3/0.7; see docs/methods/macjnet.md)", low=0.0, high=1.0)
    aggregation_window: int = param(5, "R2: window of the 3D log-polar aggregation, voxels", low=5, high=9)
    seg_features: tuple[int, int, int, int, int] = param(
        (32, 64, 128, 256, 320), "Seg-SubNet widths per U-Net stage (nnU-Net: 32 doubling, capped at 320; four "
        "stride-2 poolings)", low=1, high=1024, paper=False)
    seg_classes: int = param(2, "Segmentation classes including background (the paper: background, liver)",
                             low=2, high=200)
    return_segmentations: bool = param(False, "Also return both Seg-SubNet logits at inference", paper=False)
    labelled_fraction: float = param(0.3, "Fraction of training pairs whose labels are used (30%, Table 7)",
                                     low=0.0, high=1.0)
    stage_length: int = param(1, "Consecutive iterations of each stage before switching (Fig. 6: both updates "
                              "in every iteration)", low=1, high=10000, paper=False)
    lr_registration: float = param(2e-5, "Adam learning rate of Reg-SubNet", low=1e-7, high=1e-2)
    lr_segmentation: float = param(1e-5, "Adam learning rate of the Seg-SubNets", low=1e-7, high=1e-2)


# ----------------------------------------------------------------------------------------------------------------
# Alternating schedule (Methodology, "Joint learning framework"; Fig. 6)


def alternating_stage(iteration: int, stage_length: int = 1) -> str:
    """The stage of 0-based training iteration `iteration`: `stage_length` registration updates, then as many
    segmentation updates, and so on."""
    if iteration < 0 or stage_length < 1:
        raise ValueError(f"need iteration ≥ 0 and stage_length ≥ 1, got {iteration}, {stage_length}")
    return STAGES[(iteration // stage_length) % 2]


def labelled_pairs(num_pairs: int, fraction: float, seed: int = 0) -> list[int]:
    """Sorted indices of the round(fraction·num_pairs) training pairs whose labels are used (a seeded draw)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"labelled fraction must be in [0, 1], got {fraction}")
    return sorted(random.Random(seed).sample(range(num_pairs), round(fraction * num_pairs)))


# ----------------------------------------------------------------------------------------------------------------
# Reg-SubNet: LapIRN with attention-gated skip connections


class AttentionSkip(nn.Module):
    """Additive attention gate on the encoder skip (Oktay et al. 2018, Fig. 2), then concatenation.

    α = σ(ψ(ReLU(W_x·x + W_g·g + b_g)) + b_ψ) with 1³ convolutions to width/2 channels; the decoder features g
    gate the encoder features x (both at the level's resolution, so no resampling of α); returns [g, α·x].
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        inter = width // 2
        self.w_x = nn.Conv3d(width, inter, 1, bias=False)
        self.w_g = nn.Conv3d(width, inter, 1, bias=True)
        self.psi = nn.Conv3d(inter, 1, 1, bias=True)
        self.out_channels = 2 * width

    def forward(self, decoded: Tensor, encoded: Tensor) -> Tensor:
        alpha = torch.sigmoid(self.psi(F.relu(self.w_x(encoded) + self.w_g(decoded))))
        return torch.cat([decoded, alpha * encoded], dim=1)


class AttentionLevelNet(lapirn.LevelNet):
    """LapIRN's level CNN with an attention-gated skip connection (Fig. 7a)."""

    def make_skip(self, width: int) -> nn.Module:
        return AttentionSkip(width)


def attention_level(level: int, config: Config) -> lapirn.LevelNet:
    """Reg-SubNet's CNN for pyramid level `level` (1-based): 2 input channels at level 1, 5 above (as LapIRN)."""
    return AttentionLevelNet(2 if level == 1 else 5, config.start_channels, config.num_res_blocks, config.range_flow)


# ----------------------------------------------------------------------------------------------------------------
# Seg-SubNet: nnU-Net-style 3D U-Net with scSE blocks in the decoder


class ConvNormAct(nn.Sequential):
    """nnU-Net's unit: conv 3³ – InstanceNorm (affine) – LeakyReLU(0.01).

    nnU-Net gives the convolution a bias, which the instance norm cancels (its gradient is zero); it is left out.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True),
            nn.LeakyReLU(0.01),
        )


class SCSE(nn.Module):
    """Concurrent spatial and channel squeeze & excitation (Roy et al. 2018): cSE(x) + sSE(x).

    cSE: global average pool – FC (C → C/2) – ReLU – FC (C/2 → C) – sigmoid, scaling channels;
    sSE: conv 1³ (C → 1) – sigmoid, scaling voxels.
    """

    def __init__(self, channels: int, reduction: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)
        self.spatial = nn.Conv3d(channels, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        channel = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3, 4))))))
        return x * channel[:, :, None, None, None] + x * torch.sigmoid(self.spatial(x))


def _he_init(module: nn.Module) -> None:
    """nnU-Net's initialisation: Kaiming normal (negative slope 0.01) for convolutions, zero biases."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class SegSubNet(nn.Module):
    """3D U-Net (nnU-Net's generic architecture) for one modality: [B, 1, I, J, K] → logits [B, classes, I, J, K].

    Stage s has two conv units of width `features[s]`; stages after the first start with a stride-2 conv. The
    decoder upsamples by a 2³ stride-2 transposed conv (no bias), concatenates the encoder features, applies two conv
    units and an scSE block. The output is a 1³ conv without bias. Convolutions are He-initialised (`_he_init`).
    Sizes must be multiples of 2^(len(features)−1).
    """

    def __init__(self, features: Sequence[int], classes: int) -> None:
        super().__init__()
        self.encoder = nn.ModuleList()
        in_channels = 1
        for s, width in enumerate(features):
            self.encoder.append(nn.Sequential(ConvNormAct(in_channels, width, stride=1 if s == 0 else 2),
                                              ConvNormAct(width, width)))
            in_channels = width
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for s in range(len(features) - 2, -1, -1):
            self.up.append(nn.ConvTranspose3d(features[s + 1], features[s], 2, stride=2, bias=False))
            self.decoder.append(nn.Sequential(ConvNormAct(2 * features[s], features[s]),
                                              ConvNormAct(features[s], features[s]), SCSE(features[s])))
        self.head = nn.Conv3d(features[0], classes, 1, bias=False)
        self.apply(_he_init)

    def forward(self, image: Tensor) -> Tensor:
        skips = []
        x = image
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        for up, stage, skip in zip(self.up, self.decoder, reversed(skips[:-1])):
            x = stage(torch.cat([up(x), skip], dim=1))
        return self.head(x)


# ----------------------------------------------------------------------------------------------------------------
# The joint network


class MacJNet(lapirn.LapIRN):
    """Reg-SubNet (attention LapIRN) plus Seg-SubNets for the fixed and the moving modality.

    `forward` returns LapIRN's output (see `lapirn.LapIRN`); `segmentations` {"fixed", "moving"} holds both
    Seg-SubNets' logits in the segmentation stage of training (Eq. 16 needs them) or when
    `config.return_segmentations` is set.
    """

    multiple = 16  # LapIRN needs 8; the Seg-SubNets' four poolings need 16

    def __init__(self, config: Config) -> None:
        if 2 ** (len(config.seg_features) - 1) > self.multiple:
            raise ValueError(f"at most {self.multiple.bit_length()} Seg-SubNet stages, got {len(config.seg_features)}")
        super().__init__(config, attention_level)
        self.seg_fixed = SegSubNet(config.seg_features, config.seg_classes)
        self.seg_moving = SegSubNet(config.seg_features, config.seg_classes)
        self.stage = STAGES[0]
        self.pretraining = False

    def set_stage(self, stage: str, pretraining: bool = False) -> None:
        """Select the loss `loss` returns and the sub-networks that build a graph in `forward`.

        With `pretraining` each sub-network learns on its own ("Implementation": Reg-SubNet pre-trained
        unsupervised, Seg-SubNets on labelled images): the registration loss drops the label term and the
        segmentation loss the consistency term.
        """
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.stage, self.pretraining = stage, pretraining

    def registration_parameters(self) -> Iterator[nn.Parameter]:
        """Reg-SubNet's parameters (the pyramid's level CNNs)."""
        return self.levels.parameters()

    def segmentation_parameters(self) -> Iterator[nn.Parameter]:
        """Both Seg-SubNets' parameters."""
        yield from self.seg_fixed.parameters()
        yield from self.seg_moving.parameters()

    def forward(self, fixed: Tensor, moving: Tensor) -> RegistrationOutput:
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and self.stage == "registration"):
            output = super().forward(fixed, moving)
        if self.config.return_segmentations or (self.training and self.stage == "segmentation"):
            with torch.set_grad_enabled(grad and self.stage == "segmentation"):
                output.segmentations = {"fixed": self.seg_fixed(fixed), "moving": self.seg_moving(moving)}
        return output

    def similarity(self, fixed: Tensor, warped: Tensor, level: int) -> Tensor:
        """E_sim of Eq. 14 (unweighted) on level `level`'s images: macMIND (or MIND-SSC) mean squared difference."""
        c = self.config
        return descriptor_loss(fixed, warped, c.descriptor, c.patch_size, c.patch_distance, c.scale_weights,
                               c.aggregation_window)

    def loss(self, output: RegistrationOutput, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The current stage's loss: `registration_loss` or `segmentation_loss`."""
        if self.stage == "registration":
            return self.registration_loss(output, batch)
        return self.segmentation_loss(output, batch)

    def label_maps(self, output: RegistrationOutput, batch: dict[str, Tensor], image: str) -> Tensor:
        """One-hot labels [B, seg_classes, I, J, K] of `image` ("fixed"/"moving"): the ground truth
        `batch[image + "_labels"]` where the batch has it, else the Seg-SubNet's prediction L^seg (argmax of the
        output's logits, or of the Seg-SubNet run on `batch[image]`), without gradient."""
        key = f"{image}_labels"
        if key in batch:
            return losses.one_hot(batch[key], range(self.config.seg_classes)).to(output.displacement.dtype)
        if image in output.segmentations:
            logits = output.segmentations[image].detach()
        else:
            with torch.no_grad():
                logits = (self.seg_fixed if image == "fixed" else self.seg_moving)(batch[image])
        return F.one_hot(logits.argmax(dim=1), self.config.seg_classes).movedim(-1, 1).to(output.displacement.dtype)

    def registration_loss(self, output: RegistrationOutput, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """E_reg = λ_sim·E_sim + λ_label·(1 − Dice(L_F, L_M∘φ)) + λ_smo·1/2^(L−p)·||∇φ||² at the finest active level p.

        Labels (ground truth or Seg-SubNet predictions, `label_maps`) are brought to level p's grid as one-hot maps
        (LapIRN's pyramid downsampling) and the moving one is warped trilinearly; Dice is over the foreground
        classes. ||∇φ||² is LapIRN's smoothness (`lapirn.LapIRN.smoothness`) applied to the displacement.
        """
        p = len(output.levels)
        last = output.levels[-1]
        similarity = self.config.sim_weight * self.similarity(last["fixed"], last["warped"], p)
        smoothness = self.smoothness(last["displacement"], p)
        label = similarity.new_zeros(())
        if self.config.label_weight and not self.pretraining:  # unsupervised pre-training: no Seg-SubNet passes
            grid = tuple(last["fixed"].shape[2:])
            fixed_labels = lapirn.downsample_image(self.label_maps(output, batch, "fixed"), grid)
            moving_labels = lapirn.downsample_image(self.label_maps(output, batch, "moving"), grid)
            warped_labels = warp.warp_image(moving_labels, last["displacement"])
            label = self.config.label_weight * losses.soft_dice_loss(warped_labels[:, 1:], fixed_labels[:, 1:])
        return {"similarity": similarity, "label": label, "smoothness": smoothness,
                "total": similarity + label + smoothness}

    def segmentation_loss(self, output: RegistrationOutput, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """E_seg of Eq. 16 on the input grid: soft Dice (foreground classes) of each Seg-SubNet to its ground truth
        where the batch has it; where an image has none, Dice between the fixed segmentation and the moving
        segmentation warped by φ (no gradient to φ)."""
        if set(output.segmentations) != {"fixed", "moving"}:
            raise ValueError("the segmentation loss needs both Seg-SubNet outputs: run forward in train mode in the "
                             "segmentation stage, or with return_segmentations")
        probs = {name: torch.softmax(logits, dim=1) for name, logits in output.segmentations.items()}
        terms: dict[str, Tensor] = {}
        for name in ("fixed", "moving"):
            key = f"{name}_labels"
            if key in batch:
                target = losses.one_hot(batch[key], range(self.config.seg_classes)).to(probs[name].dtype)
                terms[f"dice_{name}"] = losses.soft_dice_loss(probs[name][:, 1:], target[:, 1:])
        if len(terms) < 2 and not self.pretraining:
            warped = warp.warp_image(probs["moving"], output.displacement.detach())
            terms["consistency"] = losses.soft_dice_loss(probs["fixed"][:, 1:], warped[:, 1:])
        # Pre-training on a pair without labels: a zero loss on the graph (zero gradients), so every process of a
        # distributed run still takes part in the gradient exchange.
        terms["total"] = sum(terms.values()) if terms else 0.0 * sum(p.sum() for p in probs.values())
        return terms


Network = MacJNet
