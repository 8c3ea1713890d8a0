"""Tune `DeepRegistrationLib.engine.refine` on TRAINING pairs only (docs/REFINEMENT.md).

The pairs are built by the benchmark suite's own generator (`benchmark.suite.materialise`) with seeds
9001+ that the suite (seeds 101–612) does not use, from ICBM152 and fsaverage only (Colin27 is held out, and the
cross-subject ICBM152 ↔ fsaverage pair is a benchmark pair, so no cross-subject pair is used):
known warps with an affine part (6–10 mm), multimodal T1–CT and T1–T2 known warps, whole-head CT–T1 known warps
of fsaverage with its skull (CT fixed or moving, `FSAVERAGE_HEAD`), and large misalignments
(a known warp whose moving image is moved by a rigid 20–40 mm / 10–20° transform, by changing its grid only).

Each (pair, configuration) runs `optimise_affine` then `optimise_svf` from the identity, as `engine.register` would
without a network; the velocity is integrated on the working grid with `int_steps` (as the caller does), composed
with the affine and scored on the fixed grid: mean Dice of the warped moving labels, % det J ≤ 0 and SDlogJ in the
fixed brain mask, refinement seconds (2 threads by default). Results go to `<out>/results.jsonl` (appended) and a
markdown table is printed.

    PYTHONPATH=DeepRegistration:. python scripts/tune_refinement.py --anatomy data/anatomy \
        --configs balanced accurate --pairs all
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from DeepRegistrationLib.core import metrics as M
from DeepRegistrationLib.core.field import DisplacementField, apply_field
from DeepRegistrationLib.core.geometry import Grid
from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.core.resample import index_map, normalize_intensity, resample_image
from DeepRegistrationLib.core.warp import integrate_velocity
from DeepRegistrationLib.engine import refine
from DeepRegistrationLib.engine.refine_settings import PRESETS, RefineSettings

from benchmark import suite

ROOT = Path(__file__).resolve().parents[1]

PAIRS = {
    "kw_icbm_9001": dict(kind="known_warp", subject="icbm152_2009a", label_set="tissue", seed=9001,
                         magnitude_mm=8.0, affine=True, boundary_landmarks=4),
    "kw_icbm_9002": dict(kind="known_warp", subject="icbm152_2009a", label_set="tissue", seed=9002,
                         magnitude_mm=10.0, affine=True, boundary_landmarks=4),
    "kw_fsav_9003": dict(kind="known_warp", subject="fsaverage", label_set="subcortical", seed=9003,
                         magnitude_mm=6.0, affine=True, boundary_landmarks=4),
    "kw_fsav_9004": dict(kind="known_warp", subject="fsaverage", label_set="subcortical", seed=9004,
                         magnitude_mm=10.0, affine=True, boundary_landmarks=4),
    "mm_ct_9101": dict(kind="multimodal", subject="icbm152_2009a", label_set="tissue", seed=9101,
                       magnitude_mm=8.0, affine=True, moving_contrast="ct", boundary_landmarks=4),
    "mm_t2_9201": dict(kind="multimodal", subject="icbm152_2009a", label_set="tissue", seed=9201,
                       magnitude_mm=8.0, affine=True, moving_contrast="t2", boundary_landmarks=4),
    "mm_ct_9102": dict(kind="multimodal", subject="icbm152_2009a", label_set="tissue", seed=9102,
                       magnitude_mm=6.0, affine=True, moving_contrast="ct", boundary_landmarks=4),
    "mm_t2_9202": dict(kind="multimodal", subject="icbm152_2009a", label_set="tissue", seed=9202,
                       magnitude_mm=6.0, affine=True, moving_contrast="t2", boundary_landmarks=4),
    **{f"hct_fsav_{seed}": dict(kind="head_ct", subject="fsaverage_head", label_set="tissue", ct_role=role,
                                seed=seed, magnitude_mm=peak, affine=affine, boundary_landmarks=10)
       for seed, role, peak, affine in ((9401, "fixed", 8.0, False), (9402, "fixed", 8.0, True),
                                        (9411, "moving", 8.0, False), (9412, "moving", 8.0, True),
                                        (9403, "fixed", 10.0, False), (9404, "fixed", 10.0, True),
                                        (9413, "moving", 10.0, False), (9414, "moving", 10.0, True))},
}
"""Training pairs: `suite.PairSpec` fields (seeds 9001+, never the suite's 101–612; no Colin27)."""

FSAVERAGE_HEAD = {"image": "fsaverage/brain.nii.gz", "labels": "fsaverage/aseg.nii.gz",
                  "head_image": "fsaverage/T1.nii.gz", "tissue_from_intensity": True,
                  "structures": {"csf": [1], "gray_matter": [2], "white_matter": [3]}}
"""fsaverage with its skull (the subject `macjnet_cpu` trains on), for head-CT pairs as the suite's `colin27_head`
builds them (tissue from k-means of the skull-stripped T1); the suite itself has no fsaverage head pairs."""

MISALIGNED = {
    "big_icbm_9301": ("kw_icbm_9001", (30.0, -20.0, 10.0), (15.0, 0.0, 5.0)),
    "big_fsav_9302": ("kw_fsav_9003", (-25.0, 15.0, -20.0), (0.0, 12.0, -8.0)),
    "big_ct_9303": ("mm_ct_9102", (20.0, 25.0, -10.0), (-10.0, 6.0, 10.0)),
}
"""Large misalignments: base pair, extra translation (mm) and rotation (degrees about x, y, z) of the moving image."""

GROUPS = {"known_warp": ["kw_icbm_9001", "kw_icbm_9002", "kw_fsav_9003", "kw_fsav_9004"],
          "multimodal": ["mm_ct_9101", "mm_t2_9201", "mm_ct_9102", "mm_t2_9202"],
          "head_ct": ["hct_fsav_9401", "hct_fsav_9402", "hct_fsav_9411", "hct_fsav_9412"],
          "head_ct_more": ["hct_fsav_9403", "hct_fsav_9404", "hct_fsav_9413", "hct_fsav_9414"],
          "misaligned": list(MISALIGNED)}

ROUND1 = dict(image_sigma=0.0, lncc_window=9, regulariser_weight=3.0, iterations=(60, 15), lr=0.5,
              control_mm=(8.0, 8.0), levels_mm=(4.0, 2.0), regulariser="diffusion")
"""The first search's base (the winner of its round, s0_w9_r3); every configuration below states its values."""

CONFIGS: dict[str, dict | None] = {
    "balanced": {}, "accurate": None,
    # The search of docs/REFINEMENT.md, each configuration complete (not relative to today's balanced):
    # round 1, steps (60, 15) at lr 0.5: image smoothing, NCC window, penalty, control grid, learning rate
    "draft": dict(ROUND1, image_sigma=1.0, lncc_window=5, regulariser_weight=1.0),
    "s0_w9_r3": dict(ROUND1),
    "s0_w9_r10": dict(ROUND1, regulariser_weight=10.0),
    "s0_w7_r3": dict(ROUND1, lncc_window=7),
    "s0_w9_r3_c6": dict(ROUND1, control_mm=(6.0, 6.0)),
    "s0_w9_r3_lr1": dict(ROUND1, lr=1.0),
    # round 2, from s0_w9_r3: learning rate, steps, penalty, a finer last control grid
    "lr025": dict(ROUND1, lr=0.25),
    "long": dict(ROUND1, iterations=(120, 30)),
    "bending": dict(ROUND1, regulariser="bending", regulariser_weight=30.0),
    "fine2": dict(ROUND1, iterations=(60, 40), control_mm=(8.0, 4.0), regulariser_weight=5.0),
    "acc_42_fine": dict(ROUND1, iterations=(80, 40), control_mm=(8.0, 4.0)),
    "acc_642": dict(ROUND1, levels_mm=(6.0, 4.0, 2.0), iterations=(60, 60, 30), control_mm=(8.0, 8.0, 4.0)),
    # round 3, for time: fewer steps at the smaller learning rate; the 4 mm level alone
    "it40_10_lr035": dict(ROUND1, iterations=(40, 10), lr=0.35),
    "it40_10_lr025": dict(ROUND1, iterations=(40, 10), lr=0.25),
    "it60_15_lr025": dict(ROUND1, iterations=(60, 15), lr=0.25),
    "only4": dict(ROUND1, levels_mm=(4.0,), iterations=(60,), control_mm=(8.0,), lr=0.25),
    # round 4, from round 3's 40 + 10 steps at lr 0.25: penalty, window, control grid
    "r1": dict(ROUND1, iterations=(40, 10), lr=0.25, regulariser_weight=1.0),
    "r03": dict(ROUND1, iterations=(40, 10), lr=0.25, regulariser_weight=0.3),
    "w5": dict(ROUND1, iterations=(40, 10), lr=0.25, lncc_window=5),
    "r1_c4": dict(ROUND1, iterations=(40, 10), lr=0.25, regulariser_weight=1.0, control_mm=(8.0, 4.0)),
    "c12": dict(ROUND1, iterations=(40, 10), lr=0.25, control_mm=(12.0, 12.0)),  # today's balanced
    "c12_8": dict(ROUND1, iterations=(40, 10), lr=0.25, control_mm=(12.0, 8.0)),
    "c12_r1": dict(ROUND1, iterations=(40, 10), lr=0.25, control_mm=(12.0, 12.0), regulariser_weight=1.0),
    "c16": dict(ROUND1, iterations=(40, 10), lr=0.25, control_mm=(16.0, 16.0)),
    "c20": dict(ROUND1, iterations=(40, 10), lr=0.25, control_mm=(20.0, 20.0)),
    "c16_lr05": dict(ROUND1, iterations=(40, 10), lr=0.5, control_mm=(16.0, 16.0)),
    "acc_c12": dict(ROUND1, iterations=(120, 30), lr=0.25, control_mm=(12.0, 12.0)),  # accurate's steps
    "acc_c12_lr05": dict(ROUND1, iterations=(120, 30), lr=0.5, control_mm=(12.0, 12.0)),
    # session 8, CT–MR only (the MIND knobs act on multimodal pairs alone), on today's balanced
    "mind_r2": dict(mind_radius=2),
    "mind_d3": dict(mind_dilation=3),
    "mind_r2_d3": dict(mind_radius=2, mind_dilation=3),
    "mi": dict(multi_similarity="mi"),
}
"""Named configurations: overrides of `PRESETS["balanced"]` (None: the preset of that name). The search adds
entries here; docs/REFINEMENT.md lists them with their results."""


@dataclasses.dataclass
class TuningPair:
    name: str
    fixed: Image
    moving: Image
    fixed_labels: Image
    moving_labels: Image
    brain: np.ndarray
    multimodal: bool
    modalities: tuple[str, str]  # (fixed, moving): "mr" or "ct", for `normalize_intensity`
    truth_affine: np.ndarray  # the extra rigid motion of the moving image (identity unless misaligned)


def rigid(translation_mm, rotation_deg, centre) -> np.ndarray:
    """RAS 4×4: rotation (x, then y, then z, degrees) about `centre`, then translation (mm)."""
    ax, ay, az = np.deg2rad(rotation_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rz @ ry @ rx
    out[:3, 3] = centre - out[:3, :3] @ centre + np.asarray(translation_mm)
    return out


def load(name: str, anatomy: Path, cache: Path) -> TuningPair:
    manifest = suite.load_manifest()
    manifest.subjects["fsaverage_head"] = FSAVERAGE_HEAD
    if name in MISALIGNED:
        base_name, translation, rotation = MISALIGNED[name]
        base = load(base_name, anatomy, cache)
        centre = base.moving.grid.voxel_to_world((np.array(base.moving.grid.shape) - 1) / 2)
        g = rigid(translation, rotation, centre)
        # The same arrays on a moved grid: the moving anatomy is moved by g (fixed point p ↦ g(φ(p))).
        moved = Grid(base.moving.grid.shape, g @ base.moving.grid.affine)
        return dataclasses.replace(base, name=name, moving=Image(base.moving.data, moved, "moving"),
                                   moving_labels=Image(base.moving_labels.data, moved, "moving labels"),
                                   truth_affine=g)
    spec = suite.PairSpec(id=f"tune_{name}", **PAIRS[name])
    directory = suite.materialise(manifest, spec, anatomy_dir=anatomy, cache_dir=cache)
    pair = suite.load_pair(directory)
    return TuningPair(name, pair.fixed, pair.moving, pair.fixed_labels, pair.moving_labels, pair.fixed_mask,
                      spec.multimodal, spec.modalities, np.eye(4))


def complete_field(velocity: torch.Tensor, grid: Grid, transform: np.ndarray, steps: int,
                   target: Grid) -> DisplacementField:
    """Field on `target` of p ↦ T(p + A_W·exp(v)(W⁻¹p)), exp by `steps` squarings on the working grid W."""
    on_target = DisplacementField.from_voxels(integrate_velocity(velocity.cpu(), steps), grid).resampled(target)
    rotated = torch.einsum("ij,bjxyz->bixyz", torch.from_numpy(transform[:3, :3]).float(), on_target.tensor())
    d = index_map((transform - np.eye(4)) @ target.affine, target) + rotated
    return DisplacementField(d[0].permute(1, 2, 3, 0).contiguous().numpy(), target)


def run(pair: TuningPair, settings: RefineSettings) -> dict:
    # As the engine does: both images to [0, 1] (CT images, fixed or moving, are in HU).
    fixed = normalize_intensity(pair.fixed.data, pair.modalities[0], pair.fixed.source)
    moving = normalize_intensity(pair.moving.data, pair.modalities[1], pair.moving.source)
    start = time.perf_counter()
    transform = refine.optimise_affine(fixed, pair.fixed.grid, moving, pair.moving.grid, settings,
                                       multimodal=pair.multimodal)
    affine_s = time.perf_counter() - start
    grid = refine.level_grid(pair.fixed.grid, settings.levels_mm[-1])
    velocity = refine.optimise_svf(fixed, pair.fixed.grid, moving, pair.moving.grid, transform, settings,
                                   multimodal=pair.multimodal, grid=grid)
    seconds = time.perf_counter() - start
    field = complete_field(velocity, grid, transform, settings.int_steps, pair.fixed.grid)
    warped = apply_field(pair.moving_labels, field, order=0).data
    labels = sorted(int(v) for v in np.unique(pair.fixed_labels.data) if v)
    det = field.jacobian_determinant()
    stats = M.jacobian_stats(det, pair.brain)
    brain_points = pair.fixed.grid.world_coordinates()[pair.brain]
    affine_error = np.linalg.norm(brain_points @ (transform - pair.truth_affine)[:3, :3].T
                                  + (transform - pair.truth_affine)[:3, 3], axis=1)
    return {"dice": M.mean_dice(pair.fixed_labels.data, warped, labels),
            "dice_identity": M.mean_dice(pair.fixed_labels.data,
                                         resample_image(pair.moving_labels, pair.fixed.grid, order=0).data, labels),
            "folding_pct": stats["percent_nonpositive_mask"], "sdlogj": M.sdlogj(det, pair.brain),
            "seconds": seconds, "affine_seconds": affine_s,
            "affine_error_mm": float(np.mean(affine_error)) if pair.name in MISALIGNED else None}


def settings_of(name: str) -> RefineSettings:
    overrides = CONFIGS[name]
    if overrides is None:
        return PRESETS[name]
    return dataclasses.replace(PRESETS["balanced"], **overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anatomy", type=Path, default=ROOT / "data" / "anatomy")
    parser.add_argument("--cache", type=Path, default=ROOT / "output" / "tuning" / "pairs")
    parser.add_argument("--out", type=Path, default=ROOT / "output" / "tuning")
    parser.add_argument("--configs", nargs="+", default=["balanced"], choices=list(CONFIGS))
    parser.add_argument("--pairs", nargs="+", default=["all"],
                        help="pair names, group names (" + ", ".join(GROUPS) + ") or 'all'")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = []
    for item in args.pairs:
        members = sum(GROUPS.values(), []) if item == "all" else GROUPS.get(item, [item])
        names += [n for n in members if n not in names]
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = {n: load(n, args.anatomy, args.cache) for n in names}
    rows = []
    for config in args.configs:
        settings = settings_of(config)
        for name, pair in pairs.items():
            row = {"config": config, "pair": name, **run(pair, settings), "threads": args.threads,
                   "settings": dataclasses.asdict(settings)}
            rows.append(row)
            with open(args.out / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{config:<14} {name:<14} dice {row['dice']:.4f} (identity {row['dice_identity']:.4f}) "
                  f"fold {row['folding_pct']:.3f}% sdlogj {row['sdlogj']:.3f} {row['seconds']:.1f}s "
                  f"(affine {row['affine_seconds']:.1f}s)"
                  + (f" affine error {row['affine_error_mm']:.2f} mm" if row["affine_error_mm"] is not None else ""),
                  flush=True)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    print("\n| config | pairs | Dice | % det J ≤ 0 | SDlogJ | seconds |\n|---|---|---|---|---|---|")
    for config in dict.fromkeys(r["config"] for r in rows):
        for group, members in GROUPS.items():
            chosen = [r for r in rows if r["config"] == config and r["pair"] in members]
            if chosen:
                mean = lambda k: np.mean([r[k] for r in chosen])  # noqa: E731
                print(f"| {config} | {group} ({len(chosen)}) | {mean('dice'):.4f} | {mean('folding_pct'):.3f} | "
                      f"{mean('sdlogj'):.3f} | {mean('seconds'):.1f} |")


if __name__ == "__main__":
    main()
