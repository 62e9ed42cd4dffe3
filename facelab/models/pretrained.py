"""Loading trained models: one registry, one way to name a model of any kind, one entry point per kind.

A source names a model by (`locate`, tried in this order):
  1. a zoo name: facelab/zoo/<name> (ZOO_DIR) holding a model of that kind (`zoo(kind)` lists them),
  2. a path ending in `.ckpt`: a Lightning checkpoint of the kind's module (read with weights_only=True, never
     unpickling code),
  3. a local folder holding that kind: an export, or a folder holding it in a sub-folder (vae/, hclf/, ...),
  4. a hub id `org/name`, for the kinds that can come from the hub (the pixel denoiser).
`load_model(kind, source, device)` gives the model in eval mode, frozen, on `device`. Every kind registers a
`ModelKind` in the module that defines it (KIND_MODULES); `load_denoiser`, `load_vae`, `load_latent_model`,
`load_collaborative`, `load_classifier`, `load_parser` and `load_hclassifier` are `load_model` for their kind.
This module is also the denoiser's kind (`model.pretrained=`: a UNet and its schedule) and holds the weight
fingerprints that files derived from a model record.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from safetensors.torch import load_file

from facelab.diffusion import Denoiser, Schedule
from facelab.io.checkpoints import load_checkpoint
from facelab.io.errors import InputError
from facelab.models.components.attributes import attribute_unet

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"
# the module that registers each kind (imported on first use)
KIND_MODULES = {"denoiser": "facelab.models.pretrained", "vae": "facelab.models.vae",
                "latent": "facelab.models.latent", "codiff": "facelab.models.codiff",
                "classifier": "facelab.models.classifier", "parser": "facelab.models.parser",
                "hclassifier": "facelab.models.hclassifier"}
_UNETS = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}


@dataclass(frozen=True)
class ModelKind:
    """How one kind of model is found and read.

    holds(path): the folder to read in `path` (itself or a sub-folder), None if it holds no model of this kind.
    from_folder(folder, source, device, **options) / from_checkpoint(ckpt, path, source, device, **options): the
    model (eval, frozen, on device) from that folder / a loaded checkpoint dict; `source` is the name as given.
    not_found(source): the error for a source that names no model of this kind.
    in_zoo(folder): whether a zoo folder is one of this kind (default: it holds one).
    from_hub(repo_id, device, **options): the model from a hub id; None: the kind is not on the hub.
    """

    name: str
    holds: Callable[[Path], Path | None]
    from_folder: Callable[..., Any]
    from_checkpoint: Callable[..., Any]
    not_found: Callable[[str], str]
    in_zoo: Callable[[Path], bool] | None = None
    from_hub: Callable[..., Any] | None = None


_KINDS: dict[str, ModelKind] = {}


def register(kind: ModelKind) -> ModelKind:
    _KINDS[kind.name] = kind
    return kind


def model_kind(name: str) -> ModelKind:
    if name not in _KINDS and name in KIND_MODULES:
        importlib.import_module(KIND_MODULES[name])
    if name not in _KINDS:
        raise ValueError(f"unknown model kind {name!r} (known: {', '.join(KIND_MODULES)})")
    return _KINDS[name]


def zoo(kind: str) -> list[str]:
    """The names of the zoo's models of `kind`."""
    spec = model_kind(kind)
    if not ZOO_DIR.is_dir():
        return []
    return sorted(p.name for p in ZOO_DIR.iterdir()
                  if p.is_dir() and (spec.in_zoo(p) if spec.in_zoo else spec.holds(p) is not None))


def locate(kind: str, source: str | Path) -> tuple[str, Path | str] | None:
    """(form, where) of the model `source` names: ("zoo" | "folder", the folder to read), ("checkpoint", the .ckpt
    path, which may not exist) or ("hub", the repo id); None when it names none of this kind."""
    spec, name = model_kind(kind), str(source)
    path = Path(name).expanduser()
    if name in zoo(kind):
        folder = spec.holds(ZOO_DIR / name)
        if folder is not None:
            return "zoo", folder
    if path.suffix == ".ckpt":
        return "checkpoint", path
    folder = spec.holds(path)
    if folder is not None:
        return "folder", folder
    if spec.from_hub and not path.exists() and not name.startswith((".", "/", "~")) and name.count("/") == 1:
        return "hub", name
    return None


def load_model(kind: str, source: str | Path, device: str | torch.device = "cpu", **options):
    """The model of `kind` that `source` names (module docstring), in eval mode, frozen, on `device`."""
    spec, name = model_kind(kind), str(source)
    found = locate(kind, source)
    if found is None:
        raise InputError(spec.not_found(name))
    form, where = found
    if form == "checkpoint":
        return spec.from_checkpoint(load_checkpoint(where), where, name, device, **options)
    if form == "hub":
        return spec.from_hub(where, device, **options)
    return spec.from_folder(where, name, device, **options)


