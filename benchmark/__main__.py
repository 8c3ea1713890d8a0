"""`python -m benchmark {materialise,run,report,speed}`; see docs/BENCHMARK.md for the exact commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from .records import OUTPUT_DIR
    from .suite import ANATOMY_DIR, CACHE_DIR, SUITE_PATH

    parser = argparse.ArgumentParser(prog="python -m benchmark", description=__doc__)
    parser.add_argument("--manifest", type=Path, default=SUITE_PATH, help="suite manifest (default suite_v2.json; suite_v1.json stays readable)")
    parser.add_argument("--anatomy-dir", type=Path, default=ANATOMY_DIR, help="fetched anatomy (training.data)")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="where pairs are materialised")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, resolution_help: str) -> None:
        p.add_argument("--resolution", type=float, default=None, help=resolution_help)
        p.add_argument("--threads", type=int, default=2, help="threads per method (torch, ITK, ANTs, Elastix)")
        p.add_argument("--device", default="cpu", help="device for the networks (cpu, cuda, ...)")
        p.add_argument("--timeout", type=float, default=None, help="seconds before a method run is abandoned")

    p = sub.add_parser("materialise", help="build the pairs into the cache")
    p.add_argument("--pairs", nargs="*", help="subset names or pair ids (default all)")
    p.add_argument("--resolution", type=float, default=None, help="grid spacing in mm (default the manifest's)")
    p.add_argument("--force", action="store_true", help="rebuild even when the cache matches")

    p = sub.add_parser("run", help="run and score the suite")
    p.add_argument("--pairs", nargs="*", help="subset names or pair ids (default all)")
    p.add_argument("--methods", nargs="*", help="method names (default identity, shipped networks, classical); "
                   "NAME@balanced-half (half the refinement's deformable steps) only when named")
    p.add_argument("--out", type=Path, default=OUTPUT_DIR, help="output directory")
    p.add_argument("--resume", action="store_true", help="keep finished (pair, method) records in --out")
    p.add_argument("--candidate", action="append", metavar="NAME=PATH",
                   help="also run this model file as NAME[candidate] (and @balanced) and compare it with the shipped "
                        "NAME on its held-out pairs (repeatable)")
    common(p, "grid spacing in mm (default the manifest's)")

    p = sub.add_parser("report", help="rebuild the tables and plots of a run directory from its records")
    p.add_argument("--out", type=Path, default=OUTPUT_DIR, help="the run's output directory")

    p = sub.add_parser("speed", help="1 mm full-pipeline timing vs ANTs SyN")
    p.add_argument("--methods", nargs="*", help="networks to time (default all with shipped weights)")
    p.add_argument("--random-weights", action="store_true",
                   help="time every registry network with freshly initialised weights (before training)")
    p.add_argument("--out", type=Path, default=OUTPUT_DIR / "speed", help="output directory")
    common(p, "grid spacing in mm (default the manifest's speed resolution, 1 mm)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from DeepRegistrationLib.core.errors import InputError

    from .suite import load_manifest, materialise

    try:
        manifest = load_manifest(args.manifest)
        if args.command == "materialise":
            for spec in manifest.select(args.pairs):
                path = materialise(manifest, spec, args.resolution, args.anatomy_dir, args.cache_dir, args.force)
                print(f"{spec.id}: {path}")
        elif args.command == "run":
            from .methods import parse_candidates
            from .run import run_suite

            run_suite(manifest, args.pairs, args.methods, args.out, args.threads, args.resolution, args.device,
                      args.timeout, args.resume, args.anatomy_dir, args.cache_dir,
                      candidates=parse_candidates(args.candidate))
            print(f"results in {args.out}")
        elif args.command == "report":
            from .run import rewrite_outputs

            rewrite_outputs(args.out)
            print(f"tables and plots rebuilt in {args.out}")
        else:
            from .speed import run_speed

            run_speed(manifest, args.methods, args.threads, args.resolution, args.device, args.random_weights,
                      args.out, args.anatomy_dir, args.cache_dir, args.timeout)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
