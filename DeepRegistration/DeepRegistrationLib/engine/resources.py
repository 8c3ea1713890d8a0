"""The machine a registration runs on: the device to use, the memory it has free, and the peak memory a registration
needs (measured on a small probe grid and scaled to the real one)."""

from __future__ import annotations

import os
import weakref

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..core.errors import InputError

BYTES_PER_FIXED_VOXEL = 200
"""Export and metrics on the fixed grid: a few float64 [I, J, K, 3] arrays (coordinates, fields, inverse)."""


class _LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes held by tensors created inside the mode, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """Nothing is compiled inside this mode: skipping torch's Dynamo wrapper avoids importing Dynamo (seconds)."""
        return False

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._seen or storage.nbytes() == 0:
            return
        self._seen.add(key)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)

        def release(key=key, size=size):
            self._seen.discard(key)
            self.live -= size

        weakref.finalize(t, release)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


_PROBES: dict[tuple[str, str, tuple[int, ...]], int] = {}
"""Probe results per (network class, config, grid): a network's activation footprint does not change."""


def probe_network_bytes(net: torch.nn.Module, shape: tuple[int, int, int]) -> int:
    """Peak bytes of tensors a no-grad forward pass allocates on a grid of `shape` (run once per config)."""
    config = getattr(net, "config", None)
    key = (type(net).__qualname__, repr(config.to_dict() if config is not None else None), tuple(shape))
    if key not in _PROBES:
        device = next(net.parameters()).device
        x = torch.zeros(1, 1, *shape, device=device)
        with torch.no_grad(), _LiveTensorBytes() as mode:
            net(x, x)
        _PROBES[key] = mode.peak
    return _PROBES[key]


def estimate_peak_bytes(net: torch.nn.Module, working_shape: tuple[int, int, int],
                        fixed_shape: tuple[int, int, int]) -> int:
    """Estimated peak bytes of a registration: network activations scaled from a probe, plus the export.

    The probe grid is two network multiples per axis; activations scale with the voxel count.
    """
    multiple = getattr(net, "multiple", 16)
    probe = (2 * multiple,) * 3
    network = probe_network_bytes(net, probe) * np.prod(working_shape) / np.prod(probe)
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    return int(network + params + BYTES_PER_FIXED_VOXEL * np.prod(fixed_shape))


def available_bytes(device: torch.device) -> int:
    """Free memory on `device`: CUDA's free memory, else the system's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def resolve_device(device: str) -> torch.device:
    """"auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:N" or "mps"; InputError if not available here."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} requested but this PyTorch build sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("device 'mps' requested but MPS is not available")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unsupported device {device!r}")
    return dev
