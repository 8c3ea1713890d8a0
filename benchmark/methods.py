"""The methods a benchmark run compares: identity, every registry network with shipped weights, and the classical
tools the manifest configures. Each produces a forward `DisplacementField` on the fixed grid (RAS mm)."""

from __future__ import annotations

import functools
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.core.field import DisplacementField
from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.methods.models import read_metadata, sha256_of
from DeepRegistrationLib.methods.registry import METHODS, OPTIMISE

from .suite import Manifest, PairSpec

IDENTITY = "identity"


@dataclass(frozen=True)
class Method:
    """A benchmarked method. `kind`: "identity", "network" (registry name) or "classical" (manifest entry)."""

    name: str
    kind: str
    monomodal_only: bool = False
    settings: dict[str, Any] = field(default_factory=dict)

    def applies_to(self, spec: PairSpec) -> bool:
        """Monomodal methods (CC-based tools, "mono" networks) are not run on multimodal pairs."""
        return not (self.monomodal_only and spec.multimodal)

    @property
    def weights(self) -> str | None:
        """A candidate network's weights file (None: the shipped model)."""
        return self.settings.get("weights")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "monomodal_only": self.monomodal_only,
                "settings": self.settings}


BENCHMARK_PRESETS = ("fast", "balanced")
"""The presets every shipped network runs with; `optimise` (no network) runs with balanced and accurate."""


CANDIDATE = "[candidate]"
"""Suffix of a candidate model's method name: `lapirn[candidate]`, `lapirn[candidate]@balanced`."""


HALF_STEPS = "balanced-half"
"""A pseudo-preset, run only when named (`lapirn@balanced-half`, `optimise@balanced-half`): balanced with half the
deformable refinement's steps at each level. A network earns its place as the refinement's seed when it reaches
`optimise@balanced` (every step, from the identity) with half the steps (`run.seed_markdown`)."""


SEEDED = "balanced-seed"
"""Pseudo-presets run only when named (`jad@balanced-seed1`, `jad[candidate]@balanced-seed2`): balanced with the
refinement's `seed` K (its affine stage's sample draws) for K in `REFINE_SEEDS`. With them the candidate table
judges `@balanced` over every seed both models ran, and a difference within the shipped model's seed-to-seed spread
is a tie (`run.candidates_markdown`)."""

REFINE_SEEDS = (1, 2)
"""The refinement seeds besides the preset's own (0) that `SEEDED` methods run with."""


def half_step_iterations() -> list[int]:
    """The balanced preset's deformable steps per level, halved (rounded up)."""
    from DeepRegistrationLib.engine.refine_settings import PRESETS

    return [math.ceil(n / 2) for n in PRESETS["balanced"].iterations]


@functools.lru_cache(maxsize=None)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    """`sha256_of(path)`, read once per version of the file (a candidate runs under several presets)."""
    return sha256_of(path)


def network_method(name: str, preset: str = "fast", weights: str | Path | None = None) -> Method:
    """A registry method run by the engine with `preset` (or a pseudo-preset: `HALF_STEPS`, `SEEDED` + K) and its
    shipped model, or the candidate model `weights`; named `<method>` (`<method>[candidate]`) for fast, with
    `@<preset>` appended else."""
    spec = METHODS[name]
    base = f"{name}{CANDIDATE}" if weights else name
    settings: dict[str, Any] = {"method": name, "preset": preset}
    if preset == HALF_STEPS:
        settings.update(preset="balanced", refinement={"iterations": half_step_iterations()})
    elif preset.startswith(SEEDED):
        settings.update(preset="balanced", refinement={"seed": int(preset[len(SEEDED):])})
    if weights:
        path = Path(weights).resolve()
        stat = path.stat()
        settings.update(weights=str(path), weights_sha256=_file_sha256(str(path), stat.st_mtime_ns, stat.st_size))
    return Method(base if preset == "fast" else f"{base}@{preset}", "network", spec.modality == "mono", settings)


def shipped_name(name: str) -> str:
    """The name of the shipped model's method that the candidate method `name` would replace."""
    return name.replace(CANDIDATE, "")


def parse_candidates(values: list[str] | None) -> dict[str, Path]:
    """`NAME=PATH` arguments → {registry network: weights file}; InputError for a bad name, a name given twice, a
    missing file or a model of another method (read from the JSON beside it)."""
    out: dict[str, Path] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not path:
            raise InputError(f"--candidate {value!r}: expected NAME=PATH, e.g. "
                             "lapirn=runs/lapirn_cpu/lapirn.safetensors")
        if name in out:
            raise InputError(f"--candidate {value!r}: {name!r} is given twice ({out[name]} and {path}); "
                             "one candidate per network")
        if name not in METHODS or not METHODS[name].is_network:
            raise InputError(f"--candidate {value!r}: {name!r} is not a registry network; networks: "
                             + ", ".join(n for n, s in METHODS.items() if s.is_network))
        if not Path(path).is_file():
            raise InputError(f"--candidate {value!r}: {path} does not exist")
        trained = read_metadata(path)["method"]
        if trained != name:
            raise InputError(f"--candidate {value!r}: {path} is a {trained} model, not a {name} model")
        out[name] = Path(path)
    return out


