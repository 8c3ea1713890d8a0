"""The trainer: reproducible on CPU, resumable without loss, clear errors first, real 2-process DDP."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.methods.models import load_model
from training.__main__ import main as training_main, reproduce_command
from training.recipe import Recipe
from training.trainer import Trainer

TINY = {"method": "lapirn", "config": {"working_shape": [16, 16, 16], "working_spacing": 2.0, "start_channels": 2,
                                       "num_res_blocks": 1},
        "data": {"kind": "phantom", "magnitude_mm": 3.0, "validation_pairs": 1},
        "iterations": 4, "schedule": "progressive", "freeze_iterations": 1,
        "stages": [{"levels": 1, "iterations": 1}, {"levels": 2, "iterations": 1}, {"levels": 3, "iterations": 2}],
        "validate_every": 2, "checkpoint_every": 2, "lr": 1e-3, "seed": 3}


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.network.state_dict().items()}


def test_fixed_seed_reproduces_and_resume_loses_nothing(tmp_path):
    a = Trainer(Recipe.from_dict(TINY), tmp_path / "a", "cpu")
    a.train(progress=False)
    b = Trainer(Recipe.from_dict(TINY), tmp_path / "b", "cpu")
    b.train(progress=False)
    c = Trainer(Recipe.from_dict(TINY), tmp_path / "c", "cpu")
    c.train(max_iterations=2, progress=False)
    resumed = Trainer(Recipe.from_dict(TINY), tmp_path / "c", "cpu")
    resumed.resume()
    assert resumed.iteration == 2
    resumed.train(progress=False)
    wa, wb, wc = weights(a), weights(b), weights(resumed)
    assert any(not torch.equal(wa[k], Trainer(Recipe.from_dict(TINY), tmp_path / "d", "cpu").network.state_dict()[k])
               for k in wa), "training changed nothing"
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
        assert torch.allclose(wa[k], wc[k], atol=1e-6), k
    meta = json.loads((tmp_path / "a" / "checkpoint.json").read_text())
    assert meta["iteration"] == 4 and meta["seed"] == 3 and meta["recipe"]["method"] == "lapirn"
    assert {"code_version", "data", "config", "validation"} <= set(meta)
    rows = (tmp_path / "a" / "metrics.csv").read_text().splitlines()
    assert any(",validation,dice," in r for r in rows) and any(",validation,folding_percent," in r for r in rows)


def test_progressive_schedule_freezes_coarse_levels_first(tmp_path):
    t = Trainer(Recipe.from_dict(TINY), tmp_path, "cpu")
    assert t.stage_at(0) == {"levels": 1, "frozen": []}
    assert t.stage_at(1) == {"levels": 2, "frozen": [1]}
    assert t.stage_at(2) == {"levels": 3, "frozen": [1, 2]}
    assert t.stage_at(3) == {"levels": 3, "frozen": []}


def test_alternating_schedule_trains_and_validates_after_either_update(tmp_path):
    """macjnet's alternating recipe: registration and segmentation updates each change only their own
    sub-networks, and validation (here after every update) scores the registration."""
    recipe = Recipe.from_dict({
        "method": "macjnet", "schedule": "alternating", "iterations": 2, "validate_every": 1, "checkpoint_every": 2,
        "config": {"working_shape": [32, 32, 32], "working_spacing": 2.0, "start_channels": 2,
                   "num_res_blocks": 1, "seg_features": [4, 4, 4, 4, 4], "seg_classes": 5,
                   "lr_registration": 1e-3, "lr_segmentation": 1e-3},
        "data": {"kind": "phantom", "magnitude_mm": 3.0, "validation_pairs": 1}})
    trainer = Trainer(recipe, tmp_path, "cpu")
    start = weights(trainer)
    trainer.train(max_iterations=1, progress=False)
    after_registration = weights(trainer)
    trainer.train(progress=False)
    after_segmentation = weights(trainer)

    def changed(a, b, prefix):
        return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))

    assert changed(start, after_registration, "levels") and not changed(start, after_registration, "seg_")
    assert changed(after_registration, after_segmentation, "seg_")
    assert not changed(after_registration, after_segmentation, "levels")
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert sum(",validation,dice," in r for r in rows) == 2
    assert any(",train,registration/similarity," in r for r in rows)  # both update kinds are logged
    assert any(",train,segmentation/total," in r for r in rows)


def test_alternating_schedule_pretrains_first(tmp_path):
    """`pretrain_iterations`: the first updates run with the network in pre-training mode, the rest jointly."""
    recipe = Recipe.from_dict({
        "method": "macjnet", "schedule": "alternating", "iterations": 4, "pretrain_iterations": 2,
        "config": {"working_shape": [32, 32, 32], "working_spacing": 2.0, "start_channels": 2,
                   "num_res_blocks": 1, "seg_features": [4, 4, 4, 4, 4], "seg_classes": 5},
        "data": {"kind": "phantom", "magnitude_mm": 3.0, "validation_pairs": 1}})
    trainer = Trainer(recipe, tmp_path, "cpu")
    assert [(s["stage"], s["pretraining"]) for s in map(trainer.stage_at, range(4))] == [
        ("registration", True), ("segmentation", True), ("registration", False), ("segmentation", False)]
    trainer.train(max_iterations=1, progress=False)
    assert trainer.network.pretraining
    with pytest.raises(InputError, match="alternating"):
        Recipe.from_dict({**TINY, "pretrain_iterations": 1})


def test_export_is_a_loadable_model(tmp_path):
    out = tmp_path / "run"
    model = tmp_path / "lapirn.safetensors"
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({**TINY, "iterations": 1, "stages": [{"levels": 1, "iterations": 1}]}))
    assert training_main(["train", str(recipe), "--out", str(out), "--device", "cpu", "--quiet",
                          "--export", str(model)]) == 0
    net, meta = load_model("lapirn", model)
    assert meta["record"]["iteration"] == 1 and meta["record"]["recipe"]["iterations"] == 1
    assert training_main(["train", str(recipe), "--out", str(out), "--device", "cpu", "--quiet"]) == 2


def test_recorded_command_reproduces_the_model(tmp_path):
    """A model trained from a shipped recipe with --set changes and an early stop records one command that
    retrains exactly the same weights."""
    sets = [f"{k}={json.dumps(v)}" for k, v in [
        ("config.working_shape", [16, 16, 16]), ("config.working_spacing", 2.0), ("config.start_channels", 2),
        ("config.num_res_blocks", 1), ("data.kind", "phantom"), ("data.magnitude_mm", 3.0),
        ("data.validation_pairs", 1), ("iterations", 4), ("stages", TINY["stages"]), ("freeze_iterations", 1),
        ("validate_every", 2), ("checkpoint_every", 2), ("lr", 1e-3), ("seed", 3)]]
    first = tmp_path / "first.safetensors"
    argv = ["train", "lapirn", "--device", "cpu", "--out", str(tmp_path / "a"), "--iterations", "2", "--quiet",
            "--export", str(first)] + [w for s in sets for w in ("--set", s)]
    assert training_main(argv) == 0
    command = shlex.split(reproduce_command(load_model("lapirn", first)[1]["record"]))
    assert command[:4] == ["python", "-m", "training", "train"] and "--iterations" in command
    again = tmp_path / "again.safetensors"
    command[command.index("--export") + 1] = str(again)
    assert training_main(command[3:] + ["--out", str(tmp_path / "b"), "--quiet"]) == 0
    a, b = load_file(str(first)), load_file(str(again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_method_or_config(tmp_path):
    Trainer(Recipe.from_dict({**TINY, "iterations": 1, "stages": [{"levels": 1, "iterations": 1}]}), tmp_path,
            "cpu").train(progress=False)
    other = Trainer(Recipe.from_dict({**TINY, "config": {**TINY["config"], "start_channels": 3}}), tmp_path, "cpu")
    with pytest.raises(InputError, match="config differs .*start_channels"):
        other.resume()
    vm = Trainer(Recipe.from_dict({"method": "voxelmorph", "config": {"working_shape": [16, 16, 16]},
                                   "data": {"kind": "phantom", "validation_pairs": 1}, "iterations": 1}),
                 tmp_path, "cpu")
    with pytest.raises(InputError, match="checkpoint of method 'lapirn'"):
        vm.resume()


@pytest.mark.parametrize("change, message", [
    ({"schedule": "nosuch"}, "unknown schedule"),
    ({"iterations": 5}, "stages whose iterations add up"),
    ({"stages": []}, "progressive schedule needs stages"),
    ({"config": {"no_such_field": 1}}, "has no field"),
    ({"data": {"kind": "folder"}}, "needs data.folder"),
    ({"method": "nosuch"}, "unknown method"),
    ({"colour": "red"}, "unknown field"),
])
def test_recipe_errors(change, message):
    with pytest.raises(InputError, match=message):
        Recipe.from_dict({**TINY, **change})


def test_folder_errors_come_before_compute(tmp_path):
    (tmp_path / "images").mkdir()
    recipe = {**TINY, "data": {"kind": "folder", "folder": str(tmp_path), "validation_pairs": 1}}
    with pytest.raises(InputError, match="no pairs.csv and no images"):
        Trainer(Recipe.from_dict(recipe), tmp_path / "run", "cpu")
    (tmp_path / "pairs.csv").write_text("fixed,moving\na.nii.gz,b.nii.gz\n")
    with pytest.raises(InputError, match="a.nii.gz does not exist"):
        Trainer(Recipe.from_dict(recipe), tmp_path / "run", "cpu")
    jad = {"method": "jad", "config": {"working_shape": [16, 16, 16]}, "iterations": 1,
           "data": {"kind": "folder", "folder": str(tmp_path), "validation_pairs": 1}}
    from DeepRegistrationLib.core.geometry import Grid
    from DeepRegistrationLib.core.image import Image, write_image
    import numpy as np
    for name in ("a", "b", "c"):
        write_image(Image(np.random.rand(8, 8, 8).astype(np.float32), Grid((8, 8, 8), np.eye(4))),
                    tmp_path / f"{name}.nii.gz")
    (tmp_path / "pairs.csv").write_text("fixed,moving\na.nii.gz,b.nii.gz\nb.nii.gz,c.nii.gz\n")
    with pytest.raises(InputError, match="needs label maps for every pair"):
        Trainer(Recipe.from_dict(jad), tmp_path / "run", "cpu")


def test_two_process_ddp_on_cpu_keeps_ranks_identical(tmp_path):
    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps({**TINY, "iterations": 3, "validate_every": 100, "checkpoint_every": 100,
                                  "stages": [{"levels": 1, "iterations": 1}, {"levels": 3, "iterations": 2}]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", worker,
           str(recipe), str(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    r0 = load_file(str(tmp_path / "run" / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "run" / "rank1.safetensors"))
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    fresh = Trainer(Recipe.from_dict(TINY), tmp_path / "fresh", "cpu").network.state_dict()
    assert any(not torch.equal(r0[k], fresh[k]) for k in r0), "DDP training changed nothing"
