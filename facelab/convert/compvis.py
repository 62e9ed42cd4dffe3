"""CompVis latent-diffusion checkpoints -> facelab folders: Collaborative Diffusion's `512_vae.ckpt`, `512_mask.ckpt`,
`512_text.ckpt` and `512_codiff_mask_text.ckpt` (formats `ldm` and `codiff`).

What the file holds decides what is written into DEST:
  an autoencoder alone (`encoder.*`, `decoder.*`, `quant_conv.*`: 512_vae.ckpt) -> vae/ (diffusers AutoencoderKL);
  one LDM (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`) -> a latent model folder
      (facelab.models.latent: vae/, unet/, scheduler/, condition/, latent_model.json);
  a LatentDiffusionCompose (`model.{seg_mask,text}_confidence_predictor.*` beside the two LDMs) -> a codiff folder
      (facelab.models.codiff: codiff.json, diffusers_mask/, diffusers_text/) that also holds the two latent models as
      ldm_mask/ and ldm_text/, so the one file is all `method=codiff model.pretrained=DEST` needs.
The openaimodel UNets (spatial transformer) become diffusers UNet2DConditionModels and the KL autoencoder an
AutoencoderKL, with diffusers' own LDM key mappings (diffusers.loaders.single_file_utils); the conditioners
(SegMaskEncoder: one Linear over the 19×1024 one-hot mask; BERTEmbedder: a from-scratch x-transformer) become
facelab's MaskEncoder and BERTEmbedder (facelab.models.components.conditions) with the mappings below. Every module is
loaded strictly: a config that does not fit the file's tensors is an InputError naming the first mismatched keys and
shapes. Dropped on purpose: the training losses (`loss.*`) and the text encoder's unused logits layer (`to_logits`).

The config: the preset `codiff_512` (configs/512_*.yaml of the release; `codiff_256` for the 256_*.ckpt), or the
original's own YAML (`model.params.unet_config`, `first_stage_config`, `cond_stage_config`, `scale_factor`,
`linear_start`/`linear_end`, `timesteps`; a codiff YAML's `compose_unet_config` for the dynamic diffusers). A YAML
holds only its own model's settings: a codiff checkpoint or a lone autoencoder (whose YAML lacks the LDM's
scale_factor) needs the preset. The `codiff` format is content-detected too: `--format ldm` converts such a file alike.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from torch import nn

from facelab.io.errors import InputError
from facelab.pipelines import write_index

_UNET_512 = {"image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 192,
             "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 5], "num_heads": 32,
             "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 640, "legacy": False}
PRESETS: dict[str, dict] = {
    "codiff_512": {  # ziqihuangg/Collaborative-Diffusion configs/512_{vae,mask,text,codiff_mask_text}.yaml
        "timesteps": 1000, "linear_start": 0.0015, "linear_end": 0.0195, "scale_factor": 0.141,
        "first_stage": {"embed_dim": 3, "ddconfig": {"double_z": True, "z_channels": 3, "resolution": 512,
                                                     "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4],
                                                     "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}},
        "unet": _UNET_512,
        "diffuser": {**_UNET_512, "model_channels": 32, "out_channels": 1},
        "mask": {"mask_embed_dim": 1024, "context_dim": 640},
        "text": {"n_embed": 640, "n_layer": 32, "vocab_size": 30522, "max_seq_len": 77},
    },
}
PRESETS["codiff_256"] = {  # configs/256_*.yaml: the same nets on a 3-level autoencoder (also 64×64×3 latents)
    **PRESETS["codiff_512"], "scale_factor": 0.058,
    "first_stage": {"embed_dim": 3, "ddconfig": {**PRESETS["codiff_512"]["first_stage"]["ddconfig"], "resolution": 256,
                                                 "ch_mult": [1, 2, 4]}},
}
# x-transformers' defaults, which BERTEmbedder does not override
X_HEADS, X_DIM_HEAD = 8, 64
# the prefixes each part has in the three kinds of file (a LatentDiffusionCompose holds each shared module twice)
VAE_PREFIXES = ("first_stage_model.", "text_ldm.first_stage_model.", "seg_mask_ldm.first_stage_model.")
PARTS = {  # codiff modality -> (its LDM UNet, its conditioner, its dynamic diffuser)
    "mask": (("model.seg_mask_unet.diffusion_model.", "seg_mask_ldm.model.diffusion_model."),
             ("cond_stage_model.seg_mask_cond_stage_model.", "seg_mask_ldm.cond_stage_model."),
             "model.seg_mask_confidence_predictor.diffusion_model."),
    "text": (("model.text_unet.diffusion_model.", "text_ldm.model.diffusion_model."),
             ("cond_stage_model.text_cond_stage_model.", "text_ldm.cond_stage_model."),
             "model.text_confidence_predictor.diffusion_model."),
}


def detect(state: dict[str, torch.Tensor]) -> bool:
    """A CompVis LDM, LatentDiffusionCompose or KL-autoencoder state dict."""
    if {"encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight"} <= state.keys():
        return True
    return any(k.startswith(("model.diffusion_model.input_blocks.", "first_stage_model.encoder.",
                             PARTS["mask"][2], PARTS["text"][2])) for k in state)


def _part(state: dict[str, torch.Tensor], *prefixes: str) -> dict[str, torch.Tensor]:
    """The tensors under the first of `prefixes` that has any, the prefix removed."""
    for prefix in prefixes:
        found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if found:
            return found
    return {}


# --- the settings: a preset, or the original's YAML -------------------------------------------------------------
def settings(config: dict) -> dict:
    """The preset form (PRESETS) of `config`: a preset itself, or a CompVis YAML (`model.params...`)."""
    if "model" not in config:
        return dict(config)
    params = dict(config["model"].get("params") or {})
    out = {k: params[k] for k in ("timesteps", "linear_start", "linear_end", "scale_factor") if k in params}
    if params.get("beta_schedule", "linear") != "linear" or params.get("parameterization", "eps") != "eps":
        raise InputError("--config: only CompVis' linear β schedule and ε-prediction are supported "
                         f"(beta_schedule={params.get('beta_schedule')}, "
                         f"parameterization={params.get('parameterization')})")
    if "ddconfig" in params:  # an autoencoder's own YAML
        out["first_stage"] = {"embed_dim": params["embed_dim"], "ddconfig": params["ddconfig"]}
    if isinstance(params.get("first_stage_config"), dict):
        out["first_stage"] = params["first_stage_config"]["params"]
    if isinstance(params.get("unet_config"), dict):
        out["unet"] = params["unet_config"]["params"]
    compose = ((params.get("compose_unet_config") or {}).get("params") or {})
    if "confidence_map_predictor_config" in compose:
        out["diffuser"] = compose["confidence_map_predictor_config"]["params"]
    cond = params.get("cond_stage_config")
    if isinstance(cond, dict):
        kind = {"SegMaskEncoder": "mask", "BERTEmbedder": "text"}.get(str(cond.get("target")).rsplit(".", 1)[-1])
        if kind is None:
            raise InputError(f"--config: cond_stage_config {cond.get('target')} is not supported (SegMaskEncoder, "
                             "BERTEmbedder)")
        out[kind] = cond.get("params") or {}
    return out


def _need(cfg: dict, key: str, what: str) -> dict:
    if key not in cfg:
        raise InputError(f"--config has no settings for the checkpoint's {what}; use --config codiff_512 or the YAML "
                         "the checkpoint was trained with")
    return cfg[key]


# --- loading with a one-line error for a config that does not fit ---------------------------------------------------
def _origin(state: dict[str, torch.Tensor]) -> dict[tuple[int, int], str]:
    """(storage address, offset) -> the original key: names a converted tensor (a view of the original) again."""
    return {(v.untyped_storage().data_ptr(), v.storage_offset()): k for k, v in state.items()}


def _fit(module: nn.Module, converted: dict[str, torch.Tensor], what: str, origin: dict | None = None,
         prefix: str = "") -> nn.Module:
    """Load `converted` into `module` strictly; an InputError names the first mismatched keys and shapes."""
    def name(key: str) -> str:
        tensor = converted[key]
        found = (origin or {}).get((tensor.untyped_storage().data_ptr(), tensor.storage_offset()))
        return prefix + (found or key)

    expected = module.state_dict()
    problems = [f"{name(k)} is {list(converted[k].shape)} in the file, the config expects {list(v.shape)}"
                for k, v in expected.items() if k in converted and converted[k].shape != v.shape]
    problems += [f"the config expects {k} {list(v.shape)}, which the file lacks"
                 for k, v in expected.items() if k not in converted]
    problems += [f"the file's {name(k)} {list(v.shape)} has no place in the config's model"
                 for k, v in converted.items() if k not in expected]
    if problems:
        raise InputError(f"--config does not fit the checkpoint's {what}: {'; '.join(problems[:2])}"
                         f"{f' (and {len(problems) - 2} more)' if len(problems) > 2 else ''}")
    module.load_state_dict({k: v.float().contiguous() for k, v in converted.items()})
    return module.eval()


# --- the parts ------------------------------------------------------------------------------------------------------
def vae_config(first_stage: dict, scale_factor: float | None) -> dict:
    """The diffusers AutoencoderKL config of CompVis' AutoencoderKL(ddconfig, embed_dim)."""
    dd, embed = first_stage["ddconfig"], first_stage["embed_dim"]
    if dd.get("attn_resolutions"):
        raise InputError(f"--config: ddconfig.attn_resolutions={dd['attn_resolutions']}: diffusers' AutoencoderKL has "
                         "attention only in its middle block")
    if not dd.get("double_z", True) or dd["z_channels"] != embed:
        raise InputError(f"--config: a KL autoencoder with double_z and z_channels = embed_dim is supported "
                         f"(double_z={dd.get('double_z')}, z_channels={dd['z_channels']}, embed_dim={embed})")
    if scale_factor is None:
        raise InputError("--config has no scale_factor (the LDM's model.params.scale_factor, the latent scale): use "
                         "--config codiff_512 or the LDM's YAML")
    levels = len(dd["ch_mult"])
    return {"in_channels": dd["in_channels"], "out_channels": dd["out_ch"], "latent_channels": embed,
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]], "layers_per_block": dd["num_res_blocks"],
            "norm_num_groups": 32, "sample_size": dd["resolution"], "scaling_factor": float(scale_factor)}


