"""One method run in a fresh ('spawn') child process, so its wall time and peak memory are its own.

The parent passes a JSON job; the child limits threads before loading numpy/torch/ANTs/ITK, runs the method and
writes into the job's `out_dir`: `field.nii.gz` (ITK displacement, LPS, on the fixed grid; suite jobs) and
`result.json` (seconds, peak and baseline resident memory, start-up seconds, or the error).
Peak memory is the child's high-water resident set (VmHWM), which includes the interpreter and the libraries it
loaded; `baseline_mb` is the resident set just before the method started.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import set_threads

if TYPE_CHECKING:
    from .methods import Method


def _status_mb(key: str) -> float | None:
    """A memory line of /proc/self/status in MiB (Linux), or None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    """High-water resident set of this process in MiB (VmHWM; ru_maxrss where /proc is absent)."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def child_main(job_json: str) -> None:
    """Entry point of the child process (see the module docstring)."""
    job = json.loads(job_json)
    out = Path(job["out_dir"])
    start = time.perf_counter()
    set_threads(job["threads"])
    try:
        result = _run(job, out, start)
    except BaseException as exc:  # reported to the parent, which records the failure and continues
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    result["peak_mb"] = round(peak_rss_mb(), 1)
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")


def _run(job: dict[str, Any], out: Path, start: float) -> dict[str, Any]:
    import torch

    torch.set_num_threads(job["threads"])
    from .methods import Method

    method = Method(**job["method"])
    weights = _random_weights(method.settings["method"], out) if job.get("random_weights") else None
    try:
        return _timed(job, method, weights, out, start)
    finally:
        if weights is not None:
            Path(weights).unlink(missing_ok=True)
            Path(weights).with_suffix(".json").unlink(missing_ok=True)


def _timed(job: dict[str, Any], method: Method, weights: str | None, out: Path, start: float) -> dict[str, Any]:
    from DeepRegistrationLib.core.field import write_itk_displacement

    from .methods import full_pipeline, run_method

    if job["mode"] == "speed":
        _preload(method)
        startup = time.perf_counter() - start
        baseline = _status_mb("VmRSS")
        seconds, stages = full_pipeline(method, Path(job["pair_dir"]), job["threads"], job["device"], weights)
        return {"seconds": seconds, "stages": stages, "startup_s": startup, "baseline_mb": baseline}
    from .suite import load_pair

    pair = load_pair(job["pair_dir"])
    _preload(method)
    startup = time.perf_counter() - start
    baseline = _status_mb("VmRSS")
    field, seconds = run_method(method, pair.fixed, pair.moving, pair.spec.modalities, job["threads"],
                                job["device"], weights)
    write_itk_displacement(field, out / "field.nii.gz")
    return {"seconds": seconds, "startup_s": startup, "baseline_mb": baseline}


def _preload(method: Method) -> None:
    """Import the method's code and libraries before the clock starts (ITK's lazy loading alone takes seconds)."""
    tool = method.settings.get("tool")
    if method.kind == "network":
        import DeepRegistrationLib.frontends.cli  # noqa: F401
        import DeepRegistrationLib.engine.registration  # noqa: F401
        from DeepRegistrationLib.methods.registry import get_method

        spec = get_method(method.settings["method"])
        if spec.is_network:
            spec.network_class  # noqa: B018  (imports the network's module)
        import DeepRegistrationLib.engine.refine  # noqa: F401
    elif tool == "ants":
        import ants  # noqa: F401
    elif tool == "elastix":
        import itk

        itk.ParameterObject.New()
        itk.ElastixRegistrationMethod  # noqa: B018  (forces the lazy module load)
        itk.TransformixFilter  # noqa: B018


def _random_weights(name: str, out: Path) -> str:
    """Freshly initialised weights saved as a model file (for timing a network before it is trained)."""
    from DeepRegistrationLib.methods.models import save_model
    from DeepRegistrationLib.methods.registry import get_method

    path = out / f"{name}_random.safetensors"
    save_model(get_method(name).build(), name, path, {"note": "random initialisation, for timing only"})
    return str(path)


def run_job(job: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
    """Run `job` in a spawned child and return its result.json (with "error" on failure, crash or timeout)."""
    out = Path(job["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").unlink(missing_ok=True)
    process = multiprocessing.get_context("spawn").Process(target=child_main, args=(json.dumps(job),))
    process.start()
    process.join(timeout_s)
    if process.is_alive():
        process.terminate()
        process.join()
        return {"error": f"timed out after {timeout_s} s"}
    if not (out / "result.json").is_file():
        return {"error": f"worker exited with code {process.exitcode} without a result (out of memory?)"}
    return json.loads((out / "result.json").read_text())
