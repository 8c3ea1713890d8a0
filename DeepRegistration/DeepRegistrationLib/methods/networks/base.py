"""The contract every registration network fulfils, so the engine, trainer and Slicer logic treat them alike."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from ...core.errors import InputError
from ...core.params import check_fields, check_instance, param

SHAPE_LOW, SHAPE_HIGH = 8, 1024
"""Bounds of every `working_shape` axis (voxels)."""


@dataclass
class MethodConfig:
    """Fields shared by every method. Subclasses add the paper's hyper-parameters with `param`."""

    working_shape: tuple[int, int, int] = param(
        (160, 192, 160), "Training crop (I, J, K) in voxels of the working grid", low=SHAPE_LOW, high=SHAPE_HIGH,
        paper=False)
    working_spacing: float = param(
        1.0, "Isotropic voxel size (mm) of the working grid the network sees at inference", low=0.5, high=4.0,
        paper=False)
    int_steps: int = param(7, "Scaling-and-squaring steps (0: the output is a plain displacement)", low=0, high=12)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def method_name(cls) -> str:
        """The method this config belongs to (its module's name), for messages."""
        return cls.__module__.rpartition(".")[2]

    @classmethod
    def check(cls, values: dict[str, Any], owner: str | None = None) -> dict[str, Any]:
        """`values` (a subset of the fields) checked against their declarations (`core.params.check_fields`: type,
        range, choices) and converted (lists to tuples); InputError (a ValueError) naming the field otherwise."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"{cls.__name__} of {cls.method_name()} has no field(s) {unknown}; known: "
                             f"{', '.join(sorted(known))}")
        return check_fields(cls, values, owner or f"{cls.method_name()} parameter")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MethodConfig":
        """Inverse of `to_dict`, checked (`check`); unknown keys are an error, missing keys take the defaults."""
        return cls(**cls.check(values))

    def validate(self) -> None:
        """Every field against its declaration (InputError naming the first that does not fit)."""
        check_instance(self, f"{self.method_name()} parameter")


@dataclass
class RegistrationOutput:
    """What a network returns for a batch of fixed/moving pairs on the working grid.

    displacement: [B, 3, I, J, K] voxels, fixed → moving, the complete transform (an affine part composed in).
    velocity: the stationary velocity (voxels of its own grid, which may be coarser) whose exponential is the
        deformable part, when the method is diffeomorphic: deformable =
        resize_field(integrate_velocity(velocity, config.int_steps), input shape). The engine integrates −velocity
        for the exact inverse.
    affine: [B, 3, 4] voxel-index affine x ↦ A x + b applied before the deformable part, when the method has one;
        then displacement = compose(affine_displacement(affine), deformable).
    levels: per-level outputs for the training loss (method-specific keys).
    segmentations: optional per-image segmentation logits (method-specific keys).
    """

    displacement: Tensor
    velocity: Tensor | None = None
    affine: Tensor | None = None
    levels: list[dict[str, Tensor]] = field(default_factory=list)
    segmentations: dict[str, Tensor] = field(default_factory=dict)


class RegistrationNetwork(torch.nn.Module, ABC):
    """Base class: `forward(fixed, moving)` on [B, 1, I, J, K] tensors whose sizes are multiples of `multiple`.

    `loss(output, batch)` returns a dict of named scalar terms with the weighted sum under "total". `batch` holds
    "fixed", "moving" and, when available, "fixed_labels"/"moving_labels" ([B, 1, I, J, K] int64).
    """

    multiple: int = 16

    def __init__(self, config: MethodConfig) -> None:
        super().__init__()
        self.config = config

    @abstractmethod
    def forward(self, fixed: Tensor, moving: Tensor) -> RegistrationOutput:
        """Register `moving` to `fixed` (both [B, 1, I, J, K], normalised intensities)."""

    @abstractmethod
    def loss(self, output: RegistrationOutput, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The method's training loss terms and their weighted sum under "total"."""
