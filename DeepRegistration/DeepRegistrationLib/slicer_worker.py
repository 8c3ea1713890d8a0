"""The registration job of the Slicer module: run in-process, or in a subprocess so Slicer's GUI stays responsive.

The Slicer module writes a job to a temporary folder, starts

    PythonSlicer -m DeepRegistrationLib.slicer_worker FOLDER      (working directory: the module's folder)

and reads the result back. Nothing here imports Slicer, VTK or Qt.

Folder layout (all arrays [i, j, k], geometry a 4×4 ijk → RAS mm affine, docs/CONVENTIONS.md):
  job.json, job.npz        the request (images, label maps, landmarks, options)
  cancel                   created by the module to ask the job to stop (checked between stages)
  result.json, result.npz  the engine's RegistrationResult (written last, atomically)
  error.json               {"type", "message"} when the job failed
Standard output carries one JSON object per line: {"stage", "fraction"} for progress, {"log"} for messages.
Exit status: 0 done, 2 bad input, 3 not enough memory/device, 4 cancelled, 1 anything else.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import metrics as M
from .errors import Cancelled, InputError, ResourceError
from .geometry import Grid
from .image import Image

Progress = Callable[[str, float], None]

EXIT_CODES = {InputError: 2, ResourceError: 3, Cancelled: 4}


@dataclass
class RegistrationJob:
    """Everything one registration needs, in backend types (RAS mm, arrays [i, j, k]).

    `fixed_labels`/`moving_labels` lie on the grids of `fixed`/`moving` with matching label values;
    `fixed_points`/`moving_points` are matched rows of RAS mm landmarks; `mask` (on the fixed grid, nonzero inside)
    is the region where Jacobian statistics are also reported; it does not change what the network sees.
    """

    fixed: Image
    moving: Image
    method: str
    parameters: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    device: str = "auto"
    instance_optimization: int = 0
    seed: int = 0
    prealign: str = "none"
    fixed_modality: str = "mr"
    moving_modality: str = "mr"
    fixed_labels: Image | None = None
    moving_labels: Image | None = None
    fixed_points: np.ndarray | None = None
    moving_points: np.ndarray | None = None
    mask: Image | None = None


_OPTIONS = ("method", "parameters", "weights", "device", "instance_optimization", "seed", "prealign",
            "fixed_modality", "moving_modality")
_IMAGES = ("fixed", "moving", "fixed_labels", "moving_labels", "mask")
_POINTS = ("fixed_points", "moving_points")


def run_job(job: RegistrationJob, progress: Progress | None = None, cancel: Callable[[], bool] | None = None):
    """Run the engine on `job`; returns its `engine.RegistrationResult` (metrics extended by `mask_metrics`)."""
    if cancel is not None and cancel():
        raise Cancelled("registration cancelled before it started")
    from .engine import register  # torch is imported only when a registration runs

    result = register(job.fixed, job.moving, job.method, parameters=job.parameters or None, weights=job.weights,
                      device=job.device, instance_optimization=job.instance_optimization, seed=job.seed,
                      prealign=job.prealign, fixed_modality=job.fixed_modality,
                      moving_modality=job.moving_modality, fixed_labels=job.fixed_labels,
                      moving_labels=job.moving_labels, fixed_points=job.fixed_points,
                      moving_points=job.moving_points, progress=progress, cancel=cancel)
    if job.mask is not None:
        result.metrics["mask"] = mask_metrics(result.jacobian.data, job.mask)
    return result


def method_config(method: str, parameters: dict[str, Any] | None = None, weights: str | None = None):
    """The config a registration would use: the weights' JSON config (shipped model by default) with `parameters`
    applied; the method's paper defaults when no weights file exists yet."""
    from .models import read_metadata
    from .registry import get_method

    spec = get_method(method)
    path = Path(weights) if weights else spec.weights_path
    stored = read_metadata(path)["config"] if path.is_file() else {}
    try:
        return spec.config_class.from_dict({**stored, **(parameters or {})})
    except (TypeError, ValueError) as exc:
        raise InputError(f"parameters do not fit method {method!r} ({exc})") from exc


def estimate_memory(method: str, parameters: dict[str, Any] | None, weights: str | None, fixed_grid: Grid) -> int:
    """Estimated peak bytes of registering onto `fixed_grid` (network probe scaled to the working grid)."""
    from .engine import working_grid
    from .memory import estimate_peak_bytes
    from .registry import get_method

    config = method_config(method, parameters, weights)
    net = get_method(method).build(config).eval()
    grid = working_grid(fixed_grid, config.working_spacing, net.multiple)
    return estimate_peak_bytes(net, grid.shape, fixed_grid.shape)


def mask_metrics(det: np.ndarray, mask: Image) -> dict[str, float]:
    """Folding percentage, SDlogJ and det J range inside `mask` (same grid as `det`, nonzero = inside)."""
    if mask.data.shape != det.shape:
        raise InputError(f"{mask.source}: mask shape {mask.data.shape} differs from the fixed image {det.shape}")
    inside = mask.data != 0
    if not inside.any():
        raise InputError(f"{mask.source}: the mask is empty")
    stats = M.jacobian_stats(det, inside)
    return {"percent_nonpositive": stats["percent_nonpositive_mask"], "voxels": stats["voxels_mask"],
            "sdlogj": M.sdlogj(det, inside), "min": float(det[inside].min()), "max": float(det[inside].max())}


