"""`python -m training train RECIPE [--out DIR] [--resume] ...` and `python -m training export RUN MODEL`.

Works under `torchrun --nproc_per_node=N -m training train ...` (DistributedDataParallel). Data commands live in
`python -m training.data` (fetch, sample).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from DeepRegistrationLib.core.errors import InputError

from .recipe import apply_sets as _apply_sets, load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train one recipe")
    tr.add_argument("recipe", help="method name (training/recipes/<name>.json) or a recipe JSON path")
    tr.add_argument("--out", help="run directory (default runs/<method>)")
    tr.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    tr.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    tr.add_argument("--iterations", type=int, help="stop after this many more iterations")
    tr.add_argument("--budget-minutes", type=float,
                    help="stop after this much wall time in this call, validation excluded (the stop is validated and "
                         "checkpointed)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe field (JSON value), e.g. iterations=500 or config.working_spacing=2")
    tr.add_argument("--export", help="after training, write the model here (e.g. Resources/Models/NAME.safetensors)")
    tr.add_argument("--quiet", action="store_true")
    ex = sub.add_parser("export", help="write a run's checkpoint as a shipped model")
    ex.add_argument("run", help="run directory")
    ex.add_argument("model", help="output .safetensors path")
    sub.add_parser("models", help="print the table of shipped models (docs/MODELS.md) from their JSON records")
    co = sub.add_parser("compare", help="paper recipe vs sample-efficient recipe, same wall-clock budget: "
                        "validation Dice against wall time (curve.csv, curve.png)")
    co.add_argument("method")
    co.add_argument("--minutes", type=float, required=True, help="wall-clock budget of each recipe")
    co.add_argument("--out", help="output directory (default runs/compare_<method>)")
    co.add_argument("--old", help="recipe name or path (default the paper recipe <method>)")
    co.add_argument("--new", help="recipe name or path (default <method>_cpu)")
    co.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change both recipes")
    co.add_argument("--set-old", action="append", default=[], metavar="KEY=VALUE", help="change the old one")
    co.add_argument("--set-new", action="append", default=[], metavar="KEY=VALUE", help="change the new one")
    co.add_argument("--validate-every", type=int, help="validation interval (iterations) of both")
    co.add_argument("--validation", choices=("old", "new"), default="new",
                    help="whose validation pairs both recipes are scored on (default new)")
    co.add_argument("--device", default="cpu")
    sc = sub.add_parser("score", help="a model file on a recipe's validation pairs (JSON: loss, dice, "
                        "dice_identity, folding_percent, epe_mm)")
    sc.add_argument("model", help=".safetensors with its JSON beside it")
    sc.add_argument("--recipe", required=True, help="recipe name or path whose validation pairs score the model")
    sc.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "models":
            print(models_table() + "\n\n" + models_commands())
            return 0
        if args.command == "compare":
            from .compare import compare

            out = Path(args.out or f"runs/compare_{args.method}")
            compare(args.method, args.minutes, out, args.old, args.new, args.set, args.set_old, args.set_new,
                    args.validate_every, args.device, args.validation)
            print(f"curve in {out / 'curve.csv'} and {out / 'curve.png'}")
            return 0
        if args.command == "score":
            from .compare import score_model

            print(json.dumps(score_model(args.model, args.recipe, args.device)))
            return 0
        return _export(args)
    except InputError as exc:
        print(f"training: error: {exc}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from .recipe import Recipe
    from .trainer import Trainer

    recipe = load_recipe(args.recipe)
    if args.set:
        recipe = Recipe.from_dict(_apply_sets(recipe.to_dict(), args.set))
    out = Path(args.out or f"runs/{recipe.method}")
    trainer = Trainer(recipe, out, args.device)
    if args.resume:
        trainer.resume()
    elif (out / "checkpoint.json").exists():
        raise InputError(f"{out}: holds a checkpoint already; pass --resume or another --out")
    trainer.train(args.iterations, progress=not args.quiet,
                  max_seconds=None if args.budget_minutes is None else 60 * args.budget_minutes)
    if args.export and trainer.rank == 0:
        trainer.export(args.export)
    return 0


def models_table() -> str:
    """Markdown table of every shipped model: data, resolution, iterations, wall time, hardware, validation."""
    from DeepRegistrationLib.methods.models import read_metadata
    from DeepRegistrationLib.methods.registry import METHODS

    rows = ["| method | data | working grid | iterations | wall time | hardware | val. Dice (identity → model) "
            "| val. % det J ≤ 0 | size | sha256 |", "|" + " --- |" * 10]
    for spec in METHODS.values():
        if not spec.weights_path.is_file():
            rows.append(f"| `{spec.name}` | not shipped (see above) | | | | | | | | |")
            continue
        meta = read_metadata(spec.weights_path)
        rec, cfg = meta["record"], meta["config"]
        data = rec["recipe"]["data"]
        val = rec.get("validation", {})
        dice = (f"{val['dice_identity']:.3f} → {val['dice']:.3f}" if "dice" in val else "—")
        hw = rec["hardware"]
        rows.append(
            f"| `{spec.name}` | {data['kind']} on {', '.join(data['subjects'])} (peak {data['magnitude_mm']} mm"
            f"{', affine' if data['affine'] else ''}{', field-bank warps' if data.get('warps') == 'bank' else ''}"
            f"{', head CT' if data.get('ct_head') else ''}"
            f"{'; held out: ' + ', '.join(data['held_out']) if data.get('held_out') else ''}) | {'×'.join(map(str, cfg['working_shape']))} at "
            f"{cfg['working_spacing']} mm | {rec['iteration']} | {rec['wall_time_s'] / 60:.0f} min | "
            f"{hw['gpu'] or hw['cpu']} ({hw['device']}) | {dice} | {val.get('folding_percent', float('nan')):.3f} | "
            f"{spec.weights_path.stat().st_size / 2**20:.1f} MB | `{meta['sha256'][:12]}` |")
    return "\n".join(rows)


def _leaf_changes(base: dict, recorded: dict, prefix: str = "") -> list[str]:
    """`key=value` for every recipe leaf whose recorded value differs from the base recipe's (dicts recurse)."""
    changes = []
    for key, value in recorded.items():
        old = base.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            changes += _leaf_changes(old, value, f"{prefix}{key}.")
        elif value != old:
            changes.append(f"{prefix}{key}={json.dumps(value, separators=(',', ':'), ensure_ascii=False)}")
    return changes


