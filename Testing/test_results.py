"""The typed metrics are the one schema of metrics.json: its documented keys (pinned here) and a lossless round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from DeepRegistrationLib.core.field import DisplacementField
from DeepRegistrationLib.core.geometry import Grid
from DeepRegistrationLib.core.image import Image
from DeepRegistrationLib.engine.evaluation import evaluate
from DeepRegistrationLib.engine.options import RegistrationOptions
from DeepRegistrationLib.engine.results import Metrics, RunInfo
from DeepRegistrationLib.frontends.outputs import strict_json, write_metrics

from conftest import ellipsoid_labels, phantom_image, smooth_field

TOP_KEYS = {"jacobian", "similarity", "labels", "landmarks", "mask", "method", "model_sha256", "device",
            "working_grid", "prealign", "instance_optimization", "seed", "peak_memory_mb", "time_s"}
"""metrics.json's documented top-level keys (README, "Command line"), all present for a run with every input."""
JACOBIAN_KEYS = {"percent_nonpositive", "sdlogj", "sdlogj_learn2reg", "min", "max", "percent_nonpositive_mask",
                 "sdlogj_mask", "sdlogj_learn2reg_mask"}


@pytest.fixture(scope="module")
def metrics() -> Metrics:
    shape = (20, 22, 18)
    grid = Grid.from_spacing(shape, (1.5, 1.2, 1.3), (-10.0, -11.0, -9.0))
    labels = ellipsoid_labels(shape)
    image = phantom_image(labels)[0, 0].numpy()
    field = DisplacementField.from_voxels(smooth_field(shape, 1.5), grid)
    points = grid.voxel_to_world(np.array([[5.0, 6, 7], [10, 11, 9]]))
    mask = Image((labels[0, 0].numpy() > 1).astype(np.uint8), grid, "mask")
    result, *_ = evaluate(Image(image, grid), Image(image, grid), field,
                          fixed_labels=Image(labels[0, 0].numpy().astype(np.int32), grid),
                          moving_labels=Image(labels[0, 0].numpy().astype(np.int32), grid),
                          fixed_points=points, moving_points=points + 1.0, mask=mask)
    result.run = RunInfo(RegistrationOptions(seed=4), "ab" * 32, "cpu", (16, 16, 16), 2.0, 123.4,
                         {"network": 0.5, "total": 0.7})
    return result


def test_metrics_json_keeps_its_documented_keys(metrics):
    data = metrics.to_json()
    assert TOP_KEYS <= set(data)
    assert set(data["jacobian"]) == JACOBIAN_KEYS
    assert set(data["similarity"]) == {"before", "after"} and set(data["similarity"]["after"]) == {"ncc", "mi"}
    assert set(data["labels"]) == {"before", "after", "volume_change"}
    assert set(data["labels"]["after"]) == {"per_label", "mean_dice", "mean_hd95", "mean_assd"}
    assert set(next(iter(data["labels"]["after"]["per_label"].values()))) == {"dice", "hd95", "assd"}
    assert set(data["landmarks"]) == {"before", "after", "mean_before", "mean_after"}
    assert {"percent_nonpositive", "voxels", "sdlogj", "min", "max"} <= set(data["mask"])
    assert data["working_grid"] == {"shape": [16, 16, 16], "spacing_mm": 2.0}
    assert data["seed"] == 4 and data["time_s"]["total"] == 0.7


def test_metrics_round_trip_through_json(metrics, tmp_path):
    write_metrics(metrics, tmp_path / "metrics.json")
    text = (tmp_path / "metrics.json").read_text()
    back = Metrics.from_json(json.loads(text))
    assert strict_json(back.to_json()) == json.loads(text)
    assert back.labels.after.mean_dice == pytest.approx(metrics.labels.after.mean_dice)
    assert back.run.options == metrics.run.options


def test_metrics_json_is_strict_json_without_nan(metrics, tmp_path):
    metrics.similarity_after.ncc = float("nan")
    try:
        write_metrics(metrics, tmp_path / "metrics.json")
    finally:
        metrics.similarity_after.ncc = metrics.similarity_before.ncc
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text and json.loads(text)["similarity"]["after"]["ncc"] is None
