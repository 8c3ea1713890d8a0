"""Speed and memory at 1 mm: the full pipeline of each method vs ANTs SyN, in one run on one machine.

The pair is the manifest's `speed` pair (ICBM152 and a known warp of it) materialised at `resolution_mm` (1 mm:
192×224×192 voxels). For every method, in its own child process, the clock runs from reading the two NIfTI files
to the last output written into a temporary directory:
- networks: `read_image` ×2 → `engine.register` (resampling to the working grid, network, field and inverse on
  the fixed grid, Jacobian and metrics) → the command line's `write_outputs` (warped image, both ITK fields,
  Jacobian, folding mask, metrics.json);
- ANTs SyN (the manifest's `ants_syn`): `read_image` ×2 → `classical.ants_register` → warped image via
  `apply_field` and the ITK field written, in the networks' file formats.
Ratios are SyN time / method time. Peak memory is each child's high-water resident set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.methods.registry import network_names

from .methods import Method, available_methods, network_method
from .records import OUTPUT_DIR, machine_info
from .suite import ANATOMY_DIR, CACHE_DIR, Manifest, materialise
from .worker import run_job

REFERENCE = "ants_syn"


def speed_methods(manifest: Manifest, names: list[str] | None, random_weights: bool) -> list[Method]:
    """The networks to time (shipped weights; with `random_weights` every registry network), then ANTs SyN."""
    if random_weights:
        networks = [network_method(n) for n in network_names()]
    else:
        networks = [m for m in available_methods(manifest) if m.kind == "network"]  # every preset, optimise
    if names:
        unknown = sorted(set(names) - {m.name for m in networks})
        if unknown:
            raise InputError(f"cannot time {unknown}: not a network with shipped weights (use --random-weights to "
                             f"time an untrained architecture); available: {[m.name for m in networks]}")
        networks = [m for m in networks if m.name in names]
    return networks + [m for m in available_methods(manifest) if m.name == REFERENCE]


def run_speed(manifest: Manifest, method_names: list[str] | None = None, threads: int = 2,
              resolution_mm: float | None = None, device: str = "cpu", random_weights: bool = False,
              out_dir: Path = OUTPUT_DIR / "speed", anatomy_dir: Path = ANATOMY_DIR, cache_dir: Path = CACHE_DIR,
              timeout_s: float | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time every method on the speed pair; print and write `speed.json` and `speed.md` into `out_dir`."""
    speed = manifest.raw["speed"]
    resolution = float(resolution_mm or speed["resolution_mm"])
    spec = manifest.pairs[speed["pair"]]
    pair_dir = materialise(manifest, spec, resolution, anatomy_dir, cache_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = json.loads((pair_dir / "pair.json").read_text())["record"]["grid"]["shape"]
    log(f"speed pair {spec.id} at {resolution:g} mm ({'x'.join(map(str, grid))}), {threads} threads, {device}")
    rows = []
    for method in speed_methods(manifest, method_names, random_weights):
        job = {"mode": "speed", "method": method.to_dict(), "pair_dir": str(pair_dir), "threads": threads,
               "device": device, "out_dir": str(out_dir / "work" / method.name),
               "random_weights": random_weights and method.kind == "network"}
        result = run_job(job, timeout_s)
        rows.append({"method": method.name, **result})
        log(f"  {method.name:<12} " + (f"FAILED: {result['error']}" if result.get("error") else
                                       f"{result['seconds']:.1f} s, peak {result['peak_mb']:.0f} MB"))
    reference = next((r for r in rows if r["method"] == REFERENCE and not r.get("error")), None)
    for r in rows:
        if reference is not None and not r.get("error"):
            r["syn_ratio"] = reference["seconds"] / r["seconds"]
    report = {"pair": spec.id, "resolution_mm": resolution, "grid": grid, "device": device,
              "random_weights": random_weights, "machine": machine_info(threads), "rows": rows}
    (out_dir / "speed.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "speed.md").write_text(speed_markdown(report))
    log(speed_markdown(report))
    return report


def speed_markdown(report: dict[str, Any]) -> str:
    lines = ["| method | time s | SyN time / method time | peak MB | where the time goes (s) |",
             "|---|---|---|---|---|"]
    for r in report["rows"]:
        if r.get("error"):
            lines.append(f"| {r['method']} | failed: {r['error'].splitlines()[0][:80]} | | | |")
            continue
        ratio = f"{r['syn_ratio']:.1f}×" if "syn_ratio" in r else "–"
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r.get("stages", {}).items())
        lines.append(f"| {r['method']} | {r['seconds']:.1f} | {ratio} | {r['peak_mb']:.0f} | {stages} |")
    m = report["machine"]
    lines += ["", f"{report['pair']} at {report['resolution_mm']:g} mm ({'x'.join(map(str, report['grid']))}), "
              f"{report['device']}, {m['threads']} threads, {m['cpu']} ({m['cores']} cores), load average "
              f"{'/'.join(f'{v:.1f}' for v in m['load_average'] or [])}"
              + ("; networks with random weights (timing only)" if report["random_weights"] else ""), ""]
    return "\n".join(lines)
