"""The settings of the per-pair refinement (`engine.refine`) and the named presets, declared once.

Every knob is a field with its unit, default and range; a preset is one `RefineSettings` (None for "fast": the
network alone). `RegistrationOptions.preset` names one and `RegistrationOptions.refinement` overrides its fields.
This module imports no PyTorch, so front ends can list and check settings before a registration runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..core.errors import InputError

AFFINE_MODES = ("off", "on", "auto")
MULTI_SIMILARITIES = ("mind", "mi")
REGULARISERS = ("diffusion", "bending")


def _knob(default: Any, help: str, *, low: float | None = None, high: float | None = None,
          choices: tuple | None = None) -> Any:
    """A settings field with the metadata front ends read (the keys of `networks.base.param`): `help` states the
    meaning and unit, `low`/`high` bound a number (or every element of a tuple), `choices` lists allowed values;
    `paper` is False: these are our documented choices (docs/REFINEMENT.md), not a paper's."""
    return field(default=default, metadata={"help": help, "low": low, "high": high, "choices": choices,
                                            "paper": False})


@dataclass(frozen=True)
class RefineSettings:
    """Every knob of the refinement; invalid values raise `InputError` naming the field (see `_knob` metadata)."""

    affine: str = _knob(
        "auto", "Affine stage: 'on' runs rigid then affine; 'auto' runs it and keeps it only if it improves the "
        "similarity over the identity; 'off' returns the identity", choices=AFFINE_MODES)
    affine_levels_mm: tuple[float, ...] = _knob(
        (8.0, 4.0), "Voxel sizes (mm) of the affine stage's levels, coarse to fine", low=1.0, high=32.0)
    rigid_iterations: tuple[int, ...] = _knob(
        (60, 20), "Adam steps of the rigid stage per affine level", low=0, high=10000)
    affine_iterations: tuple[int, ...] = _knob(
        (30, 20), "Adam steps of the affine stage (after the rigid one) per affine level", low=0, high=10000)
    affine_lr: float = _knob(
        1.0, "Adam step of the affine stage in mm (translation; rotation and stretch as the arc they move a point "
        "at the fixed foreground's radius of gyration)", low=1e-3, high=20.0)
    affine_samples: int = _knob(
        20000, "Fixed voxels drawn (with `seed`) per affine level for the similarity; 0: every voxel",
        low=0, high=10**8)
    lncc_window: int = _knob(
        9, "Local NCC window (voxels of each level, odd): the monomodal deformable similarity. The affine stage "
        "uses global NCC (monomodal) or mutual information (multimodal)", low=3, high=21)
    multi_similarity: str = _knob(
        "mind", "Multimodal deformable similarity: 'mind' (MIND-SSC descriptor difference) or 'mi' (Parzen mutual "
        "information)", choices=MULTI_SIMILARITIES)
    mi_bins: int = _knob(32, "Parzen histogram bins of mutual information (intensities 0..1)", low=8, high=128)
    mind_radius: int = _knob(1, "MIND-SSC patch radius (voxels of each level)", low=1, high=3)
    mind_dilation: int = _knob(2, "MIND-SSC neighbour distance (voxels of each level)", low=1, high=4)
    image_sigma: float = _knob(
        0.0, "Gaussian σ (voxels of each level) smoothing both images before the deformable similarity: suppresses "
        "noise, whose variance trilinear interpolation lowers off the voxel centres (a bias towards half-voxel "
        "shifts); 0: none", low=0.0, high=4.0)
    levels_mm: tuple[float, ...] = _knob(
        (4.0, 2.0), "Voxel sizes (mm) of the deformable levels, coarse to fine (none finer than the working grid)",
        low=0.5, high=16.0)
    iterations: tuple[int, ...] = _knob(
        (40, 10), "Adam steps of the deformable stage per level", low=0, high=10000)
    lr: float = _knob(0.25, "Adam step of the velocity in mm", low=1e-3, high=10.0)
    control_mm: tuple[float, ...] = _knob(
        (12.0, 12.0), "Voxel size (mm) of the velocity's control grid at each deformable level (not finer than the "
        "level): the velocity is integrated there and its displacement upsampled trilinearly", low=0.5, high=32.0)
    regulariser: str = _knob(
        "diffusion", "Penalty on the velocity: 'diffusion' (mean squared first derivatives) or 'bending' (mean "
        "squared second derivatives, per mm)", choices=REGULARISERS)
    regulariser_weight: float = _knob(3.0, "Weight of the penalty (dimensionless, derivatives per mm)",
                                      low=0.0, high=1e4)
    int_steps: int = _knob(
        5, "Scaling-and-squaring steps: exp(v) on the working grid (the caller integrates the result with these); "
        "each level coarser than the finest integrates with one step fewer per halving", low=1, high=12)
    guidance_weight: float = _knob(
        0.01, "Weight of the guidance landmarks' mean squared distance (per mm²) between mapped fixed points and "
        "their moving partners", low=0.0, high=1e3)
    seed: int = _knob(0, "Seed of the affine stage's voxel sampling (the deformable stage draws nothing)",
                      low=0, high=2**31 - 1)

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_field(f.name, getattr(self, f.name), f.default, f.metadata)
        for levels, counts in (("affine_levels_mm", "rigid_iterations"), ("affine_levels_mm", "affine_iterations"),
                               ("levels_mm", "iterations"), ("levels_mm", "control_mm")):
            if len(getattr(self, levels)) != len(getattr(self, counts)):
                raise InputError(f"refinement setting {counts!r} needs one value per level of {levels!r} "
                                 f"({len(getattr(self, levels))}), got {getattr(self, counts)}")
        for levels in ("affine_levels_mm", "levels_mm"):
            values = getattr(self, levels)
            if not values or list(values) != sorted(values, reverse=True):
                raise InputError(f"refinement setting {levels!r} must list levels coarse to fine, got {values}")
        if self.lncc_window % 2 != 1:
            raise InputError(f"refinement setting 'lncc_window' must be odd, got {self.lncc_window}")


