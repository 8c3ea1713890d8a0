"""A stand-in for SlicerPyTorch's `PyTorchUtils` module (the PyTorch extension), following its logic's API:
`PyTorchUtilsLogic().installTorch(askConfirmation, forceComputationBackend, torchVersionRequirement,
torchvisionVersionRequirement)` returns the `torch` module, or None when the user declined or it failed; with
`askConfirmation` it asks first (unless Slicer runs in testing mode). What installing does is `INSTALL_HOOK`
(the harness makes PyTorch importable, or not)."""

from __future__ import annotations

import importlib.metadata

import slicer

INSTALLS: list[dict] = []
INSTALL_HOOK = None
"""Called with the requirement; returns the torch module (installed) or None (failed)."""


class PyTorchUtilsLogic:
    def __init__(self) -> None:
        self._torch = None

    @staticmethod
    def torchInstalled() -> bool:
        try:
            importlib.metadata.files("torch")
        except importlib.metadata.PackageNotFoundError:
            return False
        try:
            import torch  # noqa: F401  (the real logic imports it too, and lets anything but ModuleNotFoundError out)
        except ModuleNotFoundError:
            return False
        return True

    def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                     torchvisionVersionRequirement=None):
        if askConfirmation and not slicer.app.commandOptions().testingEnabled:
            if not slicer.util.confirmOkCancelDisplay(
                    f"PyTorch will be downloaded and installed using light-the-torch (ltt install "
                    f"torch{torchVersionRequirement or ''}). The process might take some minutes."):
                return None
        INSTALLS.append({"torchVersionRequirement": torchVersionRequirement,
                         "forceComputationBackend": forceComputationBackend})
        return INSTALL_HOOK(torchVersionRequirement) if INSTALL_HOOK is not None else None
