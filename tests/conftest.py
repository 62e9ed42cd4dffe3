import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from facelab.utils import compose_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny tensors: one thread is fastest and never oversubscribes

TINY_UNET = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=4, attention_head_dim=8)
# Hydra overrides that shrink the training experiments to seconds on a CPU.
TINY_TRAIN = [
    "data.dataset.size=16", "data.dataset.length=24", "data.batch_size=4", "data.val_fraction=0.25",
    "model.unet.block_out_channels=[8,16]", "model.unet.down_block_types=[DownBlock2D,AttnDownBlock2D]",
    "model.unet.up_block_types=[AttnUpBlock2D,UpBlock2D]", "model.unet.norm_num_groups=4",
    "model.unet.attention_head_dim=8", "trainer.accelerator=cpu", "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1", "callbacks.sample_grid.steps=2", "callbacks.sample_grid.num_samples=2",
    "callbacks.sample_grid.every_n_steps=2", "callbacks.model_checkpoint.every_n_train_steps=2",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A local diffusers folder (unet/ + scheduler/) with a tiny random UNet."""
    folder = tmp_path_factory.mktemp("tiny_ddpm")
    torch.manual_seed(0)
    UNet2DModel(**TINY_UNET).save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(folder / "scheduler")
    return folder


def run_cli(module: str, *overrides: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m facelab.<module> overrides...` as a user would."""
    env = {**os.environ, "FACELAB_ROOT": str(cwd or ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", f"facelab.{module}", *overrides], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=600)


compose = compose_config  # compose(config_name, overrides, run_dir)
