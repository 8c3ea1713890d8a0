"""The registration job: one request (inputs and options) in backend types, its files, and running it.

A job folder holds (arrays [i, j, k], geometry a 4×4 ijk → RAS mm affine, docs/CONVENTIONS.md):
  job.json, job.npz   the request: `RegistrationOptions` and the images, label maps, landmarks and mask
  cancel              created by the requester to ask the job to stop (checked between stages)
  result.json/.npz    the `RegistrationResult`: its stored outputs (`outputs.OUTPUTS`), result.json written last
  error.json          {"type", "message"} when the job failed
`frontends.worker` runs a job folder in its own process; `frontends.job_process` starts and watches that process.
Nothing here imports Slicer, VTK or Qt, and PyTorch only when a job runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..core.errors import Cancelled, InputError
from ..core.geometry import Grid
from ..core.image import Image
from ..engine.options import RegistrationOptions

Progress = Callable[[str, float], None]


@dataclass
class RegistrationJob:
    """Everything one registration needs, in backend types (RAS mm, arrays [i, j, k]).

    `fixed_labels`/`moving_labels` lie on the grids of `fixed`/`moving` with matching label values;
    `fixed_points`/`moving_points` are matched rows of RAS mm landmarks; `mask` (on the fixed grid, nonzero inside)
    is the region where Jacobian statistics are also reported; it does not change what the network sees.
    """

    fixed: Image
    moving: Image
    options: RegistrationOptions = field(default_factory=RegistrationOptions)
    fixed_labels: Image | None = None
    moving_labels: Image | None = None
    fixed_points: np.ndarray | None = None
    moving_points: np.ndarray | None = None
    mask: Image | None = None


_IMAGES = ("fixed", "moving", "fixed_labels", "moving_labels", "mask")
_POINTS = ("fixed_points", "moving_points")


def run_job(job: RegistrationJob, progress: Progress | None = None, cancel: Callable[[], bool] | None = None):
    """Run the engine on `job`; returns its `engine.results.RegistrationResult`."""
    if cancel is not None and cancel():
        raise Cancelled("registration cancelled before it started")
    from ..engine.registration import register  # torch is imported only when a registration runs

    return register(job.fixed, job.moving, job.options, fixed_labels=job.fixed_labels,
                    moving_labels=job.moving_labels, fixed_points=job.fixed_points,
                    moving_points=job.moving_points, mask=job.mask, progress=progress, cancel=cancel)


def method_config(method: str, parameters: dict[str, Any] | None = None, weights: str | None = None):
    """The config a registration would use: the weights' JSON config (shipped model by default) with `parameters`
    applied; the method's paper defaults when no weights file exists yet."""
    from ..methods.models import read_metadata
    from ..methods.registry import get_method

    spec = get_method(method)
    path = Path(weights) if weights else spec.weights_path
    stored = read_metadata(path)["config"] if path.is_file() else {}
    try:
        return spec.config_class.from_dict({**stored, **(parameters or {})})
    except (TypeError, ValueError) as exc:
        raise InputError(f"parameters do not fit method {method!r} ({exc})") from exc


def estimate_memory(options: RegistrationOptions, fixed_grid: Grid) -> int:
    """Estimated peak bytes of registering onto `fixed_grid` (network probe scaled to the working grid)."""
    from ..engine.registration import working_grid
    from ..engine.resources import estimate_peak_bytes
    from ..methods.registry import get_method

    config = method_config(options.method, options.parameters, options.weights)
    net = get_method(options.method).build(config).eval()
    grid = working_grid(fixed_grid, config.working_spacing, net.multiple)
    return estimate_peak_bytes(net, grid.shape, fixed_grid.shape)


# ----------------------------------------------------------------------------------------------- files


