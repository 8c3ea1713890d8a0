"""Run the suite: every selected pair × every applicable method, each method run in its own child process, then
scored in this process with `scoring.score`. Writes into the output directory:

- `results.jsonl`: one record per (pair, method) as it finishes (a rerun with `resume` skips finished ones);
- `results.csv`: the summary row of each record; `structures.csv`: Dice, HD95, ASSD per structure;
- `summary.md`: the tables (per pair kind, on each network's held-out pairs, each candidate model against the
  shipped one it would replace on the candidate's held-out pairs, and per pair) and the machine;
  `dice_<label set>.png` box plots;
- `run.json`: manifest, methods with their settings, machine, threads, library versions, and per network the pairs
  whose anatomy it never saw (`held_out`, benchmark/heldout.py).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.core.field import read_itk_displacement
from DeepRegistrationLib.methods.registry import OPTIMISE

from .heldout import held_out_pairs
from .methods import CANDIDATE, HALF_STEPS, REFINE_SEEDS, SEEDED, Method, available_methods, shipped_name
from .plots import structure_boxplots
from .scoring import score
from .suite import ANATOMY_DIR, CACHE_DIR, Manifest, load_pair, materialise
from .records import OUTPUT_DIR, json_default, machine_info
from .worker import run_job

COLUMNS = ("pair", "kind", "label_set", "method", "held_out", "dice", "dice_before", "hd95", "assd", "folding_pct",
           "folding_pct_grid", "sdlogj", "tre_mm", "tre_before_mm", "epe_mm", "epe_p95_mm", "ncc", "mi",
           "landmarks", "seconds", "peak_mb", "baseline_mb", "startup_s", "error")
STRUCTURE_COLUMNS = ("pair", "kind", "label_set", "method", "structure", "label", "dice", "hd95", "assd")
KIND_TITLES = {"cross_subject": "Cross-subject (real pairs)", "known_warp": "Known warp (real anatomy)",
               "multimodal": "Multimodal known warp", "head_ct": "Whole-head CT–T1 known warp"}


def _finished(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["pair"], r["method"]): r for r in records if not r.get("error")}


def run_suite(manifest: Manifest, pair_names: list[str] | None = None, method_names: list[str] | None = None,
              out_dir: Path = OUTPUT_DIR, threads: int = 2, resolution_mm: float | None = None,
              device: str = "cpu", timeout_s: float | None = None, resume: bool = False,
              anatomy_dir: Path = ANATOMY_DIR, cache_dir: Path = CACHE_DIR,
              log: Callable[[str], None] = print, candidates: dict[str, Path] | None = None) -> list[dict[str, Any]]:
    """Materialise, run, score and write every output (see the module docstring); returns the records.
    `candidates`: network → weights file of a model to compare with the shipped one (`benchmark.methods`)."""
    from . import set_threads
    import torch

    set_threads(threads)
    torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = manifest.select(pair_names)
    methods = available_methods(manifest, method_names, candidates)
    info = {"manifest": str(manifest.path), "suite": manifest.raw.get("suite"), "version": manifest.version,
            "resolution_mm": float(resolution_mm or manifest.resolution_mm), "pairs": [s.id for s in specs],
            "methods": [m.to_dict() for m in methods], "device": device, "machine": machine_info(threads),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "held_out": held_out_pairs(manifest, specs, methods, anatomy_dir)}
    log(f"{len(specs)} pairs x {len(methods)} methods ({', '.join(m.name for m in methods)}), "
        f"{threads} threads, {info['resolution_mm']:g} mm")
    jsonl = out_dir / "results.jsonl"
    done = _finished(jsonl) if resume else {}
    if resume and (out_dir / "run.json").is_file():
        previous = json.loads((out_dir / "run.json").read_text())
        _check_same_methods(previous.get("methods", []), methods, out_dir)
        info["resumed"] = [*previous.get("resumed", []), info["started"]]
        info["started"], info["machine"]["load_average"] = previous["started"], previous["machine"]["load_average"]
    if not resume:
        jsonl.write_text("")
    records = []
    for spec in specs:
        directory = materialise(manifest, spec, resolution_mm, anatomy_dir, cache_dir)
        pair = load_pair(directory)
        for method in methods:
            if not method.applies_to(spec):
                continue
            # identity, classical tools and `optimise` learn nothing (no entry in held_out): every pair is held out
            held = method.name not in info["held_out"] or spec.id in info["held_out"][method.name]
            if (spec.id, method.name) in done:
                records.append({**done[(spec.id, method.name)], "held_out": held})
                continue
            record = {**_run_one(pair, method, out_dir, threads, device, timeout_s), "held_out": held}
            records.append(record)
            with open(jsonl, "a") as f:
                f.write(json.dumps(record, default=json_default) + "\n")
            log(_progress_line(record))
    info["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    info["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    write_outputs(records, info, out_dir)
    return records


def _check_same_methods(previous: list[dict[str, Any]], methods: list[Method], out_dir: Path) -> None:
    """A resumed run keeps records by method name: refuse a name whose settings (a candidate's model file and its
    sha256, a tool's parameters) differ from those the records were made with."""
    before = {m["name"]: m.get("settings", {}) for m in previous}
    changed = [m.name for m in methods if m.name in before and before[m.name] != json.loads(
        json.dumps(m.settings, default=json_default))]
    if changed:
        raise InputError(f"{out_dir}: cannot resume: {', '.join(changed)} ran with other settings (another model "
                         "file?) in the records there; use a new --out")


def rewrite_outputs(out_dir: Path) -> list[dict[str, Any]]:
    """Rebuild the CSVs, summary.md and plots of a run directory from its run.json and results.jsonl."""
    out_dir = Path(out_dir)
    for name in ("run.json", "results.jsonl"):
        if not (out_dir / name).is_file():
            raise InputError(f"{out_dir / name}: missing; is {out_dir} the --out of a benchmark run?")
    info = json.loads((out_dir / "run.json").read_text())
    records = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines() if line.strip()]
    write_outputs(records, info, out_dir)
    return records


