"""The sample-efficient recipe fields (training/efficient.py) and the trainer's bad-input checks: all on phantoms,
a few iterations on 16³ grids."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.core.geometry import Grid
from DeepRegistrationLib.core.image import Image, write_image
from DeepRegistrationLib.methods.registry import METHODS, network_names
from training import efficient
from training.compare import compare
from training.recipe import Recipe, load_recipe
from training.trainer import Trainer

VM = {"method": "voxelmorph", "config": {"working_shape": [16, 16, 16], "working_spacing": 2.0,
                                         "encoder_features": [4, 8, 8, 8], "decoder_features": [8, 8, 8, 8, 8, 4, 4]},
      "data": {"kind": "phantom", "magnitude_mm": 4.0, "validation_pairs": 1, "pool": 2},
      "iterations": 8, "lr": 3e-3, "validate_every": 8, "checkpoint_every": 8, "seed": 1}

LAP = {"method": "lapirn", "config": {"working_shape": [16, 16, 16], "working_spacing": 2.0, "start_channels": 2,
                                      "num_res_blocks": 1},
       "data": {"kind": "phantom", "magnitude_mm": 3.0, "validation_pairs": 1}, "iterations": 3,
       "schedule": "progressive", "stages": [{"levels": 1, "iterations": 1}, {"levels": 2, "iterations": 1},
                                             {"levels": 3, "iterations": 1}],
       "validate_every": 3, "checkpoint_every": 3, "lr": 1e-3}


def _pair_epe(trainer: Trainer) -> float:
    """EPE (mm) of the trainer's network on its one training pair (pool 1)."""
    item = trainer.train_set[0]
    batch = {k: v[None] for k, v in item.items()}
    with torch.no_grad():
        return float(efficient.end_point_error(trainer.network(batch["fixed"], batch["moving"]), batch, 2.0))


def test_warm_start_lowers_the_end_point_error_within_a_few_iterations(tmp_path):
    """20 supervised updates on the true field of a 16³ phantom pair cut the EPE by more than half, and below what
    the paper's loss reaches with the same updates and seed."""
    torch.set_num_threads(1)
    recipe = {**LAP, "schedule": "plain", "stages": [], "iterations": 20, "lr": 3e-3, "validate_every": 20,
              "checkpoint_every": 20, "data": {**LAP["data"], "magnitude_mm": 4.0, "pool": 1}}
    warm = Trainer(Recipe.from_dict({**recipe, "warm_start_iterations": 20}), tmp_path / "warm", "cpu")
    paper = Trainer(Recipe.from_dict(recipe), tmp_path / "paper", "cpu")
    paper.train_set.with_truth = True  # to measure its EPE; its loss does not read the field
    identity = _pair_epe(warm)
    warm.train(progress=False)
    paper.train(progress=False)
    assert _pair_epe(warm) < 0.5 * identity, (identity, _pair_epe(warm))
    assert _pair_epe(warm) < 0.8 * _pair_epe(paper), (_pair_epe(warm), _pair_epe(paper))
    rows = (tmp_path / "warm" / "metrics.csv").read_text()
    assert ",train,epe_mm," in rows and ",validation,epe_mm," in rows


