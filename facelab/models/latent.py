"""The runtime form of a conditional latent diffusion model (a mask- or text-conditioned LDM of Collaborative
Diffusion): autoencoder + measured latent scale + conditional UNet denoiser + condition encoder, frozen.

Exported folder layout (`LatentModel.save`, `load_latent_model`):
  vae/        diffusers AutoencoderKL (its config's scaling_factor is the measured s_f)
  unet/       diffusers UNet2DConditionModel
  scheduler/  scheduler_config.json
  condition/  config.json + model.safetensors (the condition encoder)
  latent_model.json  {"modality": "mask" | "text", "vae_fingerprint": ...}
  model_index.json   diffusers' FacelabLatentPipeline (facelab.pipelines)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn

from facelab.data.synthetic import SEG_CLASSES
from facelab.diffusion import Denoiser, Schedule
from facelab.io.errors import InputError
from facelab.io.images import resize_mask
from facelab.models.components.conditions import build_condition_encoder, load_condition_encoder, save_condition_encoder
from facelab.models.pretrained import ModelKind, _digest, load_model, register, zoo
from facelab.models.vae import load_vae, vae_from_checkpoint
from facelab.pipelines import write_index

META = "latent_model.json"


def latent_shape(vae: AutoencoderKL) -> tuple[int, int, int]:
    """(C, H, W) of the latents of a vae.config.sample_size image."""
    size = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    return vae.config.latent_channels, size, size


def check_compatible(vae: AutoencoderKL, unet_config, encoder: nn.Module, source: str = "") -> None:
    """InputError unless the UNet reads the VAE's latents and the encoder's tokens (unet_config: a dict or config)."""
    where = f"{source}: " if source else ""
    c, h, _ = latent_shape(vae)
    ldm = (unet_config["in_channels"], unet_config["out_channels"], unet_config["sample_size"])
    if ldm != (c, c, h):
        raise InputError(f"{where}VAE latent shape {c}×{h}×{h} does not match the LDM's UNet (in/out channels "
                         f"{ldm[0]}/{ldm[1]}, sample_size {ldm[2]}): use the VAE the LDM was trained on")
    if unet_config["cross_attention_dim"] != encoder.dim:
        raise InputError(f"{where}the condition encoder gives {encoder.dim}-d tokens but the UNet's "
                         f"cross_attention_dim is {unet_config['cross_attention_dim']}")


class LatentModel(nn.Module):
    """A frozen (eval, requires_grad False) conditional latent diffusion model, for sampling and for training the
    dynamic diffusers. `denoiser(z_t, t, model.condition(values))` is ε."""

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, schedule: Schedule, encoder: nn.Module,
                 source: str = ""):
        super().__init__()
        check_compatible(vae, unet.config, encoder, source)
        self.vae, self.encoder = vae, encoder
        self.denoiser = Denoiser(unet, schedule)
        self.modality: str = encoder.modality
        self.scale_factor = float(vae.config.scaling_factor)
        self.latent_shape = latent_shape(vae)
        self.source = str(source)
        self.requires_grad_(False).eval()

    @property
    def unet(self) -> UNet2DConditionModel:
        return self.denoiser.unet

    @property
    def schedule(self) -> Schedule:
        return self.denoiser.schedule

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def encode(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] [B, 3, H, W] -> z = s_f · posterior mean."""
        return self.scale_factor * self.vae.encode(images.to(self.device)).latent_dist.mean

    def decode(self, z: Tensor) -> Tensor:
        """Latents -> images in [-1, 1] (clamped)."""
        return self.vae.decode(z / self.scale_factor).sample.clamp(-1, 1)

    def condition(self, values, batch_size: int | None = None) -> dict:
        """The Denoiser's cond for label maps (mask model: [H, W] maps of any size, or a stacked [B, H, W]) or captions
        (text model); None entries, or values=None with batch_size, give the null condition."""
        tokens, mask = self.encoder(values, batch_size)
        return {"encoder_hidden_states": tokens, "encoder_attention_mask": mask}

    def check_condition(self, value) -> list[str]:
        """Warnings for one condition value: mask classes that vanish at the encoder's mask resolution. An empty
        caption, or one longer than the encoder reads, is an InputError (the reference silently cut it)."""
        if self.modality == "mask":
            size = self.encoder.mask_size
            gone = sorted(set(value.unique().tolist()) - set(resize_mask(value, size).unique().tolist()))
            return [f"mask: {', '.join(SEG_CLASSES[c] for c in gone)} not visible at the {size}×{size} the mask "
                    "encoder reads (nearest resize)"] if gone else []
        if not value.strip():
            raise InputError(f'text={value!r}: the caption is empty; give a sentence, e.g. text="This man has a '
                             'beard."')
        dropped = self.encoder.tokens_dropped([value])[0]
        if dropped:
            raise InputError(f"text: {dropped} WordPiece tokens beyond the {self.encoder.max_length} the text encoder "
                             "reads; shorten the caption")
        return []

    def fingerprint(self) -> str:
        """sha256 of the schedule, the condition encoder (config and weights) and the UNet weights."""
        digest = hashlib.sha256(json.dumps([self.schedule.config, self.encoder.config], sort_keys=True).encode())
        return _digest(self.encoder, _digest(self.unet, digest)).hexdigest()

    def vae_fingerprint(self) -> str:
        """sha256 of the autoencoder weights and its scaling_factor: models that share a latent space share it."""
        return _digest(self.vae, hashlib.sha256(repr(self.scale_factor).encode())).hexdigest()

    def save(self, folder: str | Path) -> Path:
        """Write the exported folder layout (module docstring)."""
        folder = Path(folder)
        self.vae.save_pretrained(folder / "vae", safe_serialization=True)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        DDPMScheduler.from_config(self.schedule.config).save_pretrained(folder / "scheduler")
        save_condition_encoder(self.encoder, folder / "condition")
        meta = {"modality": self.modality, "vae_fingerprint": self.vae_fingerprint()}
        (folder / META).write_text(json.dumps(meta, indent=2))
        write_index(folder)
        return folder