def convert_vae(state: dict[str, torch.Tensor], first_stage: dict, scale_factor: float | None,
                prefix: str = "first_stage_model.") -> AutoencoderKL:
    """The diffusers AutoencoderKL of CompVis autoencoder weights (no prefix)."""
    config = vae_config(first_stage, scale_factor)
    converted = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in state.items()
                                            if not k.startswith("loss.")}, config)
    return _fit(AutoencoderKL(**config), converted, "autoencoder (first_stage_model)", _origin(state), prefix)


def unet_config(params: dict) -> dict:
    """The diffusers UNet2DConditionModel config of an openaimodel UNetModel with spatial transformers."""
    unsupported = [k for k in ("use_scale_shift_norm", "resblock_updown", "num_classes", "use_new_attention_order")
                   if params.get(k)]
    if unsupported or not params.get("use_spatial_transformer"):
        raise InputError(f"--config: an openaimodel UNet with spatial transformers and plain resblocks is supported "
                         f"(use_spatial_transformer={params.get('use_spatial_transformer')}"
                         f"{''.join(f', {k}={params[k]}' for k in unsupported)})")
    mult, channels = list(params["channel_mult"]), params["model_channels"]
    if mult[0] != 1:
        raise InputError(f"--config: channel_mult={mult}: diffusers needs the first level at model_channels")
    attention = [2 ** i in params["attention_resolutions"] for i in range(len(mult))]
    head_channels = params.get("num_head_channels", -1)
    heads = params["num_heads"] if head_channels == -1 else [channels * m // head_channels for m in mult]
    depth = params.get("transformer_depth", 1)
    context = params["context_dim"]
    return {"sample_size": params.get("image_size"), "in_channels": params["in_channels"],
            "out_channels": params["out_channels"], "block_out_channels": [channels * m for m in mult],
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
            "layers_per_block": params["num_res_blocks"], "attention_head_dim": heads,
            "transformer_layers_per_block": depth if isinstance(depth, int) else list(depth),
            "cross_attention_dim": context[0] if isinstance(context, list) else context,
            "use_linear_projection": bool(params.get("use_linear_in_transformer", False)),
            "norm_num_groups": 32, "norm_eps": 1e-5}


def convert_unet(state: dict[str, torch.Tensor], params: dict, what: str,
                 prefix: str = "model.diffusion_model.") -> UNet2DConditionModel:
    """The diffusers UNet2DConditionModel of openaimodel UNet weights (no prefix)."""
    config = unet_config(params)
    try:
        converted = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in state.items()}, config)
    except (KeyError, IndexError) as err:
        raise InputError(f"--config does not fit the checkpoint's {what}: its blocks do not follow the config "
                         f"({type(err).__name__}: {err})") from None
    return _fit(UNet2DConditionModel(**config), converted, what, _origin(state), prefix)


