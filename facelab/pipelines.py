"""diffusers pipelines for facelab's latent folders: an autoencoder (vae/), a latent model (facelab.models.latent) and
a Collaborative Diffusion export (facelab.models.codiff), each named by the folder's model_index.json.

    import facelab.pipelines as fp
    pipe = fp.FacelabLatentPipeline.from_pretrained("facelab/zoo/ldm_text64")   # diffusers' own loader
    images = pipe("This man has a beard.", batch_size=2, generator=torch.Generator().manual_seed(0)).images

`<class>.from_pretrained(folder)` is diffusers' `DiffusionPipeline.from_pretrained`, run for the class named: it
reads model_index.json and loads each component with its own `from_pretrained` (vae/, unet/, scheduler/ as diffusers
models; a facelab component, ["facelab.pipelines", class], from this module, which diffusers finds in sys.modules).
`DiffusionPipeline.from_pretrained(folder)` itself resolves model_index.json's `_class_name` among diffusers' own
classes only (or runs a .py file shipped in the folder, with trust_remote_code), so it refuses these folders with
"module diffusers has no attribute Facelab...": load them through the class named in `_class_name`. The pixel
folders (unet/ + scheduler/) load with diffusers' DDPMPipeline (facelab.io.checkpoints.write_model_index).

Sampling follows facelab's `method=ldm` / `method=codiff` (ldm_grid): DDIM(η) from Gaussian latents on the LDM grid
{1, 1 + c, …} (c = T // steps) down to ᾱ_0, taken here by diffusers' DDIMScheduler built from the folder's noise
schedule, then decoded by the autoencoder (latents / scaling_factor). The same generator gives the start latents,
then one noise draw per step, so a run equals facelab's sampler from the same generator.

`python -m facelab.pipelines` (re)writes the model_index.json of the zoo's latent folders.
"""
from __future__ import annotations

import json
import typing
from collections.abc import Mapping
from pathlib import Path

import diffusers
import torch
from diffusers import (  # noqa: F401 (ModelMixin: how diffusers finds the loader of this module's components)
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    ImagePipelineOutput,
    ModelMixin,
    SchedulerMixin,
    UNet2DConditionModel,
)
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from facelab.io.errors import InputError

INDEX = "model_index.json"


def ldm_scheduler(config: Mapping, steps: int) -> DDIMScheduler:
    """diffusers' DDIM on the LDM grid for `steps` steps of the noise schedule `config` (facelab.models.codiff's
    ldm_timesteps: offset 1 below T steps, the last step to ᾱ_0), x̂0 clipped as the config says."""
    scheduler = DDIMScheduler.from_config(config, timestep_spacing="leading", set_alpha_to_one=False,
                                          steps_offset=int(steps < config["num_train_timesteps"]))
    scheduler.set_timesteps(steps)
    return scheduler


def _images(images: Tensor, output_type: str, return_dict: bool):
    """Images in [-1, 1] as `output_type` ("pt": [B, 3, H, W] in [0, 1]; "np": [B, H, W, 3]; "pil")."""
    images = (images / 2 + 0.5).clamp(0, 1)
    if output_type != "pt":
        images = images.permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "pil":
            images = DiffusionPipeline.numpy_to_pil(images)
    return ImagePipelineOutput(images=images) if return_dict else (images,)