def _run_one(pair, method: Method, out_dir: Path, threads: int, device: str,
             timeout_s: float | None) -> dict[str, Any]:
    spec = pair.spec
    work = out_dir / "work" / spec.id / method.name
    job = {"mode": "suite", "method": method.to_dict(), "pair_dir": str(pair.directory), "out_dir": str(work),
           "threads": threads, "device": device}
    result = run_job(job, timeout_s)
    record: dict[str, Any] = {"pair": spec.id, "kind": spec.kind, "label_set": spec.label_set,
                              "method": method.name, "error": result.get("error", "")}
    for key in ("seconds", "peak_mb", "baseline_mb", "startup_s"):
        record[key] = result.get(key, float("nan"))
    if not record["error"]:
        row, structures = score(pair, read_itk_displacement(work / "field.nii.gz"))
        record.update(row)
        record["structures"] = structures
        (work / "field.nii.gz").unlink()
    return record


def _progress_line(r: dict[str, Any]) -> str:
    if r["error"]:
        return f"  {r['pair']:<24} {r['method']:<12} FAILED: {r['error']}"
    return (f"  {r['pair']:<24} {r['method']:<12} Dice {r['dice']:.3f} (before {r['dice_before']:.3f})  "
            f"TRE {r['tre_mm']:.2f}  EPE {r['epe_mm']:.2f}  fold {r['folding_pct']:.3f}%  "
            f"{r['seconds']:.1f} s  {r['peak_mb']:.0f} MB")


# ---------------------------------------------------------------------------------------------------- outputs


