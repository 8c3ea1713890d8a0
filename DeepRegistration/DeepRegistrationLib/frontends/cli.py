"""`deepregistration`: register any pair with any method, evaluate any transform, write QA reports.

Exit codes: 0 success, 2 bad input, 3 resource failure (memory, device). Outputs are written into a temporary
directory beside the output directory and moved into place only when everything succeeded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import typing
import warnings
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..core.errors import Cancelled, InputError, ResourceError
from ..core.field import DisplacementField, read_itk_displacement
from ..core.image import Image, read_image, read_labels
from ..core.landmarks import match_landmarks, read_landmarks
from ..engine.evaluation import evaluate
from ..engine.options import RegistrationOptions
from ..engine.registration import register
from ..engine.results import Metrics, RegistrationResult
from ..methods.models import read_metadata
from ..methods.registry import DEFAULT_METHOD, METHODS, get_method
from .outputs import OUTPUT_FILES, strict_json, write_metrics, write_outputs

SAMPLE_DIR = Path(__file__).resolve().parents[3] / "Resources" / "SampleData"
EXIT_INPUT, EXIT_RESOURCE = 2, 3


@contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """A temporary directory beside `out_dir` whose files are moved into `out_dir` only on success."""
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        out_dir.mkdir(exist_ok=True)
        for item in tmp.iterdir():
            target = out_dir / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _landmarks(args: argparse.Namespace) -> tuple[np.ndarray | None, np.ndarray | None]:
    if (args.fixed_landmarks is None) != (args.moving_landmarks is None):
        raise InputError("give both --fixed-landmarks and --moving-landmarks, or neither")
    if args.fixed_landmarks is None:
        return None, None
    _, fixed_pts, moving_pts = match_landmarks(read_landmarks(args.fixed_landmarks),
                                               read_landmarks(args.moving_landmarks))
    return fixed_pts, moving_pts


def _labels(args: argparse.Namespace, fixed: Image, moving: Image) -> tuple[Image | None, Image | None]:
    fixed_labels = read_labels(args.fixed_labels, like=fixed) if args.fixed_labels else None
    moving_labels = read_labels(args.moving_labels, like=moving) if args.moving_labels else None
    return fixed_labels, moving_labels


def _parse_sets(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--set expects key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


class _Progress:
    """One tqdm bar on stderr for the whole registration, its label the current stage (none with --quiet)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.bar = quiet, None

    def __call__(self, stage: str, fraction: float) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=100, file=sys.stderr, leave=False,
                            bar_format="{desc:<24} {percentage:3.0f}%|{bar}| {elapsed}")
        self.bar.set_description_str(stage)
        self.bar.n = int(round(100 * fraction))
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _model_summary(spec) -> dict[str, Any] | None:
    """What the shipped model's JSON says of its training: working grid, iterations, validation Dice."""
    if not spec.weights_path.is_file():
        return None
    meta = read_metadata(spec.weights_path)
    record, config = meta.get("record", {}), meta["config"]
    validation = record.get("validation", {})
    return {"working_spacing_mm": config["working_spacing"], "iterations": record.get("iteration"),
            "hardware": record.get("hardware", {}).get("device"),
            "validation_dice": validation.get("dice"), "validation_dice_identity": validation.get("dice_identity")}


def cmd_methods(args: argparse.Namespace) -> int:
    rows = []
    for spec in METHODS.values():
        rows.append({"name": spec.name, "paper": spec.paper, "modality": spec.modality, "network": spec.is_network,
                     "shipped_model": _model_summary(spec), "default": spec.name == DEFAULT_METHOD})
    if args.json:
        print(json.dumps(strict_json(rows), indent=2))
    else:
        for r in rows:
            m = r["shipped_model"]
            model = "no model shipped" if r["network"] else "no network: needs no weights"
            if m:
                model = f"{m['working_spacing_mm']:g} mm, {m['iterations']} it."
                if m["validation_dice"] is not None:
                    model += f", val. Dice {m['validation_dice_identity']:.3f}→{m['validation_dice']:.3f}"
            star = " (default)" if r["default"] else ""
            print(f"{r['name']:<11} {r['modality']:<6} {model:<38} {r['paper']}{star}")
    return 0


REFINE_PREFIX = "refine."
"""`--set refine.KEY=VALUE` overrides a refinement setting; any other `--set KEY=VALUE` a method config field."""


def options_from_args(args: argparse.Namespace) -> RegistrationOptions:
    """The `RegistrationOptions` of the flags `add_option_flags` declared."""
    values = {f.name: getattr(args, f.name) for f in fields(RegistrationOptions)
              if f.name not in ("parameters", "refinement")}
    sets = _parse_sets(args.set)
    refinement = {k[len(REFINE_PREFIX):]: v for k, v in sets.items() if k.startswith(REFINE_PREFIX)}
    parameters = {k: v for k, v in sets.items() if not k.startswith(REFINE_PREFIX)}
    return RegistrationOptions(parameters=parameters, refinement=refinement, **values)


