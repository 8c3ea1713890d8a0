"""Questions for PyTorch asked in a separate process, so that the Slicer GUI never imports it to answer them:
`python -m DeepRegistrationLib.frontends.probe devices` and `... memory REQUEST.json`.

Each prints one JSON object on standard output and exits 0, or prints {"error": "..."} and exits 1 (a PyTorch that is
installed but cannot be imported ends here, not in the GUI). Querying CUDA here keeps the GUI process free of a CUDA
context, which would otherwise hold device memory the registration worker then lacks.

  devices   {"torch": version, "numpy": version, "cuda": [{"index", "name", "free", "total"}], "mps": bool}
  memory    REQUEST.json holds {"options": RegistrationOptions.to_dict(), "shape": [I, J, K], "affine": 4×4} (the
            fixed volume's grid); prints {"bytes": estimated peak, "device": resolved device, "free": bytes or null}
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any


def devices() -> dict[str, Any]:
    """The PyTorch and NumPy versions, each CUDA device with its free and total memory, and whether MPS exists."""
    import numpy
    import torch

    cuda = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        cuda.append({"index": index, "name": torch.cuda.get_device_name(index), "free": int(free),
                     "total": int(total)})
    mps = bool(getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available())
    return {"torch": torch.__version__, "numpy": numpy.__version__, "cuda": cuda, "mps": mps}


def memory(request: dict[str, Any]) -> dict[str, Any]:
    """The estimated peak memory of a registration onto the given grid, and what its device has free."""
    import numpy as np

    from ..core.geometry import Grid
    from ..engine.options import RegistrationOptions
    from ..engine.resources import available_bytes, resolve_device
    from .job import estimate_memory

    options = RegistrationOptions.from_dict(request["options"])
    grid = Grid(tuple(request["shape"]), np.asarray(request["affine"], dtype=np.float64))
    need = estimate_memory(options, grid)
    device = resolve_device(options.device)
    free = available_bytes(device) if device.type in ("cpu", "cuda") else None
    return {"bytes": int(need), "device": str(device), "free": free}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv == ["devices"]:
            answer = devices()
        elif len(argv) == 2 and argv[0] == "memory":
            answer = memory(json.loads(Path(argv[1]).read_text()))
        else:
            print("usage: python -m DeepRegistrationLib.frontends.probe devices | memory REQUEST.json",
                  file=sys.stderr)
            return 2
    except Exception as exc:  # reported as JSON: the caller shows it, this process only answers
        traceback.print_exc()
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
