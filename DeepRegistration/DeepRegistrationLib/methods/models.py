"""Model files: `<name>.safetensors` weights with `<name>.json` beside it (method, config, sha256, training record).

Weights load with safetensors only: a pickle or zip checkpoint (`torch.save`) is recognised by its first bytes and
refused, never unpickled. Every failure to read a model is an InputError naming the file and what is wrong: a
missing, non-JSON or incomplete description, another method, a config that does not fit the method's declarations,
a sha256 that differs from the description, a file safetensors cannot parse (corrupt, truncated), tensors that do
not fit the architecture or are not finite.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..core.errors import InputError
from ..core.image import atomic_path
from ..core.jsonio import read_json
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


REQUIRED_KEYS = {"method": str, "config": dict, "sha256": str}
"""Keys every model description has, with their JSON types."""


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON of a weights file; InputError naming it if missing, not strict JSON, not an object or without
    `method`, `config` and `sha256` of the right types."""
    meta_path = metadata_path(path)
    if not meta_path.is_file():
        raise InputError(f"{meta_path}: model description missing (every weights file needs its JSON beside it)")
    meta = read_json(meta_path, "model description")
    if not isinstance(meta, dict):
        raise InputError(f"{meta_path}: a model description is a JSON object with method, config and sha256, "
                         f"not a {type(meta).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise InputError(f"{meta_path}: model description lacks {', '.join(repr(k) for k in missing)} (it needs "
                         "method, config and sha256)")
    for key, kind in REQUIRED_KEYS.items():
        if not isinstance(meta[key], kind):
            raise InputError(f"{meta_path}: {key!r} must be a JSON {'object' if kind is dict else 'string'}, "
                             f"not {json.dumps(meta[key])[:40]}")
    if not isinstance(meta.get("record", {}), dict):
        raise InputError(f"{meta_path}: 'record' must be a JSON object")
    return meta


_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")
"""First bytes of a pickle (protocol 2+) and of a zip archive (`torch.save`'s default format)."""


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata of a safetensors file; InputError naming the file when it is anything else
    (a pickle is recognised and refused without being loaded)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_PICKLE_MAGIC):
        raise InputError(f"{path}: a PyTorch pickle/zip checkpoint, not safetensors; pickles are never loaded "
                         "(they can run code): convert it with safetensors.torch.save_file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError/ValueError) types
        raise InputError(f"{path}: not a readable safetensors file, corrupt or truncated "
                         f"({type(exc).__name__}: {str(exc)[:120]})") from None


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
    if meta["method"] != method:
        raise InputError(f"{path}: this model is for method {meta['method']!r}, not {method!r}")
    digest = sha256_of(path)
    if digest != meta["sha256"]:
        raise InputError(f"{path}: sha256 {digest[:12]}… does not match its JSON ({meta['sha256'][:12]}…); "
                         "the file is corrupt or was replaced")
    try:
        stored = spec.config_class.check(meta["config"], f"{method} config field")
    except (TypeError, ValueError) as exc:
        raise InputError(f"{metadata_path(path)}: config does not fit method {method!r} ({exc})") from None
    overrides = spec.config_class.check(overrides or {}, f"{method} parameter")
    config = spec.config_class(**{**stored, **overrides})
    tensors, header = read_tensors(path)
    if header.get("method", method) != method:
        raise InputError(f"{path}: its header says method {header['method']!r}, its JSON {method!r}")
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if bad:
        raise InputError(f"{path}: {len(bad)} weight tensor(s) hold NaN or infinite values ({', '.join(bad[:3])})")
    try:
        network = spec.build(config)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise InputError(f"{metadata_path(path)}: config cannot build a {method} network ({exc})") from None
    misfit = _misfit(network.state_dict(), tensors)
    if misfit:
        raise InputError(f"{path}: weights do not fit the {method} architecture of its JSON config ({misfit})")
    try:
        network.load_state_dict(tensors)
    except RuntimeError as exc:
        raise InputError(f"{path}: weights do not fit the {method} architecture ({str(exc)[:200]})") from None
    network.eval()
    return network, meta


def _misfit(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """What differs between a network's state dict and a file's tensors, in a few words ("" when they fit)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and tuple(expected[k].shape) != tuple(found[k].shape)]
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} tensor(s) of another shape, e.g. {k}: {tuple(found[k].shape)} in the file, "
                     f"{tuple(expected[k].shape)} in the network")
    if missing:
        parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    return "; ".join(parts)


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