def frozen(module: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """`module` on `device`, in eval mode, without gradients."""
    return module.to(device).eval().requires_grad_(False)


# --- the denoiser (model.pretrained=): a pixel-space UNet and its noise schedule -------------------------------
def zoo_names() -> list[str]:
    """The zoo's pixel DDPMs (a unet/ without a vae/: latent models load through facelab.models.latent)."""
    return zoo("denoiser")


def load_denoiser(pretrained: str, device: str | torch.device = "cpu") -> Denoiser:
    """Load a denoiser in eval mode from a zoo name, a local diffusers folder, a `.ckpt`, or a hub id."""
    return load_model("denoiser", pretrained, device)


def _denoiser(unet: torch.nn.Module, schedule: Schedule, device: str | torch.device) -> Denoiser:
    return Denoiser(frozen(unet, device), schedule)


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
    except Exception as err:  # noqa: BLE001 (offline, unknown id, no access: all one clear message)
        raise InputError(f"model.pretrained={repo_id}: cannot fetch from the hub ({type(err).__name__})") from None
    return _from_folder(folder)


def _from_lightning(ckpt: dict, path: Path):
    hparams = ckpt.get("hyper_parameters", {})
    if "unet" not in hparams or "scheduler" not in hparams:
        raise InputError(f"{path}: not a facelab diffusion checkpoint (no unet/scheduler hyper-parameters)")
    prefix = "ema.module." if any(k.startswith("ema.module.") for k in ckpt["state_dict"]) else "unet."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    unet = attribute_unet(hparams["unet"], hparams["attributes"]) if hparams.get("attributes") else \
        UNet2DModel(**hparams["unet"])
    unet.load_state_dict(state)
    return unet, Schedule.from_config(hparams["scheduler"])


register(ModelKind(
    "denoiser", holds=lambda path: path if path.is_dir() else None,
    in_zoo=lambda folder: (folder / "unet").is_dir() and not (folder / "vae").is_dir(),
    from_folder=lambda folder, source, device: _denoiser(*_from_folder(folder), device),
    from_checkpoint=lambda ckpt, path, source, device: _denoiser(*_from_lightning(ckpt, path), device),
    from_hub=lambda repo_id, device: _denoiser(*_from_hub(repo_id), device),
    not_found=lambda source: f"model.pretrained={source}: not a zoo model ({', '.join(zoo_names()) or 'none built'}), "
                             "a diffusers folder, a .ckpt file or a hub id (org/name)"))


# --- plain-folder models (config.json with `_class_name` + model.safetensors): classifiers, parsers ----------------
def plain_model_kind(name: str, noun: str, class_name: str, marker: str, build: Callable[[dict], torch.nn.Module],
                     meta_keys: tuple[str, ...]) -> ModelKind:
    """The kind of a plain-folder model, whose Lightning module keeps it as `net`.

    build(config) makes the net from the folder's config or the checkpoint's hyper-parameters (same keys); the net
    gets `source` and `meta` (the config's `meta_keys`); `marker` is a hyper-parameter only its checkpoints have.
    """

    def finish(config: dict, state: dict, source: str, device) -> torch.nn.Module:
        net = build(config)
        net.load_state_dict({k: v.float() for k, v in state.items()})
        net.source, net.meta = source, {key: config.get(key) for key in meta_keys}
        return frozen(net, device)

    def from_folder(folder: Path, source: str, device) -> torch.nn.Module:
        config = json.loads((folder / "config.json").read_text())
        if config.get("_class_name") != class_name:
            raise InputError(f"{folder}: not a {noun} (config _class_name={config.get('_class_name')})")
        return finish(config, load_file(folder / "model.safetensors"), source, device)

    def from_checkpoint(ckpt: dict, path: Path, source: str, device) -> torch.nn.Module:
        config = ckpt.get("hyper_parameters", {})
        if marker not in config:
            raise InputError(f"{path}: not a {noun} checkpoint")
        state = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
        return finish(config, state, source, device)

    def in_zoo(folder: Path) -> bool:
        config = folder / "config.json"
        return config.is_file() and json.loads(config.read_text()).get("_class_name") == class_name

    return ModelKind(name, holds=lambda path: path if (path / "config.json").is_file() else None, in_zoo=in_zoo,
                     from_folder=from_folder, from_checkpoint=from_checkpoint,
                     not_found=lambda source: f"{noun} {source}: not a zoo {noun.split()[-1]}, an exported folder "
                                              "(config.json + model.safetensors) or a .ckpt")


# --- fingerprints -----------------------------------------------------------------------------------------------
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