def _save(folder: Path, stem: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write `stem`.npz then `stem`.json, each through a temporary name, so a reader never sees half a file."""
    tmp = folder / f".{stem}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, folder / f"{stem}.npz")
    tmp = folder / f".{stem}.tmp.json"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / f"{stem}.json")


def write_job(job: RegistrationJob, folder: str | os.PathLike) -> Path:
    """Write `job` into `folder` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    sources = {}
    for name in _IMAGES:
        image = getattr(job, name)
        if image is not None:
            arrays[name] = np.ascontiguousarray(image.data)
            arrays[name + "__affine"] = image.grid.affine
            sources[name] = image.source
    for name in _POINTS:
        if getattr(job, name) is not None:
            arrays[name] = np.asarray(getattr(job, name), dtype=np.float64)
    _save(folder, "job", {"options": job.options.to_dict(), "images": sources}, arrays)
    return folder


def read_job(folder: str | os.PathLike) -> RegistrationJob:
    """The job written by `write_job`."""
    folder = Path(folder)
    meta = json.loads((folder / "job.json").read_text())
    with np.load(folder / "job.npz", allow_pickle=False) as arrays:
        images = {name: Image(arrays[name], Grid(arrays[name].shape, arrays[name + "__affine"]), source)
                  for name, source in meta["images"].items()}
        points = {name: arrays[name] for name in _POINTS if name in arrays}
    return RegistrationJob(options=RegistrationOptions.from_dict(meta["options"]), **images, **points)


def write_result(result, folder: str | os.PathLike) -> None:
    """Write a `RegistrationResult` into `folder`: every stored output of `outputs.OUTPUTS` (exact arrays in
    result.npz, the metrics in result.json, written last)."""
    from ..core.field import DisplacementField
    from .outputs import OUTPUTS, strict_json

    arrays: dict[str, np.ndarray] = {}
    kinds: dict[str, Any] = {}
    for spec in OUTPUTS:
        value = getattr(result, spec.attr) if spec.attr else None
        if value is None or spec.attr == "metrics":
            continue
        if isinstance(value, (Image, DisplacementField)):
            arrays[spec.attr], arrays[spec.attr + "__affine"] = np.ascontiguousarray(value.data), value.grid.affine
            kinds[spec.attr] = ["image", value.source] if isinstance(value, Image) else ["field", None]
        else:
            arrays[spec.attr], kinds[spec.attr] = np.asarray(value), ["array", None]
    _save(Path(folder), "result", {"outputs": kinds, "metrics": strict_json(result.metrics.to_json())}, arrays)


def has_result(folder: str | os.PathLike) -> bool:
    """True once `write_result` has put the result in place."""
    return (Path(folder) / "result.json").is_file()


def read_result(folder: str | os.PathLike):
    """The `RegistrationResult` written by `write_result`."""
    from ..core.field import DisplacementField
    from ..engine.results import Metrics, RegistrationResult
    from .outputs import OUTPUTS

    folder = Path(folder)
    meta = json.loads((folder / "result.json").read_text())
    values: dict[str, Any] = {spec.attr: None for spec in OUTPUTS if spec.attr}
    with np.load(folder / "result.npz", allow_pickle=False) as arrays:
        for name, (kind, source) in meta["outputs"].items():
            data = arrays[name]
            if kind == "array":
                values[name] = data
                continue
            grid = Grid(data.shape[:3], arrays[name + "__affine"])
            values[name] = Image(data, grid, source) if kind == "image" else DisplacementField(data, grid)
    values["metrics"] = Metrics.from_json(meta["metrics"])
    return RegistrationResult(**values)


def write_error(folder: str | os.PathLike, kind: str, message: str) -> None:
    """error.json of a failed job."""
    (Path(folder) / "error.json").write_text(json.dumps({"type": kind, "message": message}))


def read_error(folder: str | os.PathLike) -> tuple[str, str] | None:
    """(error type name, message) from a failed job's error.json, or None."""
    path = Path(folder) / "error.json"
    if not path.is_file():
        return None
    error = json.loads(path.read_text())
    return error["type"], error["message"]
