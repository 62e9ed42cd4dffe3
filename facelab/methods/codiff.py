"""`method=codiff` (Collaborative Diffusion) and `method=ldm` (one of its uni-modal latent models alone).

    python -m facelab.sample method=codiff mask=PATH text="This man has a beard of medium length."
    python -m facelab.sample method=codiff method.collab.reweight=learned return_influence_function=true
    python -m facelab.sample method=ldm mask=PATH          # the mask model alone (text="..." for the text model)

The mask is a CelebAMask-HQ label map (index/palette/colour PNG, or a [19, H·W] one-hot tensor file); without mask
or text the shipped default face (facelab/assets/codiff) is used. Both methods sample with the shared loop
(DDIM η = sampler.eta over the LDM grid {1, 1 + c, …} down to ᾱ_0) and write, under
samples/<mask stem>/<text slug>/, the original's files: the mask again as a colour PNG, {idx:06d}_x_0.png, and on
request {idx:06d}_x_inter.png / _pred_x0.png (display_x_inter), _<modality>_influence_function.png
(return_influence_function; the mask's is named seg_mask), _z_0.png (save_z), _mixed.png (save_mixed); codiff also
writes influence/{idx:06d}.npz (learned I and effective weights, [steps, M, h, w]). metrics.json holds the timing,
network calls and the mean learned / effective weight of each modality per step (inside the face when a mask is given).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from torch import Tensor

from facelab.data.synthetic import SEG_CLASSES
from facelab.diffusion import RePaint, sample
from facelab.diffusion.collab import CollaborativeDenoiser, Reweight
from facelab.guidance.base import refuse_guidance
from facelab.io.checkpoints import load_checkpoint
from facelab.io.errors import InputError
from facelab.io.grids import image_grid
from facelab.io.images import colorize_mask, read_mask, resize_mask, save_image, save_mask
from facelab.methods.common import build_sampler, clock, device_of, generator, guidance_terms
from facelab.models.codiff import ldm_timesteps, load_collaborative, load_stage
from facelab.models.latent import load_latent_model
from facelab.runner import Runner

log = logging.getLogger("facelab")
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "codiff"
DEFAULT_MASK, DEFAULT_TEXT = ASSETS / "900001.png", ASSETS / "900001.txt"
FILE_NAMES = {"mask": "seg_mask"}  # modality -> the reference's name in {idx}_<name>_influence_function.png
NROW = 10                           # tiles per row of the per-step grids, as the reference
START_STREAM, NOISE_STREAM, REWEIGHT_STREAM = 0, 1, 2
# guidance=[...]: why terms that need one of these (facelab.guidance.base) are refused; the others join the sampling
REFUSED = {"h_space": "its denoiser mixes several latent UNets' ε, so there is no single h-space to edit",
           "pixels": "it samples latents, not images",
           "frames": "it writes no trajectory.png (display_x_inter=true saves every step)"}


def run(cfg: DictConfig, runner: Runner) -> dict:
    """method=codiff: the collaborative sampler of model.pretrained under (mask, text)."""
    refuse_guidance(cfg, "method=codiff", REFUSED)
    out, gallery = runner.out, runner.gallery
    collab = load_collaborative(cfg.model.pretrained, device_of(cfg), Reweight.from_options(cfg.method.collab),
                                cfg_scales(cfg))
    return generate(cfg, out, gallery, collab, read_inputs(cfg, collab))


def run_ldm(cfg: DictConfig, runner: Runner) -> dict:
    """method=ldm: one uni-modal latent model, method.model or the one whose input is given."""
    refuse_guidance(cfg, "method=ldm", REFUSED)
    out, gallery = runner.out, runner.gallery
    device = device_of(cfg)
    if cfg.model.pretrained is not None:
        model = load_latent_model(str(cfg.model.pretrained), device)
    else:
        given = [key for key in ("mask", "text") if cfg.method[key] is not None]
        if len(given) != 1:
            raise InputError("method=ldm samples one uni-modal model: give mask=PATH or text=\"...\" (not both), or "
                             "method.model=SOURCE")
        model = load_stage(given[0], str(cfg.method.models[given[0]]), device)
    collab = CollaborativeDenoiser([model], reweight=Reweight("average"), cfg_scale=cfg_scales(cfg))
    return generate(cfg, out, gallery, collab, read_inputs(cfg, collab))


def cfg_scales(cfg: DictConfig) -> float | dict:
    scale = cfg.method.cfg_scale
    return OmegaConf.to_container(scale) if isinstance(scale, DictConfig) else float(scale)


# --- inputs ----------------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    mask: Tensor | None                  # [H, W] labels
    mask_name: str                       # output folder: the mask's stem ("none" without a mask)
    text: str | None
    warnings: list[str] = field(default_factory=list)

    def value(self, modality: str):
        return self.mask if modality == "mask" else self.text


def read_inputs(cfg: DictConfig, collab: CollaborativeDenoiser) -> Inputs:
    """The mask and caption the models read (the shipped defaults where not given), validated."""
    modalities = {model.modality for model in collab.models}
    for key in ("mask", "text"):
        if cfg.method[key] is not None and key not in modalities:
            raise InputError(f"{key}= is given but no model here reads a {key} (modalities: "
                             f"{', '.join(sorted(modalities))})")
    inputs = Inputs(None, "none", None)
    if "mask" in modalities:
        path = Path(cfg.method.mask) if cfg.method.mask is not None else DEFAULT_MASK
        inputs.mask, inputs.mask_name = read_mask(path), path.stem
    if "text" in modalities:
        inputs.text = str(cfg.method.text) if cfg.method.text is not None else DEFAULT_TEXT.read_text().strip()
        if not inputs.text.strip():
            raise InputError(f'text={inputs.text!r}: the caption is empty; give a sentence, e.g. text="This man has a '
                             'beard."')
    for model in collab.models:
        inputs.warnings += check_condition(model, inputs)
    for warning in inputs.warnings:
        log.warning(warning)
    return inputs


def check_condition(model, inputs: Inputs) -> list[str]:
    """Warnings: mask classes that vanish at the encoder's mask resolution. A caption longer than the encoder reads is
    an error (the original silently cut it)."""
    if model.modality == "mask":
        size = model.encoder.mask_size
        gone = sorted(set(inputs.mask.unique().tolist()) - set(resize_mask(inputs.mask, size).unique().tolist()))
        return [f"mask: {', '.join(SEG_CLASSES[c] for c in gone)} not visible at the {size}×{size} the mask encoder "
                "reads (nearest resize)"] if gone else []
    dropped = model.encoder.tokens_dropped([inputs.text])[0]
    if dropped:
        raise InputError(f"text: {dropped} WordPiece tokens beyond the {model.encoder.max_length} the text encoder "
                         "reads; shorten the caption")
    return []


def read_start(path: str, num: int, shape: tuple[int, ...]) -> Tensor:
    """A fixed start latent x_T: [C, h, w] (shared by all samples) or [≥ num, C, h, w] from .pt/.pth, .npy or
    .safetensors (one tensor)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"x_T={path}: no such file")
    try:
        if path.suffix == ".npy":
            x = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".safetensors":
            tensors = list(load_file(path).values())
            x = tensors[0] if len(tensors) == 1 else None
        else:
            x = load_checkpoint(path)
    except (OSError, ValueError) as err:  # InputError (a refused pickle) is a ValueError too: keep its message
        raise err if isinstance(err, InputError) else InputError(f"x_T={path}: unreadable ({err})") from None
    if not isinstance(x, Tensor):
        raise InputError(f"x_T={path}: expected one tensor")
    x = x.float()
    x = x.expand(num, *x.shape) if x.ndim == len(shape) else x
    if tuple(x.shape[1:]) != tuple(shape) or len(x) < num:
        raise InputError(f"x_T={path}: shape {list(x.shape)}; the model needs [{num}, {', '.join(map(str, shape))}] "
                         f"(or one [{', '.join(map(str, shape))}] for all samples)")
    return x[:num]