def available_methods(manifest: Manifest, names: list[str] | None = None,
                      candidates: dict[str, Path] | None = None) -> list[Method]:
    """Identity, each registry network whose weights are shipped with every preset of `BENCHMARK_PRESETS`, each
    candidate model (`candidates`: network → weights file) with the same presets, the per-pair optimisation alone
    (`optimise@balanced`, `optimise@accurate`), and the manifest's classical methods.

    With `names`, exactly those (an unknown name, or a network without weights, is an InputError); those may also
    be any of these with the `HALF_STEPS` or `SEEDED` pseudo-presets, which no default run includes.
    """
    known = {IDENTITY: Method(IDENTITY, "identity")}
    shipped = [n for n, spec in METHODS.items() if spec.is_network and spec.weights_path.is_file()]
    for preset in BENCHMARK_PRESETS:
        known.update({m.name: m for m in (network_method(n, preset) for n in shipped)})
        known.update({m.name: m for m in (network_method(n, preset, w) for n, w in (candidates or {}).items())})
    known.update({m.name: m for m in (network_method(OPTIMISE, p) for p in ("balanced", "accurate"))})
    known.update({n: Method(n, "classical", bool(s.get("monomodal_only")), s) for n, s in manifest.classical.items()})
    if not names:
        return list(known.values())
    pseudo = [HALF_STEPS, *(f"{SEEDED}{k}" for k in REFINE_SEEDS)]
    named = [network_method(n, p) for n in [*shipped, OPTIMISE] for p in pseudo]
    named += [network_method(n, p, w) for n, w in (candidates or {}).items() for p in pseudo]
    known.update({m.name: m for m in named})
    for name in names:
        if name not in known:
            hint = " (no shipped weights)" if name in METHODS else ""
            raise InputError(f"unknown or unavailable method {name!r}{hint}; available: {', '.join(known)}")
    return [known[n] for n in names]


def network_options(method: Method, modalities: tuple[str, str], device: str, weights: str | None):
    """The `RegistrationOptions` a registry method runs with in the benchmark: its shipped (or given, or the
    candidate's) model as is, its preset's refinement settings (with `HALF_STEPS`' halved steps, `SEEDED`'s seed)."""
    from DeepRegistrationLib.engine.options import RegistrationOptions

    return RegistrationOptions(method=method.settings["method"], preset=method.settings["preset"],
                               refinement=method.settings.get("refinement", {}), weights=weights or method.weights,
                               device=device, fixed_modality=modalities[0], moving_modality=modalities[1])


def run_method(method: Method, fixed: Image, moving: Image, modalities: tuple[str, str], threads: int,
               device: str = "cpu", weights: str | None = None) -> tuple[DisplacementField, float]:
    """Register `moving` to `fixed` with `method`; returns (forward field, seconds spent producing it).

    For networks the seconds are the engine's stages without its built-in metrics (the full pipeline
    preprocessing → network → field and inverse on the fixed grid); for the others the whole call.
    """
    start = time.perf_counter()
    if method.kind == "identity":
        field = DisplacementField(np.zeros((*fixed.grid.shape, 3), np.float32), fixed.grid)
        return field, time.perf_counter() - start
    if method.kind == "network":
        from DeepRegistrationLib.engine.registration import register

        result = register(fixed, moving, network_options(method, modalities, device, weights))
        stages = result.metrics.run.time_s
        return result.field, stages["total"] - stages.get("metrics", 0.0)
    if method.kind == "classical":
        from .classical import run_classical

        with tempfile.TemporaryDirectory(prefix=f"deepreg_{method.name}_") as work:
            field = run_classical(method.settings["tool"], method.settings, fixed, moving, threads, Path(work))
        return field, time.perf_counter() - start
    raise InputError(f"unknown method kind {method.kind!r}")


def full_pipeline(method: Method, pair_dir: Path, threads: int, device: str,
                  weights: str | None) -> tuple[float, dict[str, float]]:
    """(seconds, seconds per stage) from reading the pair's files to writing every output of `method`.

    Runs in the worker. Network stages are the engine's (preprocessing, resampling, network, export, metrics) plus
    reading and writing; classical ones are reading, registration (with field extraction) and writing.
    """
    from DeepRegistrationLib.core.field import apply_field, write_itk_displacement
    from DeepRegistrationLib.core.image import read_image, write_image
    from DeepRegistrationLib.frontends.outputs import OUTPUT_FILES, write_outputs

    record = json.loads((pair_dir / "pair.json").read_text())["record"]
    fixed_modality, moving_modality = record["modalities"]
    with tempfile.TemporaryDirectory(prefix=f"deepreg_speed_{method.name}_") as tmp:
        out = Path(tmp)
        start = time.perf_counter()
        fixed, moving = read_image(pair_dir / "fixed.nii.gz"), read_image(pair_dir / "moving.nii.gz")
        stages = {"read": time.perf_counter() - start}
        if method.kind == "network":
            from DeepRegistrationLib.engine.registration import register

            result = register(fixed, moving, network_options(method, (fixed_modality, moving_modality), device,
                                                             weights))
            stages.update({k: v for k, v in result.metrics.run.time_s.items() if k != "total"})
            written = time.perf_counter()
            write_outputs(result, out)
        elif method.kind == "classical":
            from .classical import run_classical

            (out / "work").mkdir()
            field = run_classical(method.settings["tool"], method.settings, fixed, moving, threads, out / "work")
            written = time.perf_counter()
            stages["registration"] = written - start - stages["read"]
            write_image(apply_field(moving, field), out / OUTPUT_FILES["warped"])  # the networks' file formats
            write_itk_displacement(field, out / OUTPUT_FILES["transform"])
        else:
            raise ValueError(f"speed runs networks and classical tools, not {method.kind!r}")
        end = time.perf_counter()
        stages["write"] = end - written
        return end - start, {k: round(v, 2) for k, v in stages.items()}
