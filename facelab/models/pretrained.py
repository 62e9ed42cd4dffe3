"""Loading trained models: one registry, one way to name a model of any kind, one entry point per kind.

A source names a model by (`locate`, tried in this order):
  1. a zoo name: facelab/zoo/<name> (ZOO_DIR) holding a model of that kind (`zoo(kind)` lists them),
  2. a path ending in `.ckpt`: a Lightning checkpoint of the kind's module (read with weights_only=True, never
     unpickling code),
  3. a local folder holding that kind: an export, or a folder holding it in a sub-folder (vae/, hclf/, ...),
  4. a hub id `org/name`, for the kinds that can come from the hub (the pixel denoiser),
  5. an author's checkpoint, `FILE.pt|.pth|.safetensors` or `PRESET:FILE` (any suffix, .ckpt included): converted once
     by facelab.convert (the preset that fits the file's tensors, or the one named) and cached by the file's sha256
     under facelab.convert.cache_dir(); then read as the folder of 3.
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
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin, UNet2DConditionModel, UNet2DModel  # noqa: F401 (ModelMixin: AttributeUNet2DModel)
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


FOREIGN_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def foreign(source: str | Path) -> tuple[Path, str | None] | None:
    """(file, preset or None) when `source` names an author's checkpoint to convert (`locate`, form 5), else None."""
    name = str(source)
    preset, sep, rest = name.partition(":")
    if sep and preset and "/" not in preset:
        from facelab.convert import presets

        if preset in presets():
            return Path(rest).expanduser(), preset
    path = Path(name).expanduser()
    return (path, None) if path.suffix in FOREIGN_SUFFIXES and path.is_file() else None


def locate(kind: str, source: str | Path) -> tuple[str, Path | str] | None:
    """(form, where) of the model `source` names: ("zoo" | "folder", the folder to read), ("checkpoint", the .ckpt
    path, which may not exist), ("hub", the repo id) or ("foreign", (file, preset)); None when it names none of this
    kind."""
    spec, name = model_kind(kind), str(source)
    path = Path(name).expanduser()
    if foreign(source) is not None:
        return "foreign", foreign(source)
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


# Models loaded inside `keep_models()`, reused by later loads of the same files: {key: (files' stamp, model)}.
KEPT: ContextVar[dict | None] = ContextVar("facelab_kept_models", default=None)


@contextmanager
def keep_models():
    """Within this block every model loaded stays in memory and a later load of the same source (its files unchanged)
    on the same device returns it instead of reading it again: facelab.run calls in a loop load each model once.
    Models are frozen; a method that trains one (codiff_edit's fine-tuning) trains a copy."""
    token = KEPT.set({}) if KEPT.get() is None else None
    try:
        yield
    finally:
        if token is not None:
            KEPT.reset(token)


def _stamp(where) -> tuple:
    """What identifies the files a model comes from: (path, size, mtime) of each, or the hub id."""
    path = Path(where) if isinstance(where, (str, Path)) else None
    if path is None or not path.exists():
        return (str(where),)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def load_model(kind: str, source: str | Path, device: str | torch.device = "cpu", **options):
    """The model of `kind` that `source` names (module docstring), in eval mode, frozen, on `device` (reused from
    memory inside `keep_models()`)."""
    spec, name = model_kind(kind), str(source)
    found = locate(kind, source)
    if found is None:
        raise InputError(spec.not_found(name))
    kept = KEPT.get()
    plain = all(v is None or isinstance(v, (str, int, float, bool)) for v in options.values())
    if kept is None or not plain:
        return _load(spec, kind, name, found, device, options)
    key = (kind, name, str(torch.device(device)), tuple(sorted(options.items())))
    stamp = _stamp(found[1])
    if key not in kept or kept[key][0] != stamp:
        kept[key] = (stamp, _load(spec, kind, name, found, device, options))
    return kept[key][1]