def _guidance(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray] | None:
    if (args.fixed_guidance is None) != (args.moving_guidance is None):
        raise InputError("give both --fixed-guidance and --moving-guidance, or neither")
    if args.fixed_guidance is None:
        return None
    _, fixed_pts, moving_pts = match_landmarks(read_landmarks(args.fixed_guidance),
                                               read_landmarks(args.moving_guidance))
    return fixed_pts, moving_pts


def _masks(args: argparse.Namespace, fixed: Image, moving: Image) -> tuple[Image | None, Image | None]:
    """The fixed and moving masks (label maps on their image's grid; nonzero inside)."""
    fixed_mask = read_labels(args.fixed_mask, like=fixed) if args.fixed_mask else None
    moving_mask = read_labels(args.moving_mask, like=moving) if args.moving_mask else None
    return fixed_mask, moving_mask


def _register(args: argparse.Namespace, fixed_path: Path, moving_path: Path,
              options: RegistrationOptions | None = None) -> RegistrationResult:
    options = options or options_from_args(args)
    get_method(options.method)
    fixed, moving = read_image(fixed_path), read_image(moving_path)
    fixed_labels, moving_labels = _labels(args, fixed, moving)
    fixed_mask, moving_mask = _masks(args, fixed, moving)
    fixed_pts, moving_pts = _landmarks(args)
    guidance = _guidance(args)
    progress = _Progress(args.quiet)
    try:
        with staged_output(Path(args.output_dir)) as out:
            result = register(fixed, moving, options, fixed_labels=fixed_labels, moving_labels=moving_labels,
                              fixed_points=fixed_pts, moving_points=moving_pts, guidance=guidance,
                              fixed_mask=fixed_mask, moving_mask=moving_mask, progress=progress)
            progress.close()
            write_outputs(result, out)
            if args.report:
                from .report import write_report

                write_report(out, fixed, moving, result, fixed_labels)
    finally:
        progress.close()
    return result


def summary_lines(metrics: Metrics) -> list[str]:
    """Human-readable before/after lines of a registration's metrics."""
    lines = []
    if metrics.labels is not None:
        b, a = metrics.labels.before, metrics.labels.after
        lines.append(f"Dice (mean)      {b.mean_dice:.3f} -> {a.mean_dice:.3f}")
        lines.append(f"HD95 (mean, mm)  {b.mean_hd95:.2f} -> {a.mean_hd95:.2f}")
        lines.append(f"ASSD (mean, mm)  {b.mean_assd:.2f} -> {a.mean_assd:.2f}")
    if metrics.landmarks is not None:
        lm = metrics.landmarks
        lines.append(f"TRE (mean, mm)   {lm.mean_before:.2f} -> {lm.mean_after:.2f}")
    lines.append(f"NCC              {metrics.similarity_before.ncc:.3f} -> {metrics.similarity_after.ncc:.3f}")
    jac = metrics.jacobian
    lines.append(f"det J <= 0       {jac.percent_nonpositive:.4f} %   SDlogJ {jac.sdlogj:.4f}")
    if metrics.run is not None:
        lines.append(f"time             {metrics.run.time_s['total']:.2f} s on {metrics.run.device}")
    return lines


def _print_result(args: argparse.Namespace, metrics: Metrics, out_dir: Path | None) -> None:
    if args.json:
        print(json.dumps(strict_json(metrics.to_json()), indent=2, allow_nan=False))
    elif not args.quiet:
        print("\n".join(summary_lines(metrics)))
        if out_dir is not None:
            print(f"outputs in {out_dir.resolve()}")


