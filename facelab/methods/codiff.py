"""`method=codiff` (Collaborative Diffusion) and `method=ldm` (one of its uni-modal latent models alone).

    python -m facelab.sample method=codiff mask=PATH text="This man has a beard of medium length."
    python -m facelab.sample method=codiff method.collab.reweight=learned return_influence_function=true
    python -m facelab.sample method=ldm mask=PATH          # the mask model alone (text="..." for the text model)

The mask is a CelebAMask-HQ label map (index/palette/colour PNG, or a [19, H·W] one-hot tensor file); without mask
or text the shipped default face (facelab/assets/codiff) is used. Both methods sample with the shared loop
(DDIM η = sampler.eta over the LDM grid {1, 1 + c, …} down to ᾱ_0) and write the original's files under
samples/<mask stem>/<text slug>/ (facelab.io.codiff: x_0, and on request x_inter / pred_x0 (display_x_inter), the
influence functions (return_influence_function), z_0 (save_z), mixed (save_mixed); codiff also influence/*.npz).
metrics.json holds the timing, network calls and the mean learned / effective weight of each modality per step
(inside the face when a mask is given), and under "eval" the scores of +eval=[captions, parsing, attributes].

guidance=[...] (REFUSED says why the others are refused): both take the classifier-gradient terms (attribute,
debias_image), whose classifier reads x̂0 decoded by the autoencoder; method=ldm also takes guidance=[debias], on its
one UNet's h with an h-classifier trained on that model's h (method=hextract model.pretrained=<the latent model>).
metrics.json "guidance" holds what those terms observed (per step: the h-classifier's or classifier's mean
predictions).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from facelab.diffusion import RePaint
from facelab.diffusion.collab import CollaborativeDenoiser, Influence, Reweight
from facelab.evaluators import (
    AttributeEvaluator,
    CaptionEvaluator,
    ParsingEvaluator,
    SimilarityEvaluator,
    build_evaluators,
    guidance_networks,
)
from facelab.guidance.base import needs, refuse_guidance
from facelab.guidance.record import RecordTrajectory
from facelab.io.codiff import SampleFolder
from facelab.io.errors import InputError
from facelab.io.images import read_mask
from facelab.io.tensors import read_latents
from facelab.models.codiff import ldm_timesteps, load_collaborative, load_stage
from facelab.models.latent import load_latent_model
from facelab.runner import Runner

log = logging.getLogger("facelab")
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "codiff"
DEFAULT_MASK, DEFAULT_TEXT = ASSETS / "900001.png", ASSETS / "900001.txt"
# guidance=[...]: why terms that need one of these, or of these classes, are refused (facelab.guidance.base); the
# others join the sampling
REFUSED = {"h_space": "its denoiser mixes several latent UNets' ε, so there is no single h-space to edit (method=ldm "
                      "edits one latent model's h)",
           "pixels": "it samples latents, not images",
           "frames": "it writes no trajectory.png (display_x_inter=true saves every step)"}
REFUSED_LDM = {"pixels": REFUSED["pixels"], "frames": REFUSED["frames"],
               "DirectionEdit": "direction files come from method=directions on a pixel model's h; none fits a latent "
                                "model"}


@dataclass(frozen=True)
class Options:
    """cfg.method of codiff and ldm (conf/method/codiff.yaml, ldm.yaml)."""

    name: str
    mask: str | None = None
    text: str | None = None
    cfg_scale: float | dict = 1.0        # one number, or {modality name: number}
    x_T: str | None = None
    save_z: bool = False
    return_influence_function: bool = False
    display_x_inter: bool = False
    save_mixed: bool = False
    ldm_grid: bool = True
    collab: dict = field(default_factory=dict)   # codiff: the Reweight options
    influence_every: int = 1                     # codiff: the dynamic diffusers every k steps (CollaborativeDenoiser)
    models: dict = field(default_factory=dict)   # ldm: {modality: source}

    @classmethod
    def of(cls, method: DictConfig) -> Options:
        given = OmegaConf.to_container(method, resolve=True)
        opts = {key: given[key] for key in cls.__dataclass_fields__ if given.get(key) is not None}
        for key in ("mask", "text", "x_T"):
            if key in opts:
                opts[key] = str(opts[key])
        if not isinstance(opts.get("cfg_scale", 1.0), dict):
            opts["cfg_scale"] = float(opts.get("cfg_scale", 1.0))
        return cls(**opts)


def run(cfg: DictConfig, runner: Runner) -> dict:
    """method=codiff: the collaborative sampler of model.pretrained under (mask, text)."""
    opts, sampler = prepare(cfg, runner)
    if isinstance(opts.influence_every, bool) or not isinstance(opts.influence_every, int) or opts.influence_every < 1:
        raise InputError(f"method.influence_every={opts.influence_every}: give a whole number of steps ≥ 1")
    collab = load_collaborative(cfg.model.pretrained, runner.device, Reweight.from_options(opts.collab), opts.cfg_scale)
    collab.influence_every = opts.influence_every
    return generate(cfg, runner, opts, sampler, collab)


class UniModal(CollaborativeDenoiser):
    """One latent model alone (M = 1): its UNet is the denoiser's h-space (`unet`, what h-space terms edit and
    fingerprint: model_fingerprint gives the latent model's own)."""

    @property
    def unet(self):
        return self.models[0].unet


