"""The method registry that every front end (command line, Slicer module, trainer, benchmark) reads.

Importing it loads no network code (and so no PyTorch): a spec imports its module only when asked for its classes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import InputError

if TYPE_CHECKING:
    from .networks.base import MethodConfig, RegistrationNetwork

MODELS_DIR = Path(__file__).resolve().parents[3] / "Resources" / "Models"
"""Shipped weights: `<name>.safetensors` with `<name>.json` (config, sha256, training record) beside it."""


@dataclass(frozen=True)
class MethodSpec:
    """One registration method: where it comes from and what it needs."""

    name: str
    paper: str
    modality: str  # "mono" or "multi"
    module: str | None  # module under methods.networks defining `Config` and `Network`; None: no network
    training_needs_labels: bool
    diffeomorphic: bool
    has_affine: bool = False

    @property
    def is_network(self) -> bool:
        """False for the per-pair optimisation, which has no network and needs no weights."""
        return self.module is not None

    @property
    def config_class(self) -> type[MethodConfig]:
        return importlib.import_module(f"{__package__}.networks.{self.module}").Config

    @property
    def network_class(self) -> type[RegistrationNetwork]:
        return importlib.import_module(f"{__package__}.networks.{self.module}").Network

    @property
    def weights_path(self) -> Path:
        return MODELS_DIR / f"{self.name}.safetensors"

    def build(self, config: MethodConfig | None = None) -> RegistrationNetwork:
        """A freshly initialised network with `config` (default: the paper's defaults)."""
        return self.network_class(config or self.config_class())


METHODS: dict[str, MethodSpec] = {}

DEFAULT_METHOD = "lapirn"
"""The method `deepregistration demo` and the Slicer module start with."""
OPTIMISE = "optimise"
"""The per-pair optimisation alone: a registry method with no network (the refinement from the identity)."""


def add_method(spec: MethodSpec) -> MethodSpec:
    """Add `spec` to `METHODS` (by its name)."""
    METHODS[spec.name] = spec
    return spec


def network_names() -> list[str]:
    """The registry's methods that are networks (with weights to train and ship), in registry order."""
    return [name for name, spec in METHODS.items() if spec.is_network]


def get_method(name: str) -> MethodSpec:
    """The spec of method `name`; an InputError lists the known names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise InputError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}") from None


for _spec in (
    MethodSpec("lapirn", "Mok & Chung 2020, Large deformation diffeomorphic image registration with Laplacian "
               "pyramid networks (MICCAI)", "mono", "lapirn", training_needs_labels=False, diffeomorphic=True),
    MethodSpec("voxelmorph", "Dalca et al. 2019, Unsupervised learning of probabilistic diffeomorphic "
               "registration (VoxelMorph-diff, MedIA)", "mono", "voxelmorph", training_needs_labels=False,
               diffeomorphic=True),
    MethodSpec("mdregnet", "Li & Fan, MDReg-Net: multi-resolution diffeomorphic image registration using fully "
               "convolutional networks with deep self-supervision", "mono", "mdregnet",
               training_needs_labels=False, diffeomorphic=True),
    MethodSpec("jad", "Zhu et al. 2021, Joint affine and deformable three-dimensional networks for brain MRI "
               "registration (Medical Physics)", "mono", "jad", training_needs_labels=True,
               diffeomorphic=False, has_affine=True),
    MethodSpec("golo_fscn", "Zheng et al. 2022, Feature self-calibration network with global-local training "
               "strategy (Neural Computing and Applications)", "mono", "golo_fscn",
               training_needs_labels=False, diffeomorphic=True),
    MethodSpec("mmln", "Zheng et al. 2022, Multi-strategy mutual learning network (Neurocomputing)", "mono",
               "mmln", training_needs_labels=False, diffeomorphic=True),
    MethodSpec("macjnet", "Zhou et al. 2023, macJNet: weakly-supervised multimodal registration with macMIND",
               "multi", "macjnet", training_needs_labels=True, diffeomorphic=True),
    MethodSpec(OPTIMISE, "per-pair optimisation without a network: rigid, affine, then a stationary velocity field "
               "(engine/refine.py, docs/REFINEMENT.md)", "multi", None, training_needs_labels=False,
               diffeomorphic=True, has_affine=True),
):
    add_method(_spec)
del _spec