def cmd_register(args: argparse.Namespace) -> int:
    result = _register(args, Path(args.fixed), Path(args.moving))
    _print_result(args, result.metrics, Path(args.output_dir))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The sample pair with the requested preset (default balanced); printed beside the network alone ("fast")."""
    args.fixed_labels = str(SAMPLE_DIR / "fixed_labels.nii.gz")
    args.moving_labels = str(SAMPLE_DIR / "moving_labels.nii.gz")
    args.fixed_landmarks = str(SAMPLE_DIR / "fixed_landmarks.fcsv")
    args.moving_landmarks = str(SAMPLE_DIR / "moving_landmarks.fcsv")
    args.fixed_mask = args.moving_mask = args.fixed_guidance = args.moving_guidance = None
    options = options_from_args(args)
    text = not args.quiet and not args.json
    if text:
        print(f"Registering the sample pair in {SAMPLE_DIR} with {options.method}...")
    result = _register(args, SAMPLE_DIR / "fixed.nii.gz", SAMPLE_DIR / "moving.nii.gz", options)
    if text and options.preset != "fast" and get_method(options.method).is_network:
        fast_args = argparse.Namespace(**{**vars(args), "output_dir": str(Path(args.output_dir) / "fast")})
        fast = _register(fast_args, SAMPLE_DIR / "fixed.nii.gz", SAMPLE_DIR / "moving.nii.gz",
                         replace(options, preset="fast", refinement={}))
        print("\n".join(side_by_side({"fast": fast.metrics, options.preset: result.metrics})))
        print(f"outputs in {Path(args.output_dir).resolve()} (fast: {Path(fast_args.output_dir).resolve()})")
        return 0
    _print_result(args, result.metrics, Path(args.output_dir))
    return 0


def side_by_side(columns: dict[str, Metrics]) -> list[str]:
    """`summary_lines` of several registrations of one pair as columns under their names."""
    rows = [summary_lines(m) for m in columns.values()]
    labels = [line[:17] for line in rows[0]]
    width = max(len(line) - 17 for r in rows for line in r) + 2
    lines = [" " * 17 + "".join(f"{name:<{width}}" for name in columns)]
    for i, label in enumerate(labels):
        lines.append(label + "".join(f"{r[i][17:] if i < len(r) else '':<{width}}" for r in rows))
    return lines


def cmd_evaluate(args: argparse.Namespace) -> int:
    fixed, moving = read_image(args.fixed), read_image(args.moving)
    fixed_labels, moving_labels = _labels(args, fixed, moving)
    fixed_pts, moving_pts = _landmarks(args)
    if args.displacement:
        field = read_itk_displacement(args.displacement).resampled(fixed.grid)
    else:
        field = DisplacementField(np.zeros((*fixed.grid.shape, 3), np.float32), fixed.grid)
    metrics, *_ = evaluate(fixed, moving, field, fixed_labels=fixed_labels, moving_labels=moving_labels,
                           fixed_points=fixed_pts, moving_points=moving_pts)
    if args.output_dir:
        with staged_output(Path(args.output_dir)) as out:
            write_metrics(metrics, out / OUTPUT_FILES["metrics"])
    _print_result(args, metrics, Path(args.output_dir) if args.output_dir else None)
    return 0


def _add_inputs(p: argparse.ArgumentParser, images: bool = True) -> None:
    if images:
        p.add_argument("--fixed", required=True, help="fixed image (NIfTI, NRRD, MHA or MGZ)")
        p.add_argument("--moving", required=True, help="moving image")
    p.add_argument("--fixed-labels", help="label map on the fixed image's grid")
    p.add_argument("--moving-labels", help="label map on the moving image's grid")
    p.add_argument("--fixed-landmarks", help="Slicer .fcsv, markups .json or CSV x,y,z (RAS mm); scored (TRE)")
    p.add_argument("--moving-landmarks", help="matched to the fixed landmarks by label, else by order")
    p.add_argument("--fixed-mask", help="label map on the fixed grid: the refinement compares the images only "
                                        "inside it (nonzero), and det J is also reported inside it")
    p.add_argument("--moving-mask", help="label map on the moving grid: the refinement compares only inside it")


def add_option_flags(p: argparse.ArgumentParser) -> None:
    """One flag per `RegistrationOptions` field (`--instance-optimization` for `instance_optimization`; the config
    overrides `parameters` as repeated `--set KEY=VALUE`), help and choices from the field's declaration."""
    hints = typing.get_type_hints(RegistrationOptions)
    for f in fields(RegistrationOptions):
        meta = f.metadata
        if f.name == "parameters":
            p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help=f"{meta['help']}; refine.KEY=VALUE: a refinement setting (preset override)")
            continue
        if f.name == "refinement":  # given as --set refine.KEY=VALUE
            continue
        kind = hints[f.name] if hints[f.name] in (int, float) else str
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=f.default,
                       choices=meta.get("choices"), help=f"{meta['help']} (default {f.default})")


def _add_run_options(p: argparse.ArgumentParser, output_required: bool) -> None:
    add_option_flags(p)
    p.add_argument("--fixed-guidance", help="guidance landmarks (same formats as --fixed-landmarks): matched pairs "
                                            "placed where the warp is wrong, pulled together by the refinement; "
                                            "never scored")
    p.add_argument("--moving-guidance", help="the moving partners of --fixed-guidance")
    p.add_argument("--output-dir", required=output_required, default=None if output_required else "output/demo")
    p.add_argument("--report", action="store_true", help="also write report.html with QA figures")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    common.add_argument("--json", action="store_true", help="print results as JSON on stdout")
    parser = argparse.ArgumentParser(prog="deepregistration", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", parents=[common], help="list the registration methods").set_defaults(func=cmd_methods)
    reg = sub.add_parser("register", parents=[common], help="register a moving image to a fixed image")
    _add_inputs(reg)
    _add_run_options(reg, output_required=True)
    reg.set_defaults(func=cmd_register)
    demo = sub.add_parser("demo", parents=[common], help="register the bundled sample pair and print its metrics")
    _add_run_options(demo, output_required=False)
    demo.set_defaults(func=cmd_demo)
    ev = sub.add_parser("evaluate", parents=[common],
                        help="metrics of an existing displacement field (or of no transform)")
    _add_inputs(ev)
    ev.add_argument("--displacement", help="ITK displacement field (fixed → moving, LPS mm); none: identity")
    ev.add_argument("--output-dir", help="write metrics.json here")
    ev.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return args.func(args)
    except InputError as exc:
        print(f"deepregistration: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except (ResourceError, MemoryError) as exc:
        print(f"deepregistration: resource failure: {exc}", file=sys.stderr)
        return EXIT_RESOURCE
    except Cancelled as exc:
        print(f"deepregistration: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
