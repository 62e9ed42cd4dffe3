"""Collaborative Diffusion's dynamic diffusers: training (DynamicDiffusers), export and loading (load_collaborative).

M frozen conditional latent models (facelab.models.latent, one per modality) that share one autoencoder, latent shape
and noise schedule are mixed by a small UNet D_m per modality (facelab.diffusion.collab). Only the D_m train, with the
ε-loss of the mixed prediction. An export is a folder with `codiff.json` (the modalities: each model's source and
weight fingerprint, and the sampling reweighting defaults) and `diffusers_<name>/` (each D_m as a diffusers folder);
the uni-modal models are loaded from their sources, once each, and refused if their weights changed since training.
A source relative to the export that names a folder inside it is read from there (a converted release keeps its
latent models as ldm_<name>/ beside the diffusers: facelab.convert.compvis).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from facelab.data.datamodule import collate_faces
from facelab.diffusion import DDIM, Schedule, sample
from facelab.diffusion.collab import SPATIAL_MODALITIES, CollaborativeDenoiser, Reweight
from facelab.io.errors import InputError
from facelab.models.base import DEFAULT, NOT_HYPERPARAMETERS, DiffusionModule
from facelab.models.components.ema import EMA
from facelab.models.latent import LatentModel, load_latent_model
from facelab.models.pretrained import ModelKind, load_model, register
from facelab.pipelines import write_index

MANIFEST = "codiff.json"
BATCH_KEYS = {"mask": "mask", "text": "caption"}  # the batch entry that feeds each modality's condition encoder
# D_m settings that follow from the loaded models, never from the user's `diffuser` config.
DERIVED = ("in_channels", "out_channels", "sample_size", "cross_attention_dim", "attention_head_dim",
           "num_attention_heads")
TRAIN_COMMAND = "python -m facelab.train +experiment=codiff_mask_text"
SAMPLE_ETA = 1.0  # the reference sampler's hard-coded η (training sample grids)


def ldm_timesteps(schedule: Schedule, steps: int) -> list[int]:
    """The LDM DDIM grid {1, 1 + c, …} (c = T // steps); sample it with final=0: the last step lands on ᾱ_0, not 1."""
    offset = 1 if steps < schedule.num_train_timesteps else 0
    return schedule.timesteps(steps, spacing="leading", offset=offset).tolist()


def load_stage(name: str, source: str, device: str | torch.device = "cpu") -> LatentModel:
    """Modality `name`'s frozen latent model; a missing or unusable one names its stage and training command."""
    try:
        model = load_latent_model(source, device)
    except InputError as err:
        raise InputError(f"stage ldm_{name} ({name} latent model): {err}. Train it with "
                         f"python -m facelab.train +experiment=ldm_{name}") from None
    return model.eval().requires_grad_(False)


def check_shared_space(models: Mapping[str, LatentModel]) -> None:
    """The models must share one autoencoder (weights and scale factor), latent shape and noise schedule."""
    (first_name, first), *others = models.items()
    for name, model in others:
        pair = f"models.{first_name}={first.source} and models.{name}={model.source}"
        if model.vae_fingerprint() != first.vae_fingerprint() or model.scale_factor != first.scale_factor:
            raise InputError(f"{pair} use different autoencoders (VAE weights or scale_factor); collaborative "
                             "diffusion mixes predictions in one latent space: train both on the same VAE")
        if tuple(model.latent_shape) != tuple(first.latent_shape):
            raise InputError(f"{pair} have different latent shapes ({tuple(first.latent_shape)} vs "
                             f"{tuple(model.latent_shape)})")
        a, b = first.denoiser.schedule, model.denoiser.schedule
        if a.num_train_timesteps != b.num_train_timesteps or not torch.allclose(a.alphas_cumprod, b.alphas_cumprod):
            raise InputError(f"{pair} have different noise schedules; collaborative diffusion needs one")


def build_diffuser(config: Mapping, model: LatentModel, head_dim: int) -> UNet2DConditionModel:
    """A dynamic diffuser for `model`'s modality: one output channel, cross-attention on its condition tokens,
    attention heads of `head_dim` channels, and a zero last conv (so every I_m starts at 1/M)."""
    derived = sorted(set(config) & set(DERIVED))
    if derived:
        raise InputError(f"model.diffuser.{derived[0]} follows from the loaded models (and model.head_dim); remove it")
    blocks = list(config["block_out_channels"])
    if any(c % head_dim for c in blocks):
        raise InputError(f"model.diffuser.block_out_channels={blocks}: each must be a multiple of head_dim={head_dim}")
    channels, size = model.latent_shape[0], model.latent_shape[1]
    unet = UNet2DConditionModel(**config, in_channels=channels, out_channels=1, sample_size=size,
                                cross_attention_dim=model.denoiser.unet.config.cross_attention_dim,
                                attention_head_dim=[c // head_dim for c in blocks])  # diffusers: heads per block
    nn.init.zeros_(unet.conv_out.weight)
    nn.init.zeros_(unet.conv_out.bias)
    return unet


def _portable(source: str) -> str:
    """A source as recorded in a manifest: an existing path made absolute, a zoo or hub name as it is."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


class DynamicDiffusers(DiffusionModule):
    """Trains one dynamic diffuser per modality on top of frozen latent models.

    models: {name: source} of each modality's LatentModel (zoo name, exported folder or .ckpt), in mixing order.
    diffuser: the UNet2DConditionModel config of every D_m, without the DERIVED keys (set from the loaded models).
    keys: {name: batch key} of each condition (default by modality: mask → "mask", text → "caption").
    collab: the sampling reweighting recorded in the export (Reweight options, default the paper preset; training
    always mixes with the learned softmax). The EMA diffusers are used for validation, sample grids and export. The
    loss's t and noise come from generators keyed by (seed, rank, step, batch), never the global RNG. Checkpoints hold
    only the D_m (and their EMA) plus the manifest with the models' fingerprints: the frozen models reload from their
    sources. Optimiser and LR schedule: facelab.models.base (default AdamW(lr, weight_decay), a linear warm-up).
    """

    def __init__(self, models: dict[str, str], diffuser: dict, head_dim: int = 16, lr: float = 1e-4,
                 weight_decay: float = 0.01, warmup_steps: int = 0, ema_decay: float = 0.999, seed: int = 0,
                 keys: dict[str, str] | None = None, image_key: str = "image", collab: dict | None = None,
                 optimizer=None, lr_scheduler=DEFAULT):
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=NOT_HYPERPARAMETERS)
        if not models:
            raise InputError("model.models is empty: give {name: source} for each modality's latent model")
        experts = {name: load_stage(name, str(source)) for name, source in models.items()}
        check_shared_space(experts)
        self.experts = nn.ModuleDict(experts)
        self.diffusers = nn.ModuleDict({name: build_diffuser(diffuser, model, head_dim)
                                        for name, model in experts.items()})
        self.ema = EMA(self.diffusers, ema_decay)
        self.keys = {name: (keys or {}).get(name) or BATCH_KEYS.get(model.modality) for name, model in experts.items()}
        missing = [name for name, key in self.keys.items() if key is None]
        if missing:
            raise InputError(f"model.keys.{missing[0]}: no default batch key for modality "
                             f"{experts[missing[0]].modality}; name the batch entry that feeds it")
        self.reweight = Reweight.from_options({"reweight": "paper", **(collab or {})})
        self.reweight.check([model.modality in SPATIAL_MODALITIES for model in experts.values()])
        first = next(iter(experts.values()))
        self.manifest = {  # codiff.json, and the checkpoints' "codiff" entry
            "modalities": [{"name": name, "modality": model.modality, "source": _portable(str(models[name])),
                            "fingerprint": model.fingerprint(), "batch_key": self.keys[name]}
                           for name, model in experts.items()],
            "vae_fingerprint": first.vae_fingerprint(), "latent_shape": list(first.latent_shape),
            "reweight": self.reweight.options()}

    @property
    def schedule(self) -> Schedule:
        return next(iter(self.experts.values())).denoiser.schedule

    def train(self, mode: bool = True):  # the uni-modal models stay frozen in eval mode (no dropout)
        super().train(mode)
        self.experts.eval()
        return self

    def collaborative(self, ema: bool = True, reweight: Reweight | None = None) -> CollaborativeDenoiser:
        """The mixed denoiser over the frozen models and the (EMA) diffusers; training mixes with the pure softmax."""
        diffusers = self.ema.module if ema else self.diffusers
        return CollaborativeDenoiser(list(self.experts.values()), list(diffusers.values()), names=list(self.experts),
                                     reweight=reweight or Reweight("learned"))

    @torch.no_grad()
    def conditions(self, batch: dict) -> list[dict]:
        return [model.condition(batch[self.keys[name]]) for name, model in self.experts.items()]

    def loss(self, collab: CollaborativeDenoiser, batch: dict, generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            z0 = collab.models[0].encode(batch[self.hparams.image_key])
        return self.eps_loss(z0, generator, lambda z_t, t: collab(z_t, t, self.conditions(batch)))

    def ema_target(self) -> nn.ModuleDict:
        return self.diffusers

    def step_loss(self, batch: dict, generator: torch.Generator, ema: bool) -> torch.Tensor:
        return self.loss(self.collaborative(ema=ema), batch, generator)

    @torch.no_grad()
    def sample_images(self, num: int, steps: int = 50, generator: torch.Generator | None = None) -> torch.Tensor:
        """Samples (DDIM η = 1, the export's reweighting) under the conditions of the first validation faces."""
        data = self.trainer.datamodule
        faces = data.val_set if data.val_set is not None else data.train_set
        batch = collate_faces([faces[i] for i in range(min(num, len(faces)))])
        collab = self.collaborative(reweight=self.reweight)
        z = torch.randn(len(batch[self.hparams.image_key]), *collab.models[0].latent_shape, generator=generator,
                        device=self.device)
        z = sample(collab, self.schedule, z, ldm_timesteps(self.schedule, steps), sampler=DDIM(eta=SAMPLE_ETA),
                   final=0, cond=self.conditions(batch), generator=generator, progress=False)
        return collab.decode(z)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the frozen models out of the checkpoint; record which models the diffusers were trained with."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("experts.")}
        checkpoint["codiff"] = self.manifest

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resuming: the models loaded now must be those of the checkpoint; their weights fill the state dict."""
        _check_fingerprints(checkpoint.get("codiff", {}), dict(self.experts))
        checkpoint["state_dict"].update({f"experts.{k}": v for k, v in self.experts.state_dict().items()})

    def export(self, folder: str | Path) -> Path:
        """Write `codiff.json`, each EMA dynamic diffuser as `diffusers_<name>/` (a diffusers folder) and
        model_index.json (facelab.pipelines.FacelabCollaborativePipeline)."""
        folder = Path(folder)
        for name, unet in self.ema.module.items():
            unet.save_pretrained(folder / f"diffusers_{name}", safe_serialization=True)
        (folder / MANIFEST).write_text(json.dumps(self.manifest, indent=2))
        write_index(folder)
        return folder


def _check_fingerprints(manifest: Mapping, models: Mapping[str, LatentModel]) -> None:
    for entry in manifest.get("modalities", []):
        model = models.get(entry["name"])
        if model is not None and model.fingerprint() != entry["fingerprint"]:
            raise InputError(f"models.{entry['name']}={model.source} is not the model these dynamic diffusers were "
                             f"trained with (weights changed: fingerprint {model.fingerprint()[:12]} ≠ "
                             f"{entry['fingerprint'][:12]}); point it at that model or retrain with {TRAIN_COMMAND}")


def load_collaborative(source: str | Path, device: str | torch.device = "cpu", reweight: Reweight | None = None,
                       cfg_scale: float | Mapping[str, float] = 1.0) -> CollaborativeDenoiser:
    """A CollaborativeDenoiser (eval, frozen) from a zoo name, an exported folder (codiff.json) or a training .ckpt.

    reweight: the sampling reweighting (None = the one the export records); cfg_scale: see CollaborativeDenoiser.
    """
    return load_model("codiff", source, device, reweight=reweight, cfg_scale=cfg_scale)


def _from_checkpoint(ckpt: dict, path: Path, source: str, device, **options) -> CollaborativeDenoiser:
    hparams, manifest = ckpt.get("hyper_parameters", {}), ckpt.get("codiff")
    if manifest is None or "diffuser" not in hparams:
        raise InputError(f"{path}: not a codiff (dynamic diffusers) checkpoint; train one with {TRAIN_COMMAND}")
    state = {k[len("ema.module."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.module.")}

    def diffuser(name: str, model: LatentModel) -> nn.Module:
        unet = build_diffuser(hparams["diffuser"], model, hparams.get("head_dim", 16))
        unet.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(f"{name}.")})
        return unet

    return _collaborative(manifest, diffuser, device, **options)


def _from_folder(folder: Path, source: str, device, **options) -> CollaborativeDenoiser:
    def diffuser(name: str, model: LatentModel) -> nn.Module:
        return UNet2DConditionModel.from_pretrained(folder / f"diffusers_{name}", low_cpu_mem_usage=False).float()

    manifest = json.loads((folder / MANIFEST).read_text())
    for entry in manifest["modalities"]:  # a model kept inside the folder (a converted checkpoint) is named relatively
        if not Path(entry["source"]).is_absolute() and (folder / entry["source"]).is_dir():
            entry["source"] = str(folder / entry["source"])
    return _collaborative(manifest, diffuser, device, **options)


def _collaborative(manifest: Mapping, diffuser, device, reweight: Reweight | None = None,
                   cfg_scale: float | Mapping[str, float] = 1.0) -> CollaborativeDenoiser:
    """The frozen models the manifest names (checked against its fingerprints) mixed by diffuser(name, model)."""
    names = [entry["name"] for entry in manifest["modalities"]]
    models = {entry["name"]: load_stage(entry["name"], entry["source"], device) for entry in manifest["modalities"]}
    _check_fingerprints(manifest, models)
    check_shared_space(models)
    diffusers = [diffuser(name, models[name]).to(device).eval().requires_grad_(False) for name in names]
    return CollaborativeDenoiser(list(models.values()), diffusers, names=names,
                                 reweight=reweight or Reweight.from_options(manifest["reweight"]), cfg_scale=cfg_scale)


def _not_found(source: str) -> str:
    if Path(source).expanduser().exists() or "/" in source:
        return (f"model.pretrained={source}: not an exported codiff folder (no {MANIFEST}) or a .ckpt of the dynamic "
                f"diffusers; train them with {TRAIN_COMMAND}")
    return (f"model.pretrained={source}: the codiff stage (dynamic diffusers) {source} is not in the zoo; train it "
            f"with {TRAIN_COMMAND} and pass its run's diffusers/ folder or a checkpoint")


register(ModelKind("codiff", holds=lambda path: path if (path / MANIFEST).is_file() else None,
                   from_folder=_from_folder, from_checkpoint=_from_checkpoint, not_found=_not_found))