def test_learning_rate_schedules():
    r = Recipe.from_dict({**VM, "iterations": 100, "lr_schedule": "cosine", "warmup_iterations": 10,
                          "lr_min": 1e-5})
    rates = [efficient.learning_rate(r, 1e-3, i) for i in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert rates[10] == pytest.approx(1e-3) and rates[99] == pytest.approx(1e-5, rel=0.05)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    step = Recipe.from_dict({**VM, "lr_step": 4, "lr_gamma": 0.5})
    assert [efficient.learning_rate(step, 1.0, i) for i in (0, 3, 4, 8)] == [1.0, 1.0, 0.5, 0.25]
    with pytest.raises(InputError, match="unknown lr_schedule"):
        Recipe.from_dict({**VM, "lr_schedule": "linear"})


def test_new_levels_start_at_zero_and_output_init(tmp_path):
    t = Trainer(Recipe.from_dict({**LAP, "new_level_init": "zero"}), tmp_path / "a", "cpu")
    assert t.initialised["zero_levels"] == ["levels.1.head.out", "levels.2.head.out"]
    net = t.network
    net.active_levels = 3
    fixed, moving = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        out = net(fixed, moving)
    assert float(out.levels[1]["residual"].abs().max()) == 0.0 and float(out.levels[2]["residual"].abs().max()) == 0.0
    assert float(out.levels[0]["residual"].abs().max()) > 0.0
    vm = Trainer(Recipe.from_dict({**VM, "output_init_std": 0.01}), tmp_path / "b", "cpu")
    assert vm.initialised["output_init_std"] == ["flow"]
    assert 0.005 < float(vm.network.flow.weight.detach().std()) < 0.02
    for name in network_names():  # every network has output layers the initialisation finds
        spec = METHODS[name]
        layers = efficient.output_layers(spec.build(spec.config_class.from_dict({"working_shape": [16, 16, 16]})))
        assert layers and all(m.weight.shape[0] in (2, 3) for m in layers.values()), name


def test_dice_term_where_labels_exist(tmp_path):
    t = Trainer(Recipe.from_dict({**VM, "dice_weight": 0.5}), tmp_path, "cpu")
    item = t.train_set[0]
    batch = {k: v[None] for k, v in item.items()}
    output = t.network(batch["fixed"], batch["moving"])
    terms = t.loss_terms(output, batch, {})
    terms = {k: float(v.detach()) for k, v in terms.items()}
    assert "dice" in terms
    assert terms["total"] == pytest.approx(terms["similarity"] + terms["smoothness"] + 0.5 * terms["dice"], rel=1e-5)
    unlabelled = {k: v for k, v in batch.items() if "labels" not in k}
    assert "dice" not in t.loss_terms(output, unlabelled, {})


def test_dice_term_starts_at_dice_from(tmp_path):
    t = Trainer(Recipe.from_dict({**VM, "dice_weight": 0.5, "dice_from": 4}), tmp_path, "cpu")
    item = t.train_set[0]
    batch = {k: v[None] for k, v in item.items()}
    output = t.network(batch["fixed"], batch["moving"])
    seen = {}
    for t.iteration in (0, 3, 4, 7):
        seen[t.iteration] = "dice" in t.loss_terms(output, batch, {})
    assert seen == {0: False, 3: False, 4: True, 7: True}
    with pytest.raises(InputError, match="dice_from needs a dice_weight"):
        Recipe.from_dict({**VM, "dice_from": 4})
    with pytest.raises(InputError, match="is not before the run's end"):
        Recipe.from_dict({**VM, "dice_weight": 0.5, "dice_from": 8})


@pytest.mark.parametrize("method", sorted(network_names()))
def test_cpu_recipes_change_the_paper_recipe_only_as_documented(method):
    paper, cpu = load_recipe(method), load_recipe(f"{method}_cpu")
    assert paper.warm_start_iterations == 0 and paper.dice_weight == 0 and paper.new_level_init == "paper"
    assert paper.lr_schedule == "step" and paper.data.warps == "random" and "colin27" in paper.data.held_out
    assert cpu.warm_start_iterations > 0 and cpu.lr_schedule == "cosine" and cpu.data.warps == "bank"
    assert cpu.data.held_out == ["colin27"] and "colin27" not in cpu.data.subjects
    assert cpu.method_config().working_spacing == 4.0


def test_resume_refuses_a_checkpoint_of_other_data(tmp_path):
    Trainer(Recipe.from_dict({**VM, "iterations": 1}), tmp_path, "cpu").train(progress=False)
    other = Trainer(Recipe.from_dict({**VM, "data": {**VM["data"], "magnitude_mm": 5.0}}), tmp_path, "cpu")
    with pytest.raises(InputError, match=r"trained on other data .*differs in \['spec'\]"):
        other.resume()
    same = Trainer(Recipe.from_dict(VM), tmp_path, "cpu")
    same.resume()
    assert same.iteration == 1


def test_held_out_subject_without_manifest_stops_before_compute(tmp_path):
    recipe = Recipe.from_dict({**VM, "data": {"kind": "known_warp", "anatomy_dir": str(tmp_path),
                                              "subjects": ["icbm152_2009a"], "held_out": ["colin27"]}})
    with pytest.raises(InputError, match="no fetch manifest"):
        Trainer(recipe, tmp_path / "run", "cpu")


def test_folder_labels_on_another_grid_stop_before_compute(tmp_path):
    grid = Grid((8, 8, 8), np.eye(4))
    coarse = Grid.from_spacing((4, 4, 4), (2.0,) * 3, (0.0, 0.0, 0.0), np.eye(3))
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name in ("a", "b", "c"):
        write_image(Image(np.random.rand(8, 8, 8).astype(np.float32), grid), tmp_path / "images" / f"{name}.nii.gz")
        labels = np.ones((4, 4, 4) if name == "b" else (8, 8, 8), np.int16)
        write_image(Image(labels, coarse if name == "b" else grid), tmp_path / "labels" / f"{name}.nii.gz")
    recipe = Recipe.from_dict({**VM, "data": {"kind": "folder", "folder": str(tmp_path), "validation_pairs": 1}})
    with pytest.raises(InputError, match=r"labels/b.nii.gz: label map grid \(shape \[4, 4, 4\], spacing \[2.0, 2.0, "
                                         r"2.0\] mm\) differs from its image"):
        Trainer(recipe, tmp_path / "run", "cpu")


def test_budget_stop_and_compare_write_a_curve(tmp_path):
    """`compare` with a tiny budget: both recipes validated at 0 and at their stop, curve.csv and curve.png."""
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps({**VM, "iterations": 1000, "validate_every": 5}))
    new.write_text(json.dumps({**VM, "iterations": 1000, "validate_every": 5, "warm_start_iterations": 500}))
    rows = compare("voxelmorph", 0.05, tmp_path / "cmp", str(old), str(new), log=lambda _: None)
    for label in ("old", "new"):
        points = [r for r in rows if r["recipe"] == label]
        assert points[0]["iteration"] == 0 and points[-1]["iteration"] > 0
        assert points[-1]["wall_s"] <= 0.05 * 60 + 10
        assert all(math.isfinite(r["dice"]) for r in points)
    assert (tmp_path / "cmp" / "curve.png").stat().st_size > 1000
    assert (tmp_path / "cmp" / "curve.csv").read_text().startswith("recipe,name,iteration,wall_s,dice")


def test_score_puts_a_model_file_on_a_recipes_validation_pairs(tmp_path):
    """`score_model`: an exported model scores what its run's last validation logged (same pairs, same weights);
    a model of another method is named."""
    from training.compare import score_model

    path = tmp_path / "recipe_vm.json"
    path.write_text(json.dumps(VM))
    trainer = Trainer(load_recipe(str(path)), tmp_path / "run", "cpu")
    trainer.train(progress=False)
    model = trainer.export(tmp_path / "vm.safetensors")
    scored = score_model(model, str(path))
    for key in ("dice", "dice_identity", "epe_mm"):
        assert scored[key] == pytest.approx(trainer.last_validation[key], rel=1e-5), key
    lap = tmp_path / "recipe_lap.json"
    lap.write_text(json.dumps(LAP))
    with pytest.raises(InputError, match="this model is for method 'voxelmorph', not 'lapirn'"):
        score_model(model, str(lap))
