"""openai guided-diffusion / improved-diffusion UNets (ADM, RePaint, P2, CycleDiff) → diffusers UNet2DModel.

The original's `UNetModel` maps onto UNet2DModel one module to one module:
  time_embed.{0,2} → time_embedding.linear_{1,2}  ([cos, sin] sinusoid: flip_sin_to_cos=True, freq_shift=0);
  input_blocks.0.0 → conv_in; per level l and block j: input_blocks.{1 + l(n+1) + j}.{0: ResBlock, 1: AttentionBlock}
  → down_blocks.l.{resnets,attentions}.j, and the level's downsampler (a strided conv, or a ResBlock(down=True) with
  `resblock_updown`) → down_blocks.l.downsamplers.0;
  middle_block.{0,1,2} → mid_block.{resnets.0, attentions.0, resnets.1};
  output_blocks.{u(n+1) + j} → up_blocks.u (u = 0 the lowest resolution), its last layer the upsampler;
  out.{0,2} → conv_norm_out / conv_out; label_emb → class_embedding (class_cond).
ResBlock: in_layers.{0,2}, emb_layers.1, out_layers.{0,3}, skip_connection → norm1, conv1, time_emb_proj, norm2,
conv2, conv_shortcut (`use_scale_shift_norm` = resnet_time_scale_shift "scale_shift"). AttentionBlock: the fused
qkv 1×1 conv is split into to_q/to_k/to_v in the *legacy* order ([head][q,k,v][ch], `use_new_attention_order=False`,
which RePaint, P2 and CycleDiff use) or the new one ([q,k,v][head][ch]).
CycleDiff's `attribute_emb` (Linear(A→D), SiLU, Linear(D→D), fed y ∈ {0, 1}^A) becomes facelab's AttributeEmbedding,
which takes y' = 2y − 1 ∈ {−1, 1}: its first layer is re-parametrised exactly (W' = W/2, b' = b + W·1/2).
With `learn_sigma` the UNet has 6 output channels, ε first then the variance interpolation v (learned_range).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from facelab.io.errors import InputError
from facelab.models.components.attributes import attribute_unet

# create_model's defaults (guided_diffusion.script_util), and the diffusion flags the converter reads
DEFAULTS = {"image_size": 256, "num_channels": 128, "num_res_blocks": 2, "channel_mult": "", "learn_sigma": False,
            "class_cond": False, "attention_resolutions": "16", "num_heads": 1, "num_head_channels": -1,
            "num_heads_upsample": -1, "use_scale_shift_norm": False, "dropout": 0.0, "resblock_updown": False,
            "use_new_attention_order": False, "diffusion_steps": 1000, "noise_schedule": "linear",
            "rescale_timesteps": False, "sigma_small": False, "predict_xstart": False, "attributes": None,
            "attribute_values": "01"}
IGNORED = {"use_fp16", "use_checkpoint", "timestep_respacing", "use_kl", "rescale_learned_sigmas", "num_classes",
           "in_channels"}
DEFAULT_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
# CycleDiff's 20 attributes (its preprocess/attributes.py, in index order)
CYCLEDIFF_ATTRIBUTES = ["Goatee", "Beard", "Bags_Under_Eyes", "Bald", "Bangs", "Black_Hair", "Blond_Hair",
                        "Brown_Hair", "Gray_Hair", "Eyeglasses", "Heavy_Makeup", "Male", "Mouth_Slightly_Open",
                        "Narrow_Eyes", "Pale_Skin", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Lipstick",
                        "Young"]
PRESETS = {
    # RePaint confs/face_example.yml (celeba256_250000.pt)
    "repaint_celeba256": {"image_size": 256, "num_channels": 256, "num_res_blocks": 2, "channel_mult": "",
                          "attention_resolutions": "32,16,8", "num_heads": 4, "num_head_channels": 64,
                          "num_heads_upsample": -1, "use_scale_shift_norm": True, "resblock_updown": True,
                          "learn_sigma": True, "class_cond": False, "dropout": 0.0, "use_new_attention_order": False,
                          "diffusion_steps": 1000, "noise_schedule": "linear", "rescale_timesteps": False},
    # P2-weighting's CelebA-HQ model (celebahq_p2.pt), as Balancing Act loads it
    "p2_celebahq": {"image_size": 256, "num_channels": 128, "num_res_blocks": 1, "channel_mult": "",
                    "attention_resolutions": "16", "num_heads": 4, "num_head_channels": 64, "num_heads_upsample": -1,
                    "use_scale_shift_norm": True, "resblock_updown": True, "learn_sigma": True, "class_cond": False,
                    "dropout": 0.0, "use_new_attention_order": False, "diffusion_steps": 1000,
                    "noise_schedule": "linear", "rescale_timesteps": False},
    # CycleDiff diffusion/script_util.py defaults (model470000.pt): improved-diffusion UNet + attribute_emb
    "cyclediff_celebahq": {"image_size": 256, "num_channels": 128, "num_res_blocks": 2,
                           "channel_mult": "1,2,4,4,8,8", "attention_resolutions": "16,8", "num_heads": 4,
                           "num_head_channels": -1, "num_heads_upsample": -1, "use_scale_shift_norm": True,
                           "resblock_updown": False, "learn_sigma": False, "sigma_small": False, "class_cond": False,
                           "dropout": 0.0, "use_new_attention_order": False, "diffusion_steps": 1000,
                           "noise_schedule": "linear", "rescale_timesteps": True,
                           "attributes": CYCLEDIFF_ATTRIBUTES, "attribute_values": "01"},
}


def detect(state: dict[str, torch.Tensor]) -> bool:
    return "input_blocks.0.0.weight" in state and "time_embed.0.weight" in state and "out.2.weight" in state


def _flags(config: dict) -> dict:
    unknown = sorted(set(config) - set(DEFAULTS) - IGNORED)
    if unknown:
        raise InputError(f"guided-diffusion config: unknown flags {unknown} (known: {', '.join(DEFAULTS)})")
    flags = {**DEFAULTS, **config}
    size = int(flags["image_size"])
    mult = flags["channel_mult"]
    if mult in ("", None):
        if size not in DEFAULT_MULT:
            raise InputError(f"guided-diffusion config: image_size={size} has no default channel_mult; give one")
        mult = DEFAULT_MULT[size]
    elif isinstance(mult, str):
        mult = tuple(float(m) for m in mult.split(","))
    flags["channel_mult"] = tuple(int(m) if float(m).is_integer() else float(m) for m in mult)
    res = flags["attention_resolutions"]
    res = [int(r) for r in str(res).split(",")] if isinstance(res, str | int) else [int(r) for r in res]
    flags["attention_ds"] = sorted({size // r for r in res})
    return flags


def unet_config(flags: dict) -> dict:
    """The diffusers UNet2DModel config of a guided-diffusion model."""
    ch, mult, size = int(flags["num_channels"]), flags["channel_mult"], int(flags["image_size"])
    if mult[0] != 1:
        raise InputError(f"guided-diffusion config: channel_mult {mult} starts at {mult[0]}; UNet2DModel needs the "
                         "first level at num_channels (its time embedding reads block_out_channels[0])")
    widths = [int(m * ch) for m in mult]
    attn = [2 ** level in flags["attention_ds"] for level in range(len(mult))]
    heads_ch = int(flags["num_head_channels"])
    if heads_ch == -1:  # a fixed number of heads: the head width must then be the same at every attention level
        up_heads = flags["num_heads_upsample"] if flags["num_heads_upsample"] != -1 else flags["num_heads"]
        if up_heads != flags["num_heads"]:
            raise InputError("guided-diffusion config: num_heads_upsample != num_heads is not expressible in "
                             "UNet2DModel (one attention_head_dim)")
        dims = {w // int(flags["num_heads"]) for w, a in zip(widths, attn, strict=True) if a} | \
            {widths[-1] // int(flags["num_heads"])}
        if len(dims) != 1:
            raise InputError(f"guided-diffusion config: num_heads={flags['num_heads']} gives head widths {sorted(dims)}"
                             " across levels; UNet2DModel has one attention_head_dim (use num_head_channels)")
        heads_ch = dims.pop()
    resnet = bool(flags["resblock_updown"])
    plain_down, plain_up = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if resnet else \
        ("DownBlock2D", "UpBlock2D")
    config = {
        "sample_size": size, "in_channels": 3, "out_channels": 6 if flags["learn_sigma"] else 3,
        "layers_per_block": int(flags["num_res_blocks"]), "block_out_channels": widths,
        "down_block_types": ["AttnDownBlock2D" if a else plain_down for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else plain_up for a in reversed(attn)],
        "downsample_type": "resnet" if resnet else "conv", "upsample_type": "resnet" if resnet else "conv",
        "norm_num_groups": 32, "attn_norm_num_groups": 32, "norm_eps": 1e-5, "attention_head_dim": heads_ch,
        "resnet_time_scale_shift": "scale_shift" if flags["use_scale_shift_norm"] else "default",
        "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "dropout": float(flags["dropout"]),
    }
    if flags["class_cond"]:
        config["num_class_embeds"] = int(flags.get("num_classes") or 1000)
    return config


def scheduler_config(flags: dict) -> dict:
    """The diffusers DDPMScheduler config of guided-diffusion's create_gaussian_diffusion flags."""
    steps, kind = int(flags["diffusion_steps"]), flags["noise_schedule"]
    if flags["rescale_timesteps"] and steps != 1000:
        raise InputError(f"guided-diffusion config: rescale_timesteps with diffusion_steps={steps} feeds the UNet "
                         "t·1000/T, which UNet2DModel cannot express")
    if flags["predict_xstart"]:
        raise InputError("guided-diffusion config: predict_xstart models are not supported (ε-prediction only)")
    if kind == "linear":  # guided-diffusion scales the 1000-step range to T steps
        scale = 1000 / steps
        sched = {"beta_schedule": "linear", "beta_start": scale * 1e-4, "beta_end": scale * 0.02}
    elif kind == "cosine":
        sched = {"beta_schedule": "squaredcos_cap_v2"}
    else:
        raise InputError(f"guided-diffusion config: noise_schedule={kind!r} (linear or cosine)")
    variance = "learned_range" if flags["learn_sigma"] else "fixed_small" if flags["sigma_small"] else "fixed_large"
    return {"num_train_timesteps": steps, **sched, "prediction_type": "epsilon", "variance_type": variance,
            "clip_sample": True}