def reproduce_command(record: dict) -> str:
    """The one command that retrains a shipped model from its training record: the method's recipe, `--set` for
    every field the run changed, `--iterations` when the run stopped before the recipe's end."""
    from .recipe import RECIPES_DIR, Recipe

    recipe = Recipe.from_dict(record["recipe"]).to_dict()  # fields added since the run take their defaults
    bases = [name for name in (recipe["method"], f"{recipe['method']}_cpu") if (RECIPES_DIR / f"{name}.json").is_file()]
    changes = {name: _leaf_changes(load_recipe(name).to_dict(), recipe) for name in bases}
    base = min(bases, key=lambda name: len(changes[name]))  # the paper recipe or the CPU one, fewer --set
    sets = changes[base]
    words = ["python -m training train", base, f"--device {record['hardware']['device'].split(':')[0]}"]
    words += [f"--set '{change}'" for change in sets]
    if record["iteration"] < recipe["iterations"]:
        words.append(f"--iterations {record['iteration']}")
    words.append(f"--export Resources/Models/{recipe['method']}.safetensors")
    return " ".join(words)


def models_commands() -> str:
    """A shell block with the command that reproduces each shipped model (after `python -m training.data fetch`)."""
    from DeepRegistrationLib.methods.models import read_metadata
    from DeepRegistrationLib.methods.registry import METHODS

    lines = ["```bash", "python -m training.data fetch"]
    lines += [reproduce_command(read_metadata(spec.weights_path)["record"])
              for spec in METHODS.values() if spec.weights_path.is_file()]
    return "\n".join([*lines, "```"])


def _export(args: argparse.Namespace) -> int:
    from .recipe import Recipe
    from .trainer import Trainer

    meta_path = Path(args.run) / "checkpoint.json"
    if not meta_path.is_file():
        raise InputError(f"{args.run}: no checkpoint.json")
    trainer = Trainer(Recipe.from_dict(json.loads(meta_path.read_text())["recipe"]), args.run, "cpu")
    trainer.resume()
    trainer.validate()  # the record carries the validation of exactly these weights
    trainer.export(args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
