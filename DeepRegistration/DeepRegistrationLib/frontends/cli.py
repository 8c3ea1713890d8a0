"""`deepregistration`: register any pair with any method, evaluate any transform, write QA reports.

Exit codes (`frontends.failures`): 0 success, 1 unexpected error (one line naming a log file with the traceback),
2 bad input, 3 resource failure (memory, device, disk, a busy output directory), 130/143 interrupted by
SIGINT/SIGTERM. Every check of the inputs, options and output directory runs before compute; outputs are staged
beside the output directory and put in place with one rename only when everything succeeded
(`frontends.outdir`). Images are files or DICOM series (a folder, or one slice file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
import warnings
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..core.dicom import AmbiguousSeries
from ..core.errors import InputError, Interrupted, recorded_warnings
from ..core.field import DisplacementField, read_itk_displacement
from ..core.image import Image, read_image, read_labels
from ..core.landmarks import match_landmarks, read_landmarks
from ..core.params import allowed, check_value, parse_text
from ..engine.evaluation import evaluate
from ..engine.options import RegistrationOptions, check_options
from ..engine.registration import register
from ..engine.results import Metrics, RegistrationResult
from ..methods.models import read_metadata
from ..methods.registry import DEFAULT_METHOD, METHODS, get_method
from .failures import EXIT_INPUT, EXIT_RESOURCE, EXIT_UNEXPECTED, classify, signals_raise, unexpected_message
from .outdir import OutputDirectory
from .outputs import OUTPUT_FILES, RUN_FILES, strict_json, write_metrics, write_outputs

SAMPLE_DIR = Path(__file__).resolve().parents[3] / "Resources" / "SampleData"
EXIT_CODES = (EXIT_INPUT, EXIT_RESOURCE, EXIT_UNEXPECTED)
"""The exit codes of the command line's failures (`frontends.failures`); `cli.EXIT_INPUT` etc. as before."""
EXIT_BROKEN_PIPE = 141
"""Standard output closed by its reader (128 + SIGPIPE, as a shell reports a process that SIGPIPE ended)."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (exit 2) instead of the whole usage text."""

    def error(self, message: str):
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _read_image(path: str | Path, series: str | None, flag: str | None) -> Image:
    """An image file or DICOM series; an ambiguous DICOM folder's error names the flag that chooses."""
    try:
        return read_image(path, series=series)
    except AmbiguousSeries as exc:
        if flag is None:
            raise
        raise InputError(f"{exc} (with {flag} UID)") from None


def _landmarks(args: argparse.Namespace) -> tuple[np.ndarray | None, np.ndarray | None]:
    if (args.fixed_landmarks is None) != (args.moving_landmarks is None):
        raise InputError("give both --fixed-landmarks and --moving-landmarks, or neither")
    if args.fixed_landmarks is None:
        return None, None
    _, fixed_pts, moving_pts = match_landmarks(read_landmarks(args.fixed_landmarks),
                                               read_landmarks(args.moving_landmarks))
    return fixed_pts, moving_pts


def _inputs(args: argparse.Namespace, fixed: str | Path, moving: str | Path, weights: str | None = None,
            displacement: str | None = None) -> dict[str, Any]:
    """Flag → path of every input of the command (the output directory may be none of them)."""
    return {"--fixed": fixed, "--moving": moving, "--fixed-labels": args.fixed_labels,
            "--moving-labels": args.moving_labels, "--fixed-landmarks": args.fixed_landmarks,
            "--moving-landmarks": args.moving_landmarks, "--fixed-mask": getattr(args, "fixed_mask", None),
            "--moving-mask": getattr(args, "moving_mask", None),
            "--fixed-guidance": getattr(args, "fixed_guidance", None),
            "--moving-guidance": getattr(args, "moving_guidance", None), "--weights": weights,
            "--displacement": displacement}


def _guidance(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray] | None:
    """The guidance landmark pairs (RAS mm), matched as the scored landmarks are; None without them."""
    fixed, moving = getattr(args, "fixed_guidance", None), getattr(args, "moving_guidance", None)
    if (fixed is None) != (moving is None):
        raise InputError("give both --fixed-guidance and --moving-guidance, or neither")
    if fixed is None:
        return None
    _, fixed_pts, moving_pts = match_landmarks(read_landmarks(fixed), read_landmarks(moving))
    return fixed_pts, moving_pts