def run_ldm(cfg: DictConfig, runner: Runner) -> dict:
    """method=ldm: one uni-modal latent model, method.model or the one whose input is given."""
    opts, sampler = prepare(cfg, runner, REFUSED_LDM)
    scales = opts.cfg_scale.values() if isinstance(opts.cfg_scale, dict) else [opts.cfg_scale]
    edits = [name for name, node in (cfg.get("guidance") or {}).items() if "h_space" in needs(node)]
    if edits and any(float(scale) != 1 for scale in scales):
        raise InputError(f"guidance=[{edits[0]}] with cfg_scale={opts.cfg_scale}: the UNet's call then also holds the "
                         "null-condition rows, whose h the h-classifier never saw; use cfg_scale=1")
    if cfg.model.pretrained is not None:
        model = load_latent_model(str(cfg.model.pretrained), runner.device)
    else:
        given = [key for key in ("mask", "text") if getattr(opts, key) is not None]
        if len(given) != 1:
            raise InputError("method=ldm samples one uni-modal model: give mask=PATH or text=\"...\" (not both), or "
                             "method.model=SOURCE")
        model = load_stage(given[0], str(opts.models[given[0]]), runner.device)
    collab = UniModal([model], reweight=Reweight("average"), cfg_scale=opts.cfg_scale)
    return generate(cfg, runner, opts, sampler, collab)


def prepare(cfg: DictConfig, runner: Runner, refused: dict = REFUSED):
    """The options and the sampler, after refusing (one line, before any model loads) what these methods cannot take."""
    opts = Options.of(cfg.method)
    refuse_guidance(cfg, f"method={opts.name}", refused)
    if cfg.get("source") is not None:
        raise InputError(f"+source: method={opts.name} reads its own inputs (mask=, text=, x_T=), not a source")
    sampler = runner.sampler()
    if isinstance(sampler, RePaint):
        raise InputError(f"sampler=repaint resamples for inpainting: method={opts.name} takes sampler=ddim, ddpm or "
                         "dpmpp_2m")
    return opts, sampler


@dataclass
class Inputs:
    mask: Tensor | None                  # [H, W] labels
    mask_name: str                       # output folder: the mask's stem ("none" without a mask)
    text: str | None
    warnings: list[str]


