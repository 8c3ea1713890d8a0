"""The one trainer: every method, one process or many (torchrun → DistributedDataParallel).

Checkpoints are `checkpoint.safetensors` (model, optimiser state and RNG state as tensors) plus `checkpoint.json`
(the recipe, the method config, the data manifest, the iteration, the seed and the code version), written
atomically every `checkpoint_every` iterations; `resume` continues from them, losing at most that interval.
Training loss terms are logged to `metrics.csv` (and TensorBoard when installed) as their means over every
`LOG_EVERY` iterations, per update kind for the alternating schedule ("registration/…", "segmentation/…");
validation every `validate_every` iterations logs loss, Dice of warped labels and % det J ≤ 0.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from DeepRegistrationLib import __version__
from DeepRegistrationLib.core import warp
from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.core.image import atomic_path
from DeepRegistrationLib.core.metrics import dice_per_label
from DeepRegistrationLib.methods.models import save_model
from DeepRegistrationLib.methods.networks.base import RegistrationNetwork
from DeepRegistrationLib.core.padding import crop_to_shape, pad_to_multiple

from . import efficient
from .datasets import FolderPairs, SyntheticPairs
from .provenance import data_manifest
from .recipe import Recipe

CHECKPOINT = "checkpoint.safetensors"

LOG_EVERY = 10
"""Training loss terms are logged as means over this many iterations."""


def code_version() -> str:
    """Package version and, inside a git checkout, the commit."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def build_datasets(recipe: Recipe, network: RegistrationNetwork) -> tuple[Dataset, Dataset]:
    """Training and held-out validation pairs; errors come before any compute."""
    config, data = network.config, recipe.data
    shape = tuple(config.working_shape)
    spacing = config.working_spacing
    needs_labels = recipe.schedule != "alternating" and _needs_labels(recipe.method)
    if data.kind == "folder":
        train = FolderPairs(data.folder, spacing, shape, False, data.validation_pairs, needs_labels)
        val = FolderPairs(data.folder, spacing, shape, True, data.validation_pairs, needs_labels)
        return train, val
    length = recipe.iterations * recipe.batch_size
    labelled = None
    if recipe.schedule == "alternating":
        from DeepRegistrationLib.methods.networks.macjnet import labelled_pairs

        labelled = set(labelled_pairs(length, config.labelled_fraction, recipe.seed))
    truth = recipe.warm_start_iterations > 0
    train = SyntheticPairs(data, spacing, shape, length, recipe.seed, labelled=labelled, with_truth=truth)
    val = SyntheticPairs(data, spacing, shape, data.validation_pairs, recipe.seed, validation=True,
                         with_truth=True)
    return train, val


def _needs_labels(method: str) -> bool:
    from DeepRegistrationLib.methods.registry import get_method

    return get_method(method).training_needs_labels


class Logger:
    """CSV (always) and TensorBoard (when installed) scalars, on rank 0 only."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.enabled, self.path, self.tb = enabled, out / "metrics.csv", None
        if enabled:
            out.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                self.tb = None

    def log(self, iteration: int, phase: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["iteration", "phase", "name", "value"])
            for name, value in values.items():
                writer.writerow([iteration, phase, name, f"{value:.6g}"])
        if self.tb is not None:
            for name, value in values.items():
                self.tb.add_scalar(f"{phase}/{name}", value, iteration)
            self.tb.flush()


def _batch_to(batch: dict[str, torch.Tensor], device: torch.device, multiple: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in batch.items():
        value = value.to(device)
        out[key] = pad_to_multiple(value.float() if "labels" not in key else value.float(), multiple).to(value.dtype)
    return out


def optimiser_state_tensors(optimisers: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimiser states as flat tensors (for safetensors) plus the JSON-able rest."""
    tensors, rest = {}, []
    for o, opt in enumerate(optimisers):
        state = opt.state_dict()
        entry = {"param_groups": state["param_groups"], "scalars": {}}
        for pid, pstate in state["state"].items():
            for key, value in pstate.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{o}.{pid}.{key}"] = value.detach().cpu().contiguous()
                else:
                    entry["scalars"][f"{pid}.{key}"] = value
        rest.append(entry)
    return tensors, {"optimisers": rest}


def load_optimiser_state(optimisers: list[torch.optim.Optimizer], tensors: dict[str, torch.Tensor],
                         meta: dict) -> None:
    for o, (opt, entry) in enumerate(zip(optimisers, meta["optimisers"])):
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            parts = key.split(".")
            if parts[0] == "optim" and int(parts[1]) == o:
                state.setdefault(int(parts[2]), {})[parts[3]] = value
        for key, value in entry["scalars"].items():
            pid, name = key.split(".")
            state.setdefault(int(pid), {})[name] = value
        opt.load_state_dict({"state": state, "param_groups": entry["param_groups"]})


