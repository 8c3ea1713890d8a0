"""Errors raised for bad input: each names the offending file or object and the problem; and the warnings of a run,
recorded so that they can be reported with its result."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator


class InputError(ValueError):
    """Bad user input (file, image, landmarks, option). Front ends map it to exit code 2."""


class ResourceError(RuntimeError):
    """The machine cannot run the request (memory, device). Front ends map it to exit code 3."""


class Cancelled(RuntimeError):
    """The user cancelled a running registration; nothing was written."""


class RegistrationWarning(UserWarning):
    """Something about the inputs or the run that the user should know (a doubtful input, a fallback); front ends
    show it and metrics.json lists it under "warnings"."""


def warn(message: str) -> None:
    """Issue a `RegistrationWarning` (attributed to the code that calls `warn`)."""
    warnings.warn(message, RegistrationWarning, stacklevel=2)


class Interrupted(BaseException):
    """The process was asked to stop (SIGINT, SIGTERM); a BaseException like KeyboardInterrupt, so that no
    `except Exception` swallows it. `signal` is the signal's name."""

    def __init__(self, signal: str) -> None:
        super().__init__(f"interrupted by {signal}")
        self.signal = signal


@contextmanager
def recorded_warnings() -> Iterator[list[str]]:
    """Collect the messages of the `RegistrationWarning`s issued inside the block into the yielded list (filled
    when the block ends, also when it raises), then issue every warning again so that the caller's filters and
    handlers see them."""
    messages: list[str] = []
    caught: list[warnings.WarningMessage] = []
    failed = True
    try:
        with warnings.catch_warnings(record=True) as log:
            warnings.simplefilter("always")
            try:
                yield messages
                failed = False
            finally:
                caught = list(log)
    finally:
        for w in caught:
            text = str(w.message)
            if issubclass(w.category, RegistrationWarning) and text not in messages:
                messages.append(text)
            try:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
            except Exception:
                if not failed:  # a filter turned it into an error: that error is the caller's
                    raise
