"""KL autoencoder (LDM's first stage): a diffusers AutoencoderKL trained on faces, its latent scale measured on data."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor, nn

from facelab.io.errors import InputError
from facelab.models.base import DEFAULT, NOT_HYPERPARAMETERS, FacelabModule
from facelab.models.pretrained import ModelKind, frozen, load_model, register, zoo
from facelab.pipelines import write_index


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix; taming's NLayerDiscriminator) with GroupNorm(1) in place of BatchNorm: no running
    statistics, so scoring reconstructions for the generator's loss changes nothing."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            prev, width = width, channels * min(2 ** i, 8)
            seq += [nn.Conv2d(prev, width, 4, 2 if i < layers else 1, 1, bias=False), nn.GroupNorm(1, width),
                    nn.LeakyReLU(0.2)]
        seq.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class VAE(FacelabModule):
    """AutoencoderKL with LDM's loss: reconstruction + kl_weight·KL, plus an optional hinge PatchGAN from `disc_start`.

    Loss scale: the reconstruction term is a per-pixel mean (L1 or MSE) and the KL (summed over the latent) is divided
    by the pixel count too, so `kl_weight` means what it means in LDM (1e-6 against a per-image summed loss).
    The adversarial term has LDM's adaptive weight disc_weight·‖∇rec‖/‖∇adv‖ at the decoder's last layer.

    With the discriminator on, one optimiser holds both nets (automatic optimisation: one global step per batch, the
    trainer's gradient clipping): the discriminator's hinge loss sees detached reconstructions and the generator's
    adversarial term sees the discriminator's weights as constants, so each net gets only its own gradient. Before
    `disc_start` the discriminator's loss has weight 0 (every parameter still gets a gradient, as DDP requires).

    The latent scale s_f = 1/std(posterior means of the first `scale_samples` validation images) is measured, never
    assumed: at every checkpoint (for the weights it holds) and at the end of training, and stored as the
    AutoencoderKL config's `scaling_factor`, which the checkpoint (`vae_config`) and the export carry.

    Optimiser (facelab.models.base): default LDM's autoencoder optimiser Adam(lr, betas=(0.5, 0.9)), no LR schedule.
    """

    export_name = "diffusers"

    def __init__(self, vae: dict, lr: float = 2e-4, kl_weight: float = 1e-6, rec_loss: str = "l1",
                 disc_start: int | None = None, disc_weight: float = 0.5, disc_channels: int = 64,
                 disc_layers: int = 3, scale_samples: int = 256, image_key: str = "image", seed: int = 0,
                 optimizer=None, lr_scheduler=DEFAULT):
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=NOT_HYPERPARAMETERS)
        if rec_loss not in ("l1", "mse"):
            raise InputError(f"model.rec_loss={rec_loss}: use l1 or mse")
        if scale_samples < 2:
            raise InputError(f"model.scale_samples={scale_samples}: the latent std needs at least 2 images")
        self.vae = AutoencoderKL(**vae)
        self.disc = None if disc_start is None else PatchDiscriminator(vae.get("out_channels", 3), disc_channels,
                                                                       disc_layers)

    def losses(self, x: Tensor, posterior, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction loss, KL per pixel, reconstruction) of x decoded from z."""
        x_rec = self.vae.decode(z).sample
        rec = F.l1_loss(x_rec, x) if self.hparams.rec_loss == "l1" else F.mse_loss(x_rec, x)
        kl = posterior.kl().mean() / x[0].numel()
        return rec, kl, x_rec

    def training_step(self, batch, batch_idx):
        x = batch[self.hparams.image_key]
        posterior = self.vae.encode(x).latent_dist
        rec, kl, x_rec = self.losses(x, posterior, posterior.sample(self.generator(0, self.global_step, batch_idx)))
        loss = rec + self.hparams.kl_weight * kl
        self.log_dict({"train/rec": rec, "train/kl": kl}, sync_dist=True, batch_size=len(x))
        d_loss = 0.0
        if self.disc is not None:
            active = self.global_step >= self.hparams.disc_start
            d_loss = float(active) * (F.relu(1 - self.disc(x)).mean() + F.relu(1 + self.disc(x_rec.detach())).mean())
            if active:
                constants = {k: v.detach() for k, v in self.disc.named_parameters()}
                adv = -torch.func.functional_call(self.disc, constants, (x_rec,)).mean()
                loss = loss + self.adaptive_weight(rec, adv) * adv
                self.log_dict({"train/adv": adv, "train/d_loss": d_loss}, sync_dist=True, batch_size=len(x))
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(x))  # the autoencoder's loss
        return loss + d_loss

    def adaptive_weight(self, rec: Tensor, adv: Tensor) -> Tensor:
        last = self.vae.decoder.conv_out.weight
        g_rec, = torch.autograd.grad(rec, last, retain_graph=True)
        g_adv, = torch.autograd.grad(adv, last, retain_graph=True)
        return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach() * self.hparams.disc_weight

    def validation_step(self, batch, batch_idx):
        x = batch[self.hparams.image_key]
        posterior = self.vae.encode(x).latent_dist
        rec, kl, x_rec = self.losses(x, posterior, posterior.mode())
        mse = (x_rec.clamp(-1, 1) - x).pow(2).flatten(1).mean(1)
        psnr = (10 * torch.log10(4 / mse.clamp(min=1e-10))).mean()  # data range 2 ([-1, 1])
        self.log_dict({"val/loss": rec + self.hparams.kl_weight * kl, "val/rec": F.l1_loss(x_rec, x),
                       "val/psnr": psnr}, prog_bar=True, sync_dist=True, batch_size=len(x))

    def optimizer_params(self) -> list[dict]:
        groups = [{"params": self.vae.parameters()}]
        if self.disc is not None:
            groups.append({"params": self.disc.parameters()})
        return groups

    def default_optimizer(self):
        return functools.partial(torch.optim.Adam, lr=self.hparams.lr, betas=(0.5, 0.9))  # LDM's autoencoder's

    @torch.no_grad()
    def measure_scale_factor(self) -> float:
        """s_f = 1/std of the posterior means of the first `scale_samples` validation images; stored in the config.

        Every rank reads the same images (the datamodule's own unsharded validation loader), so all agree."""
        datamodule = getattr(self.trainer, "datamodule", None)
        loader = datamodule.val_dataloader() if datamodule is not None else []
        means, count = [], 0
        for batch in loader:
            x = batch[self.hparams.image_key][: self.hparams.scale_samples - count].to(self.device)
            means.append(self.vae.encode(x).latent_dist.mean.flatten())
            count += len(x)
            if count >= self.hparams.scale_samples:
                break
        if count < 2:
            raise InputError("model=vae measures its latent scale on validation images: give the data a validation "
                             "split (data.val_fraction > 0 or data.val_dataset)")
        scale = float(1 / torch.cat(means).std())
        self.vae.register_to_config(scaling_factor=scale)
        return scale

    def on_train_end(self) -> None:
        self.measure_scale_factor()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.measure_scale_factor()
        checkpoint["vae_config"] = vae_config(self.vae)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.vae.register_to_config(scaling_factor=checkpoint["vae_config"]["scaling_factor"])

    def export(self, folder: str | Path) -> Path:
        """Write the autoencoder as a diffusers folder `folder/vae/` (safetensors), with the measured scaling_factor,
        and model_index.json (facelab.pipelines.FacelabAutoencoderPipeline)."""
        folder = Path(folder)
        self.vae.save_pretrained(folder / "vae", safe_serialization=True)
        write_index(folder)
        return folder


