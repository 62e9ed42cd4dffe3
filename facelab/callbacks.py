"""Lightning callbacks shared by the training experiments."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch

from facelab.io.grids import image_grid, save_grid


class SampleGrid(pl.Callback):
    """Every `every_n_steps` (and at the end), sample a grid from the module's EMA denoiser with DDIM.

    The module provides `sample_images(num, steps, generator) -> [N,3,H,W]` in [-1,1]. Grids are written to
    `<run dir>/samples/step_XXXXXX.png` and sent to every logger that takes images (TensorBoard, wandb).
    """

    def __init__(self, every_n_steps: int = 1000, num_samples: int = 16, steps: int = 50, seed: int = 0):
        self.every_n_steps, self.num_samples, self.steps, self.seed = every_n_steps, num_samples, steps, seed

    def _log(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not hasattr(module, "sample_images") or not trainer.is_global_zero:  # sampling needs no other rank
            return
        generator = torch.Generator(module.device).manual_seed(self.seed)
        images = module.sample_images(self.num_samples, self.steps, generator)
        step = trainer.global_step
        save_grid(images, Path(trainer.default_root_dir) / "samples" / f"step_{step:06d}.png", upscale=2)
        grid = image_grid(images)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard
                experiment.add_image("samples", grid, step, dataformats="HWC")
            elif hasattr(logger, "log_image"):  # wandb
                logger.log_image("samples", [grid], step=step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if not self.every_n_steps or trainer.global_step % self.every_n_steps:
            self._log(trainer, pl_module)


RUN_RECORD = "facelab_run"  # the checkpoint key of RunRecord's entry


class RunRecord(pl.Callback):
    """Write the run's composed config (unresolved, plain data) into every checkpoint under `RUN_RECORD`.

    facelab.train compares it with a resuming run's config, so that a checkpoint resumes only the run it belongs to.
    """

    def __init__(self, config: dict):
        self.config = config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[RUN_RECORD] = {"format": 1, "config": self.config}
