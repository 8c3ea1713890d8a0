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
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import SimpleITK as sitk

from .engine import RegistrationResult, evaluate, register
from .errors import Cancelled, InputError, ResourceError
from .field_io import DisplacementField, read_itk_displacement, write_itk_displacement
from .geometry import RAS_FROM_LPS
from .image import Image, read_image, read_labels, write_image
from .landmarks import match_landmarks, read_landmarks
from .models import read_metadata
from .registry import DEFAULT_METHOD, METHODS, get_method

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "Resources" / "SampleData"
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


def write_affine_tfm(affine_ras: np.ndarray, path: Path) -> None:
    """The RAS affine (fixed point ↦ moving point) as an ITK transform file (LPS)."""
    lps = RAS_FROM_LPS @ affine_ras[:3, :3] @ RAS_FROM_LPS
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(lps.flatten()))
    transform.SetTranslation(tuple(RAS_FROM_LPS @ affine_ras[:3, 3]))
    sitk.WriteTransform(transform, str(path))


OUTPUT_FILES = {"warped": "warped.nii.gz", "field": "displacement.nii", "inverse": "inverse_displacement.nii",
                "jacobian": "jacobian.nii", "folding": "folding.nii.gz", "warped_labels": "warped_labels.nii.gz",
                "affine": "affine.tfm", "metrics": "metrics.json"}
"""The file each output of `register` is written to. The fields and the Jacobian map are float32 values that vary
over the whole grid: gzip shrinks them by about a quarter for ~10 s per 1 mm field, so they are plain `.nii`."""


def write_outputs(result: RegistrationResult, fixed: Image, moving: Image, out: Path,
                  fixed_labels: Image | None, report: bool) -> None:
    """Every output file of `register` into directory `out` (names in `OUTPUT_FILES`)."""
    write_image(result.warped, out / OUTPUT_FILES["warped"])
    write_itk_displacement(result.field, out / OUTPUT_FILES["field"])
    write_itk_displacement(result.inverse, out / OUTPUT_FILES["inverse"])
    write_image(result.jacobian, out / OUTPUT_FILES["jacobian"])
    folding = Image((result.jacobian.data <= 0).astype(np.uint8), result.jacobian.grid, "folding")
    write_image(folding, out / OUTPUT_FILES["folding"])
    if result.warped_labels is not None:
        write_image(result.warped_labels, out / OUTPUT_FILES["warped_labels"])
    if result.affine_ras is not None:
        write_affine_tfm(result.affine_ras, out / OUTPUT_FILES["affine"])
    for name, seg in result.segmentations.items():
        write_image(seg, out / f"segmentation_{name}.nii.gz")
    (out / OUTPUT_FILES["metrics"]).write_text(json.dumps(result.metrics, indent=2, default=_json_default) + "\n")
    if report:
        from .report import write_report

        write_report(out, fixed, moving, result, fixed_labels)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


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
        rows.append({"name": spec.name, "paper": spec.paper, "modality": spec.modality,
                     "shipped_model": _model_summary(spec), "default": spec.name == DEFAULT_METHOD})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            m = r["shipped_model"]
            model = "no model shipped"
            if m:
                model = f"{m['working_spacing_mm']:g} mm, {m['iterations']} it."
                if m["validation_dice"] is not None:
                    model += f", val. Dice {m['validation_dice_identity']:.3f}→{m['validation_dice']:.3f}"
            star = " (default)" if r["default"] else ""
            print(f"{r['name']:<11} {r['modality']:<6} {model:<38} {r['paper']}{star}")
    return 0