def vae_config(vae: AutoencoderKL) -> dict:
    """The AutoencoderKL config as plain JSON types (what a weights-only checkpoint can hold)."""
    return json.loads(json.dumps({k: v for k, v in vae.config.items() if not k.startswith("_")}))


def load_vae(source: str | Path, device: str | torch.device = "cpu") -> AutoencoderKL:
    """A frozen AutoencoderKL in eval mode from a zoo name, a diffusers folder (the vae folder itself or one holding
    vae/), or a checkpoint of a facelab VAE or latent DDPM. Its config must carry a scaling_factor."""
    return load_model("vae", source, device)


def _holds(path: Path) -> Path | None:
    """The AutoencoderKL folder in `path`: its vae/ sub-folder or the folder itself."""
    return next((folder for folder in (path / "vae", path) if (folder / "config.json").is_file()), None)


def _from_folder(folder: Path) -> AutoencoderKL:
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name") != "AutoencoderKL":
        raise InputError(f"{folder}: holds a {config.get('_class_name')}, not an AutoencoderKL")
    if "scaling_factor" not in config:
        raise InputError(f"{folder / 'config.json'}: no scaling_factor; it must be measured on data (train the VAE "
                         "with facelab, which measures it), never a library default")
    return AutoencoderKL.from_pretrained(folder, low_cpu_mem_usage=False)


def vae_from_checkpoint(ckpt: dict, path: str | Path) -> AutoencoderKL:
    """The autoencoder of a loaded VAE or LatentDDPM checkpoint (its `vae_config` and `vae.*` weights)."""
    if "vae_config" not in ckpt:
        raise InputError(f"{path}: not a facelab VAE or latent DDPM checkpoint (no vae_config)")
    vae = AutoencoderKL.from_config(ckpt["vae_config"])
    vae.load_state_dict({k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("vae.")})
    return vae


register(ModelKind(
    "vae", holds=_holds, in_zoo=lambda folder: (folder / "vae").is_dir(),
    from_folder=lambda folder, source, device: frozen(_from_folder(folder), device),
    from_checkpoint=lambda ckpt, path, source, device: frozen(vae_from_checkpoint(ckpt, path), device),
    not_found=lambda source: f"VAE {source}: not found; expected a zoo VAE ({', '.join(zoo('vae')) or 'none built'}), "
                             "a diffusers AutoencoderKL folder (or a folder holding vae/), or a facelab VAE/LDM .ckpt"))
