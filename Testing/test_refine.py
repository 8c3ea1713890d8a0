"""Per-pair refinement (DeepRegistrationLib.engine.refine): affine and SVF recovery, inverse, guidance, masks, cancel,
determinism, input errors. Small synthetic volumes made here; one thread."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import ellipsoid_labels, phantom_image, smooth_field
from DeepRegistrationLib.core import warp
from DeepRegistrationLib.core.errors import Cancelled, InputError, RegistrationWarning
from DeepRegistrationLib.core.geometry import Grid
from DeepRegistrationLib.core.resample import resample_array
from DeepRegistrationLib.engine import refine, refine_settings

SHAPE = (32, 32, 32)
SPACING = 2.0
AFFINE = refine_settings.RefineSettings(affine="on", affine_levels_mm=(4.0, 2.0), rigid_iterations=(60, 40),
                               affine_iterations=(40, 40), affine_lr=0.5, affine_samples=0)
SVF = refine_settings.RefineSettings(levels_mm=(4.0, 2.0), iterations=(60, 60), control_mm=(4.0, 2.0), lr=0.3,
                            regulariser_weight=1.0, lncc_window=5, image_sigma=0.0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test on one thread (small grids; a contended second core costs more than it gains)."""


def grid(origin=(-31.0, -31.0, -31.0), direction=None, shape=SHAPE) -> Grid:
    return Grid.from_spacing(shape, (SPACING,) * 3, origin, direction)


def textured(shape=SHAPE, seed=0, intensities=(0.0, 0.5, 1.0, 0.25, 0.8), contrast=0.25) -> np.ndarray:
    """The label phantom with smooth random texture inside the head: no symmetry for a rigid motion to hide in.
    Other `intensities` per label and a negative texture `contrast` make another modality of the same anatomy."""
    labels = ellipsoid_labels(shape)
    texture = smooth_field(shape, 1.0, seed)[:, :1]
    image = phantom_image(labels, intensities) + contrast * texture * (labels > 0)
    return warp.gaussian_smooth(image.clamp(0, 1), 0.7)[0, 0].numpy()


def rigid_matrix(degrees, axis, translation, centre=np.zeros(3)) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.deg2rad(degrees)
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    out = np.eye(4)
    out[:3, :3] = rotation
    out[:3, 3] = centre - rotation @ centre + np.asarray(translation, float)
    return out


def mean_error_voxels(estimate: np.ndarray, truth: np.ndarray, g: Grid, image: np.ndarray) -> float:
    """Mean |T̂(p) − T(p)| over the image's foreground voxels, in voxels."""
    points = g.world_coordinates()[image > refine.FOREGROUND]
    diff = points @ (estimate - truth)[:3, :3].T + (estimate - truth)[:3, 3]
    return float(np.linalg.norm(diff, axis=1).mean() / SPACING)


@pytest.mark.parametrize("truth", [
    rigid_matrix(0.0, (0, 0, 1), (5.0, -3.0, 2.0)),
    rigid_matrix(12.0, (1, 2, 0.5), (0.0, 0.0, 0.0)),
    rigid_matrix(8.0, (0.3, -1, 1), (3.0, 2.0, -4.0)) @ np.diag([1.06, 0.95, 1.02, 1.0])
    @ np.array([[1, 0.04, 0, 0], [0, 1, 0, 0], [0.03, 0, 1, 0], [0, 0, 0, 1.0]]),
], ids=["translation", "rotation", "affine"])
def test_affine_recovers_known_transform(truth):
    g = grid()
    fixed = textured()
    moving = resample_array(fixed, g, g, transform=np.linalg.inv(truth))  # moving(T p) = fixed(p)
    estimate = refine.optimise_affine(fixed, g, moving, g, AFFINE, multimodal=False)
    assert mean_error_voxels(estimate, truth, g, fixed) < 0.2


