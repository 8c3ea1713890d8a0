"""Command line: `python -m training.data fetch [--dest DIR] [--only NAME ...]`, `python -m training.data sample` and
`python -m training.data fieldbank [--out DIR] [--synthetic N] [--spacing MM] [--measure]`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "DeepRegistration") not in sys.path:
    sys.path.insert(0, str(ROOT / "DeepRegistration"))

from .fetch import DATASETS, FetchError, fetch  # noqa: E402
from .label_protocols import LabelTableError  # noqa: E402
from DeepRegistrationLib.core.errors import InputError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p_fetch = commands.add_parser("fetch", help="download and convert the public templates")
    p_fetch.add_argument("--dest", type=Path, default=ROOT / "data" / "anatomy")
    p_fetch.add_argument("--only", nargs="+", choices=[d.name for d in DATASETS], help="datasets to fetch")
    p_sample = commands.add_parser("sample", help="build Resources/SampleData from ICBM152 2009a")
    p_sample.add_argument("--anatomy", type=Path, default=ROOT / "data" / "anatomy")
    p_sample.add_argument("--out", type=Path, default=ROOT / "Resources" / "SampleData")
    p_sample.add_argument("--seed", type=int, default=2009)
    p_bank = commands.add_parser("fieldbank", help="SyN fields between training subjects (training/data/fieldbank.py)")
    p_bank.add_argument("--anatomy", type=Path, default=ROOT / "data" / "anatomy")
    p_bank.add_argument("--out", type=Path, default=ROOT / "data" / "fieldbank")
    p_bank.add_argument("--subjects", nargs="+", default=["icbm152_2009a", "fsaverage"])
    p_bank.add_argument("--held-out", nargs="*", default=["colin27"], help="subjects the bank must not use")
    p_bank.add_argument("--synthetic", type=int, default=4, help="synthesised subjects registered to each real one")
    p_bank.add_argument("--spacing", type=float, default=4.0, help="grid spacing in mm")
    p_bank.add_argument("--seed", type=int, default=0)
    p_bank.add_argument("--threads", type=int, default=1, help="ITK/ANTs threads")
    p_bank.add_argument("--measure", action="store_true",
                        help="only print 95th percentiles of the bank, its draws and the random SVFs")
    p_bank.add_argument("--scale", type=float, nargs=2, default=[0.6, 1.0], help="--measure: data.bank_scale")
    p_bank.add_argument("--magnitude", type=float, default=4.0, help="--measure: data.magnitude_mm of the added SVF")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.command == "fetch":
            fetch(args.dest, args.only)
        elif args.command == "fieldbank":
            import json
            import os

            import torch

            from .fieldbank import build_bank, measure

            os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
            torch.set_num_threads(args.threads)
            if args.measure:
                numbers = measure(args.out if (args.out / "manifest.json").is_file() else None, args.anatomy,
                                  args.spacing, scale=args.scale, magnitude_mm=args.magnitude)
                print(json.dumps({k: round(v, 2) for k, v in numbers.items()}, indent=1))
            else:
                build_bank(args.anatomy, args.out, args.subjects, args.synthetic, args.spacing, args.seed,
                           args.held_out)
        else:
            from .sample import build_sample

            build_sample(args.anatomy, args.out, seed=args.seed)
    except (FetchError, LabelTableError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