class Trainer:
    """Runs one recipe into `out_dir` on `device` (torchrun sets up the process group from the environment)."""

    def __init__(self, recipe: Recipe, out_dir: str | Path, device: str = "auto") -> None:
        self.recipe, self.out = recipe, Path(out_dir)
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
            dist.init_process_group(backend)
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.device = self._device(device)
        torch.manual_seed(recipe.seed + self.rank)
        from DeepRegistrationLib.methods.registry import get_method

        self.spec = get_method(recipe.method)
        self.data_record = data_manifest(recipe)  # hashes and hold-out checks before any compute
        self.network = self.spec.build(recipe.method_config())
        self.initialised = self._initialise(self.network)
        self.network = self.network.to(self.device)
        self.train_set, self.val_set = build_datasets(recipe, self.network)
        self.optimisers = self._optimisers()
        self.iteration = 0
        self.elapsed = 0.0
        self.logger = Logger(self.out, self.rank == 0)
        self.last_validation: dict[str, float] = {}
        self.validation_s = 0.0  # wall time spent validating (a time budget excludes it)

    def _initialise(self, network: RegistrationNetwork) -> dict[str, list[str]]:
        """The recipe's output-layer initialisation (`output_init_std`) and zero output layers for the pyramid
        levels that later stages add (`new_level_init` "zero"); returns the layers changed."""
        r, done = self.recipe, {}
        if r.output_init_std is not None:
            done["output_init_std"] = efficient.init_output_layers(network, r.output_init_std)
        if r.new_level_init == "zero" and r.stages:
            first = r.stages[0]["levels"]
            done["zero_levels"] = efficient.zero_level_outputs(network, list(range(first + 1, 4)))
        return done

    def _device(self, device: str) -> torch.device:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda" and self.distributed:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        return dev

    def _optimisers(self) -> list[torch.optim.Optimizer]:
        if self.recipe.schedule == "alternating":
            c = self.network.config
            return [torch.optim.Adam(self.network.registration_parameters(), lr=c.lr_registration),
                    torch.optim.Adam(self.network.segmentation_parameters(), lr=c.lr_segmentation)]
        return [torch.optim.Adam(self.network.parameters(), lr=self.recipe.lr)]

    # -- schedule ------------------------------------------------------------------------------------------------
    def stage_at(self, iteration: int) -> dict[str, Any]:
        """Schedule state at 0-based `iteration`: active and frozen pyramid levels (when the recipe has `stages`)
        and, for the alternating schedule, whether it is a registration or a segmentation update and whether it is
        still pre-training (`pretrain_iterations`)."""
        r = self.recipe
        state: dict[str, Any] = {}
        if r.stages:
            start = 0
            for stage in r.stages:
                if iteration < start + stage["iterations"] or stage is r.stages[-1]:
                    levels = stage["levels"]
                    frozen = list(range(1, levels)) if iteration - start < r.freeze_iterations else []
                    state.update(levels=levels, frozen=frozen)
                    break
                start += stage["iterations"]
        if r.schedule == "alternating":
            from DeepRegistrationLib.methods.networks.macjnet import alternating_stage

            state["stage"] = alternating_stage(iteration, self.network.config.stage_length)
            state["pretraining"] = iteration < r.pretrain_iterations
        return state

    def _set_learning_rate(self, optimiser: torch.optim.Optimizer) -> None:
        """The recipe's schedule (`efficient.learning_rate`: step decay, or warm-up and cosine) from each group's
        initial rate; a function of the iteration alone, so a resumed run continues it exactly."""
        r = self.recipe
        if not (r.lr_step or r.warmup_iterations or r.lr_schedule == "cosine"):
            return
        for group in optimiser.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = efficient.learning_rate(r, group["initial_lr"], self.iteration)

    def loss_terms(self, output, batch: dict[str, torch.Tensor], stage: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The paper's loss, or during the warm start the end-point error to the true field; plus the labels'
        Dice term (`dice_weight`, from iteration `dice_from` on) on registration updates of pairs with labels."""
        r = self.recipe
        registration = stage.get("stage", "registration") == "registration"
        if registration and self.iteration < r.warm_start_iterations and "displacement" in batch:
            epe = efficient.end_point_error(output, batch, self.network.config.working_spacing)
            return {"epe_mm": epe, "total": epe}
        terms = self.network.loss(output, batch)
        if registration and r.dice_weight > 0 and self.iteration >= r.dice_from:
            dice = efficient.label_dice_loss(output, batch)
            if dice is not None:
                terms["dice"] = dice
                terms["total"] = terms["total"] + r.dice_weight * dice
        return terms

    def _apply_stage(self, stage: dict[str, Any]) -> None:
        net = self.network
        if "levels" in stage:
            net.active_levels = stage["levels"]
            net.unfreeze_levels(range(1, 4))
            net.freeze_levels(stage["frozen"])
        if "stage" in stage:
            net.set_stage(stage["stage"], pretraining=stage["pretraining"])

    def _wrapped(self) -> torch.nn.Module:
        if not self.distributed:
            return self.network
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.network, device_ids=ids, find_unused_parameters=True)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def checkpoint_meta(self) -> dict[str, Any]:
        return {"method": self.recipe.method, "recipe": self.recipe.to_dict(),
                "config": self.network.config.to_dict(), "iteration": self.iteration, "seed": self.recipe.seed,
                "code_version": code_version(), "data": self.data_record, "initialised": self.initialised,
                "wall_time_s": round(self.elapsed, 1), "world_size": self.world,
                "hardware": {"device": str(self.device), "cpu": platform.processor() or platform.machine(),
                             "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None},
                "validation": self.last_validation}

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}
        opt_tensors, opt_meta = optimiser_state_tensors(self.optimisers)
        tensors.update(opt_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        self.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.out / CHECKPOINT) as tmp:
            save_file(tensors, str(tmp))
        meta = {**self.checkpoint_meta(), **opt_meta}
        with atomic_path(self.out / "checkpoint.json") as tmp:
            tmp.write_text(json.dumps(meta, indent=2) + "\n")

    def resume(self) -> None:
        """Continue from `out_dir`'s checkpoint; InputError when it belongs to another method or config."""
        meta_path = self.out / "checkpoint.json"
        if not meta_path.is_file():
            raise InputError(f"{self.out}: no checkpoint to resume from")
        meta = json.loads(meta_path.read_text())
        if meta["method"] != self.recipe.method:
            raise InputError(f"{meta_path}: checkpoint of method {meta['method']!r}, recipe is {self.recipe.method!r}")
        if meta["config"] != self.network.config.to_dict():
            diff = sorted(k for k in meta["config"] if meta["config"][k] != self.network.config.to_dict().get(k))
            raise InputError(f"{meta_path}: checkpoint config differs from the recipe's in {diff}")
        if meta.get("data") != self.data_record:
            old, new = meta.get("data") or {}, self.data_record
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise InputError(f"{meta_path}: the checkpoint was trained on other data than this recipe reads "
                             f"(data manifest differs in {diff}); resume with the recorded recipe and anatomy, "
                             "or start a new run with another --out")
        tensors = load_file(str(self.out / CHECKPOINT))
        self.network.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        load_optimiser_state(self.optimisers, tensors, meta)
        torch.set_rng_state(tensors["rng.torch"])
        self.iteration, self.elapsed = meta["iteration"], meta.get("wall_time_s", 0.0)
        self.last_validation = meta.get("validation", {})

    # -- loop ----------------------------------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        sampler = DistributedCyclicSampler(len(self.train_set), self.recipe.batch_size, self.iteration,
                                           self.rank, self.world)
        return iter(DataLoader(self.train_set, batch_size=self.recipe.batch_size, sampler=sampler,
                               num_workers=self.recipe.workers, persistent_workers=self.recipe.workers > 0))

    def train(self, max_iterations: int | None = None, progress: bool = True, max_seconds: float | None = None,
              on_validation=None) -> Path:
        """Train to `recipe.iterations` (or `max_iterations` more, or until `max_seconds` of wall time, validation
        excluded, have passed in this call: then the stop iteration is validated and checkpointed); returns the
        checkpoint path.
        `on_validation(trainer, summary)` is called after every validation (`compare` records its curve)."""
        r = self.recipe
        end = r.iterations if max_iterations is None else min(r.iterations, self.iteration + max_iterations)
        started, validated = time.perf_counter(), self.validation_s
        self.on_validation = on_validation
        model = None
        current_stage: dict[str, Any] | None = None
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if r.amp and self.device.type == "cuda"
                    else nullcontext())
        bar = None
        if progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=r.iterations, initial=self.iteration, desc=r.method, unit="it", dynamic_ncols=True)
        batches = self._batches()
        running: dict[str, list[torch.Tensor]] = {}  # detached terms, read out only when logged (no sync)
        self.network.train()
        while self.iteration < end:
            if max_seconds is not None and (time.perf_counter() - started
                                            - (self.validation_s - validated)) >= max_seconds:
                end = self.iteration  # out of budget: validate and checkpoint these weights below
                if self.last_validation.get("iteration") != self.iteration:
                    self.validate()
                self.save_checkpoint()
                break
            stage = self.stage_at(self.iteration)
            if stage != current_stage or model is None:
                self._apply_stage(stage)
                model, current_stage = self._wrapped(), stage
            batch = _batch_to(next(batches), self.device, self.network.multiple)
            start = time.perf_counter()
            optimisers = self.optimisers
            if "stage" in stage:
                optimisers = [self.optimisers[0 if stage["stage"] == "registration" else 1]]
            for opt in optimisers:
                self._set_learning_rate(opt)
                opt.zero_grad(set_to_none=True)
            with autocast:
                output = model(batch["fixed"], batch["moving"])
                terms = self.loss_terms(output, batch, stage)
            terms["total"].backward()
            for opt in optimisers:
                opt.step()
            self.elapsed += time.perf_counter() - start
            self.iteration += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{terms['total'].item():.4f}")
            prefix = f"{stage['stage']}/" if "stage" in stage else ""
            for k, v in terms.items():
                running.setdefault(prefix + k, []).append(v.detach())
            if self.iteration % LOG_EVERY == 0 or self.iteration == end:
                self.logger.log(self.iteration, "train",
                                {k: torch.stack(v).float().mean().item() for k, v in running.items()})
                running.clear()
            if self.iteration % r.validate_every == 0 or self.iteration == end:
                self.validate()
                self.network.train()
                self._apply_stage(stage)
            if self.iteration % r.checkpoint_every == 0 or self.iteration == end:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        return self.out / CHECKPOINT

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss, mean Dice of warped labels (and of the identity) and % det J ≤ 0 on the held-out pairs."""
        net = self.network
        clock = time.perf_counter()
        was = net.active_levels if hasattr(net, "active_levels") else None
        net.eval()
        if hasattr(net, "set_stage"):  # macjnet: validation scores the registration, whichever update came last
            net.set_stage("registration")
        totals: dict[str, list[float]] = {"loss": [], "dice": [], "dice_identity": [], "folding_percent": [],
                                          "epe_mm": []}
        for i in range(len(self.val_set)):
            item = self.val_set[i]
            batch = _batch_to({k: v[None] for k, v in item.items()}, self.device, net.multiple)
            shape = item["fixed"].shape[1:]
            output = net(batch["fixed"], batch["moving"])
            totals["loss"].append(float(net.loss(output, batch)["total"]))
            disp = crop_to_shape(output.displacement.float(), shape)
            det = warp.jacobian_determinant(disp)
            totals["folding_percent"].append(float((det <= 0).float().mean()) * 100)
            if "displacement" in item:
                error = (disp.cpu() - item["displacement"][None].float()).norm(dim=1).mean()
                totals["epe_mm"].append(float(error) * net.config.working_spacing)
            if "fixed_labels" in item:
                fixed_labels = item["fixed_labels"][0].numpy()
                moving_labels = crop_to_shape(batch["moving_labels"], shape)
                warped = warp.warp_labels(moving_labels.long(), disp).cpu()[0, 0].numpy()
                dice = dice_per_label(fixed_labels, warped)
                ident = dice_per_label(fixed_labels, item["moving_labels"][0].numpy())
                totals["dice"].append(float(np.nanmean(list(dice.values()))))
                totals["dice_identity"].append(float(np.nanmean(list(ident.values()))))
        summary = {k: float(np.mean(v)) for k, v in totals.items() if v}
        if was is not None:
            net.active_levels = was
        self.last_validation = {**summary, "iteration": self.iteration}
        self.logger.log(self.iteration, "validation", summary)
        self.validation_s += time.perf_counter() - clock
        if getattr(self, "on_validation", None) is not None:
            self.on_validation(self, summary)
        return summary

    def export(self, path: str | Path) -> Path:
        """Write the trained network as a shipped model (safetensors + JSON with the training record)."""
        record = self.checkpoint_meta()
        record.pop("config")
        return save_model(self.network, self.recipe.method, path, record)


class DistributedCyclicSampler(Sampler[int]):
    """Indices for iteration t ≥ `start` on rank r of `world`: ((t·world + r)·B + b) mod n, b < B.

    Each rank sees disjoint pairs, a resumed run continues where it stopped, and a folder of n pairs is cycled.
    """

    def __init__(self, n: int, batch_size: int, start: int, rank: int, world: int) -> None:
        self.n, self.batch, self.start, self.rank, self.world = n, batch_size, start, rank, world

    def __iter__(self) -> Iterator[int]:
        t = self.start
        while True:
            for b in range(self.batch):
                yield ((t * self.world + self.rank) * self.batch + b) % self.n
            t += 1