def read_inputs(opts: Options, models) -> Inputs:
    """The mask and caption the models read (the shipped defaults where not given), checked by each model."""
    modalities = {model.modality for model in models}
    for key in ("mask", "text"):
        if getattr(opts, key) is not None and key not in modalities:
            raise InputError(f"{key}= is given but no model here reads a {key} (modalities: "
                             f"{', '.join(sorted(modalities))})")
    path = Path(opts.mask) if opts.mask is not None else DEFAULT_MASK
    mask = read_mask(path) if "mask" in modalities else None
    text = (opts.text if opts.text is not None else DEFAULT_TEXT.read_text().strip()) if "text" in modalities else None
    values = {"mask": mask, "text": text}
    warnings = [w for model in models for w in model.check_condition(values[model.modality])]
    for warning in warnings:
        log.warning(warning)
    return Inputs(mask, path.stem if mask is not None else "none", text, warnings)


def checked_evaluators(cfg: DictConfig, opts: Options, inputs: Inputs, terms: list, resolution: int) -> dict:
    """+eval=[...]: captions (against the caption), parsing (against the mask), attributes; checked before sampling."""
    evaluators = build_evaluators(cfg)
    for name, evaluator in evaluators.items():
        lacks = {CaptionEvaluator: inputs.text is None and "caption", ParsingEvaluator: inputs.mask is None and "mask",
                 SimilarityEvaluator: "reference image"}.get(type(evaluator))
        if lacks:
            raise InputError(f"+eval=[{name}]: method={opts.name} has no {lacks} to score its samples against")
        extra = {"num_images": cfg.num_samples} if isinstance(evaluator, AttributeEvaluator) else {}
        evaluator.check(resolution, guidance_networks(terms), **extra)
    return evaluators


def references(evaluator, inputs: Inputs, n: int) -> dict:
    if isinstance(evaluator, CaptionEvaluator):
        return {"captions": [inputs.text] * n}
    return {"labels": inputs.mask.expand(n, -1, -1)} if isinstance(evaluator, ParsingEvaluator) else {}