# ----------------------------------------------------------------------------------------------- files


def _put_image(arrays: dict[str, np.ndarray], name: str, image: Image) -> dict[str, str]:
    arrays[name] = np.ascontiguousarray(image.data)
    arrays[name + "__affine"] = image.grid.affine
    return {"source": image.source}


def _get_image(arrays, name: str, source: str) -> Image:
    data = arrays[name]
    return Image(data, Grid(data.shape, arrays[name + "__affine"]), source)


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
    meta: dict[str, Any] = {name: getattr(job, name) for name in _OPTIONS}
    meta["images"] = {name: _put_image(arrays, name, img) for name in _IMAGES
                      if (img := getattr(job, name)) is not None}
    for name in _POINTS:
        if getattr(job, name) is not None:
            arrays[name] = np.asarray(getattr(job, name), dtype=np.float64)
    _save(folder, "job", meta, arrays)
    return folder


def read_job(folder: str | os.PathLike) -> RegistrationJob:
    """The job written by `write_job`."""
    folder = Path(folder)
    meta = json.loads((folder / "job.json").read_text())
    with np.load(folder / "job.npz", allow_pickle=False) as arrays:
        images = {name: _get_image(arrays, name, info["source"]) for name, info in meta["images"].items()}
        points = {name: arrays[name] for name in _POINTS if name in arrays}
    return RegistrationJob(**{name: meta[name] for name in _OPTIONS}, **images, **points)


def write_result(result, folder: str | os.PathLike) -> None:
    """Write an `engine.RegistrationResult` into `folder` (result.npz, then result.json last)."""
    folder = Path(folder)
    arrays: dict[str, np.ndarray] = {}
    for name in ("field", "inverse"):
        displacement = getattr(result, name)
        arrays[name] = displacement.data
        arrays[name + "__affine"] = displacement.grid.affine
    images = {name: _put_image(arrays, name, img) for name in ("warped", "jacobian", "warped_labels")
              if (img := getattr(result, name)) is not None}
    segmentations = {name: _put_image(arrays, "segmentation__" + name, img)
                     for name, img in result.segmentations.items()}
    if result.affine_ras is not None:
        arrays["affine_ras"] = result.affine_ras
    arrays["working_grid__affine"] = result.working_grid.affine
    meta = {"method": result.method, "metrics": result.metrics, "model_sha256": result.model_sha256,
            "device": result.device, "working_shape": list(result.working_grid.shape), "images": images,
            "segmentations": segmentations}
    _save(folder, "result", meta, arrays)


def read_result(folder: str | os.PathLike):
    """The `engine.RegistrationResult` written by `write_result`."""
    from .engine import RegistrationResult
    from .field_io import DisplacementField

    folder = Path(folder)
    meta = json.loads((folder / "result.json").read_text())
    with np.load(folder / "result.npz", allow_pickle=False) as arrays:
        fields = {name: DisplacementField(arrays[name], Grid(arrays[name].shape[:3], arrays[name + "__affine"]))
                  for name in ("field", "inverse")}
        images = {name: _get_image(arrays, name, info["source"]) for name, info in meta["images"].items()}
        segmentations = {name: _get_image(arrays, "segmentation__" + name, info["source"])
                         for name, info in meta["segmentations"].items()}
        affine_ras = arrays["affine_ras"] if "affine_ras" in arrays else None
        working = Grid(tuple(meta["working_shape"]), arrays["working_grid__affine"])
    return RegistrationResult(meta["method"], fields["field"], fields["inverse"], affine_ras, images["warped"],
                              images["jacobian"], images.get("warped_labels"), meta["metrics"],
                              meta["model_sha256"], meta["device"], working, segmentations)


def read_error(folder: str | os.PathLike) -> tuple[str, str] | None:
    """(error type name, message) from a failed job's error.json, or None."""
    path = Path(folder) / "error.json"
    if not path.is_file():
        return None
    error = json.loads(path.read_text())
    return error["type"], error["message"]


# ------------------------------------------------------------------------------------------- subprocess


def _emit(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the job in the folder named by the only argument; see the module docstring for the protocol."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m DeepRegistrationLib.slicer_worker JOB_FOLDER", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    cancel_file = folder / "cancel"
    warnings.showwarning = lambda message, *args, **kwargs: _emit({"log": str(message)})
    try:
        job = read_job(folder)
        result = run_job(job, progress=lambda stage, fraction: _emit({"stage": stage, "fraction": fraction}),
                         cancel=cancel_file.exists)
        write_result(result, folder)
    except Exception as exc:  # reported to the module through error.json and the exit status
        code = next((c for kind, c in EXIT_CODES.items() if isinstance(exc, kind)), 1)
        message = str(exc) if code != 1 else f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        (folder / "error.json").write_text(json.dumps({"type": type(exc).__name__, "message": message}))
        _emit({"log": message})
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