def test_affine_multimodal_on_oblique_grids():
    """Another contrast (MI) and a moving image on its own oblique grid with another origin."""
    g = grid()
    fixed = textured()
    other = textured(intensities=(0.0, 0.3, 0.1, 0.9, 0.6), contrast=-0.2)
    truth = rigid_matrix(10.0, (0, 1, 1), (4.0, -2.0, 3.0))
    direction = rigid_matrix(20.0, (1, 0, 1), (0, 0, 0))[:3, :3]
    g_moving = grid(origin=tuple(np.array([3.0, -2.0, 1.0]) - direction @ np.full(3, 39.0)), direction=direction,
                    shape=(40, 40, 40))
    moving = resample_array(other, g, g_moving, transform=np.linalg.inv(truth))
    estimate = refine.optimise_affine(fixed, g, moving, g_moving, dataclasses.replace(AFFINE, affine_samples=4000),
                                      multimodal=True)
    assert mean_error_voxels(estimate, truth, g, fixed) < 0.5


def test_affine_auto_keeps_identity_when_nothing_moved():
    g = grid()
    fixed = textured()
    auto = dataclasses.replace(AFFINE, affine="auto")
    estimate = refine.optimise_affine(fixed, g, fixed.copy(), g, auto, multimodal=False)
    assert mean_error_voxels(estimate, np.eye(4), g, fixed) < 0.05
    assert np.array_equal(refine.optimise_affine(fixed, g, fixed, g, dataclasses.replace(AFFINE, affine="off"),
                                                 multimodal=False), np.eye(4))


def test_no_overlap_after_rigid_is_an_input_error():
    """A hollow shell against a small central blob: the centres of mass coincide, the foregrounds never meet."""
    g = grid()
    r = np.linalg.norm(g.world_coordinates(), axis=-1)
    shell = ((r > 18) & (r < 24)).astype(np.float32)
    blob = (r < 6).astype(np.float32)
    with pytest.raises(InputError, match="no fixed foreground voxel maps onto the moving foreground"):
        refine.optimise_affine(shell, g, blob, g, AFFINE, multimodal=False)
    with pytest.raises(InputError, match="do not overlap"):
        refine.optimise_svf(shell, g, blob, g, np.eye(4), SVF, multimodal=False, grid=g)


def svf_pair(magnitude=3.0, seed=0):
    """fixed, moving = fixed ∘ exp(−v), and the true voxel displacement exp(v) on the grid."""
    fixed = torch.from_numpy(textured())[None, None]
    v = smooth_field(SHAPE, magnitude, seed)
    moving = warp.warp_image(fixed, warp.integrate_velocity(-v))
    return fixed[0, 0].numpy(), moving[0, 0].numpy(), warp.integrate_velocity(v)


def test_svf_recovers_known_field_and_inverse_is_exact():
    g = grid()
    fixed, moving, truth = svf_pair()
    velocity = refine.optimise_svf(fixed, g, moving, g, np.eye(4), SVF, multimodal=False, grid=g)
    assert velocity.shape == (1, 3, *SHAPE) and velocity.dtype == torch.float32
    forward = warp.integrate_velocity(velocity, SVF.int_steps)
    inside = torch.from_numpy(fixed > refine.FOREGROUND)
    before = truth.norm(dim=1)[0][inside].mean()
    epe = (forward - truth).norm(dim=1)[0][inside].mean()
    assert epe < 0.5 < before
    inverse = warp.integrate_velocity(-velocity, SVF.int_steps)
    for composed in (warp.compose(inverse, forward), warp.compose(forward, inverse)):
        assert composed.norm(dim=1).mean() < 0.01 and composed.abs().max() < 0.1


def test_svf_multimodal_mind_and_initial_velocity():
    """Another contrast per label (MIND-SSC): the field moves towards the truth, and starting from the true
    velocity (on a coarser grid, as a network gives it) ends no farther from it than starting from the identity.
    The small phantom's flat labels leave the multimodal optimum about 0.6 voxel from the truth."""
    g = grid()
    fixed, _, truth = svf_pair()
    v = smooth_field(SHAPE, 3.0, 0)
    other = torch.from_numpy(textured(intensities=(0.0, 0.3, 0.1, 0.9, 0.6), contrast=-0.2))[None, None]
    moving = warp.warp_image(other, warp.integrate_velocity(-v))[0, 0].numpy()
    inside = torch.from_numpy(fixed > refine.FOREGROUND)
    settings = dataclasses.replace(SVF, iterations=(20, 20))

    def epe(velocity):
        return float((warp.integrate_velocity(velocity, SVF.int_steps) - truth).norm(dim=1)[0][inside].mean())

    plain = refine.optimise_svf(fixed, g, moving, g, np.eye(4), settings, multimodal=True, grid=g)
    seeded = refine.optimise_svf(fixed, g, moving, g, np.eye(4), settings, multimodal=True, grid=g,
                                 initial_velocity=warp.resize_field(v, (16, 16, 16)))
    before = epe(torch.zeros(1, 3, *SHAPE))
    assert epe(plain) < 0.92 * before
    assert epe(seeded) <= epe(plain) + 0.01