def convert_mask_encoder(state: dict[str, torch.Tensor], params: dict, prefix: str = "cond_stage_model."):
    """facelab's MaskEncoder of a SegMaskEncoder(PassSegMaskEncoder) (`linear`: Linear(mask_embed_dim, context_dim))."""
    from facelab.models.components.conditions import NUM_CLASSES, MaskEncoder

    inner = str((params.get("seg_mask_encoder_config") or {}).get("target", "PassSegMaskEncoder"))
    if not inner.endswith("PassSegMaskEncoder"):
        raise InputError(f"--config: seg_mask_encoder_config {inner}: only the PassSegMaskEncoder one-hot is supported")
    pixels = params.get("mask_embed_dim", 1024)
    size = math.isqrt(pixels)
    if size * size != pixels:
        raise InputError(f"--config: mask_embed_dim={pixels} is not a square mask's pixel count")
    encoder = MaskEncoder(num_classes=NUM_CLASSES, mask_size=size, dim=params.get("context_dim", 640))
    converted = {f"proj.{k[len('linear.'):]}": v for k, v in state.items() if k.startswith("linear.")}
    converted.update({k: v for k, v in state.items() if not k.startswith("linear.")})
    return _fit(encoder, converted, "mask conditioner (cond_stage_model)", _origin(state), prefix)