def write_outputs(records: list[dict[str, Any]], info: dict[str, Any], out_dir: Path) -> None:
    """results.csv, structures.csv, summary.md, box plots and run.json from the records."""
    out_dir = Path(out_dir)
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    with open(out_dir / "structures.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, STRUCTURE_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            for s in r.get("structures", []):
                writer.writerow({**{k: r[k] for k in ("pair", "kind", "label_set", "method")}, **s})
    plots = structure_boxplots(records, out_dir, "dice")
    info["plots"] = [p.name for p in plots]
    (out_dir / "run.json").write_text(json.dumps(info, indent=1, default=json_default) + "\n")
    (out_dir / "summary.md").write_text(summary_markdown(records, info))


def _fmt(values: list[float], digits: int) -> str:
    finite = [v for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return "–"
    mean = float(np.mean(finite))
    if len(finite) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {float(np.std(finite)):.{digits}f}"


TABLE = (("Dice", "dice", 3), ("HD95 mm", "hd95", 2), ("ASSD mm", "assd", 2), ("% det J ≤ 0", "folding_pct", 3),
         ("SDlogJ", "sdlogj", 3), ("TRE mm", "tre_mm", 2), ("EPE mm", "epe_mm", 2), ("time s", "seconds", 1),
         ("peak MB", "peak_mb", 0))


def summary_markdown(records: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """Per-kind table (mean ± sd over pairs) and per-pair table, plus failures and the machine."""
    ok = [r for r in records if not r["error"]]
    methods = list(dict.fromkeys(r["method"] for r in records))
    head = "| method | pairs | " + " | ".join(t[0] for t in TABLE) + " |"
    rule = "|---|---|" + "---|" * len(TABLE)
    lines = []
    for kind, title in KIND_TITLES.items():
        group = [r for r in ok if r["kind"] == kind]
        if not group:
            continue
        lines += [f"### {title}", "", head, rule]
        for method in methods:
            rows = [r for r in group if r["method"] == method]
            if rows:
                lines.append(f"| {method} | {len(rows)} | " + " | ".join(_fmt([r[k] for r in rows], d)
                                                                           for _, k, d in TABLE) + " |")
        lines.append("")
    lines += held_out_markdown(ok, info, methods, head, rule)
    lines += candidates_markdown(ok, info, methods)
    lines += seed_markdown(ok, info, methods)
    lines += ["### Per pair", "", "| pair | method | " + " | ".join(t[0] for t in TABLE) + " |",
              "|---|---|" + "---|" * len(TABLE)]
    for r in ok:
        lines.append(f"| {r['pair']} | {r['method']} | " + " | ".join(_fmt([r[k]], d) for _, k, d in TABLE) + " |")
    failed = [r for r in records if r["error"]]
    if failed:
        lines += ["", "### Failed runs", ""] + [f"- {r['pair']} / {r['method']}: {r['error']}" for r in failed]
    m = info["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads per method, load average "
              f"{_load(m.get('load_average'))} at start and {_load(m.get('load_average_end'))} at the end; "
              f"{info['resolution_mm']:g} mm grid; versions {', '.join(f'{k} {v}' for k, v in m['versions'].items())}; "
              f"{info['started']} – {info.get('finished', '?')}"
              + (f" (resumed {', '.join(info['resumed'])})" if info.get("resumed") else "") + ".", ""]
    return "\n".join(lines)


def held_out_markdown(ok: list[dict[str, Any]], info: dict[str, Any], methods: list[str], head: str,
                      rule: str) -> list[str]:
    """The held-out tables: for every set of pairs that is some networks' held-out set, those networks and the
    untrained methods (identity, classical) on exactly those pairs, per pair kind."""
    held = info.get("held_out")
    if held is None:
        return []
    lines = ["### Held-out anatomy", ""]
    networks = [m for m in methods if m in held]
    if not any(held.get(m) for m in networks):
        return lines + ["No network has a held-out pair: every model's training record shares a file hash with "
                        "the anatomy of every pair (" + ", ".join(networks) + ").", ""]
    groups: dict[tuple[str, ...], list[str]] = {}
    for m in networks:
        if held.get(m):
            groups.setdefault(tuple(held[m]), []).append(m)
    untrained = [m for m in methods if m not in held]
    lines.append("Networks with no held-out pair: " + (", ".join(m for m in networks if not held.get(m)) or "none")
                 + ".")
    lines.append("")
    for pairs, members in groups.items():
        lines += [f"Pairs whose anatomy {', '.join(members)} never saw: {', '.join(pairs)}.", ""]
        for kind, title in KIND_TITLES.items():
            rows_of = {m: [r for r in ok if r["method"] == m and r["pair"] in pairs and r["kind"] == kind]
                       for m in untrained + members}
            if not any(rows_of.values()):
                continue
            lines += [f"#### {title}, held out ({', '.join(members)})", "", head, rule]
            for m, rows in rows_of.items():
                if rows:
                    lines.append(f"| {m} | {len(rows)} | " + " | ".join(_fmt([r[k] for r in rows], d)
                                                                       for _, k, d in TABLE) + " |")
            lines.append("")
    return lines


def candidates_markdown(ok: list[dict[str, Any]], info: dict[str, Any], methods: list[str]) -> list[str]:
    """Each candidate model against the shipped model it would replace, same preset, on the pairs held out for the
    candidate on which both ran: mean Dice of each, and whether the candidate beats it (the shipping rule; a
    `@balanced` row over the refinement seeds that were run, `_seed_means`; a `fast` row against a shipped model
    that trained on those pairs' anatomy, `_against_memory`)."""
    candidates = [m for m in methods if CANDIDATE in m and SEEDED not in m]
    if not candidates:
        return []
    held = info.get("held_out") or {}
    lines = ["### Candidate models against the shipped ones (held-out pairs of the candidate)", "",
             "| candidate | shipped | pairs | candidate Dice | shipped Dice | Δ | identity Dice | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    dice = {(r["pair"], r["method"]): r["dice"] for r in ok}
    for name in candidates:
        shipped = shipped_name(name)
        pairs, new, old, before = _held_out_means(dice, held.get(name, []), name, shipped, "identity")
        if not pairs:
            lines.append(f"| {name} | {shipped} | 0 | – | – | – | – | no held-out pair on which both ran |")
            continue
        news, olds = _seed_means(dice, pairs, name, shipped) if name.endswith("@balanced") else ([], [])
        saw = CANDIDATE + "@" not in name and not set(pairs) <= set(held.get(shipped, []))  # fast, shipped saw them
        verdict = _against_memory(new, old, before) if saw else "beats" if new > old else "does not beat"
        if news:  # the @balanced row over seeds 0 (the preset's own), then the seeds both ran
            news, olds = [new, *news], [old, *olds]
            new, old, spread = float(np.mean(news)), float(np.mean(olds)), float(np.std(olds, ddof=1))
            verdict = "beats" if new > old else "tie" if new >= old - spread else "does not beat"
            verdict += f" (Δ {new - old:+.4f}, seed spread {spread:.4f}, {len(olds)} seeds)"
        lines.append(f"| {name} | {shipped} | {len(pairs)} | {new:.3f} | {old:.3f} | {new - old:+.3f} | "
                     f"{_mean_or_dash(before)} | {verdict} |")
    return lines + [""]


ABOVE_IDENTITY = 0.03
"""Issue 17's target for every network with `fast`: mean Dice at least this above the identity's."""


def _against_memory(new: float, old: float, identity: float | None) -> str:
    """The `fast` verdict where the shipped model trained on the anatomy of the candidate's held-out pairs: its Dice
    there is memory, not a held-out row, so a candidate that does not beat it replaces it when it meets the
    `ABOVE_IDENTITY` target on anatomy it never saw."""
    if new > old:
        return "beats (the shipped model trained on this anatomy)"
    why = "the shipped model trained on this anatomy, so it has no held-out row"
    if identity is None:
        return f"does not beat: {why}; run identity to judge the candidate by identity + {ABOVE_IDENTITY:g}"
    meets = new >= identity + ABOVE_IDENTITY
    return (f"{'replaces' if meets else 'does not beat'}: {why}; the candidate {'meets' if meets else 'misses'} "
            f"identity + {ABOVE_IDENTITY:g}")


def _seed_means(dice: dict[tuple[str, str], float], pairs: list[str], name: str, shipped: str
                ) -> tuple[list[float], list[float]]:
    """Mean Dice over `pairs` of the `@balanced` candidate `name` and of `shipped` for each refinement seed of
    `REFINE_SEEDS` (`SEEDED` methods) that both ran on all of them. The candidate table calls a candidate below by
    less than the standard deviation of the shipped model's per-seed means a tie."""
    news, olds = [], []
    for k in REFINE_SEEDS:
        a, b = f"{name}-seed{k}", f"{shipped}-seed{k}"
        if all((p, a) in dice and (p, b) in dice for p in pairs):
            news.append(float(np.mean([dice[(p, a)] for p in pairs])))
            olds.append(float(np.mean([dice[(p, b)] for p in pairs])))
    return news, olds


def _held_out_means(dice: dict[tuple[str, str], float], held: list[str], name: str, other: str, beside: str
                    ) -> tuple[list[str], float, float, float | None]:
    """The held-out pairs on which `name` and `other` both ran, their mean Dice there, and `beside`'s mean (None
    unless it ran on every one of those pairs)."""
    pairs = [p for p in held if (p, name) in dice and (p, other) in dice]
    if not pairs:
        return [], math.nan, math.nan, None
    first, second = (float(np.mean([dice[(p, m)] for p in pairs])) for m in (name, other))
    extra = [dice[(p, beside)] for p in pairs if (p, beside) in dice]
    return pairs, first, second, float(np.mean(extra)) if len(extra) == len(pairs) else None


def _mean_or_dash(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


SAME_DICE = 0.005
"""Mean Dice within this of `optimise@balanced`'s counts as the same final accuracy (`seed_markdown`)."""


def seed_markdown(ok: list[dict[str, Any]], info: dict[str, Any], methods: list[str]) -> list[str]:
    """Each network as the refinement's seed: `NAME@balanced-half` (half the deformable steps) against
    `optimise@balanced` (all of them, from the identity) on the network's held-out pairs on which both ran, with
    `optimise@balanced-half` beside it; the verdict: the same final accuracy (within `SAME_DICE`) or not."""
    reference, alone = f"{OPTIMISE}@balanced", f"{OPTIMISE}@{HALF_STEPS}"
    seeds = [m for m in methods if m.endswith(f"@{HALF_STEPS}") and m != alone]
    if not seeds:
        return []
    held = info.get("held_out") or {}
    dice = {(r["pair"], r["method"]): r["dice"] for r in ok}
    lines = ["### Networks as the refinement's seed: half the steps against all of them from the identity "
             "(held-out pairs of the network)", "",
             f"| seeded, half the steps | pairs | its Dice | {reference} | Δ | {alone} | verdict |",
             "|---|---|---|---|---|---|---|"]
    for name in seeds:
        pairs, seeded, full, identity_half = _held_out_means(dice, held.get(name, []), name, reference, alone)
        if not pairs:
            lines.append(f"| {name} | 0 | – | – | – | – | no held-out pair on which both ran |")
            continue
        verdict = "below"
        if seeded >= full - SAME_DICE:
            verdict = "same accuracy, half the steps"
            if identity_half is not None and identity_half >= full - SAME_DICE:
                verdict += " (so does the identity: these pairs do not tell)"
        lines.append(f"| {name} | {len(pairs)} | {seeded:.3f} | {full:.3f} | {seeded - full:+.3f} | "
                     f"{_mean_or_dash(identity_half)} | {verdict} |")
    return lines + [""]


def _load(values: list[float] | None) -> str:
    return "/".join(f"{v:.1f}" for v in values) if values else "?"