def test_a_start_worse_than_the_identity_is_dropped_with_a_warning():
    """A network's field that points the wrong way (three times the true velocity, negated) scores worse than the
    identity: the refinement warns and starts from the identity, as without a network."""
    import warnings

    g = grid()
    fixed, moving, _ = svf_pair()
    settings = dataclasses.replace(SVF, iterations=(10, 5))
    wrong = -3.0 * smooth_field(SHAPE, 3.0, 0)
    with pytest.warns(RegistrationWarning, match="starts from the identity"):
        seeded = refine.optimise_svf(fixed, g, moving, g, np.eye(4), settings, multimodal=False, grid=g,
                                     initial_velocity=wrong)
    plain = refine.optimise_svf(fixed, g, moving, g, np.eye(4), settings, multimodal=False, grid=g)
    assert torch.equal(seeded, plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegistrationWarning)  # the true velocity is kept, silently
        refine.optimise_svf(fixed, g, moving, g, np.eye(4), settings, multimodal=False, grid=g,
                            initial_velocity=smooth_field(SHAPE, 3.0, 0))


def test_svf_follows_the_affine_and_guidance_pulls_the_point():
    """The images agree everywhere (moving is fixed moved by T), so only the guidance pair moves the field."""
    g = grid()
    fixed = textured()
    shift = rigid_matrix(0.0, (0, 0, 1), (4.0, 0.0, 0.0))
    moving = resample_array(fixed, g, g, transform=np.linalg.inv(shift))
    point = np.array([[0.0, 8.0, 0.0]])
    partner = shift[:3, :3] @ point[0] + shift[:3, 3] + np.array([0.0, 5.0, 0.0])
    settings = dataclasses.replace(SVF, regulariser_weight=1.0, guidance_weight=0.05)
    plain = refine.optimise_svf(fixed, g, moving, g, shift, settings, multimodal=False, grid=g)
    guided = refine.optimise_svf(fixed, g, moving, g, shift, settings, multimodal=False, grid=g,
                                 guidance=(point, partner[None]))

    def mapped(velocity):
        u = warp.integrate_velocity(velocity, settings.int_steps)
        ijk = torch.from_numpy(g.world_to_voxel(point).T.copy()).float().view(1, 3, 1, 1, 1)
        d = g.affine[:3, :3] @ warp.sample(u, ijk)[0, :, 0, 0, 0].double().numpy()
        return shift[:3, :3] @ (point[0] + d) + shift[:3, 3]

    assert np.linalg.norm(mapped(plain) - (partner - [0, 5, 0])) < 0.5  # the affine alone explains the images
    assert np.linalg.norm(mapped(guided) - partner) < np.linalg.norm(mapped(plain) - partner) - 2.0


def test_mask_excludes_a_differing_structure():
    """A bright blob only in the moving image, outside the fixed mask, does not pull the field."""
    g = grid()
    fixed = textured()
    r = np.linalg.norm(g.world_coordinates() - np.array([0.0, 0.0, 20.0]), axis=-1)
    moving = np.where(r < 5, 1.0, fixed).astype(np.float32)
    mask = (r > 11).astype(np.uint8)
    settings = dataclasses.replace(SVF, iterations=(30, 20))
    free = refine.optimise_svf(fixed, g, moving, g, np.eye(4), settings, multimodal=False, grid=g)
    masked = refine.optimise_svf(fixed, g, moving, g, np.eye(4), settings, multimodal=False, grid=g,
                                 fixed_mask=mask)
    assert free.abs().max() > 0.3
    assert masked.abs().max() < 0.3 * free.abs().max()