def slug(text: str | None) -> str:
    return (re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:80] or "text") if text is not None else "none"


# --- sampling --------------------------------------------------------------------------------------------------------
@dataclass
class Sampled:
    images: Tensor | None = None         # [N, 3, H, W] in [-1, 1]
    z0: Tensor | None = None             # [N, C, h, w]
    t: list[int] | None = None           # the network's time at each step (codiff)
    learned: Tensor | None = None        # [N, steps, M, h, w] learned I (codiff)
    weights: Tensor | None = None        # [N, steps, M, h, w] effective weights (codiff)
    x_inter: list[Tensor] = field(default_factory=list)   # per sample: decoded [x_T, x after each step]
    pred_x0: list[Tensor] = field(default_factory=list)   # per sample: decoded x̂0 of each step
    seconds: float = 0.0


def run_batches(cfg: DictConfig, collab: CollaborativeDenoiser, inputs: Inputs, sampler,
                device: torch.device) -> Sampled:
    if isinstance(sampler, RePaint):
        raise InputError(f"sampler=repaint resamples for inpainting: method={cfg.method.name} takes sampler=ddim, "
                         "ddpm or dpmpp_2m")
    if cfg.num_samples < 1 or cfg.batch_size < 1:
        raise InputError(f"num_samples={cfg.num_samples}, batch_size={cfg.batch_size}: both must be at least 1")
    schedule, shape, terms = collab.schedule, collab.models[0].latent_shape, guidance_terms(cfg)
    if cfg.method.ldm_grid:
        grid, final = ldm_timesteps(schedule, sampler.steps), 0
    else:
        grid, final = sampler.timesteps(schedule), -1
    starts = read_start(cfg.method.x_T, cfg.num_samples, shape) if cfg.method.x_T is not None else None
    start_gen, noise_gen = generator(cfg.seed, device, START_STREAM), generator(cfg.seed, device, NOISE_STREAM)
    collab.generator = generator(cfg.seed, device, REWEIGHT_STREAM)
    collab.record = collab.diffusers is not None
    values = [inputs.value(model.modality) for model in collab.models]
    result, images, latents, learned, weights = Sampled(), [], [], [], []
    for first in range(0, cfg.num_samples, cfg.batch_size):
        n = min(cfg.batch_size, cfg.num_samples - first)
        z = (starts[first:first + n].to(device) if starts is not None
             else torch.randn(n, *shape, generator=start_gen, device=device))
        frames = {"x": [z], "x0": []}

        def keep(state, frames=frames):
            frames["x"].append(state.x)
            frames["x0"].append(state.x0)

        collab.records.clear()
        start = clock(device)
        z0 = sample(collab, schedule, z, grid, sampler=sampler, guidance=terms, generator=noise_gen,
                    cond=collab.conditions(values, n), final=final, progress=cfg.progress,
                    callback=keep if cfg.method.display_x_inter else None)
        images.append(collab.decode(z0).cpu())
        result.seconds += clock(device) - start
        latents.append(z0.cpu())
        if collab.records:
            result.t = [int(r["t"][0]) for r in collab.records]
            learned.append(torch.stack([r["learned"] for r in collab.records], 1))
            weights.append(torch.stack([r["weights"] for r in collab.records], 1))
        if cfg.method.display_x_inter:
            for i in range(n):
                result.x_inter.append(decode_frames(collab, [x[i] for x in frames["x"]]))
                result.pred_x0.append(decode_frames(collab, [x[i] for x in frames["x0"]]))
    result.images, result.z0 = torch.cat(images), torch.cat(latents)
    if learned:
        result.learned, result.weights = torch.cat(learned), torch.cat(weights)
    return result


