"""Model files: `<name>.safetensors` weights with `<name>.json` beside it (method, config, sha256, training record).

Weights load with safetensors only (never pickle). A file whose sha256 differs from its JSON, or that belongs to
another method, is refused with an InputError.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from ..core.errors import InputError
from ..core.image import atomic_path
from .networks.base import RegistrationNetwork
from .registry import MethodSpec, get_method


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def metadata_path(weights: str | os.PathLike) -> Path:
    """The JSON beside a weights file."""
    return Path(weights).with_suffix(".json")


def save_model(network: RegistrationNetwork, method: str, path: str | os.PathLike,
               record: dict[str, Any] | None = None) -> Path:
    """Write `network`'s weights and the JSON with method, config, sha256 and `record` (training provenance)."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"method": method})
    meta = {"method": method, "config": network.config.to_dict(), "sha256": sha256_of(path),
            "weights": path.name, "record": record or {}}
    with atomic_path(metadata_path(path)) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON of a weights file; InputError if missing or unreadable."""
    meta_path = metadata_path(path)
    if not meta_path.is_file():
        raise InputError(f"{meta_path}: model description missing (every weights file needs its JSON beside it)")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{meta_path}: not valid JSON ({exc})") from exc


def load_model(method: str, path: str | os.PathLike | None = None,
               overrides: dict[str, Any] | None = None) -> tuple[RegistrationNetwork, dict[str, Any]]:
    """Build method `method` from its weights file (default: the shipped one) and return (network, metadata).

    `overrides` change inference-time config fields (for example `int_steps`); architecture fields must match.
    """
    spec: MethodSpec = get_method(method)
    path = Path(path) if path is not None else spec.weights_path
    if not path.is_file():
        raise InputError(f"{path}: no weights for method {method!r} (train them with `python -m training "
                         f"train {method}` or pass a weights file)")
    meta = read_metadata(path)
    if meta.get("method") != method:
        raise InputError(f"{path}: this model is for method {meta.get('method')!r}, not {method!r}")
    digest = sha256_of(path)
    if digest != meta.get("sha256"):
        raise InputError(f"{path}: sha256 {digest[:12]}… does not match its JSON ({str(meta.get('sha256'))[:12]}…); "
                         "the file is corrupt or was replaced")
    try:
        config = spec.config_class.from_dict({**meta["config"], **(overrides or {})})
    except (TypeError, ValueError) as exc:
        raise InputError(f"{metadata_path(path)}: config does not fit method {method!r} ({exc})") from exc
    network = spec.build(config)
    try:
        network.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:
        raise InputError(f"{path}: weights do not fit the {method} architecture ({exc})") from exc
    network.eval()
    return network, meta


def trained_modalities(meta: dict[str, Any]) -> tuple[str, str] | None:
    """(fixed, moving) engine modalities ("mr"/"ct") of the synthetic pairs a model was trained on, from its
    training record; None when unknown (a user's folder of images, or no record) or when the training contrasts
    were random per label ("label_driven": no modality to hold the model to)."""
    data = meta.get("record", {}).get("recipe", {}).get("data")
    if not data or data.get("kind") in ("folder", "label_driven"):
        return None
    if data.get("kind") != "multimodal":
        return "mr", "mr"
    return tuple("ct" if data[key] == "ct" else "mr" for key in ("fixed_modality", "moving_modality"))
