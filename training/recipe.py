"""Training recipes: one JSON file per method in training/recipes/, read into a checked `Recipe`.

A recipe names the method, the config fields it changes from the paper's defaults (for example a reduced working
resolution on a CPU), the data, the optimiser and the schedule:

* `plain`: every iteration updates every parameter;
* `progressive` (LapIRN family): `stages` list `{"levels": p, "iterations": n}`; on entering a stage the coarser
  levels are frozen for `freeze_iterations`, then trained jointly (LapIRN's coarse-to-fine scheme);
* `alternating` (macjnet): registration and segmentation updates alternate (`networks.macjnet.alternating_stage`),
  each stage with its own optimiser and learning rate; only `labelled_fraction` of the pairs keep their labels.
  With `stages`, its Reg-SubNet is also trained coarse to fine as in `progressive`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.methods.registry import get_method

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
SCHEDULES = ("plain", "progressive", "alternating")
DATA_KINDS = ("known_warp", "label_driven", "multimodal", "phantom", "folder")


@dataclass
class DataSpec:
    """Where training pairs come from.

    kind: "known_warp" (real images with random smooth warps), "label_driven" (SynthMorph-style images of real label
    maps), "multimodal" (one subject in two synthetic contrasts), "phantom" (analytic, for tests), "folder" (a
    user's images, see training/README.md). `subjects`: anatomy names under `anatomy_dir` (training/data/fetch.py).
    `magnitude_mm`: peak of the random warps. `validation_pairs`: held-out pairs drawn from seeds no training pair
    uses (and, for a folder, the last pairs of the list). `pool` > 0 draws only that many distinct training pairs
    and cycles through them, each synthesised once and kept in memory (cheap CPU training); 0 draws a new pair
    for every index.
    """

    kind: str = "known_warp"
    anatomy_dir: str = "data/anatomy"
    subjects: list[str] = field(default_factory=lambda: ["icbm152_2009a", "colin27", "fsaverage"])
    folder: str | None = None
    magnitude_mm: float = 6.0
    affine: bool = False
    pool: int = 0
    fixed_modality: str = "t1"
    moving_modality: str = "t2"
    validation_pairs: int = 4


@dataclass
class Recipe:
    """One training run's full description (saved with every checkpoint)."""

    method: str
    config: dict[str, Any] = field(default_factory=dict)
    data: DataSpec = field(default_factory=DataSpec)
    iterations: int = 1000
    batch_size: int = 1
    lr: float = 1e-4
    lr_step: int = 0  # multiply the learning rate by lr_gamma every lr_step iterations (0: constant)
    lr_gamma: float = 0.5
    schedule: str = "plain"
    stages: list[dict[str, int]] = field(default_factory=list)
    freeze_iterations: int = 0
    pretrain_iterations: int = 0  # alternating schedule: the first N iterations train each sub-network on its own
    validate_every: int = 100
    checkpoint_every: int = 100
    seed: int = 0
    amp: bool = True
    workers: int = 0  # DataLoader processes synthesising pairs beside the training process

    def __post_init__(self) -> None:
        spec = get_method(self.method)
        if isinstance(self.data, dict):
            unknown = set(self.data) - set(DataSpec.__dataclass_fields__)
            if unknown:
                raise InputError(f"recipe data has unknown field(s) {sorted(unknown)}")
            self.data = DataSpec(**self.data)
        try:
            spec.config_class.from_dict(self.config)
        except (TypeError, ValueError) as exc:
            raise InputError(f"recipe config does not fit method {self.method!r}: {exc}") from exc
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.data.kind not in DATA_KINDS:
            raise InputError(f"unknown data kind {self.data.kind!r}; use one of {', '.join(DATA_KINDS)}")
        if self.data.kind == "folder" and not self.data.folder:
            raise InputError("data kind 'folder' needs data.folder")
        if self.schedule == "progressive" and not self.stages:
            raise InputError("a progressive schedule needs stages")
        if self.stages and sum(s["iterations"] for s in self.stages) != self.iterations:
            raise InputError("stages whose iterations add up to `iterations` are needed")
        if self.pretrain_iterations and self.schedule != "alternating":
            raise InputError("pretrain_iterations belongs to the alternating schedule")
        if not 0 <= self.pretrain_iterations <= self.iterations:
            raise InputError("pretrain_iterations must be between 0 and iterations")
        if self.workers < 0:
            raise InputError("workers must be ≥ 0")
        if min(self.iterations, self.batch_size, self.validate_every, self.checkpoint_every) < 1:
            raise InputError("iterations, batch_size, validate_every and checkpoint_every must be ≥ 1")

    def method_config(self):
        """The method's config: paper defaults with this recipe's changes."""
        return get_method(self.method).config_class.from_dict(self.config)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Recipe":
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise InputError(f"recipe has unknown field(s) {sorted(unknown)}")
        if "method" not in values:
            raise InputError("recipe names no method")
        return cls(**values)


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe by method name (training/recipes/<name>.json) or by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise InputError(f"{path}: no such recipe")
    try:
        return Recipe.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc
