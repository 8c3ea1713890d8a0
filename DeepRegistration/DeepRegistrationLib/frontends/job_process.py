"""Running a registration job in a worker process and following it: the requester's side of `frontends.worker`.

`JobProcess` owns the job folder and turns what the process does into callbacks: progress lines, log lines, and
exactly one `finished(JobOutcome)`. It talks to the process through a small `ProcessBackend` (Qt's QProcess in the
Slicer module, a fake in tests), so the run, cancel, failure and abandon paths are tested without Qt.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from .job import RegistrationJob, has_result, read_error, read_result, write_job

WORKER_MODULE = "DeepRegistrationLib.frontends.worker"
CANCEL_GRACE_S = 10.0
"""How long a cancelled worker may take to stop at its next stage before its owner kills it."""


class ProcessBackend(Protocol):
    """A child process as `JobProcess` needs it. The owner forwards the process's events to `JobProcess.output`,
    `JobProcess.exited` and `JobProcess.failed_to_start`."""

    def start(self, program: str, arguments: list[str], working_directory: str) -> None: ...

    def kill(self) -> None: ...


@dataclass
class JobOutcome:
    """How a job ended: "done" (with `result`), "cancelled", "failed" (with `message`), or "abandoned" (its owner
    went away, e.g. the scene closed; nothing must be built from it)."""

    status: str
    result: Any = None
    message: str = ""
    error_type: str | None = None


class JobProcess:
    """One job run in one worker process (`python -m DeepRegistrationLib.frontends.worker FOLDER`)."""

    def __init__(self, job: RegistrationJob, backend: ProcessBackend, python: str, module_dir: Path, *,
                 progress: Callable[[str, float], None], log: Callable[[str], None],
                 finished: Callable[[JobOutcome], None], temporary_dir: str | None = None) -> None:
        self.job, self.backend, self.python, self.module_dir = job, backend, python, Path(module_dir)
        self.progress, self.log, self.finished = progress, log, finished
        self.temporary_dir = temporary_dir
        self.folder: Path | None = None
        self.running = False
        self._buffer = ""
        self._cancelled = False
        self._abandoned = False

    def start(self) -> None:
        """Write the job to a new folder and start the worker on it."""
        self.folder = Path(tempfile.mkdtemp(prefix="DeepRegistration-", dir=self.temporary_dir))
        write_job(self.job, self.folder)
        self.running = True
        self.backend.start(self.python, ["-m", WORKER_MODULE, str(self.folder)], str(self.module_dir))

    def cancel(self) -> None:
        """Ask the worker to stop at its next stage (the owner kills it after `CANCEL_GRACE_S` if it has not)."""
        self._cancelled = True
        if self.folder is not None:
            (self.folder / "cancel").touch()

    def kill_if_running(self) -> None:
        """Kill the worker if it still runs (after a cancel's grace period, or when the owner goes away)."""
        if self.running:
            self.backend.kill()

    def abandon(self, finished: Callable[[JobOutcome], None] | None = None) -> None:
        """The owner goes away (scene closed, module reloaded): stop the worker; `finished` reports "abandoned".

        An owner that is being destroyed passes its own `finished` (for example to free the process): from then on
        no progress or log line reaches the old owner, and the final outcome goes to `finished` instead.
        """
        if finished is not None:
            self.progress, self.log, self.finished = (lambda stage, fraction: None), (lambda text: None), finished
        self._abandoned = True
        self.cancel()
        self.kill_if_running()

    def output(self, text: str) -> None:
        """Text the worker wrote on standard output: JSON progress and log lines, anything else logged as is."""
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in filter(None, (line.strip() for line in lines)):
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                self.log(line)
                continue
            if not isinstance(message, dict):
                self.log(line)
                continue
            if "stage" in message:
                self.progress(str(message["stage"]), float(message.get("fraction", 0.0)))
            if "log" in message:
                self.log(str(message["log"]))

    def errors(self, text: str) -> None:
        """Text the worker wrote on standard error (logged)."""
        if text.strip():
            self.log(text.strip())

    def exited(self, exit_code: int, crashed: bool = False) -> None:
        """The worker ended: read its result or error and report the outcome."""
        if not self.running:
            return
        self.running = False
        folder = self.folder
        try:
            if self._abandoned:
                outcome = JobOutcome("abandoned")
            elif exit_code == 0 and not crashed and has_result(folder):
                outcome = JobOutcome("done", read_result(folder))
            else:
                error = read_error(folder)
                if (error and error[0] == "Cancelled") or self._cancelled:
                    outcome = JobOutcome("cancelled", message="cancelled; nothing was changed")
                elif error:
                    outcome = JobOutcome("failed", message=error[1], error_type=error[0])
                else:
                    how = "crashed" if crashed else f"stopped with exit status {exit_code}"
                    outcome = JobOutcome("failed", message=f"the registration process {how}")
        except Exception as exc:  # a result that cannot be read is a failure of this job, not of its owner
            outcome = JobOutcome("failed", message=f"the result could not be read ({exc})")
        finally:
            self._discard()
        self.finished(outcome)

    def failed_to_start(self, message: str) -> None:
        """The worker could not be started (program missing, not executable)."""
        if not self.running:
            return
        self.running = False
        self._discard()
        self.finished(JobOutcome("abandoned" if self._abandoned else "failed",
                                 message=f"the registration process could not be started ({message})"))

    def _discard(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
