"""ermongroup/ddim `Model` state dicts (SDEdit / DiffusionCLIP `celeba_hq.ckpt`) → diffusers UNet2DModel.

The original (models/diffusion.py) is the DDPM UNet that diffusers' UNet2DModel was modelled on:
  temb.dense.{0,1} → time_embedding.linear_{1,2}: the sinusoid is [sin, cos] with frequencies
    exp(−log(10⁴)·i/(half − 1)): flip_sin_to_cos=False, freq_shift=1;
  down.{l}.block.{j} / .attn.{j} / .downsample.conv → down_blocks.l.{resnets,attentions}.j / downsamplers.0.conv: the
    downsampler pads (0, 1, 0, 1) then convolves with stride 2 and no padding, which is Downsample2D with
    downsample_padding=0;
  mid.{block_1, attn_1, block_2} → mid_block.{resnets.0, attentions.0, resnets.1};
  up.{l} is stored high-resolution first (up.0 is the last to run): up.{l} → up_blocks.{L−1−l};
  norm_out, conv_out → conv_norm_out, conv_out. Every GroupNorm has eps 1e-6 (norm_eps=1e-6).
ResnetBlock: norm1, conv1, temb_proj, norm2, conv2, nin_shortcut → norm1, conv1, time_emb_proj, norm2, conv2,
conv_shortcut. AttnBlock (one head, scale C^−½): norm, q, k, v, proj_out (1×1 convs) → group_norm, to_q, to_k, to_v,
to_out.0 (linears): attention_head_dim = the block's width (None).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from facelab.convert.guided_diffusion import fit_state
from facelab.convert.guided_diffusion import fits as _fits
from facelab.io.errors import InputError

# the original's YAML layout (configs/*.yml): data.image_size, model.*, diffusion.*
PRESETS = {
    # SDEdit configs/celeba.yml (celeba_hq.ckpt), also DiffusionCLIP's and Asyrp's CelebA-HQ model
    "sdedit_celebahq": {
        "data": {"image_size": 256, "channels": 3},
        "model": {"type": "simple", "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": [1, 1, 2, 2, 4, 4],
                  "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.0, "var_type": "fixedsmall",
                  "resamp_with_conv": True},
        "diffusion": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                      "num_diffusion_timesteps": 1000},
    },
}
RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
          "nin_shortcut": "conv_shortcut"}
ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def detect(state: dict[str, torch.Tensor]) -> bool:
    return "temb.dense.0.weight" in state and "mid.block_1.norm1.weight" in state


def _sections(config: dict) -> tuple[dict, dict, int]:
    if "model" not in config:
        raise InputError("ddim config: expected the original's YAML layout (model:, diffusion:, data:)")
    model, diffusion = dict(config["model"]), dict(config.get("diffusion", {}))
    size = int(config.get("data", {}).get("image_size") or model.get("resolution") or 0)
    if not size:
        raise InputError("ddim config: data.image_size is missing")
    if model.get("type", "simple") != "simple":
        raise InputError(f"ddim config: model.type={model['type']!r}; only 'simple' (no learned log-variance)")
    if not model.get("resamp_with_conv", True):
        raise InputError("ddim config: resamp_with_conv=False (average-pool resampling) is not supported")
    return model, diffusion, size


def unet_config(model: dict, size: int) -> dict:
    ch, mult = int(model["ch"]), [int(m) for m in model["ch_mult"]]
    attn = [size // 2 ** level in {int(r) for r in model["attn_resolutions"]} for level in range(len(mult))]
    return {"sample_size": size, "in_channels": int(model.get("in_channels", 3)),
            "out_channels": int(model.get("out_ch", 3)), "layers_per_block": int(model["num_res_blocks"]),
            "block_out_channels": [ch * m for m in mult],
            "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
            "norm_num_groups": 32, "attn_norm_num_groups": 32, "norm_eps": 1e-6, "attention_head_dim": None,
            "flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0,
            "dropout": float(model.get("dropout", 0.0))}


def scheduler_config(model: dict, diffusion: dict) -> dict:
    kind = diffusion.get("beta_schedule", "linear")
    if kind not in ("linear", "quad"):
        raise InputError(f"ddim config: beta_schedule={kind!r} (linear or quad)")
    variance = {"fixedsmall": "fixed_small", "fixedlarge": "fixed_large"}.get(model.get("var_type", "fixedsmall"))
    if variance is None:
        raise InputError(f"ddim config: var_type={model['var_type']!r} (fixedsmall or fixedlarge)")
    return {"num_train_timesteps": int(diffusion.get("num_diffusion_timesteps", 1000)),
            "beta_schedule": "linear" if kind == "linear" else "scaled_linear",  # quad = linspace of √β, squared
            "beta_start": float(diffusion.get("beta_start", 1e-4)), "beta_end": float(diffusion.get("beta_end", 0.02)),
            "prediction_type": "epsilon", "variance_type": variance, "clip_sample": True}


def _module(key: str, levels: int) -> tuple[str, str] | None:
    """(original module prefix, diffusers prefix) of a parameter key; None for an unknown key."""
    parts = key.split(".")
    head = parts[0]
    if key.startswith("temb.dense."):
        return f"temb.dense.{parts[2]}", f"time_embedding.linear_{int(parts[2]) + 1}"
    if head in ("conv_in", "conv_out"):
        return head, head
    if head == "norm_out":
        return head, "conv_norm_out"
    if head == "mid" and len(parts) >= 3:
        name = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}.get(parts[1])
        table = ATTN if parts[1] == "attn_1" else RESNET
        if name and parts[2] in table:
            return f"mid.{parts[1]}.{parts[2]}", f"mid_block.{name}.{table[parts[2]]}"
        return None
    if head in ("down", "up") and len(parts) >= 4:
        level = int(parts[1])
        block = f"down_blocks.{level}" if head == "down" else f"up_blocks.{levels - 1 - level}"
        if parts[2] in ("downsample", "upsample") and parts[3] == "conv":
            return f"{head}.{level}.{parts[2]}.conv", f"{block}.{parts[2]}rs.0.conv"
        if parts[2] in ("block", "attn") and len(parts) >= 5:
            table = RESNET if parts[2] == "block" else ATTN
            if parts[4] in table:
                kind = "resnets" if parts[2] == "block" else "attentions"
                orig = f"{head}.{level}.{parts[2]}.{parts[3]}.{parts[4]}"
                return orig, f"{block}.{kind}.{parts[3]}.{table[parts[4]]}"
    return None


def map_state(state: dict[str, torch.Tensor], levels: int) -> tuple[dict, dict]:
    """(diffusers state, {diffusers key: original key}) of a ddim state dict (unknown keys are left out)."""
    out, origin = {}, {}
    for key, tensor in state.items():
        found = _module(key, levels)
        if found is None:
            continue
        orig, new = found
        new_key = new + key[len(orig):]
        if ".attn" in orig and new_key.split(".")[-2] in ("to_q", "to_k", "to_v", "0") and tensor.ndim == 4:
            tensor = tensor.reshape(tensor.shape[0], -1)  # 1×1 conv → linear
        out[new_key], origin[new_key] = tensor, key
    return out, origin


def build(state: dict[str, torch.Tensor], config: dict, dry: bool = False) -> tuple[UNet2DModel | None, dict]:
    model, diffusion, size = _sections(config)
    unet = fit_state(lambda: UNet2DModel(**unet_config(model, size)),
                     lambda _: map_state(state, len(model["ch_mult"])), state, "the ddim config", dry)
    return unet, scheduler_config(model, diffusion)


def convert(state: dict[str, torch.Tensor], dest: Path, config: dict, fmt: str = "ddim") -> None:
    unet, sched = build(state, config)
    unet.save_pretrained(dest / "unet", safe_serialization=True)
    DDPMScheduler.from_config(sched).save_pretrained(dest / "scheduler")
    recipe = {"timestep_rescaling": None, "time_embedding": "[sin, cos] (flip_sin_to_cos=False, freq_shift=1)",
              "downsampling": "pad (0,1,0,1) then 3×3 stride-2 conv (downsample_padding=0)"}
    (dest / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")


def fits(state: dict[str, torch.Tensor], config: dict) -> str | None:
    """None if `config` fits the tensors of `state`, else why not (guided_diffusion.fits with this format's build)."""
    return _fits(state, config, build)
