"""The options of one registration, declared once: the engine takes them, every front end builds or reflects them.

The command line makes one flag per field (`--instance-optimization` for `instance_optimization`), the job runner
stores them in job.json, the Slicer parameter node has one camelCase field per option (a test checks it), and the
benchmark builds them per method. Adding an option is one `param` line here plus its front-end widgets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..core.errors import InputError
from ..core.params import check_fields, param
from ..methods.registry import DEFAULT_METHOD, get_method
from .refine_settings import DEFAULT_PRESET, PRESETS

PREALIGN_CHOICES = ("none", "moments", "jad")
MODALITIES = ("mr", "ct")


@dataclass
class RegistrationOptions:
    """How to register one pair (inputs — images, labels, landmarks, mask — are passed beside it)."""

    method: str = param(DEFAULT_METHOD, "registration method (a registry name; `deepregistration methods`); "
                                        "'optimise' is the refinement alone, from the identity")
    preset: str = param(DEFAULT_PRESET, "fast: the network alone; balanced: rigid/affine, the network, then a "
                                        "deformable refinement of the pair; accurate: more refinement levels and "
                                        "steps", choices=tuple(PRESETS))
    refinement: dict[str, Any] = param({}, "overrides of the preset's refinement settings "
                                           "(engine/refine_settings.RefineSettings), e.g. iterations=[80,20]")
    weights: str | None = param(None, "weights file (.safetensors with its JSON beside it); none: the method's "
                                      "shipped model")
    parameters: dict[str, Any] = param({}, "overrides of the method's inference-time config fields, e.g. "
                                           "working_spacing=2.0 (mm); each is checked against the method's "
                                           "declaration (type, range, choices)")
    device: str = param("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    prealign: str = param("none", "affine pre-alignment: none, centre-of-mass translation (moments) or the jad "
                                  "model's affine", choices=PREALIGN_CHOICES)
    instance_optimization: int = param(0, "test-time optimisation steps of the method's own loss on this pair "
                                          "(on a copy of the weights)", low=0, high=10_000)
    seed: int = param(0, "random seed (torch) of the run", low=0, high=2**31 - 1)
    fixed_modality: str = param("mr", "fixed image modality: mr (percentile normalisation) or ct (HU through a "
                                      "fixed piecewise map)", choices=MODALITIES)
    moving_modality: str = param("mr", "moving image modality: mr or ct", choices=MODALITIES)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RegistrationOptions":
        """Inverse of `to_dict`; missing keys take the defaults, unknown keys are a ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown registration option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


def check_options(options: RegistrationOptions) -> RegistrationOptions:
    """`options` checked against their declarations and converted (int for an integral float, tuples for lists):
    every field by `core.params.check_fields`, the method by the registry, and each of `parameters` against the
    method's config declaration. InputError names the option or parameter and what it allows."""
    if not isinstance(options, RegistrationOptions):
        raise InputError(f"expected RegistrationOptions, got {type(options).__name__}")
    values = check_fields(RegistrationOptions, options.to_dict(), "option")
    spec = get_method(values["method"])
    if spec.is_network:
        values["parameters"] = spec.config_class.check(values["parameters"], f"{spec.name} parameter")
    elif values["parameters"]:
        raise InputError(f"method {spec.name!r} has no network parameters ({', '.join(values['parameters'])}); its "
                         "settings are the refinement's (--set refine.KEY=VALUE)")
    return replace(options, **values)
