"""Shared fixtures: small analytic volumes and known-warp pairs made here, no downloads."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "DeepRegistration"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from DeepRegistrationLib.core import padding, warp  # noqa: E402
from training.data.phantom import ellipsoid_labels, phantom_image  # noqa: E402,F401  (re-exported for tests)


def smooth_field(shape: tuple[int, int, int], magnitude: float, seed: int = 0) -> torch.Tensor:
    """A smooth random velocity [1, 3, I, J, K] in voxels with maximum about `magnitude`."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 4, 4, 4, generator=gen)
    v = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
    return v * (magnitude / v.abs().max())


@pytest.fixture
def toy_pair():
    """Factory for a known-warp pair on a grid of `shape`: fixed, moving, labels of both and the true field.

    moving = fixed warped by exp(−v), so the true fixed→moving displacement is u = exp(v) and
    warp(moving, u) ≈ fixed.
    """

    def make(shape=(32, 32, 32), magnitude=2.0, seed=0):
        fixed_labels = ellipsoid_labels(shape)
        fixed = phantom_image(fixed_labels)
        v = smooth_field(shape, magnitude, seed)
        u = warp.integrate_velocity(v)
        inverse = warp.integrate_velocity(-v)
        moving = warp.warp_image(fixed, inverse)
        moving_labels = warp.warp_labels(fixed_labels, inverse)
        return {"fixed": fixed, "moving": moving, "fixed_labels": fixed_labels, "moving_labels": moving_labels,
                "displacement": u, "velocity": v}

    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def random_pair(shape: tuple[int, int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two unrelated smooth random images [1, 1, I, J, K] (for shape and gradient checks)."""
    gen = torch.Generator().manual_seed(seed)
    fixed = warp.gaussian_smooth(torch.rand(1, 1, *shape, generator=gen), 1.0)
    moving = warp.gaussian_smooth(torch.rand(1, 1, *shape, generator=gen), 1.0)
    return fixed, moving


def label_dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean Dice over the non-zero labels of two label maps."""
    from DeepRegistrationLib.core.metrics import mean_dice

    return mean_dice(a.numpy(), b.numpy())


def optimise_on_pair(net: torch.nn.Module, data: dict, steps: int, lr: float,
                     keys: tuple[str, ...] = ("fixed", "moving"), eval_output: bool = False) -> dict:
    """`steps` Adam updates of `net`'s loss on one toy pair (`data` from `toy_pair`; `keys` go into the loss
    batch), then the network once more on the same pair (in eval mode with `eval_output`: a few steps leave
    BatchNorm's running statistics far from the batch's, so BatchNorm networks are read in train mode). Returns
    the first and final loss, the final output, and the mean label Dice before (identity) and after warping the
    moving labels by the output."""
    batch = {k: data[k] for k in keys}
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    first = None
    for _ in range(steps):
        total = net.loss(net(data["fixed"], data["moving"]), batch)["total"]
        first = float(total.detach()) if first is None else first
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
    with torch.no_grad():
        final = float(net.loss(net(data["fixed"], data["moving"]), batch)["total"])
        net.train(not eval_output)
        out = net(data["fixed"], data["moving"])
    return {"first": first, "final": final, "output": out,
            "dice_before": label_dice(data["moving_labels"], data["fixed_labels"]),
            "dice_after": label_dice(warp.warp_labels(data["moving_labels"], out.displacement), data["fixed_labels"])}


def conv_parameters(cin: int, cout: int, k: int = 3, bias: bool = True) -> int:
    """Parameters of a k×k×k convolution (transposed alike) from `cin` to `cout` channels."""
    return cin * cout * k**3 + (cout if bias else 0)


def assert_parameter_count(net: torch.nn.Module, expected: int, name: str) -> None:
    """`net` has exactly the `expected` parameters (counted from its architecture by the caller)."""
    count = sum(p.numel() for p in net.parameters())
    print(f"{name} parameters: {count}")
    assert count == expected


def forward_on_padded_odd_grid(net: torch.nn.Module, shape: tuple[int, int, int], grid: tuple[int, int, int]):
    """`net` on a random pair of the odd `shape` padded to its multiple, which must give `grid`; the displacement
    must cover `grid`, be finite and crop back to `shape`. Returns the output for the method's own checks."""
    fixed, moving = (padding.pad_to_multiple(x, net.multiple) for x in random_pair(shape))
    assert tuple(fixed.shape[2:]) == grid
    with torch.no_grad():
        out = net(fixed, moving)
    assert out.displacement.shape == (1, 3, *grid)
    assert torch.isfinite(out.displacement).all()
    assert padding.crop_to_shape(out.displacement, shape).shape == (1, 3, *shape)
    return out


def zero_output_layers(net: torch.nn.Module) -> torch.nn.Module:
    """`net` with the weights and biases of its `output_layers` (those whose zero output is the identity) zeroed."""
    for layer in net.output_layers:
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    return net


def assert_gradients_reach_every_parameter(net: torch.nn.Module, batch: dict) -> None:
    """One backward pass of `net`'s total loss on `batch` gives every parameter a non-zero (and not NaN) gradient."""
    net.loss(net(batch["fixed"], batch["moving"]), batch)["total"].backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: the networks' tests run small grids, where a second, contended thread on a shared
    2-core machine costs far more than it gains."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_dicom_series(image, folder, uid: str = "1.2.826.0.1.3680043.2.1125.7.1", *, slopes=None,
                       intercept: float = 0.0, modality: str = "MR", names=None, positions=None):
    """Write `image` (a DeepRegistrationLib Image, RAS) as a DICOM series of single-frame slices along its k axis
    with SimpleITK/GDCM: one file per slice, Image Position/Orientation (Patient) from its geometry (LPS),
    `slopes` (one per slice, or one for all) and `intercept` the Rescale Slope/Intercept of float data.
    `names` gives the file names in slice order (default: numbered backwards, so that file order is not slice
    order); `positions` replaces the Image Position (Patient) of slice k (LPS mm), for broken series."""
    import locale

    import SimpleITK as sitk

    from DeepRegistrationLib.core.image import image_to_sitk

    saved = locale.setlocale(locale.LC_ALL)  # GDCM's writer leaves the C locale behind (ASCII for Python's I/O)
    try:
        return _write_dicom_series(sitk, image_to_sitk, image, folder, uid, slopes, intercept, modality, names,
                                   positions)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_series(sitk, image_to_sitk, image, folder, uid, slopes, intercept, modality, names, positions):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    volume = image_to_sitk(image)
    depth = volume.GetDepth()
    d = volume.GetDirection()
    orientation = "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    sop = {"MR": "1.2.840.10008.5.1.4.1.1.4", "CT": "1.2.840.10008.5.1.4.1.1.2"}[modality]
    floats = slopes is not None
    if slopes is not None and np.ndim(slopes) == 0:
        slopes = [slopes] * depth
    names = names or [f"IM{depth - k:04d}.dcm" for k in range(depth)]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(depth):
        plane = volume[:, :, k]
        plane = sitk.Cast(plane, sitk.sitkFloat32 if floats else sitk.sitkInt16)
        position = positions[k] if positions is not None else volume.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {"0020|000e": uid, "0020|000d": uid + ".0", "0020|0037": orientation,
                "0020|0032": "\\".join(f"{v:.10f}" for v in position), "0020|0013": str(k + 1),
                "0008|0060": modality, "0008|0016": sop, "0008|103e": f"series {uid[-3:]}",
                "0008|0018": f"{uid}.{k + 1}"}
        if floats:
            tags.update({"0028|1053": f"{slopes[k]:g}", "0028|1052": f"{intercept:g}", "0028|0100": "16",
                         "0028|0101": "16", "0028|0102": "15", "0028|0103": "1"})
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / names[k]))
        writer.Execute(plane)
    return folder
