"""Checks of the inputs that need only the nodes and files themselves (no NumPy, no PyTorch, no nibabel), so the
Slicer widget can explain a wrong choice as soon as it is made — before the packages are even installed — and
`frontends.mrml` refuses the same inputs with the same words."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import InputError


def check_volume_input(node, role: str) -> None:
    """InputError naming `node` unless it is a scalar intensity volume in a scene (not a label map, vector, tensor or
    diffusion volume: those derive from the scalar volume class in MRML, so the class alone does not tell)."""
    if node is None:
        raise InputError(f"choose a {role} volume")
    name = node.GetName()
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"{role} volume {name!r} is a label map; choose an intensity volume (label maps belong in "
                         f"the {role} segmentation field)")
    for kind, what in (("vtkMRMLVectorVolumeNode", "a vector (multi-component) volume"),
                       ("vtkMRMLTensorVolumeNode", "a tensor or diffusion volume")):
        if node.IsA(kind):
            raise InputError(f"{role} volume {name!r} is {what}; choose a scalar volume (Vector to Scalar Volume "
                             "module, or one component)")
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"{role} input {name!r} is not a scalar volume")
    if node.GetScene() is None:
        raise InputError(f"{name}: the {role} volume is not in a scene")


def check_volume_pair(fixed, moving) -> None:
    """Both volumes usable (`check_volume_input`) and different."""
    check_volume_input(fixed, "fixed")
    check_volume_input(moving, "moving")
    if fixed is moving:
        raise InputError(f"fixed and moving are the same volume {fixed.GetName()!r}; choose two volumes")


def check_weights(options) -> None:
    """Refuse the weights file of `options` (engine.options.RegistrationOptions) when it is missing, lacks its JSON,
    or is a model of another method than `options.method` (read from the JSON, without PyTorch), so that a wrong
    choice is reported as soon as it is made, before a worker starts."""
    if not options.weights:
        return
    path = Path(options.weights)
    if not path.is_file():
        raise InputError(f"{path}: no weights for method {options.method!r} (the file does not exist)")
    meta_path = path.with_suffix(".json")  # methods.models.metadata_path, which imports PyTorch
    if not meta_path.is_file():
        raise InputError(f"{meta_path}: model description missing (every weights file needs its JSON beside it)")
    try:
        method = json.loads(meta_path.read_text()).get("method")
    except (json.JSONDecodeError, AttributeError, OSError) as exc:
        raise InputError(f"{meta_path}: not a model description ({exc})") from exc
    if method != options.method:
        raise InputError(f"weights {path.name}: a {method!r} model, not {options.method!r}; choose method {method!r} "
                         f"or a {options.method!r} weights file (empty: the shipped model)")
