"""ANTs (antspyx) and Elastix (itk-elastix) registrations returned as our dense fields.

Both tools map fixed physical points to moving physical points when they resample (ITK's convention), which is our
direction (docs/CONVENTIONS.md §3); they work in LPS. Each result is converted to a `DisplacementField` on the
fixed grid in RAS mm:
- ANTs: `antsApplyTransforms` composes the forward transform list (`fwdtransforms`: SyN warp and affine) into one
  displacement field on the fixed grid (`ants.apply_transforms(..., compose=prefix)`), read as an ITK field.
- Elastix: `transformix` evaluates the whole transform chain (affine, then B-spline) at every fixed voxel
  (`itk.transformix_deformation_field`), LPS vectors on the fixed grid.
Images reach the tools through NIfTI files written by `image.write_image`, so both read the same geometry as we do.
`Testing/test_benchmark.py` checks that our `apply_field` with these fields reproduces each tool's own warped image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.core.field import DisplacementField, read_itk_displacement
from DeepRegistrationLib.core.geometry import RAS_FROM_LPS, Grid
from DeepRegistrationLib.core.image import Image, write_image


def _write_inputs(fixed: Image, moving: Image, workdir: Path) -> tuple[Path, Path]:
    paths = workdir / "fixed.nii", workdir / "moving.nii"
    for image, path in zip((fixed, moving), paths):
        write_image(Image(np.asarray(image.data, dtype=np.float32), image.grid, image.source), path)
    return paths


def ants_register(fixed: Image, moving: Image, registration: dict[str, Any], workdir: Path,
                  seed: int = 1) -> tuple[DisplacementField, list[str]]:
    """Run `ants.registration(fixed, moving, **registration)`; return its forward field and transform files.

    `seed` fixes ANTs' random metric sampling (`--random-seed`).
    """
    import ants

    fixed_path, moving_path = _write_inputs(fixed, moving, workdir)
    f, m = ants.image_read(str(fixed_path)), ants.image_read(str(moving_path))
    ants.config._random_seed = seed  # what ants.set_ants_deterministic sets, without forcing one thread
    result = ants.registration(f, m, outprefix=str(workdir / "ants_"), **registration)
    transforms = list(result["fwdtransforms"])
    return ants_field(f, m, transforms, workdir), transforms


def ants_field(fixed: Any, moving: Any, transforms: list[str], workdir: Path) -> DisplacementField:
    """Compose ANTs forward transforms (as listed in `fwdtransforms`) into one field on the fixed grid (RAS mm)."""
    import ants

    path = ants.apply_transforms(fixed, moving, transforms, compose=str(workdir / "ants_forward_"))
    if path is None or not Path(path).is_file():
        raise RuntimeError(f"antsApplyTransforms did not write the composed field for {transforms}")
    return read_itk_displacement(path)


def elastix_parameter_object(parameter_maps: list[dict[str, Any]]) -> Any:
    """An `itk.ParameterObject` holding the maps in order (values: a string or a list of strings)."""
    import itk

    parameters = itk.ParameterObject.New()
    for entries in parameter_maps:
        parameters.AddParameterMap({k: tuple(v) if isinstance(v, list) else (str(v),) for k, v in entries.items()})
    return parameters


def _itk_field_to_ours(field: Any) -> DisplacementField:
    """An ITK vector image (LPS components, LPS geometry) to a RAS `DisplacementField`."""
    import itk

    lps = itk.array_from_image(field).astype(np.float64)  # [K, J, I, 3]
    grid = Grid.from_lps(tuple(int(s) for s in field.GetLargestPossibleRegion().GetSize()),
                         tuple(field.GetOrigin()), tuple(field.GetSpacing()),
                         itk.array_from_matrix(field.GetDirection()))
    return DisplacementField((lps.transpose(2, 1, 0, 3) @ RAS_FROM_LPS.T).astype(np.float32), grid)


def elastix_register(fixed: Image, moving: Image, parameter_maps: list[dict[str, Any]], workdir: Path,
                     threads: int) -> tuple[DisplacementField, Any]:
    """Run elastix with `parameter_maps` (in order); return the forward field and elastix's transform parameters."""
    import itk

    fixed_path, moving_path = _write_inputs(fixed, moving, workdir)
    f, m = itk.imread(str(fixed_path), itk.F), itk.imread(str(moving_path), itk.F)
    _, transform = itk.elastix_registration_method(f, m, parameter_object=elastix_parameter_object(parameter_maps),
                                                   log_to_console=False, number_of_threads=threads)
    field = itk.transformix_deformation_field(m, transform, output_directory=str(workdir))
    result = _itk_field_to_ours(field)
    if not result.grid.same_as(fixed.grid, tol=1e-3):
        raise RuntimeError("transformix returned a field on another grid than the fixed image's")
    return DisplacementField(result.data, fixed.grid), transform


def run_classical(tool: str, settings: dict[str, Any], fixed: Image, moving: Image, threads: int,
                  workdir: Path) -> DisplacementField:
    """The forward field of a classical method described by a manifest `classical` entry (files go to `workdir`)."""
    if tool == "ants":
        return ants_register(fixed, moving, settings["registration"], workdir)[0]
    if tool == "elastix":
        return elastix_register(fixed, moving, settings["parameter_maps"], workdir, threads)[0]
    raise InputError(f"unknown classical tool {tool!r}; use 'ants' or 'elastix'")
