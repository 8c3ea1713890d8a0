"""The worker process of a registration job: `python -m DeepRegistrationLib.frontends.worker JOB_FOLDER`.

The Slicer module starts it with PythonSlicer (working directory: the module's folder) so that Slicer's GUI stays
responsive; `frontends.job_process.JobProcess` is the other side. It reads the job (`frontends.job`), runs it, and
writes the result folder or error.json. Standard output carries one JSON object per line: {"stage", "fraction"} for
progress, {"log"} for messages. Exit status: 0 done, 2 bad input, 3 not enough memory/device/disk, 4 cancelled,
1 anything else (`frontends.failures.classify`, as the command line; error.json then holds the traceback).
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from ..core.errors import Cancelled
from .failures import EXIT_UNEXPECTED, classify
from .job import read_job, run_job, write_error, write_result

EXIT_CANCELLED = 4


def _emit(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the job in the folder named by the only argument; see the module docstring for the protocol."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m DeepRegistrationLib.frontends.worker JOB_FOLDER", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    cancel_file = folder / "cancel"
    warnings.showwarning = lambda message, *args, **kwargs: _emit({"log": str(message)})
    try:
        job = read_job(folder)
        result = run_job(job, progress=lambda stage, fraction: _emit({"stage": stage, "fraction": fraction}),
                         cancel=cancel_file.exists)
        write_result(result, folder)
    except Exception as exc:  # reported to the requester through error.json and the exit status
        code = EXIT_CANCELLED if isinstance(exc, Cancelled) else classify(exc)[0]
        message = str(exc) if code != EXIT_UNEXPECTED else f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        write_error(folder, type(exc).__name__, message)
        _emit({"log": message})
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
