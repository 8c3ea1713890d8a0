"""Which pairs involve only anatomy a model never saw: the pair's subjects' file hashes against the model's record.

A pair is held out for a network when no file of any of its subjects' anatomy folders (every file the fetch wrote
for that subject: the T1 with and without skull, the labels, the tables) has a sha256 among the training hashes of
the model's data manifest (`training.provenance.training_hashes`: every training subject's files, a user's folder,
the field bank's sources). A model whose record has no data manifest with hashes (a folder run of an old trainer,
a hand-made model) has no held-out pairs: nothing proves what it saw. Identity and the classical methods learn
nothing (nor does the per-pair optimisation, `optimise`), so every pair is held out for them; the report compares each
network with them on its own held-out pairs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from DeepRegistrationLib.methods.models import read_metadata, sha256_of
from DeepRegistrationLib.methods.registry import METHODS

from training.provenance import training_hashes

from .methods import Method
from .suite import Manifest, PairSpec

SubjectHashes = Callable[[str], set[str]]


def model_hashes(record: dict[str, Any]) -> set[str] | None:
    """The training hashes of a model's record; None when it proves nothing (no data manifest with hashes)."""
    data = record.get("data")
    if not isinstance(data, dict):
        return None
    hashes = set(training_hashes(data))
    return hashes or None


def network_record(method: Method) -> dict[str, Any]:
    """The training record of the model `method` runs (a candidate's file, or the shipped one)."""
    return read_metadata(method.weights or METHODS[method.settings["method"]].weights_path).get("record", {})


def anatomy_hashes(manifest: Manifest, anatomy_dir: Path) -> SubjectHashes:
    """subject name → sha256 of every file in its anatomy folder (the folder of its `image`), cached."""
    cache: dict[str, set[str]] = {}

    def hashes(subject: str) -> set[str]:
        if subject not in cache:
            folder = (Path(anatomy_dir) / manifest.subjects[subject]["image"]).parent
            cache[subject] = {sha256_of(p) for p in sorted(folder.iterdir())
                              if p.is_file() and p.name != "manifest.json"} if folder.is_dir() else set()
        return cache[subject]

    return hashes


def held_out_for(hashes: set[str] | None, specs: list[PairSpec], subject_hashes: SubjectHashes,
                 method: Method | None = None) -> list[str]:
    """Ids of the pairs of `specs` none of whose subjects' files is among `hashes` (module docstring)."""
    if hashes is None:
        return []
    out = []
    for spec in specs:
        if method is not None and not method.applies_to(spec):
            continue
        files = [subject_hashes(s) for s in spec.subjects]
        if all(files) and not any(f & hashes for f in files):
            out.append(spec.id)
    return out


def held_out_pairs(manifest: Manifest, specs: list[PairSpec], methods: list[Method], anatomy_dir: Path,
                   records: dict[str, dict[str, Any]] | None = None,
                   subject_hashes: SubjectHashes | None = None) -> dict[str, list[str]]:
    """{network name: ids of its held-out pairs} for every network of `methods` (records default to the shipped
    models' JSON)."""
    subject_hashes = subject_hashes or anatomy_hashes(manifest, anatomy_dir)
    out = {}
    for method in methods:
        if method.kind != "network" or not METHODS[method.settings["method"]].is_network:
            continue  # identity, classical tools and the optimisation learn nothing: every pair is held out
        record = (records or {}).get(method.name) or network_record(method)
        out[method.name] = held_out_for(model_hashes(record), specs, subject_hashes, method)
    return out