def bert_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BERTEmbedder keys (`transformer.` + x-transformers' TransformerWrapper) -> facelab BERTEmbedder keys. The
    Encoder's layers alternate attention and feed-forward, each [norm, block, residual]: layer 2i is block i's
    attention, 2i + 1 its feed-forward (`net.0.0` and `net.2` its two Linears). `to_logits` is unused: dropped."""
    out = {}
    for key, value in state.items():
        name = key.removeprefix("transformer.")
        if name.startswith("to_logits."):
            continue
        if name.startswith("attn_layers.layers."):
            layer, part, rest = name[len("attn_layers.layers."):].split(".", 2)
            block, ff = divmod(int(layer), 2)
            norm = "ff_norm" if ff else "attn_norm"
            body = "ff." + rest.replace("net.0.0.", "0.").replace("net.2.", "2.") if ff else "attn." + rest
            name = f"blocks.{block}.{norm}.{rest}" if part == "0" else f"blocks.{block}.{body}"
        else:
            name = name.replace("pos_emb.emb.", "pos_emb.")
        out[name] = value
    return out


def convert_text_encoder(state: dict[str, torch.Tensor], params: dict, prefix: str = "cond_stage_model."):
    """facelab's BERTEmbedder of CompVis' BERTEmbedder(n_embed, n_layer, vocab_size, max_seq_len)."""
    from facelab.models.components.conditions import BERTEmbedder

    encoder = BERTEmbedder(dim=params["n_embed"], depth=params["n_layer"], heads=X_HEADS, dim_head=X_DIM_HEAD,
                           max_length=params.get("max_seq_len", 77), vocab_size=params.get("vocab_size", 30522))
    return _fit(encoder, bert_keys(state), "text conditioner (cond_stage_model)", _origin(state), prefix)


def scheduler_config(cfg: dict) -> dict:
    """CompVis' "linear" schedule β_t = linspace(√linear_start, √linear_end, T)² is diffusers' scaled_linear; LDM
    samples without clipping x̂0."""
    return {"num_train_timesteps": int(cfg.get("timesteps", 1000)), "beta_schedule": "scaled_linear",
            "beta_start": float(cfg.get("linear_start", 1e-4)), "beta_end": float(cfg.get("linear_end", 2e-2)),
            "prediction_type": "epsilon", "variance_type": "fixed_small", "clip_sample": False,
            "timestep_spacing": "leading", "steps_offset": 1}


# --- whole files ------------------------------------------------------------------------------------------------------
def latent_model(vae: AutoencoderKL, unet_state: dict, cond_state: dict, cfg: dict, unet_prefix: str,
                 cond_prefix: str, source: str):
    """The facelab LatentModel of one LDM's UNet and conditioner weights on `vae`."""
    from facelab.diffusion import Schedule
    from facelab.models.latent import LatentModel

    unet = convert_unet(unet_state, _need(cfg, "unet", "UNet (unet_config)"), "UNet (model.diffusion_model)",
                        unet_prefix)
    if any(k.startswith("linear.") for k in cond_state):
        encoder = convert_mask_encoder(cond_state, _need(cfg, "mask", "mask conditioner (SegMaskEncoder)"),
                                       cond_prefix)
    elif any(k.startswith("transformer.") for k in cond_state):
        encoder = convert_text_encoder(cond_state, _need(cfg, "text", "text conditioner (BERTEmbedder)"), cond_prefix)
    else:
        raise InputError(f"the checkpoint's conditioner ({cond_prefix}*) is neither a SegMaskEncoder (linear.*) nor "
                         "a BERTEmbedder (transformer.*)")
    return LatentModel(vae, unet, Schedule(scheduler_config(cfg)), encoder, source=source)


def convert(state: dict[str, torch.Tensor], dest: Path, config: dict, fmt: str) -> None:
    """Write the facelab folder of a CompVis checkpoint into `dest` (module docstring)."""
    dest, cfg = Path(dest), settings(config)
    compose = any(k.startswith((PARTS["mask"][2], PARTS["text"][2])) for k in state)
    if fmt == "codiff" and not compose:
        raise InputError("--format codiff: not a LatentDiffusionCompose checkpoint (no model.seg_mask_confidence_"
                         "predictor.* or model.text_confidence_predictor.*); use --format ldm")
    first_stage = _need(cfg, "first_stage", "autoencoder (first_stage_config)")
    vae_prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in state)), None)
    if vae_prefix is None:  # a lone autoencoder (512_vae.ckpt)
        if "encoder.conv_in.weight" not in state:
            raise InputError("not a CompVis LDM or autoencoder checkpoint (no first_stage_model.* or encoder.*)")
        convert_vae(state, first_stage, cfg.get("scale_factor"), "").save_pretrained(dest / "vae",
                                                                                     safe_serialization=True)
        write_index(dest)
        _recipe(dest, ["vae"], None)
        return
    vae = convert_vae(_part(state, vae_prefix), first_stage, cfg.get("scale_factor"), vae_prefix)
    if not compose:
        model = latent_model(vae, _part(state, "model.diffusion_model."), _part(state, "cond_stage_model."), cfg,
                             "model.diffusion_model.", "cond_stage_model.", "converted CompVis LDM")
        model.save(dest)
        _recipe(dest, [model.modality], cfg)
        return
    _write_codiff(state, dest, cfg, vae)


