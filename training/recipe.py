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
DATA_KINDS = ("known_warp", "label_driven", "synth", "multimodal", "phantom", "folder")
ANATOMY_KINDS = ("known_warp", "label_driven", "synth", "multimodal")
"""Data kinds drawn from fetched anatomy (their files are hashed into the model's data manifest)."""
WARPS = ("random", "bank")
LR_SCHEDULES = ("step", "cosine")


@dataclass
class DataSpec:
    """Where training pairs come from.

    kind: "known_warp" (real images with random smooth warps), "label_driven" (SynthMorph-style images of real label
    maps), "synth" (SynthMorph-style images of *new* label maps made by deforming and recombining the subjects'
    maps, `training/data/labelsynth.py`), "multimodal" (one subject in two synthetic contrasts; `ct_head` renders
    the CT from a head with skull, scalp and air), "phantom" (analytic, for tests), "folder" (a user's images, see
    training/README.md). `subjects`: anatomy names under `anatomy_dir` (training/data/fetch.py). `held_out`:
    subjects no training pair may come from (their file hashes are recorded to prove it; the default recipes hold
    out Colin27). `magnitude_mm`: peak of the random warps. `warps`: "random" (random smooth SVFs) or "bank"
    (a real inter-subject SyN field from `fieldbank`, rescaled by a factor in `bank_scale` and composed with a
    random SVF of peak `magnitude_mm`). `validation_pairs`: held-out pairs drawn from seeds no training pair uses
    (and, for a folder, the last pairs of the list). `pool` > 0 draws only that many distinct training pairs
    and cycles through them, each synthesised once and kept in memory (cheap CPU training); 0 draws a new pair
    for every index.
    """

    kind: str = "known_warp"
    anatomy_dir: str = "data/anatomy"
    subjects: list[str] = field(default_factory=lambda: ["icbm152_2009a", "colin27", "fsaverage"])
    held_out: list[str] = field(default_factory=list)
    folder: str | None = None
    magnitude_mm: float = 6.0
    warps: str = "random"
    fieldbank: str = "data/fieldbank"
    bank_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])
    ct_head: bool = False
    synth_fraction: float = 0.0  # known_warp / label_driven: this fraction of training pairs is of kind "synth"
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
    # Sample-efficient changes to the paper's recipe (all off by default, so a paper recipe is unchanged;
    # the `<method>_cpu.json` recipes switch them on; docs/MODELS.md, "Sample-efficient recipes"):
    lr_schedule: str = "step"  # "step" (lr_step/lr_gamma) or "cosine" (warm-up, then cosine to lr_min)
    warmup_iterations: int = 0  # linear warm-up from lr/warmup to lr over the first N iterations
    lr_min: float = 0.0  # the cosine schedule's final rate
    warm_start_iterations: int = 0  # the first N updates minimise the end-point error to the true field
    dice_weight: float = 0.0  # + weight × soft Dice loss of the warped labels, wherever a pair has labels
    dice_from: int = 0  # the Dice term is added from this iteration on (after the plateau; 0: from the start)
    output_init_std: float | None = None  # N(0, std) for the velocity output layers (None: the paper's init)
    new_level_init: str = "paper"  # "zero": a pyramid level starts with a zero output layer (the coarser result)
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
        if not spec.is_network:
            raise InputError(f"method {self.method!r} has no network to train (it optimises each pair)")
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
        both = sorted(set(self.data.held_out) & set(self.data.subjects))
        if both and self.data.kind in ANATOMY_KINDS:
            raise InputError(f"subject(s) {both} are both held out and trained on; drop them from data.subjects")
        if self.data.warps not in WARPS:
            raise InputError(f"unknown data.warps {self.data.warps!r}; use one of {', '.join(WARPS)}")
        if len(self.data.bank_scale) != 2 or not 0 < self.data.bank_scale[0] <= self.data.bank_scale[1]:
            raise InputError("data.bank_scale must be [low, high] with 0 < low ≤ high")
        if not 0.0 <= self.data.synth_fraction <= 1.0:
            raise InputError("data.synth_fraction must be between 0 and 1")
        if self.data.synth_fraction and self.data.kind not in ("known_warp", "label_driven"):
            raise InputError("data.synth_fraction mixes synth pairs into known_warp or label_driven data only")
        if self.data.ct_head and self.data.kind != "multimodal":
            raise InputError("data.ct_head belongs to data kind 'multimodal'")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(f"unknown lr_schedule {self.lr_schedule!r}; use one of {', '.join(LR_SCHEDULES)}")
        if self.new_level_init not in ("paper", "zero"):
            raise InputError("new_level_init must be 'paper' or 'zero'")
        if min(self.warmup_iterations, self.warm_start_iterations, self.dice_from) < 0 or self.dice_weight < 0:
            raise InputError("warmup_iterations, warm_start_iterations, dice_weight and dice_from must be ≥ 0")
        if self.dice_from and not self.dice_weight:
            raise InputError("dice_from needs a dice_weight > 0 (the term it delays)")
        if self.dice_from >= self.iterations:
            raise InputError(f"dice_from {self.dice_from} is not before the run's end ({self.iterations} iterations)")
        if self.warm_start_iterations and self.data.kind == "folder":
            raise InputError("warm_start_iterations needs synthetic pairs with a known field, not data kind 'folder'")
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
    """A recipe by name (training/recipes/<name>.json: a method's paper recipe, or `<method>_cpu` for its
    CPU-budget variant) or by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise InputError(f"{path}: no such recipe")
    try:
        return Recipe.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc


def apply_sets(recipe_dict: dict, sets: list[str]) -> dict:
    """`--set key=value` changes (JSON values; dotted keys reach config.* and data.*) applied to a recipe dict."""
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--set expects key=value, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        target = recipe_dict
        *parents, leaf = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = parsed
    return recipe_dict
