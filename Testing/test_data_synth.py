"""Synthetic pairs (training/data/synth.py): exact ground truth, label consistency, contrasts, landmarks, seeds."""

from __future__ import annotations

import pytest
import torch
from conftest import ellipsoid_labels, phantom_image

from DeepRegistrationLib.core import warp
from training.data import synth
from training.data.label_protocols import (LabelTableError, remap_to_shared, shared_ids, validate_label_table)

SHAPE = (32, 32, 32)
SPACING = (2.0, 2.0, 2.0)
TISSUE = {0: "background", 1: "csf", 2: "gm", 3: "wm", 4: "gm"}  # phantom ids → tissue classes


def dice(a: torch.Tensor, b: torch.Tensor, label: int) -> float:
    a, b = a == label, b == label
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def interior(labels: torch.Tensor, width: int = 2) -> torch.Tensor:
    """Foreground voxels at least `width` voxels from the background (no partial volume with it)."""
    fg = (labels > 0).float()
    return -torch.nn.functional.max_pool3d(-fg, 2 * width + 1, stride=1, padding=width) > 0.5


def ncc(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    return ellipsoid_labels(SHAPE)


@pytest.fixture(scope="module")
def pair(labels):
    return synth.known_warp_pair(phantom_image(labels), labels, spacing=SPACING, seed=3, boundary_landmarks=6)


def test_velocity_magnitude_in_mm_and_diffeomorphic():
    spacing = (1.0, 2.0, 3.0)
    v = synth.random_velocity(SHAPE, torch.Generator().manual_seed(0), spacing, magnitude_mm=5.0)
    v_mm = v * torch.tensor(spacing).view(1, 3, 1, 1, 1)
    assert v_mm.norm(dim=1).max() == pytest.approx(5.0, rel=1e-4)
    u = warp.integrate_velocity(v)
    assert warp.jacobian_determinant(u).min() > 0
    assert 2.0 < float((u * torch.tensor(spacing).view(1, 3, 1, 1, 1)).norm(dim=1).max()) < 8.0


def test_linear_velocity_integrates_to_affine():
    v = synth.random_linear_velocity(SHAPE, SPACING, torch.Generator().manual_seed(1), rotation_deg=5.0)
    u = warp.integrate_velocity(v)
    grid = warp.identity_grid(SHAPE).reshape(3, -1).T
    mapped = (grid + u.reshape(3, -1).T)[:, :]
    inner = ((grid > 4) & (grid < SHAPE[0] - 5)).all(1)
    design = torch.cat([grid, torch.ones(len(grid), 1)], 1)[inner].double()
    solution = torch.linalg.lstsq(design, mapped[inner].double()).solution
    assert (design @ solution - mapped[inner]).abs().max() < 1e-3


def test_ground_truth_reproduces_fixed(labels, pair):
    image = phantom_image(labels)
    clean_moving = warp.warp_image(image, pair.inverse)
    residual = warp.compose(pair.inverse, pair.displacement)  # φ⁻¹∘φ = id, in voxels
    assert residual[..., 4:-4, 4:-4, 4:-4].abs().max() < 0.05 and residual.abs().mean() < 0.01
    # warp(warp(image, u⁻¹), u) with a single interpolation:
    restored = warp.warp_image(image, warp.compose(pair.inverse, pair.displacement))
    assert (restored - image).abs().mean() < 0.05 * (clean_moving - image).abs().mean()
    aligned = ncc(warp.warp_image(pair.moving, pair.displacement), pair.fixed)
    assert aligned > 0.95 and 1 - aligned < 0.5 * (1 - ncc(pair.moving, pair.fixed))


def test_intensities_never_match(pair):
    restored = warp.warp_image(pair.moving, pair.displacement)
    assert (restored - pair.fixed).abs().mean() > 0.01


def test_labels_consistent(pair):
    restored = warp.warp_labels(pair.moving_labels, pair.displacement)
    for label in range(1, 5):
        assert dice(restored, pair.fixed_labels, label) > 0.9
    assert dice(pair.moving_labels, pair.fixed_labels, 3) < dice(restored, pair.fixed_labels, 3)


def test_landmarks_map_exactly(pair):
    points, moved = pair.fixed_landmarks, pair.moving_landmarks
    assert len(points) == 4 * 7 and torch.equal(points, points.round())
    i, j, k = points.long().T
    assert torch.allclose(moved - points, pair.displacement[0, :, i, j, k].T, atol=1e-6)
    assert torch.equal(pair.fixed_labels[0, 0, i, j, k], pair.landmark_labels)
    # The label's centre landmark lands inside the same label of the moving image.
    first = torch.cat([torch.tensor([True]), pair.landmark_labels[1:] != pair.landmark_labels[:-1]])
    centre = moved[first].round().long().T
    assert torch.equal(pair.moving_labels[0, 0, centre[0], centre[1], centre[2]], pair.landmark_labels[first])


def test_seed_reproducibility():
    labels = ellipsoid_labels((16, 16, 16))
    image = phantom_image(labels)
    a = synth.known_warp_pair(image, labels, SPACING, seed=7)
    b = synth.known_warp_pair(image, labels, SPACING, seed=torch.Generator().manual_seed(7))
    c = synth.known_warp_pair(image, labels, SPACING, seed=8)
    for name in ("fixed", "moving", "displacement", "moving_labels", "moving_landmarks"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.displacement, c.displacement)


def test_label_driven_pair(labels):
    p = synth.label_driven_pair(labels, SPACING, seed=1)
    restored = warp.warp_image(p.moving, p.displacement)
    means = lambda img: torch.stack([img[labels == i].mean() for i in range(5)])  # noqa: E731
    assert (means(p.fixed) - means(restored)).abs().max() > 0.05  # independent per-label intensities
    assert 0.0 <= float(p.fixed.min()) and float(p.fixed.max()) < 3.0
    assert dice(warp.warp_labels(p.moving_labels, p.displacement), labels, 2) > 0.9


def test_multimodal_contrast_ordering(labels):
    gen = torch.Generator().manual_seed(0)
    t1 = synth.multimodal_contrast(labels, "t1", gen, TISSUE)
    t2 = synth.multimodal_contrast(labels, "t2", gen, TISSUE)
    ct = synth.multimodal_contrast(labels, "ct", gen, TISSUE, blur_voxels=0.0)
    mean = lambda img, i: float(img[labels == i].mean())  # noqa: E731
    assert mean(t1, 3) > mean(t1, 2) > mean(t1, 1)
    assert mean(t2, 1) > mean(t2, 2) > mean(t2, 3)
    assert mean(ct, 0) == pytest.approx(-1000, abs=10) and mean(ct, 2) > mean(ct, 3) > mean(ct, 1)
    brain = interior(labels)
    assert ncc(t1[brain], t2[brain]) < -0.5
    with pytest.raises(ValueError, match=r"\[4\]"):
        synth.multimodal_contrast(labels, "t1", gen, {0: "background", 1: "csf", 2: "gm", 3: "wm"})
    with pytest.raises(ValueError, match="modality"):
        synth.multimodal_contrast(labels, "pet", gen, TISSUE)


def test_multimodal_pair_shares_geometry(labels):
    p = synth.multimodal_pair(labels, SPACING, seed=2, classes=TISSUE, affine=True)
    restored = warp.warp_image(p.moving, p.displacement)
    brain = interior(labels)
    assert ncc(p.fixed[brain], restored[brain]) < -0.5
    assert dice(warp.warp_labels(p.moving_labels, p.displacement), labels, 1) > 0.85


def test_label_table_validation_and_shared_protocols():
    labels = torch.tensor([0, 17, 53, 2])
    validate_label_table(labels, {17: "Left-Hippocampus", 53: "Right-Hippocampus", 2: "WM"}, "ok")
    with pytest.raises(LabelTableError, match=r"not the table \[2\].*not the map \[99\]"):
        validate_label_table(labels, {17: "a", 53: "b", 99: "c"}, "aseg.nii.gz")
    shared = remap_to_shared(labels, "aseg")
    assert shared.tolist() == [0, shared_ids()["left_hippocampus"], shared_ids()["right_hippocampus"], 0]
    aal = remap_to_shared(torch.tensor([37, 38, 500]).numpy(), "aal")
    assert aal.tolist() == [shared_ids()["left_hippocampus"], shared_ids()["right_hippocampus"], 0]