def _resblock(orig: str, new: str) -> dict[str, str]:
    return {f"{orig}.in_layers.0": f"{new}.norm1", f"{orig}.in_layers.2": f"{new}.conv1",
            f"{orig}.emb_layers.1": f"{new}.time_emb_proj", f"{orig}.out_layers.0": f"{new}.norm2",
            f"{orig}.out_layers.3": f"{new}.conv2", f"{orig}.skip_connection": f"{new}.conv_shortcut"}


def module_map(flags: dict) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """({original module prefix: diffusers prefix} for plain modules, [(original, diffusers)] attention blocks)."""
    n, levels = int(flags["num_res_blocks"]), len(flags["channel_mult"])
    attn_levels = {level for level in range(levels) if 2 ** level in flags["attention_ds"]}
    plain = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
             "label_emb": "class_embedding"}
    attns = []
    for level in range(levels):
        for j in range(n):
            index = 1 + level * (n + 1) + j
            plain.update(_resblock(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}"))
            if level in attn_levels:
                attns.append((f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}"))
        if level != levels - 1:
            down = f"input_blocks.{1 + level * (n + 1) + n}.0"
            if flags["resblock_updown"]:
                plain.update(_resblock(down, f"down_blocks.{level}.downsamplers.0"))
            else:
                plain[f"{down}.op"] = f"down_blocks.{level}.downsamplers.0.conv"
    plain.update(_resblock("middle_block.0", "mid_block.resnets.0"))
    plain.update(_resblock("middle_block.2", "mid_block.resnets.1"))
    attns.append(("middle_block.1", "mid_block.attentions.0"))
    for u in range(levels):
        level = levels - 1 - u
        for j in range(n + 1):
            index = u * (n + 1) + j
            plain.update(_resblock(f"output_blocks.{index}.0", f"up_blocks.{u}.resnets.{j}"))
            if level in attn_levels:
                attns.append((f"output_blocks.{index}.1", f"up_blocks.{u}.attentions.{j}"))
            if level and j == n:
                up = f"output_blocks.{index}.{2 if level in attn_levels else 1}"
                if flags["resblock_updown"]:
                    plain.update(_resblock(up, f"up_blocks.{u}.upsamplers.0"))
                else:
                    plain[f"{up}.conv"] = f"up_blocks.{u}.upsamplers.0.conv"
    return plain, attns


def split_qkv(weight: torch.Tensor, heads: int, legacy: bool) -> list[torch.Tensor]:
    """q, k, v of a fused qkv projection ([3C, ...]): legacy rows are [head][q,k,v][ch], new ones [q,k,v][head][ch]."""
    width = weight.shape[0] // 3
    rows = weight.reshape(heads, 3, width // heads, *weight.shape[1:]) if legacy else \
        weight.reshape(3, heads, width // heads, *weight.shape[1:]).transpose(0, 1)
    return [rows[:, i].reshape(width, *weight.shape[1:]) for i in range(3)]


def map_state(state: dict[str, torch.Tensor], flags: dict, heads_ch: int) -> tuple[dict, dict]:
    """(diffusers state, {diffusers key: original key}) of a guided-diffusion state dict."""
    plain, attns = module_map(flags)
    out, origin = {}, {}

    def put(new: str, orig: str, tensor: torch.Tensor):
        out[new], origin[new] = tensor, orig

    for key, tensor in state.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in plain:
            put(f"{plain[prefix]}.{leaf}", key, tensor)
    legacy = not flags["use_new_attention_order"]
    for orig, new in attns:
        if f"{orig}.qkv.weight" not in state:
            continue
        width = state[f"{orig}.qkv.weight"].shape[0] // 3
        heads = max(width // heads_ch, 1)
        for leaf in ("weight", "bias"):
            put(f"{new}.group_norm.{leaf}", f"{orig}.norm.{leaf}", state.get(f"{orig}.norm.{leaf}"))
            for name, part in zip(("to_q", "to_k", "to_v"), split_qkv(state[f"{orig}.qkv.{leaf}"], heads, legacy),
                                  strict=True):
                put(f"{new}.{name}.{leaf}", f"{orig}.qkv.{leaf}", part.reshape(part.shape[0], -1) if leaf == "weight"
                    else part)
            proj = state.get(f"{orig}.proj_out.{leaf}")
            put(f"{new}.to_out.0.{leaf}", f"{orig}.proj_out.{leaf}",
                proj.reshape(proj.shape[0], -1) if proj is not None and leaf == "weight" else proj)
    for leaf in ("weight", "bias"):  # CycleDiff: y ∈ {0,1} → facelab's y' = 2y − 1
        w1, b1 = state.get("attribute_emb.0.weight"), state.get(f"attribute_emb.0.{leaf}")
        if w1 is None:
            break
        if flags["attribute_values"] == "01":
            b1 = w1 / 2 if leaf == "weight" else b1 + w1.sum(1) / 2
        put(f"class_embedding.linear_1.{leaf}", f"attribute_emb.0.{leaf}", b1)
        put(f"class_embedding.linear_2.{leaf}", f"attribute_emb.2.{leaf}", state.get(f"attribute_emb.2.{leaf}"))
    return out, origin


def mismatch(expected: dict[str, torch.Tensor], mapped: dict, origin: dict, state: dict) -> str | None:
    """Why `mapped` (from `state`) does not fit a model with state `expected` (first keys and shapes), or None."""
    used = set(origin.values())
    missing = [k for k in expected if mapped.get(k) is None]
    wrong = [k for k in expected if mapped.get(k) is not None and mapped[k].shape != expected[k].shape]
    extra = [k for k in state if k not in used]
    parts = []
    if wrong:
        parts.append("shape mismatch " + ", ".join(f"{origin[k]} {list(state[origin[k]].shape)} (the config expects "
                                                    f"{list(expected[k].shape)} for {k})" for k in wrong[:3]))
    if missing:
        parts.append("no tensor of the file maps to " + ", ".join(origin.get(k, k) for k in missing[:3]))
    if extra:
        parts.append("the config has no place for " + ", ".join(f"{k} {list(state[k].shape)}" for k in extra[:3]))
    return "; ".join(parts) or None


def fit_state(make, mapping, state: dict, what: str, dry: bool = False) -> torch.nn.Module | None:
    """make() builds the model, mapping(model) gives (mapped state, origin); the model holding `state`, or an
    InputError naming the first keys/shapes that do not fit (checked on the meta device first: no weights built;
    dry: only that check, returning None)."""
    with torch.device("meta"):
        meta = make()
    mapped, origin = mapping(meta)
    problem = mismatch(meta.state_dict(), mapped, origin, state)
    if problem:
        raise InputError(f"{what} does not fit the checkpoint's tensors: {problem}")
    if dry:
        return None
    model = make()
    model.load_state_dict({k: v.float() for k, v in mapped.items()})
    return model


def fits(state: dict[str, torch.Tensor], config: dict, builder: Callable | None = None) -> str | None:
    """None if `config` fits the tensors of `state`, else why not (no weights are built). `builder`: the format's
    `build(state, config, dry=True)` (default this module's; facelab.convert.ddim passes its own)."""
    try:
        (builder or build)(state, config, dry=True)
    except InputError as err:
        return str(err)
    return None


def build(state: dict[str, torch.Tensor], config: dict, dry: bool = False) -> tuple[UNet2DModel, dict, dict]:
    """(the diffusers UNet holding `state` (None when dry), its scheduler config, the resolved flags)."""
    flags = _flags(config)
    unet_cfg = unet_config(flags)
    attributes = flags["attributes"]
    if attributes and "attribute_emb.0.weight" in state and len(attributes) != state["attribute_emb.0.weight"].shape[1]:
        raise InputError(f"guided-diffusion config: {len(attributes)} attributes, but attribute_emb.0.weight has shape "
                         f"{list(state['attribute_emb.0.weight'].shape)}")
    unet = fit_state(lambda: attribute_unet(unet_cfg, attributes) if attributes else UNet2DModel(**unet_cfg),
                     lambda _: map_state(state, flags, unet_cfg["attention_head_dim"]), state,
                     "the guided-diffusion config", dry)
    return unet, scheduler_config(flags), flags


def convert(state: dict[str, torch.Tensor], dest: Path, config: dict, fmt: str = "guided_diffusion") -> None:
    unet, sched, flags = build(state, config)
    unet.save_pretrained(dest / "unet", safe_serialization=True)
    DDPMScheduler.from_config(sched).save_pretrained(dest / "scheduler")
    recipe = {"timestep_rescaling": "t·1000/T (identity at T=1000)" if flags["rescale_timesteps"] else None,
              "attention_order": "new" if flags["use_new_attention_order"] else "legacy",
              "attribute_input": "facelab y' = 2y − 1 (the original's y ∈ {0, 1}, re-parametrised exactly)"
              if flags["attributes"] else None}
    (dest / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