@torch.no_grad()
def decode_frames(collab: CollaborativeDenoiser, latents: list[Tensor], chunk: int = 16) -> Tensor:
    stacked = torch.stack(latents)
    return torch.cat([collab.decode(part).cpu() for part in stacked.split(chunk)])


# --- outputs ---------------------------------------------------------------------------------------------------------
def generate(cfg: DictConfig, out: Path, gallery, collab: CollaborativeDenoiser, inputs: Inputs) -> dict:
    device, sampler = device_of(cfg), build_sampler(cfg.sampler)
    result = run_batches(cfg, collab, inputs, sampler, device)
    folder = out / "samples" / inputs.mask_name / slug(inputs.text)
    write_samples(cfg, folder, collab, inputs, result)
    write_gallery(out, gallery, folder, collab, inputs, result)
    n, runs = len(result.images), -(-cfg.num_samples // cfg.batch_size)
    metrics = {"method": cfg.method.name, "modalities": collab.names,
               "mask": str(cfg.method.mask or DEFAULT_MASK) if inputs.mask is not None else None, "text": inputs.text,
               "outputs": str(folder.relative_to(out)), "num_samples": n, "seconds": result.seconds,
               "seconds_per_image": result.seconds / n, "sampler": sampler.name, "steps": sampler.steps,
               "eta": getattr(sampler, "eta", None), "cfg_scale": dict(zip(collab.names, collab.cfg_scales)),
               # forwards of a whole sampling run (each image goes through all of them, batched with the others)
               "network_calls": sum(collab.calls.values()) // runs,
               "network_calls_by_kind": {k: v // runs for k, v in collab.calls.items()}, "warnings": inputs.warnings}
    if collab.diffusers is not None:
        metrics.update(reweight=collab.reweight.options(), influence=influence_means(collab, inputs, result))
    return metrics


def influence_means(collab: CollaborativeDenoiser, inputs: Inputs, result: Sampled) -> dict:
    """Mean learned I and effective weight per modality and step, over the samples and the face region (mask ≠ 0 at
    latent resolution) when a mask is given, else over all pixels."""
    h, w = result.learned.shape[-2:]
    region = torch.ones(h, w, dtype=torch.bool)
    if inputs.mask is not None and (resize_mask(inputs.mask, (h, w)) != 0).any():
        region = resize_mask(inputs.mask, (h, w)) != 0
    means = {kind: getattr(result, kind)[..., region].mean((0, -1)) for kind in ("learned", "weights")}  # [steps, M]
    return {"t": result.t, "region": "face" if not region.all() else "all",
            **{kind: {name: [round(float(v), 4) for v in m[:, j]] for j, name in enumerate(collab.names)}
               for kind, m in means.items()}}


def save_tiles(tiles: Tensor, path: Path, nrow: int, upscale: int = 1) -> Path:
    """A grid of [N, C, h, w] tiles in [-1, 1] through save_image (never overwrites), optionally upscaled (nearest)."""
    grid = torch.from_numpy(image_grid(tiles, min(nrow, len(tiles)))).permute(2, 0, 1).float() / 127.5 - 1
    return save_image(grid.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2), path)


def write_samples(cfg: DictConfig, folder: Path, collab: CollaborativeDenoiser, inputs: Inputs,
                  result: Sampled) -> None:
    size = result.images.shape[-1]
    if inputs.mask is not None:
        save_mask(inputs.mask, folder / f"{inputs.mask_name}.png", style="colour")
        colour = torch.from_numpy(colorize_mask(resize_mask(inputs.mask, size))).permute(2, 0, 1).float() / 127.5 - 1
    for idx, image in enumerate(result.images):
        save_image(image, folder / f"{idx:06d}_x_0.png")
        if cfg.method.display_x_inter:
            save_tiles(result.x_inter[idx], folder / f"{idx:06d}_x_inter.png", NROW)
            save_tiles(result.pred_x0[idx], folder / f"{idx:06d}_pred_x0.png", NROW)
        if cfg.method.save_z:  # the reference's (z + 40)·4 for its raw latents; ours are scaled to unit variance: (z + 4)·32
            z = result.z0[idx]
            save_image((z[:3] if len(z) >= 3 else z.mean(0, keepdim=True)) / 4, folder / f"{idx:06d}_z_0.png")
        if cfg.method.save_mixed and inputs.mask is not None:
            save_image(0.7 * image + 0.3 * colour, folder / f"{idx:06d}_mixed.png")
        if result.weights is None:
            continue
        if cfg.method.get("return_influence_function"):
            for j, (name, model) in enumerate(zip(collab.names, collab.models)):
                maps = result.weights[idx, :, j, None] * 2 - 1  # [steps, 1, h, w]: the map ×255 once saved
                save_tiles(maps, folder / f"{idx:06d}_{FILE_NAMES.get(model.modality, name)}_influence_function.png",
                           NROW)
        npz = folder / "influence" / f"{idx:06d}.npz"
        npz.parent.mkdir(parents=True, exist_ok=True)
        with open(npz, "xb") as file:
            np.savez(file, learned=result.learned[idx].numpy(), weights=result.weights[idx].numpy(),
                     t=np.array(result.t), names=np.array(collab.names))


def write_gallery(out: Path, gallery, folder: Path, collab: CollaborativeDenoiser, inputs: Inputs,
                  result: Sampled) -> None:
    """Sections: inputs (colour mask, caption), samples (grid.png), influence (influence.png: sample 0's learned I and
    effective weights of each modality at up to 10 evenly spaced steps)."""
    caption = inputs.text if inputs.text is not None else "(no caption)"
    if inputs.mask is not None:
        gallery.section("inputs").append([(f"mask {inputs.mask_name}; caption: {caption}",
                                           folder / f"{inputs.mask_name}.png")])
    grid = save_tiles(result.images, out / "grid.png", min(len(result.images), 8), upscale=2)
    gallery.section("samples").append([(f"{len(result.images)} samples; caption: {caption}", grid)])
    if result.weights is None:
        return
    steps = torch.linspace(0, len(result.t) - 1, min(10, len(result.t))).round().long()
    rows = [getattr(result, kind)[0, steps, j] for kind in ("learned", "weights") for j in range(len(collab.names))]
    upscale = max(1, result.images.shape[-1] // result.weights.shape[-1])
    path = save_tiles(torch.cat(rows)[:, None] * 2 - 1, out / "influence.png", len(steps), upscale)
    labels = [f"{kind} {name}" for kind in ("learned I", "weight") for name in collab.names]
    gallery.section("influence").append([(f"rows: {', '.join(labels)}; columns: t = "
                                          f"{', '.join(str(result.t[i]) for i in steps)}", path)])
