"""Pixel-space DDPM: a diffusers UNet2DModel trained with the ε-prediction loss, with an EMA copy."""
from __future__ import annotations

import torch
from diffusers import UNet2DModel

from facelab.diffusion import DDIM, Denoiser, Schedule, sample
from facelab.io.errors import InputError
from facelab.models.base import DEFAULT, NOT_HYPERPARAMETERS, DiffusionModule
from facelab.models.components.attributes import attribute_unet
from facelab.models.components.ema import EMA
from facelab.models.pretrained import load_denoiser, weights_mismatch


class PixelDDPM(DiffusionModule):
    """ε-loss DDPM on images in [-1, 1]. `unet` and `scheduler` are diffusers config dicts.

    `attributes` (names of columns of the batches' `attributes`) makes it attribute-conditional (CycleDiff): the
    vector y = 2·label − 1 ∈ {−1, 1}^A goes through an AttributeEmbedding added to the time embedding; with probability
    `label_dropout` a whole row is replaced by the null label 0 (so the model also learns p(x), for classifier-free
    guidance and for sampling without attributes). Its embedding starts at zero: fine-tuned `init_from` an
    unconditional model, training starts exactly at that model; `embedding_lr_scale` lets it learn faster than the
    pretrained rest (the labels' share of the loss is small, so at the base rate it stays near zero for long).

    The EMA weights are the ones used for validation, sample grids and export. The loss's noise and timesteps are
    drawn from generators seeded by (`seed`, rank, step, batch): never from the global RNG, so a run resumed from a
    checkpoint continues exactly as an uninterrupted one, and validation draws the same noise at every check.
    Optimiser: `optimizer` (default AdamW(lr, weight_decay)) and `lr_scheduler` (default a linear warm-up over
    `warmup_steps`), see facelab.models.base. Export (`export`): the EMA UNet and the scheduler as a diffusers folder
    (unet/, scheduler/); an attribute-conditional UNet keeps its attribute embedding in the same safetensors file and
    its attribute names in unet/config.json.
    """

    def __init__(self, unet: dict, scheduler: dict, lr: float = 2e-4, weight_decay: float = 0.0,
                 warmup_steps: int = 200, ema_decay: float = 0.999, image_key: str = "image", seed: int = 0,
                 init_from: str | None = None, attributes: list[str] | None = None, label_dropout: float = 0.0,
                 embedding_lr_scale: float = 1.0, optimizer=None, lr_scheduler=DEFAULT):
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=NOT_HYPERPARAMETERS)
        if not 0 <= label_dropout < 1:
            raise InputError(f"model.label_dropout={label_dropout}: must lie in [0, 1)")
        self.unet = attribute_unet(unet, attributes) if attributes else UNet2DModel(**unet)
        if init_from:  # fine-tune: start from a trained model's weights (zoo name, diffusers folder or .ckpt)
            fresh = {k: v for k, v in self.unet.state_dict().items() if k.startswith("class_embedding.")}
            source = {**fresh, **load_denoiser(init_from).unet.state_dict()}  # unconditional: keeps the fresh embedding
            problem = weights_mismatch(self.unet.state_dict(), source)
            if problem:
                raise InputError(f"model.init_from={init_from}: its weights do not fit model.unet / model.attributes: "
                                 f"{problem}")
            self.unet.load_state_dict(source)
        self.schedule = Schedule.from_config(scheduler)
        self.ema = EMA(self.unet, ema_decay)
        self.columns: list[int] | None = None

    def setup(self, stage: str) -> None:
        if self.hparams.attributes:
            names = list(getattr(self.trainer.datamodule, "attribute_names", []))
            missing = [a for a in self.hparams.attributes if a not in names]
            if missing:
                raise InputError(f"model.attributes {missing} are not in the data's attributes ({names or 'none'})")
            self.columns = [names.index(a) for a in self.hparams.attributes]

    def condition(self, batch: dict, generator: torch.Generator) -> torch.Tensor | None:
        """The attribute vectors y ∈ {−1, 1}^A of a batch, each row zeroed with probability label_dropout (None for
        an unconditional model)."""
        if self.columns is None:
            return None
        y = batch["attributes"][:, self.columns].float() * 2 - 1
        keep = torch.rand(len(y), 1, device=y.device, generator=generator) >= self.hparams.label_dropout
        return y * keep

    def denoiser(self, ema: bool = True) -> Denoiser:
        return Denoiser(self.ema.module if ema else self.unet, self.schedule)

    def loss(self, unet: torch.nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        return self.eps_loss(batch[self.hparams.image_key], generator,
                             lambda x_t, t: unet(x_t, t, class_labels=self.condition(batch, generator)).sample)

    def ema_target(self) -> torch.nn.Module:
        return self.unet

    def step_loss(self, batch: dict, generator: torch.Generator, ema: bool) -> torch.Tensor:
        return self.loss(self.ema.module if ema else self.unet, batch, generator)

    def optimizer_params(self) -> list[dict]:
        """The UNet; its attribute embedding (if any) in a second group, whose lr build_optimizer scales."""
        embedding = [p for n, p in self.unet.named_parameters() if n.startswith("class_embedding.")]
        rest = [p for n, p in self.unet.named_parameters() if not n.startswith("class_embedding.")]
        return [{"params": rest}] + ([{"params": embedding}] if embedding else [])

    def build_optimizer(self) -> torch.optim.Optimizer:
        # the attribute embedding may learn faster than the (pretrained) rest: its signal in the loss is small
        optimizer = super().build_optimizer()
        for group in optimizer.param_groups[1:]:
            group["lr"] = optimizer.defaults["lr"] * self.hparams.embedding_lr_scale
        return optimizer

    @torch.no_grad()
    def sample_images(self, num: int, steps: int = 50, generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM(η=0) samples from the EMA weights, in [-1, 1], x̂0 clipped as the scheduler config says (an
        attribute-conditional model samples under the null label)."""
        size = self.hparams.unet["sample_size"]
        x = torch.randn(num, self.unet.config.in_channels, size, size, generator=generator, device=self.device)
        return sample(self.denoiser(), self.schedule, x, self.schedule.timesteps(steps), sampler=DDIM(),
                      generator=generator, progress=False)