class ConditionEncoder(ModelMixin):
    """diffusers' view of a latent model's condition/ folder (facelab.models.components.conditions: config.json +
    model.safetensors): `condition(values, batch_size)` -> the UNet's encoder_hidden_states and
    encoder_attention_mask."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    @classmethod
    def from_pretrained(cls, path, subfolder: str | None = None, torch_dtype=None, **_loading_options):
        from facelab.models.components.conditions import load_condition_encoder

        module = cls(load_condition_encoder(Path(path) / (subfolder or ""))).eval().requires_grad_(False)
        return module.to(torch_dtype) if torch_dtype is not None else module

    def save_pretrained(self, save_directory, **_options) -> None:
        from facelab.models.components.conditions import save_condition_encoder

        save_condition_encoder(self.encoder, save_directory)

    def forward(self, values, batch_size: int | None = None) -> dict:
        tokens, mask = self.encoder(values, batch_size)
        return {"encoder_hidden_states": tokens, "encoder_attention_mask": mask}


class CollaborativeModel(ModelMixin):
    """diffusers' view of a Collaborative Diffusion export (codiff.json, diffusers_<name>/ and the latent models it
    names), loaded by facelab.models.codiff.load_collaborative: the mixed ε of its modalities, their conditions and
    the shared autoencoder. It is read from the folder itself (it has no sub-folder of its own)."""

    def __init__(self, collab: torch.nn.Module):
        super().__init__()
        self.collab = collab

    @classmethod
    def from_pretrained(cls, path, subfolder: str | None = None, torch_dtype=None, **_loading_options):
        from facelab.models.codiff import load_collaborative

        module = cls(load_collaborative(Path(path) / (subfolder or "")))
        return module.to(torch_dtype) if torch_dtype is not None else module

    def save_pretrained(self, save_directory, **_options) -> None:
        raise InputError(f"{save_directory}: not written; a Collaborative Diffusion folder comes from its training "
                         "export (DynamicDiffusers.export) or the converter, and names its latent models by source")

    def forward(self, z_t: Tensor, t: Tensor, cond: list) -> Tensor:
        return self.collab(z_t, t, cond)


class FacelabAutoencoderPipeline(DiffusionPipeline):
    """A facelab autoencoder folder (vae/: AutoencoderKL with the measured scaling_factor). `pipe(images)`
    reconstructs images in [-1, 1] through the scaled latents z = s_f · posterior mean (`encode`, `decode`), as
    facelab's latent models do. `AutoencoderKL.from_pretrained(folder, subfolder="vae")` reads the same vae/."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.register_modules(vae=vae)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] [B, 3, H, W] -> s_f · posterior mean."""
        posterior = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        return self.vae.config.scaling_factor * posterior.mean

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in [-1, 1] (clamped)."""
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    def __call__(self, images: Tensor, output_type: str = "pil", return_dict: bool = True):
        return _images(self.decode(self.encode(images)), output_type, return_dict)


class _LatentSampling(DiffusionPipeline):
    """The shared DDIM loop over `eps(z_t, t, cond)` and decoding (module docstring)."""

    def _sample(self, eps, cond, shape: tuple, schedule: Mapping, num_inference_steps: int, eta: float,
                generator, latents: Tensor | None, decode, output_type: str, return_dict: bool):
        scheduler = ldm_scheduler(schedule, num_inference_steps)
        z = latents.to(self.device) if latents is not None else \
            randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        for t in self.progress_bar(scheduler.timesteps):
            step = torch.full((len(z),), int(t), device=z.device, dtype=torch.long)
            z = scheduler.step(eps(z, step, cond), t, z, eta=eta, generator=generator).prev_sample
        return _images(decode(z), output_type, return_dict)


class FacelabLatentPipeline(_LatentSampling):
    """A facelab latent model folder (vae/, unet/, scheduler/, condition/: a mask- or text-conditioned LDM).

    `pipe(condition, batch_size, num_inference_steps, eta, guidance_scale, generator, latents, output_type)`: one
    condition for the whole batch (a [H, W] CelebAMask-HQ label map for a mask model, a caption for a text model;
    None: the null condition), classifier-free guidance ε_∅ + s·(ε − ε_∅) when guidance_scale ≠ 1 (facelab's
    cfg_scale, the null rows in the same UNet call)."""

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, scheduler: SchedulerMixin,
                 condition: ConditionEncoder):
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler, condition=condition)

    @torch.no_grad()
    def __call__(self, condition=None, batch_size: int = 1, num_inference_steps: int = 50, eta: float = 1.0,
                 guidance_scale: float = 1.0, generator: torch.Generator | None = None, latents: Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        def encode(value) -> dict:
            return {k: v.expand(batch_size, *v.shape[1:]) for k, v in self.condition(value, batch_size=1).items()}

        cond = encode(None if condition is None else [condition])
        if guidance_scale != 1:
            null = encode(None)
            cond = {k: torch.cat([cond[k], null[k]]) for k in cond}

        def eps(z: Tensor, t: Tensor, cond: dict) -> Tensor:
            if guidance_scale == 1:
                return self.unet(z, t, **cond).sample
            out, out_null = self.unet(torch.cat([z, z]), torch.cat([t, t]), **cond).sample.chunk(2)
            return out_null + guidance_scale * (out - out_null)

        vae = self.vae.config
        size = vae.sample_size // 2 ** (len(vae.block_out_channels) - 1)
        return self._sample(eps, cond, (batch_size, vae.latent_channels, size, size), self.scheduler.config,
                            num_inference_steps, eta, generator, latents,
                            lambda z: self.vae.decode(z / vae.scaling_factor).sample.clamp(-1, 1), output_type,
                            return_dict)


class FacelabCollaborativePipeline(_LatentSampling):
    """A Collaborative Diffusion export (codiff.json): `pipe(conditions, batch_size, ...)` with conditions
    {modality name: value} (a name left out: its null condition) samples the mixed ε of facelab's
    CollaborativeDenoiser, with the reweighting the export records."""

    def __init__(self, collab: CollaborativeModel):
        super().__init__()
        self.register_modules(collab=collab)

    def save_pretrained(self, save_directory, **options) -> None:
        """Refused before anything is written (CollaborativeModel.save_pretrained)."""
        self.collab.save_pretrained(save_directory, **options)

    @torch.no_grad()
    def __call__(self, conditions: Mapping | None = None, batch_size: int = 1, num_inference_steps: int = 50,
                 eta: float = 1.0, generator: torch.Generator | None = None, latents: Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        collab = self.collab.collab
        conditions = dict(conditions or {})
        unknown = sorted(set(conditions) - set(collab.names))
        if unknown:
            raise InputError(f"conditions name {', '.join(unknown)}; the modalities are {', '.join(collab.names)}")
        cond = collab.conditions([conditions.get(name) for name in collab.names], batch_size)
        return self._sample(self.collab, cond, (batch_size, *collab.models[0].latent_shape),
                            collab.schedule.config, num_inference_steps, eta, generator, latents, collab.decode,
                            output_type, return_dict)


def pipeline_for(folder: str | Path) -> type[DiffusionPipeline] | None:
    """The pipeline class of a facelab latent folder (codiff.json, latent_model.json, or vae/ alone), else None."""
    from facelab.models.codiff import MANIFEST
    from facelab.models.latent import META

    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        return FacelabCollaborativePipeline
    if (folder / META).is_file():
        return FacelabLatentPipeline
    if (folder / "vae" / "config.json").is_file():
        return FacelabAutoencoderPipeline
    return None


def model_index(folder: str | Path) -> dict:
    """The model_index.json of a facelab latent folder: its pipeline class and that class's components, a diffusers
    one by the class its sub-folder's config names, a facelab one by this module's class."""
    folder = Path(folder)
    pipeline = pipeline_for(folder)
    if pipeline is None:
        raise InputError(f"{folder}: not a facelab latent folder (no codiff.json, latent_model.json or vae/)")
    components = {}
    for name, cls in typing.get_type_hints(pipeline.__init__).items():
        if cls.__module__ == __name__:
            components[name] = [__name__, cls.__name__]
        else:
            config = next(c for c in (folder / name / "config.json", folder / name / "scheduler_config.json")
                          if c.is_file())
            components[name] = ["diffusers", json.loads(config.read_text())["_class_name"]]
    return {"_class_name": pipeline.__name__, "_diffusers_version": diffusers.__version__, **components}


def write_index(folder: str | Path) -> Path:
    """Write `folder`/model_index.json (`model_index`)."""
    target = Path(folder) / INDEX
    target.write_text(json.dumps(model_index(folder), indent=2) + "\n")
    return target


def write_zoo_indexes() -> list[Path]:
    """(Re)write the model_index.json of every latent folder in the zoo."""
    from facelab.models.pretrained import ZOO_DIR

    return [write_index(folder) for folder in sorted(ZOO_DIR.iterdir()) if pipeline_for(folder) is not None]


if __name__ == "__main__":  # through the module's own name, which model_index.json records for its components
    from facelab.pipelines import write_zoo_indexes as write_zoo

    print("\n".join(map(str, write_zoo())))