def test_cancel_progress_and_determinism():
    g = grid()
    fixed, moving, _ = svf_pair()
    calls = []
    settings = dataclasses.replace(SVF, iterations=(5, 5))
    first = refine.optimise_svf(fixed, g, moving, g, np.eye(4), settings, multimodal=False, grid=g,
                                progress=lambda stage, fraction: calls.append((stage, fraction)))
    assert [c[0] for c in calls] == ["deformable 4 mm"] * 5 + ["deformable 2 mm"] * 5
    assert np.allclose([c[1] for c in calls], np.arange(1, 11) / 10)
    second = refine.optimise_svf(fixed, g, moving, g, np.eye(4), settings, multimodal=False, grid=g)
    assert torch.equal(first, second)
    a = refine.optimise_affine(fixed, g, moving, g, dataclasses.replace(AFFINE, affine_samples=500, seed=3),
                               multimodal=True)
    b = refine.optimise_affine(fixed, g, moving, g, dataclasses.replace(AFFINE, affine_samples=500, seed=3),
                               multimodal=True)
    assert np.array_equal(a, b)
    count = iter(range(100))
    with pytest.raises(Cancelled):
        refine.optimise_svf(fixed, g, moving, g, np.eye(4), settings, multimodal=False, grid=g,
                            cancel=lambda: next(count) >= 3)
    with pytest.raises(Cancelled):
        refine.optimise_affine(fixed, g, moving, g, AFFINE, multimodal=False, cancel=lambda: True)


@pytest.mark.parametrize("overrides, field", [
    ({"iterations": (-1, 5)}, "iterations"),
    ({"multi_similarity": "ssd"}, "multi_similarity"),
    ({"regulariser": "elastic"}, "regulariser"),
    ({"lr": float("nan")}, "lr"),
    ({"lncc_window": 4}, "lncc_window"),
    ({"levels_mm": (2.0, 4.0), "control_mm": (8.0, 8.0)}, "levels_mm"),
    ({"iterations": (10,)}, "iterations"),
    ({"affine": "maybe"}, "affine"),
    ({"int_steps": 3.5}, "int_steps"),
])
def test_bad_settings_name_the_field(overrides, field):
    with pytest.raises(InputError, match=f"'{field}'"):
        refine_settings.RefineSettings(**overrides)


def test_bad_inputs_are_input_errors():
    g = grid()
    fixed = textured()
    with pytest.raises(InputError, match="moving image"):
        refine.optimise_affine(fixed, g, fixed[:-1], g, AFFINE, multimodal=False)
    with pytest.raises(InputError, match="guidance"):
        refine.optimise_svf(fixed, g, fixed, g, np.eye(4), SVF, multimodal=False, grid=g,
                            guidance=(np.zeros((2, 3)), np.zeros((3, 3))))
    with pytest.raises(InputError, match="no foreground"):
        refine.optimise_affine(np.zeros(SHAPE, np.float32), g, fixed, g, AFFINE, multimodal=False)


def test_presets_and_metadata():
    assert refine_settings.PRESETS["fast"] is None
    assert isinstance(refine_settings.PRESETS["balanced"], refine_settings.RefineSettings)
    assert refine_settings.PRESETS["balanced"] == refine_settings.RefineSettings()
    accurate = refine_settings.PRESETS["accurate"]
    assert sum(accurate.iterations) > sum(refine_settings.RefineSettings().iterations)
    for f in dataclasses.fields(refine_settings.RefineSettings):
        assert f.metadata["help"] and "paper" in f.metadata, f.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        refine_settings.RefineSettings().lr = 1.0  # type: ignore[misc]


def test_level_grid_covers_the_fixed_image():
    oblique = Grid.from_spacing((20, 30, 10), (1.0, 1.5, 3.0), (5.0, -7.0, 2.0),
                                rigid_matrix(30.0, (1, 1, 0), (0, 0, 0))[:3, :3])
    level = refine.level_grid(oblique, 2.0)
    assert np.allclose(level.spacing, 2.0) and np.allclose(level.direction, np.eye(3))
    corners = oblique.voxel_to_world(np.array([[i, j, k] for i in (0, 19) for j in (0, 29) for k in (0, 9)]))
    ijk = level.world_to_voxel(corners)
    assert (ijk > -1.0).all() and (ijk < np.array(level.shape)).all()
