"""Command line: `python -m training.data fetch [--dest DIR] [--only NAME ...]` and `python -m training.data sample`."""

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
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.command == "fetch":
            fetch(args.dest, args.only)
        else:
            from .sample import build_sample

            build_sample(args.anatomy, args.out, seed=args.seed)
    except (FetchError, LabelTableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
