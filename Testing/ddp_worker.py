"""Run by Testing/test_training.py under torchrun: a few DDP steps, then each rank saves its weights."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "DeepRegistration")]

import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from training.recipe import load_recipe  # noqa: E402
from training.trainer import Trainer  # noqa: E402

recipe_path, out = sys.argv[1], Path(sys.argv[2])
trainer = Trainer(load_recipe(recipe_path), out, "cpu")
trainer.train(progress=False)
state = {k: v.contiguous() for k, v in trainer.network.state_dict().items()}
save_file(state, str(out / f"rank{trainer.rank}.safetensors"))
dist.destroy_process_group()
