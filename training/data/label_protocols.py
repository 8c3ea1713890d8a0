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
