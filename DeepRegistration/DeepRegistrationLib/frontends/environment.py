"""Can this Python run DeepRegistration? The packages it needs, their installed versions, and what to do about each
problem — decided from package metadata only, so nothing here imports PyTorch (or any other checked package).

The Slicer module calls `check()` before its first registration: an installed but broken PyTorch must not take the
GUI process down with it, and the GUI process must not create a CUDA context the worker then lacks. Whether PyTorch
actually imports is asked of a separate process (`frontends.probe`). Only the standard library is imported here.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass
from typing import Callable

TORCH_REQUIREMENT = ">=2.1"
"""The PyTorch versions the backend supports (safetensors.torch, torch.func-free code, `torch.backends.mps`)."""
TORCH_FOR_NUMPY2 = "2.3"
"""The first PyTorch whose wheels are built against NumPy 2 (older wheels fail on `tensor.numpy()` under NumPy 2)."""
OTHER_PACKAGES = {"safetensors": ("safetensors", "0.4"), "nibabel": ("nibabel", "5.0"), "scipy": ("scipy", "1.10")}
"""Import name → (distribution name, minimum version) of the pip-installable packages besides PyTorch. NumPy and
SimpleITK come with Slicer and are never reinstalled."""


def parse_version(text: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: "2.3.1+cu121" → (2, 3, 1), "2.13.0rc1" → (2, 13, 0)."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", text or "")
    if not match:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def at_least(version: str, minimum: str) -> bool:
    """True when `version` ≥ `minimum` (release numbers compared, padded with zeros)."""
    have, need = parse_version(version), parse_version(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution from its metadata (no import), None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Problem:
    """One reason DeepRegistration cannot run yet. `package` is the distribution; `fix` is "pytorch" (install or
    upgrade PyTorch through the PyTorch extension with version `requirement`) or "pip" (pip-install
    `requirement`)."""

    package: str
    message: str
    fix: str
    requirement: str = ""


def check(version_of: Callable[[str], str | None] | None = None) -> list[Problem]:
    """Every problem of this environment, PyTorch first; an empty list when everything needed is installed.

    `version_of(distribution)` gives an installed version or None (default: `installed_version`, resolved at call
    time so tests can replace it).
    """
    version_of = version_of or installed_version
    problems = []
    numpy = version_of("numpy")
    torch = version_of("torch")
    minimum = TORCH_REQUIREMENT.lstrip(">=")
    if torch is None:
        problems.append(Problem("torch", "PyTorch is not installed.", "pytorch", TORCH_REQUIREMENT))
    elif not at_least(torch, minimum):
        problems.append(Problem("torch", f"PyTorch {torch} is installed; DeepRegistration needs PyTorch {minimum} "
                                         "or later.", "pytorch", TORCH_REQUIREMENT))
    elif numpy is not None and parse_version(numpy)[0] >= 2 and not at_least(torch, TORCH_FOR_NUMPY2):
        problems.append(Problem("torch", f"PyTorch {torch} was built for NumPy 1, but this Python has NumPy {numpy}: "
                                         f"PyTorch {TORCH_FOR_NUMPY2} or later is needed.", "pytorch",
                                f">={TORCH_FOR_NUMPY2}"))
    for name, (distribution, least) in OTHER_PACKAGES.items():
        version = version_of(distribution)
        if version is None:
            problems.append(Problem(distribution, f"{distribution} is not installed.", "pip",
                                    f"{distribution}>={least}"))
        elif not at_least(version, least):
            problems.append(Problem(distribution, f"{distribution} {version} is installed; {least} or later is "
                                                  "needed.", "pip", f"{distribution}>={least}"))
    return problems


def describe(problems: list[Problem]) -> str:
    """One paragraph for the panel: the problems and what pressing Apply will do about them."""
    if not problems:
        return ""
    lines = [p.message for p in problems]
    if any(p.fix == "pytorch" for p in problems):
        lines.append("Press Apply to install PyTorch through the PyTorch extension (it picks the build that matches "
                     "your graphics driver).")
    if any(p.fix == "pip" for p in problems):
        lines.append("Press Apply to install the other packages with pip (Slicer's NumPy and SimpleITK are kept).")
    return " ".join(lines)