def _masks(args: argparse.Namespace, fixed: Image, moving: Image) -> tuple[Image | None, Image | None]:
    """The fixed and moving masks (label maps on their image's grid; nonzero inside)."""
    fixed_mask = read_labels(args.fixed_mask, like=fixed) if args.fixed_mask else None
    moving_mask = read_labels(args.moving_mask, like=moving) if args.moving_mask else None
    return fixed_mask, moving_mask


def _labels(args: argparse.Namespace, fixed: Image, moving: Image) -> tuple[Image | None, Image | None]:
    fixed_labels = read_labels(args.fixed_labels, like=fixed) if args.fixed_labels else None
    moving_labels = read_labels(args.moving_labels, like=moving) if args.moving_labels else None
    return fixed_labels, moving_labels


def _parse_sets(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items as a dict (values parsed as strict JSON where they are, else text); checked later
    against the method's declarations (`engine.options.check_options`)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set expects KEY=VALUE, got {item!r}")
        if key.strip() in out:
            raise InputError(f"--set {key.strip()} is given twice")
        out[key.strip()] = parse_text(value)
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
    """The `RegistrationOptions` of the flags `add_option_flags` declared, checked against their declarations
    (`engine.options.check_options`: InputError naming the option or parameter and its allowed values)."""
    values = {f.name: getattr(args, f.name) for f in fields(RegistrationOptions)
              if f.name not in ("parameters", "refinement")}
    sets = _parse_sets(args.set)
    refinement = {k[len(REFINE_PREFIX):]: v for k, v in sets.items() if k.startswith(REFINE_PREFIX)}
    parameters = {k: v for k, v in sets.items() if not k.startswith(REFINE_PREFIX)}
    return check_options(RegistrationOptions(parameters=parameters, refinement=refinement, **values))


@contextmanager
def _noting_commit(output: OutputDirectory) -> Iterator[None]:
    """A signal held back while the outputs were put in place arrives just after: say that they are complete."""
    try:
        yield
    except Interrupted as exc:
        if output.committed:
            exc.after_commit = str(output.given)
        raise


def _read_pair(args: argparse.Namespace, fixed_path: str | Path, moving_path: str | Path):
    """Images, labels and landmarks of the command, with the warnings issued while reading them."""
    with recorded_warnings() as messages:
        fixed = _read_image(fixed_path, getattr(args, "fixed_series", None), "--fixed-series")
        moving = _read_image(moving_path, getattr(args, "moving_series", None), "--moving-series")
        fixed_labels, moving_labels = _labels(args, fixed, moving)
        fixed_pts, moving_pts = _landmarks(args)
    return fixed, moving, fixed_labels, moving_labels, fixed_pts, moving_pts, messages


def _run_inputs(args: argparse.Namespace, fixed: Image, moving: Image) -> dict[str, Any]:
    """The registration-only inputs of `register`: guidance landmarks and masks."""
    fixed_mask, moving_mask = _masks(args, fixed, moving)
    return {"guidance": _guidance(args), "fixed_mask": fixed_mask, "moving_mask": moving_mask}


def _register(args: argparse.Namespace, fixed_path: Path, moving_path: Path,
              compare_fast: bool = False) -> tuple[RegistrationResult, RegistrationResult | None]:
    """Register as the flags say and write the outputs; with `compare_fast`, also the network alone (preset fast;
    not written) when the preset refines a network's result. Returns (result, fast result or None)."""
    options = options_from_args(args)
    progress = _Progress(args.quiet)
    output = OutputDirectory(args.output_dir, _inputs(args, fixed_path, moving_path, options.weights),
                             args.overwrite, RUN_FILES)
    fast = None
    try:
        with _noting_commit(output), output as out:
            fixed, moving, fixed_labels, moving_labels, fixed_pts, moving_pts, read_warnings = _read_pair(
                args, fixed_path, moving_path)
            scored = {"fixed_labels": fixed_labels, "moving_labels": moving_labels, "fixed_points": fixed_pts,
                      "moving_points": moving_pts}
            result = register(fixed, moving, options, **scored, **_run_inputs(args, fixed, moving),
                              progress=progress)
            result.metrics.warnings = read_warnings + [w for w in result.metrics.warnings if w not in read_warnings]
            if compare_fast and options.preset != "fast" and get_method(options.method).is_network:
                fast = register(fixed, moving, replace(options, preset="fast", refinement={}), **scored,
                                progress=progress)
            progress("writing outputs", 1.0)
            progress.close()
            write_outputs(result, out)
            if args.report:
                from .report import write_report

                write_report(out, fixed, moving, result, fixed_labels)
    finally:
        progress.close()
    return result, fast


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
    result, _ = _register(args, Path(args.fixed), Path(args.moving))
    _print_result(args, result.metrics, Path(args.output_dir))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The sample pair with the requested preset (default balanced), printed beside the network alone (fast)."""
    args.fixed_labels = str(SAMPLE_DIR / "fixed_labels.nii.gz")
    args.moving_labels = str(SAMPLE_DIR / "moving_labels.nii.gz")
    args.fixed_landmarks = str(SAMPLE_DIR / "fixed_landmarks.fcsv")
    args.moving_landmarks = str(SAMPLE_DIR / "moving_landmarks.fcsv")
    text = not args.quiet and not args.json
    if text:
        print(f"Registering the sample pair in {SAMPLE_DIR} with {args.method} ({args.preset})...")
    result, fast = _register(args, SAMPLE_DIR / "fixed.nii.gz", SAMPLE_DIR / "moving.nii.gz", compare_fast=text)
    if fast is None:
        _print_result(args, result.metrics, Path(args.output_dir))
        return 0
    print("\n".join(side_by_side({"fast (network alone)": fast.metrics, args.preset: result.metrics})))
    print(f"outputs ({args.preset}) in {Path(args.output_dir).resolve()}")
    return 0


def side_by_side(columns: dict[str, Metrics]) -> list[str]:
    """`summary_lines` of several registrations of one pair as columns under their names."""
    rows = [summary_lines(m) for m in columns.values()]
    width = max(len(line) - 17 for r in rows for line in r) + 2
    lines = [" " * 17 + "".join(f"{name:<{width}}" for name in columns)]
    for i, line in enumerate(rows[0]):
        lines.append(line[:17] + "".join(f"{r[i][17:] if i < len(r) else '':<{width}}" for r in rows))
    return lines


def cmd_evaluate(args: argparse.Namespace) -> int:
    def run(out: Path | None) -> Metrics:
        fixed, moving, fixed_labels, moving_labels, fixed_pts, moving_pts, read_warnings = _read_pair(
            args, args.fixed, args.moving)
        with recorded_warnings() as messages:
            if args.displacement:
                field = read_itk_displacement(args.displacement).resampled(fixed.grid)
            else:
                field = DisplacementField(np.zeros((*fixed.grid.shape, 3), np.float32), fixed.grid)
            metrics, *_ = evaluate(fixed, moving, field, fixed_labels=fixed_labels, moving_labels=moving_labels,
                                   fixed_points=fixed_pts, moving_points=moving_pts)
        metrics.warnings = read_warnings + messages
        if out is not None:
            write_metrics(metrics, out / OUTPUT_FILES["metrics"])
        return metrics

    if args.output_dir:
        output = OutputDirectory(args.output_dir, _inputs(args, args.fixed, args.moving, None, args.displacement),
                                 args.overwrite, RUN_FILES)
        with _noting_commit(output), output as out:
            metrics = run(out)
    else:
        metrics = run(None)
    _print_result(args, metrics, Path(args.output_dir) if args.output_dir else None)
    return 0


def _add_inputs(p: argparse.ArgumentParser, images: bool = True) -> None:
    if images:
        p.add_argument("--fixed", required=True, help="fixed image: NIfTI, NRRD, MHA or MGZ file, or a DICOM series "
                                                      "(its folder, or one of its slice files)")
        p.add_argument("--moving", required=True, help="moving image (as --fixed)")
        p.add_argument("--fixed-series", metavar="UID", help="Series Instance UID to read when the --fixed DICOM "
                                                             "folder holds several series (they are listed)")
        p.add_argument("--moving-series", metavar="UID", help="the same for --moving")
    p.add_argument("--fixed-labels", help="label map on the fixed image's grid")
    p.add_argument("--moving-labels", help="label map on the moving image's grid")
    p.add_argument("--fixed-landmarks", help="Slicer .fcsv, markups .json or CSV x,y,z (RAS mm); scored (TRE)")
    p.add_argument("--moving-landmarks", help="matched to the fixed landmarks by label, else by order")


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
        flag = "--" + f.name.replace("_", "-")
        bounded = any(meta.get(key) is not None for key in ("low", "high", "choices"))
        values = f"{allowed(hints[f.name], meta)}; " if bounded else ""
        p.add_argument(flag, dest=f.name, type=_flag_type(f, hints[f.name]), default=f.default,
                       choices=meta.get("choices"), help=f"{meta['help']} ({values}default {f.default})")


def _flag_type(f, hint: Any) -> Callable[[str], Any]:
    """argparse `type` of a declared option: the text parsed (numbers as JSON) and checked against the
    declaration, a one-line error naming what is allowed otherwise."""
    numeric = hint in (int, float, bool)

    def convert(text: str) -> Any:
        try:
            return check_value("", f, hint, parse_text(text) if numeric else text)
        except InputError:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed: expected {allowed(hint, f.metadata)} "
                                             f"({f.metadata['help']})") from None

    convert.__name__ = hint.__name__ if isinstance(hint, type) else "value"
    return convert


def _add_output_flags(p: argparse.ArgumentParser, required: bool, default: str | None = None,
                      overwrite: bool = False) -> None:
    p.add_argument("--output-dir", required=required, default=default,
                   help="directory for the outputs: new or empty (or, with --overwrite, one holding only outputs of "
                        "an earlier run); never an input or inside an input folder")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=overwrite,
                   help="replace the outputs of an earlier run in --output-dir as a whole (nothing else is ever "
                        f"deleted; default {'on' if overwrite else 'off'})")


def _add_run_options(p: argparse.ArgumentParser, output_required: bool) -> None:
    add_option_flags(p)
    p.add_argument("--fixed-guidance", help="guidance landmarks (same formats as --fixed-landmarks): matched pairs "
                                            "placed where the warp is wrong, pulled together by the refinement; "
                                            "never scored")
    p.add_argument("--moving-guidance", help="the moving partners of --fixed-guidance")
    p.add_argument("--fixed-mask", help="label map on the fixed grid: the refinement compares the images only "
                                        "inside it (nonzero), and det J is also reported inside it")
    p.add_argument("--moving-mask", help="label map on the moving grid: the refinement compares only inside it")
    if output_required:
        _add_output_flags(p, required=True)
    else:
        _add_output_flags(p, required=False, default="output/demo", overwrite=True)
    p.add_argument("--report", action="store_true", help="also write report.html with QA figures")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    common.add_argument("--json", action="store_true", help="print results as JSON on stdout")
    parser = _Parser(prog="deepregistration", description=__doc__.split("\n")[0])
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
    ev.add_argument("--output-dir", help="write metrics.json here (the rules of register's --output-dir)")
    ev.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run there")
    ev.set_defaults(func=cmd_evaluate)
    return parser


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings printed as `deepregistration: warning: ...` (one line, no source line); each message once."""
    previous = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *rest, **kw: f"deepregistration: warning: {message}\n"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield
    finally:
        warnings.formatwarning = previous


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code and never lets an exception (or a traceback) out: expected errors are
    one line on stderr, an unexpected one is one line naming the log file with its traceback."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (already printed in one line) and --help
        return exc.code if isinstance(exc.code, int) else EXIT_INPUT
    with _one_line_warnings(), signals_raise():
        try:
            return args.func(args)
        except BrokenPipeError:  # `deepregistration methods | head`: the reader left; say nothing more
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):
                pass
            return EXIT_BROKEN_PIPE
        except (Exception, Interrupted, KeyboardInterrupt) as exc:
            code, message = classify(exc)
            if code == EXIT_UNEXPECTED and not message:
                message = unexpected_message(exc, argv if argv is not None else sys.argv[1:])
            print(f"deepregistration: {message}", file=sys.stderr)
            return code


if __name__ == "__main__":
    sys.exit(main())
