"""What a run trained on, provably: the data manifest of every checkpoint and model JSON, and the hold-out checks.

The data manifest (`data_manifest`) is `{"spec": the recipe's data spec, <subject>: {file: sha256}, ...,
"held_out": {<subject>: {file: sha256}}, "fieldbank": {...}}`: the sha256 of every file in the folder of every
fetched subject a pair is drawn from (computed from the files, not copied from their fetch manifest), the same for
every held-out subject (so the record alone proves the hold-out), and, when warps come from the field bank, the
bank's manifest hash and the hashes of the anatomy its fields were computed from (a field between two subjects
carries their shapes). `training_hashes` is the set a benchmark compares a pair's anatomy with; a record whose
held-out hashes meet its training hashes is a leak (`leaks`).

Errors come before compute: a held-out subject without a fetch manifest, a held-out subject whose files are also
training files (the same file under another name, a field bank computed from it, a user's folder holding it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from DeepRegistrationLib.core.errors import InputError

from DeepRegistrationLib.methods.models import sha256_of

from .data.subjects import subject_files
from .recipe import ANATOMY_KINDS, Recipe
NOT_SUBJECTS = ("spec", "held_out", "fieldbank", "folder")
"""Keys of a data manifest that are not training subjects."""


def folder_files(folder: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every NIfTI file under a user's training folder."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): sha256_of(p) for p in sorted(folder.rglob("*.nii*")) if p.is_file()}


def data_manifest(recipe: Recipe) -> dict[str, Any]:
    """The data manifest of a run (module docstring); InputError on a missing held-out subject or a leak."""
    data = recipe.data
    out: dict[str, Any] = {"spec": recipe.to_dict()["data"]}
    uses_anatomy = data.kind in ANATOMY_KINDS
    if uses_anatomy:
        for name in training_subjects(recipe):
            out[name] = subject_files(data.anatomy_dir, name)
    if data.kind == "folder" and data.folder:
        out["folder"] = folder_files(data.folder)
    if data.held_out and (uses_anatomy or data.kind == "folder"):
        out["held_out"] = {name: subject_files(data.anatomy_dir, name, "held-out") for name in data.held_out}
    if uses_anatomy and data.warps == "bank":
        from .data.fieldbank import bank_record

        out["fieldbank"] = bank_record(data.fieldbank)
    found = leaks(out)
    if found:
        raise InputError("held-out anatomy would be trained on: " + "; ".join(
            f"{subject}/{f} is also {where}" for subject, f, where in found))
    return out


def training_subjects(recipe: Recipe) -> list[str]:
    """The fetched subjects a run reads (the data spec's subjects; a head CT also reads nothing else)."""
    return list(recipe.data.subjects)


def _hashes(entry: Any, where: str) -> Iterable[tuple[str, str]]:
    """(sha256, where) for every hash in a nested {name: sha256 | {...}} mapping."""
    if isinstance(entry, str) and len(entry) == 64:
        yield entry, where
    elif isinstance(entry, dict):
        for key, value in entry.items():
            yield from _hashes(value, f"{where}/{key}")


def training_hashes(manifest: dict[str, Any]) -> dict[str, str]:
    """{sha256: where it is used} of every file a run trained on (subjects, a user's folder, the field bank)."""
    out: dict[str, str] = {}
    for key, value in manifest.items():
        if key in ("spec", "held_out"):
            continue
        for digest, where in _hashes(value, key):
            out.setdefault(digest, where)
    return out


def leaks(manifest: dict[str, Any], held_out: dict[str, dict[str, str]] | None = None
          ) -> list[tuple[str, str, str]]:
    """(held-out subject, file, training use) for every held-out file whose hash is among the training hashes.

    `held_out` defaults to the manifest's own "held_out" entry; pass known hashes of a subject to check a record
    against them."""
    used = training_hashes(manifest)
    found = []
    for subject, files in (held_out if held_out is not None else manifest.get("held_out", {})).items():
        for name, digest in files.items():
            if digest in used:
                found.append((subject, name, used[digest]))
    return found