def generate(cfg: DictConfig, runner: Runner, opts: Options, sampler, collab: CollaborativeDenoiser) -> dict:
    inputs = read_inputs(opts, collab.models)
    schedule, shape, terms = collab.schedule, collab.models[0].latent_shape, runner.guidance()
    evaluators = checked_evaluators(cfg, opts, inputs, terms, collab.models[0].vae.config.sample_size)
    grid, final = ((ldm_timesteps(schedule, sampler.steps), 0) if opts.ldm_grid else (sampler.timesteps(schedule), -1))
    starts = read_latents(opts.x_T, cfg.num_samples, shape) if opts.x_T is not None else None
    files = SampleFolder(runner.out, inputs.mask, inputs.mask_name, inputs.text, collab.names,
                         [model.modality for model in collab.models], save_z=opts.save_z, save_mixed=opts.save_mixed,
                         influence_maps=opts.return_influence_function)
    caption = inputs.text if inputs.text is not None else "(no caption)"
    if files.mask_png is not None:
        runner.gallery.section("inputs").append([(f"mask {inputs.mask_name}; caption: {caption}", files.mask_png)])
    start_gen, noise_gen = runner.generator("codiff.start"), runner.generator("codiff.noise")
    collab.generator, collab.record = runner.generator("codiff.reweight"), collab.diffusers is not None
    counters = {kind: [runner.count_calls(net) for net in nets] for kind, nets in
                (("models", [model.unet for model in collab.models]), ("diffusers", collab.diffusers or []))}
    trajectory = [RecordTrajectory(every=1, num_images=cfg.batch_size)] if opts.display_x_inter else []
    values = [{"mask": inputs.mask, "text": inputs.text}[model.modality] for model in collab.models]
    images, records = [], []
    for first, n in runner.batches(cfg.num_samples):
        z = (starts[first:first + n].to(runner.device) if starts is not None
             else torch.randn(n, *shape, generator=start_gen, device=runner.device))
        with runner.timed("sampling"):
            z0 = runner.sample(collab, z, sampler, [*terms, *trajectory], noise_gen, timesteps=grid, final=final,
                               cond=collab.conditions(values, n))
            images.append(collab.decode(z0).cpu())
        records.append(collab.take_influence())
        files.write(first, images[-1], z0.cpu(), [decode_trajectory(collab, z, trajectory[0].frames, i)
                                                  for i in range(n)] if trajectory else (), records[-1])
    images, influence = torch.cat(images), None if records[0] is None else Influence.cat(records)
    runner.grid(images, "grid.png", "samples", f"{len(images)} samples; caption: {caption}",
                nrow=min(len(images), 8), upscale=2)
    seconds, runs = runner.seconds["sampling"], -(-cfg.num_samples // cfg.batch_size)
    counts = {kind: sum(c.count for c in found) for kind, found in counters.items()}
    metrics = {"method": opts.name, "modalities": collab.names,
               "mask": str(opts.mask or DEFAULT_MASK) if inputs.mask is not None else None, "text": inputs.text,
               "outputs": str(files.folder.relative_to(runner.out)), "num_samples": len(images), "seconds": seconds,
               "seconds_per_image": seconds / len(images), "sampler": sampler.name, "steps": sampler.steps,
               "eta": getattr(sampler, "eta", None), "cfg_scale": dict(zip(collab.names, collab.cfg_scales)),
               "influence_every": getattr(collab, "influence_every", 1),
               # forwards of a whole sampling run (each image goes through all of them, batched with the others)
               "network_calls": sum(counts.values()) // runs, "network_calls_per_image": sum(counts.values()) / runs,
               "network_calls_by_kind": {kind: count // runs for kind, count in counts.items() if count},
               "warnings": inputs.warnings}
    if influence is not None:
        tiles, t = influence.tiles()
        labels = [f"{kind} {name}" for kind in ("learned I", "weight") for name in collab.names]
        runner.grid(tiles, "influence.png", "influence", f"rows: {', '.join(labels)}; columns: t = "
                    f"{', '.join(map(str, t))}", nrow=len(t), upscale=max(1, images.shape[-1] // tiles.shape[-1]),
                    rows=labels, cols=[f"t = {step}" for step in t], maps={"label": "influence", "vmin": 0, "vmax": 1})
        metrics.update(reweight=collab.reweight.options(), influence=influence.means(collab.names, inputs.mask))
    observed = observations(cfg, terms)
    if observed:
        metrics["guidance"] = observed
    if evaluators:
        metrics["eval"] = {name: evaluator.score(images, **references(evaluator, inputs, len(images)))
                           for name, evaluator in evaluators.items()}
    return metrics


def observations(cfg: DictConfig, terms: list) -> dict:
    """Per guidance term, what it saw at each step: the h-classifier's mean predictions before and after the edit and
    ‖Δh‖ (debias: trajectory_rows), or the guiding classifier's mean probability of each target (attribute: rows)."""
    found = {}
    for name, term in zip((cfg.get("guidance") or {}).keys(), terms):
        rows = term.trajectory_rows() if hasattr(term, "trajectory_rows") else getattr(term, "rows", None)
        if rows:
            found[name] = [{key: round(value, 5) if isinstance(value, float) else value for key, value in row.items()}
                           for row in rows]
    return found


@torch.no_grad()
def decode_trajectory(collab: CollaborativeDenoiser, z: Tensor, frames: list, i: int, chunk: int = 16):
    """Sample i's decoded x_t (x_T, then after each step) and x̂0 (each step), from RecordTrajectory's frames."""
    x_t = torch.stack([z[i].cpu(), *(frame[1][i] for frame in frames)])
    x0 = torch.stack([frame[2][i] for frame in frames])
    return tuple(torch.cat([collab.decode(part.to(z.device)).cpu() for part in x.split(chunk)]) for x in (x_t, x0))
