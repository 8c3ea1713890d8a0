"""Errors raised for bad input: each names the offending file or object and the problem."""


class InputError(ValueError):
    """Bad user input (file, image, landmarks, option). Front ends map it to exit code 2."""


class ResourceError(RuntimeError):
    """The machine cannot run the request (memory, device). Front ends map it to exit code 3."""


class Cancelled(RuntimeError):
    """The user cancelled a running registration; nothing was written."""
