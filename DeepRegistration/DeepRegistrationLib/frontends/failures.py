"""How a front-end process ends when something goes wrong: exit codes, one-line messages, the crash log, and
signals turned into an exception so that every `finally` (staging directories, locks) runs.

Exit codes: 0 success, 1 an unexpected error (one line naming the log file that holds its traceback), 2 bad input
(`InputError`, or a path the user chose that cannot be used), 3 resources (`ResourceError`, memory, disk full, a
busy output directory), 130 interrupted by SIGINT (Ctrl-C), 143 by SIGTERM; the command line also ends with 141
when the reader of its standard output goes away (`deepregistration methods | head`).
"""

from __future__ import annotations

import errno
import os
import signal
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..core.errors import Cancelled, InputError, Interrupted, ResourceError

EXIT_UNEXPECTED, EXIT_INPUT, EXIT_RESOURCE = 1, 2, 3
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}
RESOURCE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.EIO, errno.EFBIG}
"""OSErrors that say the machine ran out of something (exit 3); other OSErrors are about a path (exit 2)."""
LOG_DIR_ENV = "DEEPREGISTRATION_LOG_DIR"


def classify(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message without the program name) of an exception that ends a run."""
    if isinstance(exc, Interrupted):
        after = getattr(exc, "after_commit", None)
        note = f" after the outputs were put in place in {after} (they are complete)" if after else ""
        return EXIT_SIGNAL.get(exc.signal, 130), f"interrupted by {exc.signal}{note}"
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_SIGNAL["SIGINT"], "interrupted by SIGINT"
    if isinstance(exc, InputError):
        return EXIT_INPUT, f"error: {_one_line(exc)}"
    if isinstance(exc, (ResourceError, MemoryError)):
        return EXIT_RESOURCE, f"resource failure: {_one_line(exc) or 'out of memory'}"
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
        return EXIT_RESOURCE, f"resource failure: {_one_line(exc)}"
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        text = f"{where}{exc.strerror or exc}"
        if exc.errno in RESOURCE_ERRNOS:
            return EXIT_RESOURCE, f"resource failure: {text}"
        return EXIT_INPUT, f"error: {text}"
    if isinstance(exc, Cancelled):
        return EXIT_UNEXPECTED, str(exc)
    return EXIT_UNEXPECTED, ""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def log_dir() -> Path:
    """Where crash logs go: $DEEPREGISTRATION_LOG_DIR, else ~/.cache/deepregistration/logs, else the temp dir."""
    if os.environ.get(LOG_DIR_ENV):
        return Path(os.environ[LOG_DIR_ENV])
    return Path.home() / ".cache" / "deepregistration" / "logs"


def write_crash_log(exc: BaseException, argv: list[str] | None) -> Path | None:
    """Write the traceback of `exc` (and the command line) to a new log file; its path, or None if none could be
    written anywhere."""
    text = (f"deepregistration crash, {time.strftime('%Y-%m-%d %H:%M:%S')}, pid {os.getpid()}\n"
            f"arguments: {argv!r}\n\n" + "".join(traceback.format_exception(exc)))
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (log_dir(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    return None


def unexpected_message(exc: BaseException, argv: list[str] | None) -> str:
    """The one line for an unexpected error, naming the log file with its traceback."""
    log = write_crash_log(exc, argv)
    where = f"; the traceback is in {log}" if log else ""
    return f"internal error: {type(exc).__name__}: {_one_line(exc)[:300]}{where} (please report it)"


@contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` in the main thread for the duration of the block (a second signal
    while the first unwinds is ignored, so that clean-up finishes); the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}
    previous = {sig: signal.getsignal(sig) for sig in names}
    fired = []

    def handler(signum, frame):
        if fired:
            return
        fired.append(signum)
        raise Interrupted(names[signum])

    for sig in names:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
