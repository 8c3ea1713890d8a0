"""Label tables (TSV `id<TAB>name`) and the structures that the AAL and FreeSurfer aseg protocols share.

Background is id 0 and is never listed in a table. Cross-subject Dice between maps of different protocols is only
meaningful on `SHARED_STRUCTURES`: remap both maps with `remap_to_shared` first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SHARED_STRUCTURES: tuple[str, ...] = (
    "left_hippocampus", "right_hippocampus", "left_amygdala", "right_amygdala",
    "left_caudate", "right_caudate", "left_putamen", "right_putamen",
    "left_pallidum", "right_pallidum", "left_thalamus", "right_thalamus",
)
"""Canonical names; structure n (0-based) has shared id n + 1."""

PROTOCOLS: dict[str, dict[str, int]] = {
    # AAL (Tzourio-Mazoyer 2002) as shipped by mricron: aal.nii.txt ids.
    "aal": {
        "left_hippocampus": 37, "right_hippocampus": 38, "left_amygdala": 41, "right_amygdala": 42,
        "left_caudate": 71, "right_caudate": 72, "left_putamen": 73, "right_putamen": 74,
        "left_pallidum": 75, "right_pallidum": 76, "left_thalamus": 77, "right_thalamus": 78,
    },
    # FreeSurfer aseg (FreeSurferColorLUT ids).
    "aseg": {
        "left_hippocampus": 17, "right_hippocampus": 53, "left_amygdala": 18, "right_amygdala": 54,
        "left_caudate": 11, "right_caudate": 50, "left_putamen": 12, "right_putamen": 51,
        "left_pallidum": 13, "right_pallidum": 52, "left_thalamus": 10, "right_thalamus": 49,
    },
}


class LabelTableError(ValueError):
    """A label table disagrees with its label map, or cannot be parsed."""


def shared_ids() -> dict[str, int]:
    """Canonical structure name → shared id (1..12)."""
    return {name: n + 1 for n, name in enumerate(SHARED_STRUCTURES)}


def shared_table() -> dict[int, str]:
    """The label table of remapped maps: shared id → canonical name."""
    return {i: name for name, i in shared_ids().items()}


def remap_to_shared(labels: np.ndarray | torch.Tensor, protocol: str) -> np.ndarray | torch.Tensor:
    """Map a label map of `protocol` ("aal" or "aseg") to shared ids; every other structure becomes 0."""
    if protocol not in PROTOCOLS:
        raise KeyError(f"unknown label protocol {protocol!r}; known: {sorted(PROTOCOLS)}")
    lut = np.zeros(max(PROTOCOLS[protocol].values()) + 1, dtype=np.int64)
    for name, shared in shared_ids().items():
        lut[PROTOCOLS[protocol][name]] = shared
    if isinstance(labels, torch.Tensor):
        idx = labels.long()
        inside = (idx >= 0) & (idx < len(lut))
        return torch.where(inside, torch.from_numpy(lut).to(labels.device)[idx.clamp(0, len(lut) - 1)], 0).to(labels.dtype)
    idx = np.asarray(labels).astype(np.int64)
    inside = (idx >= 0) & (idx < len(lut))
    return np.where(inside, lut[np.clip(idx, 0, len(lut) - 1)], 0).astype(np.asarray(labels).dtype)


def validate_label_table(labels: np.ndarray | torch.Tensor, table: dict[int, str], source: str) -> None:
    """Raise LabelTableError unless the table's ids are exactly the non-zero ids present in `labels`."""
    values = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    present = {int(v) for v in np.unique(values)} - {0}
    listed = set(table) - {0}
    missing, unused = sorted(present - listed), sorted(listed - present)
    if missing or unused:
        raise LabelTableError(
            f"{source}: label table does not match the label map: ids in the map but not the table {missing}, "
            f"ids in the table but not the map {unused}")


def write_label_table(path: Path, table: dict[int, str]) -> None:
    """Write `id<TAB>name` lines sorted by id, with a header line `id<TAB>name`."""
    lines = ["id\tname"] + [f"{i}\t{table[i]}" for i in sorted(table) if i != 0]
    Path(path).write_text("\n".join(lines) + "\n")


def read_label_table(path: Path) -> dict[int, str]:
    """Read a table written by `write_label_table` (header optional)."""
    table: dict[int, str] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.lower().startswith("id\t"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip().lstrip("-").isdigit():
            raise LabelTableError(f"{path}:{n}: expected 'id<TAB>name', got {line!r}")
        table[int(parts[0])] = parts[1].strip()
    return table


ASEG_TISSUE: dict[int, str] = {
    **{i: "gm" for i in (3, 42, 8, 47, 10, 49, 11, 50, 12, 51, 13, 52, 17, 53, 18, 54, 26, 58)},
    **{i: "wm" for i in (2, 41, 7, 46, 77, 251, 252, 253, 254, 255, 16, 28, 60, 85)},
    **{i: "csf" for i in (4, 5, 14, 15, 24, 43, 44, 30, 62, 31, 63)},
}
"""FreeSurfer aseg id → tissue class of `synth.TISSUE_CLASSES` (grey: cortex and subcortical grey as in the
benchmark's fsaverage `gray_matter`; white: cerebral and cerebellar white matter, brain stem, ventral DC, optic
chiasm; CSF: ventricles, CSF, vessels and choroid plexus)."""

TISSUE_IDS = {"csf": 1, "gm": 2, "wm": 3}


def tissue_map(labels: np.ndarray | torch.Tensor, classes: dict[int, str]) -> np.ndarray | torch.Tensor:
    """A label map relabelled to tissue ids (1 CSF, 2 GM, 3 WM) through `classes` (label id → class); ids
    without a class become 0."""
    lut = np.zeros(max(max(classes), 0) + 1, dtype=np.int64)
    for label, tissue in classes.items():
        lut[label] = TISSUE_IDS.get(tissue, 0)
    if isinstance(labels, torch.Tensor):
        idx = labels.long()
        inside = (idx >= 0) & (idx < len(lut))
        return torch.where(inside, torch.from_numpy(lut)[idx.clamp(0, len(lut) - 1)], 0)
    idx = np.asarray(labels).astype(np.int64)
    inside = (idx >= 0) & (idx < len(lut))
    return np.where(inside, lut[np.clip(idx, 0, len(lut) - 1)], 0)
