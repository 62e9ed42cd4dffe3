"""Conditional latent DDPM (a uni-modal LDM of Collaborative Diffusion): a diffusers UNet2DConditionModel trained with
the ε-loss on the latents of a frozen, trained VAE, cross-attending to a mask or text condition encoder."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from facelab.diffusion import DDIM, Denoiser, Schedule, sample
from facelab.io.errors import InputError
from facelab.models.base import DEFAULT, NOT_HYPERPARAMETERS, DiffusionModule
from facelab.models.components.conditions import build_condition_encoder
from facelab.models.components.ema import EMA
from facelab.models.latent import LatentModel, check_compatible, latent_shape
from facelab.models.vae import load_vae, vae_config


class LatentDDPM(DiffusionModule):
    """ε-loss DDPM on z_0 = s_f·sample(E(x)) (the posterior sample drawn from a keyed generator, as LDM does).

    `vae`: a trained VAE (zoo name, export folder or .ckpt), frozen and kept in the checkpoints so they are
    self-contained. `condition`: the encoder config (`_class_name` + kwargs, see components.conditions); a mask or
    from-scratch text encoder trains jointly with the UNet, the pretrained MiniLM stays frozen. `modality_key` names the
    batch entry it reads. Each row is trained under the null condition with probability `condition_dropout`
    (classifier-free guidance). UNet `sample_size`, `in_channels`, `out_channels` and `cross_attention_dim` left null
    follow the VAE's latents and the encoder's token width.

    The EMA (of the UNet and a trainable encoder) gives validation, sample grids, `latent_model()` and the export. The
    loss's randomness comes from generators keyed by (seed, rank, step, batch): exact resume, no global RNG.
    Optimiser and LR schedule: facelab.models.base (default AdamW(lr, weight_decay), a linear warm-up).
    """

    def __init__(self, unet: dict, scheduler: dict, vae: str, condition: dict, modality_key: str = "mask",
                 condition_dropout: float = 0.1, lr: float = 1e-4, weight_decay: float = 0.01,
                 warmup_steps: int = 200, ema_decay: float = 0.999, image_key: str = "image", seed: int = 0,
                 optimizer=None, lr_scheduler=DEFAULT):
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=NOT_HYPERPARAMETERS)
        if not 0 <= condition_dropout < 1:
            raise InputError(f"model.condition_dropout={condition_dropout}: must lie in [0, 1)")
        if not vae:
            raise InputError("model.vae is not set: give the trained VAE (zoo name, export folder or .ckpt)")
        self.vae = load_vae(vae)
        self.encoder = build_condition_encoder(condition)
        channels, size, _ = latent_shape(self.vae)
        derived = {"sample_size": size, "in_channels": channels, "out_channels": channels,
                   "cross_attention_dim": self.encoder.dim}
        self.hparams.unet = unet = {**unet, **{k: v for k, v in derived.items() if unet.get(k) is None}}
        check_compatible(self.vae, unet, self.encoder, "model")
        self.unet = UNet2DConditionModel(**unet)
        self.schedule = Schedule.from_config(scheduler)
        self.train_encoder = any(p.requires_grad for p in self.encoder.parameters())
        self.ema = EMA(self.trained(), ema_decay)
        self._preview: list | None = None

    def trained(self) -> nn.ModuleDict:
        """The nets the optimiser and the EMA follow: the UNet and, unless frozen, the condition encoder."""
        return nn.ModuleDict({"unet": self.unet, **({"encoder": self.encoder} if self.train_encoder else {})})

    def latent_model(self) -> LatentModel:
        """The frozen EMA model (shares weights with this module)."""
        ema = self.ema.module
        encoder = ema["encoder"] if self.train_encoder else self.encoder
        return LatentModel(self.vae, ema["unet"], self.schedule, encoder, source=f"{type(self).__name__} (EMA)")

    def denoiser(self) -> Denoiser:
        """The EMA ε-denoiser (its cond: `latent_model().condition(values)`)."""
        return self.latent_model().denoiser

    @property
    def scale_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def condition_values(self, batch: dict, generator: torch.Generator, dropout: float) -> list:
        """The batch's condition values, each replaced by None (the null condition) with probability `dropout`."""
        key = self.hparams.modality_key
        if key not in batch:
            raise InputError(f"model.modality_key={key}: the batches have no {key!r} (they have {sorted(batch)})")
        values = list(batch[key])
        drop = torch.rand(len(values), generator=generator, device=generator.device) < dropout
        return [None if d else v for v, d in zip(values, drop.tolist())]

    def loss(self, nets: nn.ModuleDict, batch: dict, generator: torch.Generator, dropout: float) -> torch.Tensor:
        x0 = batch[self.hparams.image_key]
        with torch.no_grad():
            z0 = self.scale_factor * self.vae.encode(x0).latent_dist.sample(generator)
        encoder = nets["encoder"] if self.train_encoder else self.encoder

        def predict(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # the condition dropout draws after t, ε
            tokens, mask = encoder(self.condition_values(batch, generator, dropout))
            return nets["unet"](z_t, t, encoder_hidden_states=tokens, encoder_attention_mask=mask).sample

        return self.eps_loss(z0, generator, predict)

    def ema_target(self) -> nn.ModuleDict:
        return self.trained()

    def step_loss(self, batch: dict, generator: torch.Generator, ema: bool) -> torch.Tensor:
        if ema:  # validation: the conditional loss of the EMA model
            return self.loss(self.ema.module, batch, generator, 0.0)
        return self.loss(self.trained(), batch, generator, self.hparams.condition_dropout)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vae_config"] = vae_config(self.vae)  # with the frozen vae.* weights: load_latent_model(.ckpt)

    def preview_values(self, num: int) -> list:
        """The conditions of the first `num` validation faces (cycled; null without validation data), for grids."""
        if self._preview is None:
            datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
            loader = datamodule.val_dataloader() if datamodule is not None else []
            self._preview = []
            for batch in loader:
                self._preview += list(batch[self.hparams.modality_key])
                if len(self._preview) >= num:
                    break
        values = self._preview or [None]
        return [values[i % len(values)] for i in range(num)]

    @torch.no_grad()
    def sample_images(self, num: int, steps: int = 50, generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM(η=1, as Collaborative Diffusion samples) of the EMA model under the first validation faces'
        conditions, x̂0 clamped as the scheduler config says, decoded to [-1, 1]."""
        model = self.latent_model()
        z = torch.randn(num, *model.latent_shape, generator=generator, device=self.device)
        z = sample(model.denoiser, self.schedule, z, self.schedule.timesteps(steps), sampler=DDIM(eta=1.0),
                   cond=model.condition(self.preview_values(num)),
                   generator=generator, progress=False)
        return model.decode(z)

    def export(self, folder: str | Path) -> Path:
        """Write the EMA model in the latent model folder layout (facelab.models.latent)."""
        return self.latent_model().save(folder)