def _register(args: argparse.Namespace, fixed_path: Path, moving_path: Path) -> RegistrationResult:
    get_method(args.method)
    fixed, moving = read_image(fixed_path), read_image(moving_path)
    fixed_labels, moving_labels = _labels(args, fixed, moving)
    fixed_pts, moving_pts = _landmarks(args)
    progress = _Progress(args.quiet)
    try:
        with staged_output(Path(args.output_dir)) as out:
            result = register(fixed, moving, args.method, parameters=_parse_sets(args.set), weights=args.weights,
                              device=args.device, instance_optimization=args.instance_optimization,
                              seed=args.seed, prealign=args.prealign, fixed_modality=args.fixed_modality,
                              moving_modality=args.moving_modality, fixed_labels=fixed_labels,
                              moving_labels=moving_labels, fixed_points=fixed_pts, moving_points=moving_pts,
                              progress=progress)
            progress.close()
            write_outputs(result, fixed, moving, out, fixed_labels, args.report)
    finally:
        progress.close()
    return result


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """Human-readable before/after lines of a metrics dict."""
    lines = []
    if "labels" in metrics:
        b, a = metrics["labels"]["before"], metrics["labels"]["after"]
        lines.append(f"Dice (mean)      {b['mean_dice']:.3f} -> {a['mean_dice']:.3f}")
        lines.append(f"HD95 (mean, mm)  {b['mean_hd95']:.2f} -> {a['mean_hd95']:.2f}")
        lines.append(f"ASSD (mean, mm)  {b['mean_assd']:.2f} -> {a['mean_assd']:.2f}")
    if "landmarks" in metrics:
        lm = metrics["landmarks"]
        lines.append(f"TRE (mean, mm)   {lm['mean_before']:.2f} -> {lm['mean_after']:.2f}")
    sim = metrics["similarity"]
    lines.append(f"NCC              {sim['before']['ncc']:.3f} -> {sim['after']['ncc']:.3f}")
    jac = metrics["jacobian"]
    lines.append(f"det J <= 0       {jac['percent_nonpositive']:.4f} %   SDlogJ {jac['sdlogj']:.4f}")
    if "time_s" in metrics:
        lines.append(f"time             {metrics['time_s']['total']:.2f} s on {metrics['device']}")
    return lines


def _print_result(args: argparse.Namespace, metrics: dict[str, Any], out_dir: Path | None) -> None:
    if args.json:
        print(json.dumps(metrics, indent=2, default=_json_default))
    elif not args.quiet:
        print("\n".join(summary_lines(metrics)))
        if out_dir is not None:
            print(f"outputs in {out_dir.resolve()}")


def cmd_register(args: argparse.Namespace) -> int:
    result = _register(args, Path(args.fixed), Path(args.moving))
    _print_result(args, result.metrics, Path(args.output_dir))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    args.fixed_labels = str(SAMPLE_DIR / "fixed_labels.nii.gz")
    args.moving_labels = str(SAMPLE_DIR / "moving_labels.nii.gz")
    args.fixed_landmarks = str(SAMPLE_DIR / "fixed_landmarks.fcsv")
    args.moving_landmarks = str(SAMPLE_DIR / "moving_landmarks.fcsv")
    if not args.quiet and not args.json:
        print(f"Registering the sample pair in {SAMPLE_DIR} with {args.method}...")
    result = _register(args, SAMPLE_DIR / "fixed.nii.gz", SAMPLE_DIR / "moving.nii.gz")
    _print_result(args, result.metrics, Path(args.output_dir))
    return 0


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
            (out / OUTPUT_FILES["metrics"]).write_text(json.dumps(metrics, indent=2, default=_json_default) + "\n")
    _print_result(args, metrics, Path(args.output_dir) if args.output_dir else None)
    return 0


def _add_inputs(p: argparse.ArgumentParser, images: bool = True) -> None:
    if images:
        p.add_argument("--fixed", required=True, help="fixed image (NIfTI, NRRD, MHA or MGZ)")
        p.add_argument("--moving", required=True, help="moving image")
    p.add_argument("--fixed-labels", help="label map on the fixed image's grid")
    p.add_argument("--moving-labels", help="label map on the moving image's grid")
    p.add_argument("--fixed-landmarks", help="Slicer .fcsv, markups .json or CSV x,y,z (RAS mm)")
    p.add_argument("--moving-landmarks", help="matched to the fixed landmarks by label, else by order")


def _add_run_options(p: argparse.ArgumentParser, output_required: bool) -> None:
    p.add_argument("--method", default=DEFAULT_METHOD, help=f"method name (default {DEFAULT_METHOD})")
    p.add_argument("--output-dir", required=output_required, default=None if output_required else "output/demo")
    p.add_argument("--weights", help="weights file (default: the method's shipped model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--instance-optimization", type=int, default=0, metavar="STEPS",
                   help="test-time optimisation steps on this pair (weights restored afterwards)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prealign", choices=("none", "moments", "jad"), default="none",
                   help="affine pre-alignment: centre-of-mass translation or the jad model's affine")
    p.add_argument("--fixed-modality", choices=("mr", "ct"), default="mr")
    p.add_argument("--moving-modality", choices=("mr", "ct"), default="mr")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an inference-time config field, e.g. working_spacing=2.0")
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
