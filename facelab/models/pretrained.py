"""Resolve `model.pretrained=` to a UNet and its schedule: a zoo name, a diffusers folder, a Lightning
checkpoint or a hub id."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from safetensors.torch import load_file

from facelab.diffusion import Denoiser, Schedule
from facelab.io.checkpoints import load_checkpoint
from facelab.io.errors import InputError
from facelab.models.components.attributes import attribute_unet

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"
_UNETS = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}


def zoo_names() -> list[str]:
    """The zoo's pixel DDPMs (a unet/ without a vae/: latent models load through facelab.models.latent)."""
    if not ZOO_DIR.is_dir():
        return []
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "unet").is_dir() and not (p / "vae").is_dir())


def load_denoiser(pretrained: str, device: str | torch.device = "cpu") -> Denoiser:
    """Load a denoiser in eval mode from a zoo name, a local diffusers folder, a `.ckpt`, or a hub id."""
    source = str(pretrained)
    path = Path(source).expanduser()
    if source in zoo_names():
        unet, schedule = _from_folder(ZOO_DIR / source)
    elif path.suffix == ".ckpt":
        unet, schedule = _from_lightning(path)
    elif path.is_dir():
        unet, schedule = _from_folder(path)
    elif path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise InputError(f"model.pretrained={source}: not a zoo model ({', '.join(zoo_names()) or 'none built'}), "
                         "a diffusers folder, a .ckpt file or a hub id (org/name)")
    else:
        unet, schedule = _from_hub(source)
    return Denoiser(unet.to(device).eval().requires_grad_(False), schedule)


def _unet_class(config_path: Path):
    name = json.loads(config_path.read_text()).get("_class_name", "UNet2DModel")
    if name not in _UNETS:
        raise InputError(f"{config_path}: unsupported model class {name} (expected one of {sorted(_UNETS)})")
    return _UNETS[name]


def _from_folder(folder: Path):
    sub = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    if not (sub / "config.json").is_file():
        raise InputError(f"{folder}: not a diffusers folder (no unet/config.json or config.json)")
    sched = next((p for p in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json")
                  if p.is_file()), None)
    if sched is None:
        raise InputError(f"{folder}: no scheduler/scheduler_config.json, so the noise schedule is unknown")
    config = json.loads((sub / "config.json").read_text())
    if config.get("attributes"):  # attribute-conditional (facelab's AttributeEmbedding as the class embedding)
        weights = sub / "diffusion_pytorch_model.safetensors"
        if not weights.is_file():
            raise InputError(f"{sub}: an attribute-conditional UNet needs its weights in {weights.name}")
        unet = attribute_unet(config)
        unet.load_state_dict(load_file(weights))
    else:
        unet = _unet_class(sub / "config.json").from_pretrained(sub, low_cpu_mem_usage=False)
    return unet, Schedule.from_config(sched)


def _from_hub(repo_id: str):
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "unet/*", "scheduler/*"]))
    except Exception as err:  # offline, unknown id, no access
        raise InputError(f"model.pretrained={repo_id}: cannot fetch from the hub ({type(err).__name__})") from None
    return _from_folder(folder)


def _from_lightning(path: Path):
    ckpt = load_checkpoint(path)
    hparams = ckpt.get("hyper_parameters", {})
    if "unet" not in hparams or "scheduler" not in hparams:
        raise InputError(f"{path}: not a facelab diffusion checkpoint (no unet/scheduler hyper-parameters)")
    prefix = "ema.module." if any(k.startswith("ema.module.") for k in ckpt["state_dict"]) else "unet."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    unet = attribute_unet(hparams["unet"], hparams["attributes"]) if hparams.get("attributes") else \
        UNet2DModel(**hparams["unet"])
    unet.load_state_dict(state)
    return unet, Schedule.from_config(hparams["scheduler"])



def load_plain_model(source: str | Path, kind: str, class_name: str, marker: str, build,
                     meta_keys: tuple[str, ...], device: str | torch.device = "cpu") -> torch.nn.Module:
    """A plain-folder model (config.json with `_class_name` + model.safetensors; classifiers, parsers) in eval mode
    from a zoo name, an exported folder or a Lightning .ckpt whose module keeps it as `net` (never unpickled).

    build(config) makes the net from the folder's config or the checkpoint's hyper-parameters (same keys); the
    net gets `source` and `meta` (the config's `meta_keys`); `marker` is a hyper-parameter only such checkpoints have.
    """
    path = Path(str(source)).expanduser()
    if not path.exists() and (ZOO_DIR / str(source) / "config.json").is_file():
        path = ZOO_DIR / str(source)
    if path.suffix == ".ckpt":
        ckpt = load_checkpoint(path)
        config = ckpt.get("hyper_parameters", {})
        if marker not in config:
            raise InputError(f"{path}: not a {kind} checkpoint")
        state = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    elif (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        if config.get("_class_name") != class_name:
            raise InputError(f"{path}: not a {kind} (config _class_name={config.get('_class_name')})")
        state = load_file(path / "model.safetensors")
    else:
        raise InputError(f"{kind} {source}: not a zoo {kind.split()[-1]}, an exported folder (config.json + "
                         "model.safetensors) or a .ckpt")
    net = build(config)
    net.load_state_dict({k: v.float() for k, v in state.items()})
    net.source, net.meta = str(source), {key: config.get(key) for key in meta_keys}
    return net.to(device).eval().requires_grad_(False)


def _digest(module: torch.nn.Module, digest):
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest


def model_fingerprint(denoiser: Denoiser) -> str:
    """sha256 of the UNet weights and the noise schedule: identifies the model whatever path it was loaded from.
    Files derived from a model (statistics, directions, h-classifiers) record it and are refused for another."""
    return _digest(denoiser.unet, hashlib.sha256(json.dumps(denoiser.schedule.config, sort_keys=True).encode())
                   ).hexdigest()


def fingerprint(module: torch.nn.Module) -> str:
    """sha256 of any module's weights (e.g. a classifier), shortened."""
    return _digest(module, hashlib.sha256()).hexdigest()[:16]