def _write_codiff(state: dict[str, torch.Tensor], dest: Path, cfg: dict, vae: AutoencoderKL) -> None:
    from facelab.diffusion.collab import Reweight
    from facelab.models.codiff import BATCH_KEYS, MANIFEST, check_shared_space

    diffuser_params = _need(cfg, "diffuser", "dynamic diffusers (confidence_map_predictor_config)")
    models, modalities = {}, []
    for name, (unet_prefixes, cond_prefixes, diffuser_prefix) in PARTS.items():
        unet_prefix = next((p for p in unet_prefixes if any(k.startswith(p) for k in state)), unet_prefixes[0])
        cond_prefix = next((p for p in cond_prefixes if any(k.startswith(p) for k in state)), cond_prefixes[0])
        model = latent_model(vae, _part(state, unet_prefix), _part(state, cond_prefix), cfg, unet_prefix, cond_prefix,
                             f"converted CompVis {name} LDM")
        if model.modality != name:
            raise InputError(f"{cond_prefix}*: a {model.modality} conditioner where the {name} one belongs")
        model.save(dest / f"ldm_{name}")
        diffuser = convert_unet(_part(state, diffuser_prefix), diffuser_params,
                                f"{name} dynamic diffuser ({diffuser_prefix})", diffuser_prefix)
        diffuser.save_pretrained(dest / f"diffusers_{name}", safe_serialization=True)
        models[name] = model
        modalities.append({"name": name, "modality": name, "source": f"ldm_{name}", "fingerprint": model.fingerprint(),
                           "batch_key": BATCH_KEYS[name]})
    check_shared_space(models)
    first = models["mask"]
    manifest = {"modalities": modalities, "vae_fingerprint": first.vae_fingerprint(),
                "latent_shape": list(first.latent_shape), "reweight": Reweight.from_options({"reweight": "paper"})
                .options()}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    write_index(dest)
    _recipe(dest, ["codiff", "ldm_mask", "ldm_text"], cfg)


def _recipe(dest: Path, parts: list[str], cfg: dict | None) -> None:
    """recipe.json (merged into the converter framework's): what was written and left out, and the noise schedule
    (also for a codiff folder, whose schedule lives in its ldm_*/scheduler/)."""
    recipe = {"compvis": {"wrote": parts, "dropped": ["loss.* (training losses)",
                                                      "cond_stage_model.transformer.to_logits (unused logits layer)"]}}
    if cfg is not None:
        recipe["schedule"] = {**scheduler_config(cfg), "original": "CompVis linear β = linspace(√linear_start, "
                                                                   "√linear_end, timesteps)²"}
    (dest / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