def _check_field(name: str, value: Any, default: Any, meta: dict) -> None:
    """InputError naming `name` when `value` has another type than `default` or breaks `meta`'s bounds/choices."""
    items = value if isinstance(default, tuple) else (value,)
    kind = type(default[0]) if isinstance(default, tuple) else type(default)
    if isinstance(default, tuple) and not isinstance(value, tuple):
        raise InputError(f"refinement setting {name!r} must be a tuple, got {value!r}")
    for item in items:
        ok = isinstance(item, kind) and not isinstance(item, bool)
        if kind is float:
            ok = isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item)
        if not ok:
            raise InputError(f"refinement setting {name!r} must be {kind.__name__}, got {item!r}")
        if meta["choices"] is not None and item not in meta["choices"]:
            raise InputError(f"refinement setting {name!r}: unknown value {item!r}; use one of {meta['choices']}")
        if meta["low"] is not None and not meta["low"] <= item <= meta["high"]:
            raise InputError(f"refinement setting {name!r} must lie in [{meta['low']}, {meta['high']}], got {item!r}")


PRESETS: dict[str, RefineSettings | None] = {
    "fast": None,
    "balanced": RefineSettings(),
    "accurate": RefineSettings(rigid_iterations=(100, 40), affine_iterations=(60, 40), iterations=(120, 30)),
}
"""Named settings: "fast" is the network alone (no refinement), "balanced" the default, "accurate" slower."""


DEFAULT_PRESET = "balanced"


def preset_settings(preset: str, overrides: dict[str, Any] | None = None) -> RefineSettings | None:
    """The settings of `preset` with `overrides` ({field: value}; lists become tuples) applied; None for "fast".

    InputError for an unknown preset or field, an invalid value, or overrides of "fast" (it has no refinement).
    """
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    base = PRESETS[preset]
    overrides = dict(overrides or {})
    if base is None:
        if overrides:
            raise InputError(f"preset 'fast' runs the network alone; refinement settings {sorted(overrides)} apply "
                             "to 'balanced' and 'accurate'")
        return None
    known = {f.name for f in fields(RefineSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InputError(f"unknown refinement setting(s) {unknown}; known: {', '.join(sorted(known))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return replace(base, **values)
