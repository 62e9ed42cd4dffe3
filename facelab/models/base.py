"""The LightningModule bases of facelab's models: what every trainable thing shares, written once.

`FacelabModule` (every model):
  - optimiser and LR scheduler from config: `optimizer` and `lr_scheduler` are factories, normally Hydra nodes with
    `_partial_: true` (conf/model/*.yaml), called as `optimizer(params=...)` and `lr_scheduler(optimizer=...)`. A
    scheduler with a `total_steps` parameter left unset (OneCycleLR) gets the run's step budget (trainer.max_steps,
    DEFAULT_TOTAL_STEPS when it sets none); `lr_scheduler=None` keeps the learning rate constant. Not given (a module
    built directly in Python), `default_optimizer()` / `default_lr_scheduler()` build the ones conf/model gives, from
    the module's `lr`, `weight_decay` and `warmup_steps` hyper-parameters. The factories are kept out of the
    hyper-parameters (NOT_HYPERPARAMETERS), so checkpoints stay plain data that loads with `weights_only=True`.
  - `generator(*key)`: a generator on the module's device seeded by (seed, rank, *key), never the global RNG.

`DiffusionModule` (the ε-prediction models: pixel DDPM, latent DDPM, dynamic diffusers) adds the EMA copy of
`ema_target()`, updated in `optimizer_step` (so checkpoints taken at a step include it), the ε-loss `eps_loss` with t
and noise from the step's generator, the training / validation steps around the subclass's `step_loss`, a linear
warm-up by default, and the diffusers export of an EMA UNet and its schedule.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR

from facelab.models.components.ema import EMA
from facelab.models.components.seeding import keyed_generator

NOT_HYPERPARAMETERS = ("optimizer", "lr_scheduler")  # factories (code), not checkpoint data
DEFAULT = "default"  # lr_scheduler not given: the module's default_lr_scheduler() (None means none)
DEFAULT_TOTAL_STEPS = 10000  # the step budget of a scheduler that needs one when trainer.max_steps is unset


def linear_warmup(optimizer: Optimizer, warmup_steps: int) -> LambdaLR:
    """LR factor min(1, (step + 1) / warmup_steps): a linear ramp over the first `warmup_steps` steps (0, 1: none)."""
    warmup = max(1, warmup_steps)
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))


def one_cycle(max_lr: float, pct_start: float = 0.1) -> Callable[..., OneCycleLR]:
    """A OneCycleLR factory peaking at `max_lr`; its total_steps is the run's step budget (configure_optimizers)."""
    return functools.partial(OneCycleLR, max_lr=max_lr, pct_start=pct_start)


class FacelabModule(pl.LightningModule):
    """Base of every facelab LightningModule (module docstring). A subclass calls `super().__init__(optimizer,
    lr_scheduler)` first, then `self.save_hyperparameters(ignore=NOT_HYPERPARAMETERS)`, and says what trains
    (`optimizer_params`)."""

    export_name = "model"  # the run-directory folder its export is written to

    def __init__(self, optimizer: Callable[..., Optimizer] | None = None,
                 lr_scheduler: Callable[..., object] | str | None = DEFAULT):
        super().__init__()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler

    def generator(self, *key: int) -> torch.Generator:
        """A generator on the module's device seeded by (seed, rank, *key)."""
        return keyed_generator(self.device, self.hparams.seed, self.global_rank, *key)

    def optimizer_params(self) -> Iterable:
        """The parameters (or parameter groups) the optimiser trains."""
        raise NotImplementedError

    def default_optimizer(self) -> Callable[..., Optimizer]:
        return functools.partial(torch.optim.AdamW, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def default_lr_scheduler(self) -> Callable[..., object] | None:
        return None

    def build_optimizer(self) -> Optimizer:
        return (self.optimizer_factory or self.default_optimizer())(params=self.optimizer_params())

    def configure_optimizers(self):
        optimizer = self.build_optimizer()
        factory = self.lr_scheduler_factory
        if isinstance(factory, str) and factory == DEFAULT:
            factory = self.default_lr_scheduler()
        if factory is None:
            return {"optimizer": optimizer}
        scheduler = factory(optimizer=optimizer, **self._step_budget(factory))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _step_budget(self, factory: Callable) -> dict:
        """{"total_steps": the run's step budget} for a scheduler that takes total_steps and was not given it."""
        try:
            parameter = inspect.signature(factory).parameters.get("total_steps")
        except (TypeError, ValueError):
            return {}
        if parameter is None or parameter.default is not None:
            return {}
        trainer = self._trainer
        return {"total_steps": trainer.max_steps if trainer is not None and trainer.max_steps > 0 else
                DEFAULT_TOTAL_STEPS}


class DiffusionModule(FacelabModule):
    """An ε-prediction diffusion model with an EMA copy (module docstring). A subclass sets `self.schedule` and
    `self.ema = EMA(self.ema_target(), ema_decay)`, and implements `ema_target` and `step_loss`."""

    export_name = "diffusers"
    schedule: object  # facelab.diffusion.Schedule
    ema: EMA

    def ema_target(self) -> nn.Module:
        """The net(s) the EMA follows (and, by default, the optimiser trains)."""
        raise NotImplementedError

    def step_loss(self, batch: dict, generator: torch.Generator, ema: bool) -> Tensor:
        """The loss of a batch: of the trained nets (training) or of the EMA copy (ema=True, validation)."""
        raise NotImplementedError

    def optimizer_params(self) -> Iterable:
        return self.ema_target().parameters()

    def default_lr_scheduler(self) -> Callable[..., object] | None:
        return functools.partial(linear_warmup, warmup_steps=self.hparams.warmup_steps)

    def eps_loss(self, x0: Tensor, generator: torch.Generator, predict: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """‖predict(x_t, t) − ε‖² (mean) with t ~ U{0..T−1} and ε ~ N(0, I) drawn, in that order, from `generator`."""
        t = torch.randint(0, self.schedule.num_train_timesteps, (len(x0),), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return F.mse_loss(predict(self.schedule.q_sample(x0, t, noise), t), noise)

    def training_step(self, batch, batch_idx):
        loss = self.step_loss(batch, self.generator(0, self.global_step, batch_idx), ema=False)
        # synced: the mean over the global batch, so curves compare across device counts
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch[self.hparams.image_key]))
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.ema_target())  # here, not in on_train_batch_end, so checkpoints taken at this step have it

    def validation_step(self, batch, batch_idx):
        loss = self.step_loss(batch, self.generator(1, batch_idx), ema=True)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch[self.hparams.image_key]))

    def export(self, folder: str | Path) -> Path:
        """Write the EMA UNet and the scheduler as a diffusers folder (unet/, scheduler/, model_index.json)."""
        from facelab.io.checkpoints import write_model_index

        folder = Path(folder)
        self.ema.module.save_pretrained(folder / "unet", safe_serialization=True)
        DDPMScheduler.from_config(self.schedule.config).save_pretrained(folder / "scheduler")
        write_model_index(folder)
        return folder