def _load(spec, kind: str, name: str, found: tuple, device, options: dict):
    """The loader of `spec` on `found`; a file whose content it cannot use (bad JSON, missing or unexpected keys,
    weights of other shapes) is one line naming the model, whatever the loader raised."""
    try:
        return _read(spec, kind, name, found, device, options)
    except InputError:
        raise
    except (ValueError, TypeError, KeyError, RuntimeError, OSError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise InputError(f"{kind} {name}: cannot be loaded from {found[1]} ({type(err).__name__}: {first}); the "
                         "folder is damaged or holds another kind of model") from None


def _read(spec, kind: str, name: str, found: tuple, device, options: dict):
    form, where = found
    if form == "foreign":
        from facelab.convert import converted

        folder = spec.holds(converted(*where))
        if folder is None:
            raise InputError(spec.not_found(name))
        model = spec.from_folder(folder, name, device, **options)
    elif form == "checkpoint":
        model = spec.from_checkpoint(load_checkpoint(where), where, name, device, **options)
    elif form == "hub":
        model = spec.from_hub(where, device, **options)
    else:
        model = spec.from_folder(where, name, device, **options)
    refuse_non_finite(model, f"{kind} {name}")
    return model


def refuse_non_finite(model, what: str) -> None:
    """One line naming the first weight (parameter or buffer) of `model` that holds NaN or ±inf."""
    modules = [m for m in (model, *vars(model).values()) if isinstance(m, torch.nn.Module)]
    for module in modules:
        for key, value in (*module.named_parameters(), *module.named_buffers()):
            if value.is_floating_point() and not torch.isfinite(value).all():
                bad = int((~torch.isfinite(value)).sum())
                raise InputError(f"{what}: weight {key} holds {bad} NaN or infinite values of {value.numel()}; the "
                                 "model is damaged (re-export or re-train it)")


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


def read_unet(sub: Path) -> torch.nn.Module:
    """The UNet of a diffusers model folder (config.json + diffusion_pytorch_model.safetensors), built from its
    config and filled with its weights; a broken folder (bad JSON, missing/empty/truncated weights, weights of
    another architecture) is refused with one line naming the file and the first mismatched keys."""
    from facelab.convert.reading import read_file

    try:
        config = json.loads((sub / "config.json").read_text())
    except ValueError as err:
        raise InputError(f"{sub / 'config.json'}: not valid JSON ({err})") from None
    weights = sub / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise InputError(f"{sub}: no weights file {weights.name} (facelab reads safetensors only)")
    state = read_file(weights)
    unet = attribute_unet(config) if config.get("attributes") else _unet_class(sub / "config.json").from_config(config)
    problem = weights_mismatch(unet.state_dict(), state, where="config.json: ")
    if problem:
        raise InputError(f"{sub}: its weights do not fit its config.json: {problem}")
    unet.load_state_dict(state)
    return unet


class AttributeUNet2DModel(UNet2DModel):
    """How diffusers reads an attribute-conditional facelab UNet (model_index.json names this class): the folder's
    UNet with its AttributeEmbedding, sampled under the null label (all zeros) when no class_labels are given, as
    facelab's Denoiser does. diffusers resolves the class from `sys.modules` (`import facelab.models.pretrained`
    before `DDPMPipeline.from_pretrained(folder)`) and its loader kind by base-class name in this module (ModelMixin,
    imported above for that)."""

    @classmethod
    def from_pretrained(cls, path, subfolder: str | None = None, torch_dtype=None, **_loading_options):
        unet = read_unet(Path(path) / (subfolder or ""))
        unet.__class__ = cls  # the same module, with forward's null-label default
        return unet.to(torch_dtype) if torch_dtype is not None else unet

    def forward(self, sample, timestep, class_labels=None, return_dict: bool = True):
        if class_labels is None:
            class_labels = sample.new_zeros(len(sample), len(self.config.attributes))
        return super().forward(sample, timestep, class_labels=class_labels, return_dict=return_dict)


def _from_folder(folder: Path):
    sub = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    if not (sub / "config.json").is_file():
        raise InputError(f"{folder}: not a diffusers folder (no unet/config.json or config.json)")
    sched = next((p for p in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json")
                  if p.is_file()), None)
    if sched is None:
        raise InputError(f"{folder}: no scheduler/scheduler_config.json, so the noise schedule is unknown")
    try:
        schedule = Schedule.from_config(sched)
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{sched}: not a usable scheduler config ({str(err).splitlines()[0]})") from None
    return read_unet(sub), schedule


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
                             "a diffusers folder, a .ckpt file, an author's checkpoint (FILE.pt or PRESET:FILE) or a "
                             "hub id (org/name)"))


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


# --- explaining weights that do not fit a model (model.init_from=) ---------------------------------------------
def _fix_for(key: str, shape_mismatch: bool, where: str) -> str:
    """The config key (under `where`) that decides the parameter `key` of a diffusers UNet."""
    if key.startswith("class_embedding."):
        return "model.attributes" if where == "model.unet." else f"{where}attributes"
    if key.startswith("conv_out.") and shape_mismatch:
        return f"{where}out_channels (6 for a learn_sigma model)"
    if key.startswith("conv_in.") and shape_mismatch:
        return f"{where}block_out_channels / in_channels"
    if "time_emb_proj" in key and shape_mismatch:
        return f"{where}resnet_time_scale_shift"
    if ".attentions." in key:
        return f"{where}down_block_types / up_block_types (which levels attend) and attention_head_dim"
    if "samplers.0." in key and not shape_mismatch:
        return f"{where}downsample_type / upsample_type (conv or resnet)"
    if ".resnets." in key and not shape_mismatch:
        return f"{where}layers_per_block"
    preset = " (a model preset such as model=ddpm256 sets a whole architecture)" if where == "model.unet." else ""
    return f"{where}block_out_channels{preset}"


def weights_mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor],
                     where: str = "model.unet.") -> str | None:
    """Why state `given` does not load into a model whose state is `expected`: the first mismatched keys with their
    shapes and the config key (under `where`) that fixes them; None when it fits."""
    wrong = [k for k in expected if k in given and given[k].shape != expected[k].shape]
    missing = [k for k in expected if k not in given]
    extra = [k for k in given if k not in expected]
    if not (wrong or missing or extra):
        return None
    parts = []
    if wrong:
        parts.append("shapes differ: " + ", ".join(f"{k} {list(given[k].shape)} vs the config's "
                                                   f"{list(expected[k].shape)}" for k in wrong[:3]))
    if missing:
        parts.append("missing from the weights: " + ", ".join(missing[:3]))
    if extra:
        parts.append("not in the configured model: " + ", ".join(extra[:3]))
    first = (wrong or missing or extra)[0]
    return f"{'; '.join(parts)} (set {_fix_for(first, bool(wrong), where)})"
