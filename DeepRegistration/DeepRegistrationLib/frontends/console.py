"""The `deepregistration` console script: SIGINT and SIGTERM end it with one line from its first instant, before
the command line's modules (and PyTorch, seconds to import) are loaded; then `frontends.cli.main` runs, which
turns signals into `Interrupted` for the rest of the run."""

from __future__ import annotations

import signal
import sys

from .failures import EXIT_SIGNAL


def _early(signum, frame) -> None:
    name = signal.Signals(signum).name
    print(f"deepregistration: interrupted by {name}", file=sys.stderr)
    raise SystemExit(EXIT_SIGNAL.get(name, 130))


def main() -> int:
    """Install the early signal handlers, import the command line and run it on `sys.argv`."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _early)
    from .cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
