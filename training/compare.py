"""`python -m training compare METHOD --minutes M`: the paper's recipe and the sample-efficient one, trained for the
same wall-clock budget on this machine, one after the other, as validation Dice against wall time.

Each recipe (`--old`, default the method's paper recipe `training/recipes/<method>.json`; `--new`, default
`<method>_cpu.json`) gets the same changes (`--set`, e.g. the working grid or the anatomy folder; `--set-old` and
`--set-new` for one of them only), runs for `--minutes` of wall time in its own run directory under `--out`, and is
validated at iteration 0 and every `--validate-every` iterations on the same held-out pairs for both: those of the
`--validation` recipe (default "new": real training subjects moved by field-bank warps, no synthetic anatomy), so
the two curves measure one thing. The wall time of a point
is the time since that recipe's start *without* the time spent validating (so a denser validation does not cost a
recipe its budget; the budget, `Trainer.train(max_seconds=...)`, excludes it too); it includes pair synthesis. Written into `--out`: `curve.csv` (recipe, name, iteration,
wall_s, dice, dice_identity, epe_mm, folding_percent) and `curve.png` (Dice against minutes, both recipes, the
identity dashed).

`python -m training score MODEL --recipe NAME` scores a model file (a shipped model, a run's export) on a recipe's
validation pairs: the old model's point on the pairs a new recipe's run is validated on.
"""

from __future__ import annotations

import csv
import tempfile
import time
from pathlib import Path
from typing import Any

from DeepRegistrationLib.core.errors import InputError

from .recipe import Recipe, apply_sets, load_recipe

COLUMNS = ("recipe", "name", "iteration", "wall_s", "dice", "dice_identity", "epe_mm", "folding_percent")


def _recipe(name: str, sets: list[str], validate_every: int | None) -> Recipe:
    recipe = load_recipe(name)
    values = apply_sets(recipe.to_dict(), sets)
    if validate_every:
        values["validate_every"] = validate_every
    return Recipe.from_dict(values)


def compare(method: str, minutes: float, out: str | Path, old: str | None = None, new: str | None = None,
            sets: list[str] | None = None, sets_old: list[str] | None = None, sets_new: list[str] | None = None,
            validate_every: int | None = None, device: str = "cpu", validation: str = "new",
            log=print) -> list[dict[str, Any]]:
    """Train both recipes for `minutes` each (module docstring); returns the curve rows."""
    from .trainer import Trainer

    out = Path(out)
    plan = [("old", old or method, (sets or []) + (sets_old or [])),
            ("new", new or f"{method}_cpu", (sets or []) + (sets_new or []))]
    recipes = [(label, name, _recipe(name, extra, validate_every)) for label, name, extra in plan]
    for label, name, recipe in recipes:
        if recipe.method != method:
            raise InputError(f"recipe {name!r} is for method {recipe.method!r}, not {method!r}")
        if (out / label / "checkpoint.json").exists():
            raise InputError(f"{out / label}: holds a run already; pass another --out")
    if validation not in ("old", "new"):
        raise InputError("--validation must be 'old' or 'new'")
    reference = dict((label, recipe) for label, _, recipe in recipes)[validation]
    trainers = [Trainer(recipe, out / label, device) for label, _, recipe in recipes]  # every check first
    rows: list[dict[str, Any]] = []
    for (label, name, recipe), trainer in zip(recipes, trainers):
        trainer.val_set = _validation_set(reference, trainer)
        start, spent = time.perf_counter(), [0.0]
        validate = trainer.validate

        def timed(validate=validate, start=start, spent=spent, label=label, name=name, trainer=trainer):
            t = time.perf_counter()
            summary = validate()
            spent[0] += time.perf_counter() - t
            row = {"recipe": label, "name": name, "iteration": trainer.iteration,
                   "wall_s": round(time.perf_counter() - start - spent[0], 2)}
            row.update({k: summary.get(k, float("nan")) for k in COLUMNS[4:]})
            rows.append(row)
            log(f"{label} ({name}) iteration {row['iteration']}: {row['wall_s']:.0f} s, Dice {row['dice']:.3f} "
                f"(identity {row['dice_identity']:.3f}), EPE {row['epe_mm']:.2f} mm")
            return summary

        trainer.validate = timed
        trainer.validate()
        trainer.train(progress=False, max_seconds=60 * minutes)
    write_curve(rows, out)
    return rows


def _validation_set(reference: Recipe, trainer):
    """The reference recipe's validation pairs on this trainer's working grid."""
    from .datasets import FolderPairs, SyntheticPairs

    config, data = trainer.network.config, reference.data
    shape, spacing = tuple(config.working_shape), config.working_spacing
    if data.kind == "folder":
        return FolderPairs(data.folder, spacing, shape, True, data.validation_pairs, False)
    return SyntheticPairs(data, spacing, shape, data.validation_pairs, reference.seed, validation=True,
                          with_truth=True)


def score_model(path: str | Path, recipe: str, device: str = "cpu") -> dict[str, float]:
    """Validation loss, Dice (and the identity's), % det J ≤ 0 and EPE (mm) of the model file `path` on the
    validation pairs of `recipe` (name or path), built on the model's own working grid; InputError for a model of
    another method."""
    from DeepRegistrationLib.methods.models import load_model

    from .trainer import Trainer

    reference = load_recipe(recipe)
    network, _ = load_model(reference.method, path)
    with tempfile.TemporaryDirectory(prefix="deepreg_score_") as tmp:
        trainer = Trainer(reference, tmp, device)
        trainer.network = network.to(trainer.device)
        trainer.val_set = _validation_set(reference, trainer)
        return trainer.validate()


def write_curve(rows: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, colour in (("old", "tab:blue"), ("new", "tab:orange")):
        points = [r for r in rows if r["recipe"] == label]
        if not points:
            continue
        minutes = [r["wall_s"] / 60 for r in points]
        ax.plot(minutes, [r["dice"] for r in points], "o-", color=colour, label=f"{label}: {points[0]['name']}")
        ax.plot(minutes, [r["dice_identity"] for r in points], "--", color=colour, alpha=0.5)
    ax.set_xlabel("wall time without validation (min)")
    ax.set_ylabel("validation Dice (dashed: identity)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=100)
    plt.close(fig)