def load_latent_model(source: str | Path, device: str | torch.device = "cpu") -> LatentModel:
    """A LatentModel from a zoo name, an exported folder, or a LatentDDPM Lightning .ckpt (its EMA weights)."""
    return load_model("latent", source, device)


def _from_folder(folder: Path) -> LatentModel:
    meta = json.loads((folder / META).read_text())
    for part in ("vae", "unet", "scheduler", "condition"):
        if not (folder / part).is_dir():
            raise InputError(f"{folder}: {part}/ is missing from this latent model folder")
    model = LatentModel(load_vae(folder / "vae"),
                        UNet2DConditionModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False),
                        Schedule.from_config(folder / "scheduler"), load_condition_encoder(folder / "condition"),
                        source=str(folder))
    if meta.get("modality") != model.modality:
        raise InputError(f"{folder / META}: modality {meta.get('modality')!r}, but condition/ is a {model.modality} "
                         "encoder")
    if meta.get("vae_fingerprint") not in (None, model.vae_fingerprint()):
        raise InputError(f"{folder}: vae/ is not the autoencoder this model was trained with (fingerprint differs)")
    return model


def _from_checkpoint(ckpt: dict, path: Path) -> LatentModel:
    hparams = ckpt.get("hyper_parameters", {})
    if not {"unet", "scheduler", "condition"} <= hparams.keys():
        raise InputError(f"{path}: not a LatentDDPM checkpoint (no unet/scheduler/condition hyper-parameters)")
    state = ckpt["state_dict"]

    def part(*prefixes: str) -> dict:  # the first prefix present: EMA weights when the checkpoint has them
        for prefix in prefixes:
            found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if found:
                return found
        return {}

    unet = UNet2DConditionModel(**hparams["unet"])
    unet.load_state_dict(part("ema.module.unet.", "unet."))
    encoder = build_condition_encoder(hparams["condition"])
    encoder.load_state_dict(part("ema.module.encoder.", "encoder."))
    return LatentModel(vae_from_checkpoint(ckpt, path), unet, Schedule.from_config(hparams["scheduler"]), encoder,
                       source=str(path))


register(ModelKind(
    "latent", holds=lambda path: path if (path / META).is_file() else None,
    from_folder=lambda folder, source, device: _from_folder(folder).to(device),
    from_checkpoint=lambda ckpt, path, source, device: _from_checkpoint(ckpt, path).to(device),
    not_found=lambda source: f"latent model {source}: not found; expected a zoo latent model "
                             f"({', '.join(zoo('latent')) or 'none built'}), an exported folder with {META} "
                             "(vae/, unet/, scheduler/, condition/), or a LatentDDPM .ckpt"))
