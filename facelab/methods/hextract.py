"""`method=hextract`: h-space vectors with attribute labels, the training data of the h-classifier (Balancing Act's
ADP).

Inputs (`method.source`, or any source composed with `+source=NAME` whose inputs carry labels):
  synthetic      labelled synthetic faces (SyntheticSource of method.faces), DDIM(η = 0)-inverted over the sampler grid
                 (ground-truth labels of method.attributes);
  class_folders  the original's layout, one sub-folder of images per class (ClassFolderSource of `method.root`, e.g.
                 data/Male/{0,1}/), DDIM(η = 0)-inverted (labels = the folders);
  trajectory     the sampler's own trajectories from x_T ~ N(0, I), the final image labelled by an attribute classifier
                 (`method.classifier`): h as guidance will see it (the original trained on inversions only).
h is recorded at `method.where` at every timestep of the grid, one network call per grid time, and written as shards
(facelab.data.hspace: format, ShardWriter, HSpaceDataset) in `method.out` (default <run dir>/hspace).
A latent model (model.pretrained = a zoo latent model such as ldm_text64, or an exported latent folder) is read as
method=ldm samples it: its UNet's h under one condition (method.mask / method.text, default the shipped face's), on
the LDM grid (method.ldm_grid); inputs are VAE-encoded before the inversion, trajectories decoded before labelling.

    python -m facelab.sample method=hextract model.pretrained=ddpm64_biased method.out=data/hspace/ddpm64_biased
    python -m facelab.sample method=hextract model.pretrained=ldm_text64 text="A face." method.source=trajectory
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from facelab.data.hspace import FORMAT, ShardWriter
from facelab.diffusion import ddim_invert, hspace
from facelab.diffusion.hspace import WHERE
from facelab.guidance.base import refuse_guidance
from facelab.io.errors import InputError
from facelab.io.images import resize_images
from facelab.models.classifier import load_classifier
from facelab.models.codiff import ldm_timesteps
from facelab.models.latent import LatentModel, load_latent_model
from facelab.models.pretrained import load_denoiser, locate, model_fingerprint
from facelab.runner import Runner
from facelab.sources import ClassFolderSource, Inputs, Source, SyntheticSource, build, named_as

SOURCES = ("synthetic", "class_folders", "trajectory")
DTYPES = {"float16": torch.float16, "float32": torch.float32}
GRID_IMAGES = 64  # the first images shown in grid.png
KNOBS = {"synthetic": {"source.count": "num_samples", "source.seed": "method.faces.seed",  # errors of the defaults
                       "source.start": "method.faces.start", "source.priors": "method.faces.priors"},
         "class_folders": {"source.root": "method.root"}}


@dataclass(frozen=True)
class Options:
    """cfg.method, checked once."""

    source: str
    attributes: list[str]
    faces: dict
    root: str | None
    attribute: str | None
    classifier: str
    where: str
    dtype: str
    shard_size: int
    out: str | None
    mask: str | None = None    # latent models: the condition (as method=ldm's mask= / text=)
    text: str | None = None
    ldm_grid: bool = True      # latent models: the LDM grid ending on ᾱ_0, as method=ldm / codiff sample

    @classmethod
    def from_cfg(cls, node: DictConfig) -> Options:
        values = OmegaConf.to_container(node, resolve=True)
        opts = cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})
        for key, allowed in (("source", SOURCES), ("where", WHERE), ("dtype", DTYPES)):
            if getattr(opts, key) not in allowed:
                raise InputError(f"method.{key}={getattr(opts, key)!r}: use one of {', '.join(allowed)}")
        if opts.source == "class_folders" and opts.root is None:
            raise InputError("method.source=class_folders needs method.root=DIR (one sub-folder of images per class)")
        return opts

    def default_source(self, count: int) -> Source:
        """The inputs method.source names (synthetic faces or class folders)."""
        if self.source == "class_folders":
            return ClassFolderSource(self.root, attribute=self.attribute)
        return SyntheticSource(count, self.faces["seed"], self.faces["start"], self.faces["priors"], prefix="")


def run(cfg: DictConfig, runner: Runner) -> dict:
    refuse_guidance(cfg, "method=hextract", "it records h along unguided inversions and trajectories, the "
                    "h-classifier's training data")
    opts = Options.from_cfg(cfg.method)
    composed = cfg.get("source") is not None
    if composed and opts.source == "trajectory":
        raise InputError("method.source=trajectory samples its own faces: drop +source, or invert its images with "
                         "method.source=synthetic")
    folder = Path(opts.out) if opts.out else runner.out / "hspace"
    if folder.is_dir() and any(folder.glob("*.safetensors")):
        raise FileExistsError(f"{folder}: already holds h-space shards; choose another method.out")
    source = None if opts.source == "trajectory" else build(cfg.source) if composed else \
        opts.default_source(cfg.num_samples)
    knobs = {} if composed else KNOBS.get(opts.source, {})
    with named_as(knobs):
        total = source and source.size()  # checks the source's knobs and files before the model loads
    latent = Latent.load(cfg.model.pretrained, opts, runner.device)
    denoiser = latent.model.denoiser if latent else load_denoiser(cfg.model.pretrained, runner.device)
    sampler = runner.sampler()
    grid = extraction_grid(denoiser, sampler)
    if latent and opts.ldm_grid:
        grid = ldm_timesteps(denoiser.schedule, sampler.steps)
    described = {k: v for k, v in OmegaConf.to_container(cfg.sampler, resolve=True).items() if not k.startswith("_")}
    meta = {"format": FORMAT, "model": str(cfg.model.pretrained), "fingerprint": model_fingerprint(denoiser),
            "where": opts.where, "grid": grid, "num_train_timesteps": denoiser.schedule.num_train_timesteps,
            "resolution": latent.resolution if latent else denoiser.unet.config.sample_size, "source": opts.source,
            "sampler": {"name": sampler.name, **described}}
    if latent:
        meta["latent"] = {"modality": latent.model.modality, "condition": latent.condition, "ldm_grid": opts.ldm_grid}
    calls = runner.count_calls(denoiser.unet)
    if opts.source == "trajectory":
        batches = trajectory_batches(cfg, opts, runner, denoiser, sampler, meta, latent)
    else:
        batches = inversion_batches(opts, runner, denoiser, grid, source, total, meta, knobs, latent)
    writer, shown = None, []
    with runner.timed("extraction"):
        for images, h, labels, names in batches:
            writer = writer or ShardWriter(folder, meta, opts.shard_size, DTYPES[opts.dtype])
            writer.add(h, labels, names)
            shown += list(images[:GRID_IMAGES - len(shown)].cpu())
        shards = writer.close()
    runner.grid(torch.stack(shown), "grid.png", f"{opts.source} images (first {len(shown)})", "images", upscale=2)
    counts = {name: torch.bincount(writer.labels[:, j], minlength=k).tolist()
              for j, (name, k) in enumerate(meta["attributes"].items())}
    seconds = runner.seconds["extraction"]
    return {"source": opts.source, "num_images": writer.count, "out": str(folder), "shards": len(shards),
            "grid": grid, "h_shape": writer.h_shape, "class_counts": counts, "label_source": meta["label_source"],
            "seconds": seconds, "seconds_per_image": seconds / writer.count,
            "network_calls_per_image": calls.count / -(-writer.count // cfg.batch_size)}  # a batch's calls


class Latent:
    """A latent model read as method=ldm samples it: its UNet under one condition value, inputs VAE-encoded."""

    def __init__(self, model: LatentModel, opts: Options):
        from facelab.methods.codiff import read_inputs  # the condition as method=ldm reads it (defaults, checks)

        inputs = read_inputs(opts, [model])
        self.model, self.text = model, model.modality == "text"
        self.value = inputs.text if self.text else inputs.mask
        self.condition = inputs.text if self.text else str(opts.mask or "the shipped default mask")
        self.resolution = model.vae.config.sample_size

    @classmethod
    def load(cls, source, opts: Options, device) -> Latent | None:
        """The latent model `source` names (zoo name or exported folder), else None (a pixel model: no condition)."""
        found = locate("latent", str(source))
        if found is None or found[0] == "checkpoint":
            if opts.mask is not None or opts.text is not None:
                raise InputError(f"mask= / text=: model {source} is not a latent model (zoo name or exported latent "
                                 "folder); pixel models take no condition")
            return None
        return cls(load_latent_model(str(source), device), opts)

    def cond(self, n: int) -> dict:
        with torch.no_grad():
            return {key: value.expand(n, *value.shape[1:])
                    for key, value in self.model.condition([self.value], batch_size=1).items()}


def extraction_grid(denoiser, sampler) -> list[int]:
    """The sampler's grid as a strictly decreasing list of training times (no RePaint jumps)."""
    grid = sampler.timesteps(denoiser.schedule)
    if any(s >= t for t, s in zip(grid, grid[1:])):
        raise InputError(f"sampler={sampler.name}: h extraction needs a decreasing grid (use sampler=ddim or ddpm)")
    return grid


def labelling(opts: Options, source: Source, inputs: Inputs) -> dict:
    """The shards' label metadata: {attribute: K}, where the labels come from, class names of real inputs."""
    wanted = list(inputs.labels) if isinstance(source, ClassFolderSource) else list(opts.attributes)
    known = list(inputs.labels or {})
    if not wanted or any(a not in known for a in wanted):
        what = "the synthetic faces' attributes" if isinstance(source, SyntheticSource) else "the inputs' labels"
        raise InputError(f"method.attributes={wanted}: give some of {what} {', '.join(known) or '(none)'}")
    found = {"attributes": {a: len(inputs.classes[a]) for a in wanted}}
    if isinstance(source, SyntheticSource):
        priors = json.dumps(dict(source.priors))
        found["label_source"] = f"synthetic:seed={source.seed},start={source.start},priors={priors}"
    else:
        found["classes"] = {a: inputs.classes[a] for a in wanted}
        found["label_source"] = f"class_folders:{Path(str(source.root)).resolve()}" \
            if isinstance(source, ClassFolderSource) else f"source:{type(source).__name__}"
    return {**found, "inversion_eta": 0.0}


def inversion_batches(opts: Options, runner: Runner, denoiser, grid: list[int], source: Source, total: int,
                      meta: dict, knobs: dict, latent: Latent | None = None):
    """Batches (images, h [B, T, ...], labels [B, A], names) of the source's images, DDIM(η = 0)-inverted (a latent
    model: their latents, under its condition); the first batch's labels are checked (and `meta` completed) before
    any network call."""
    resolution = meta["resolution"]
    for first, n in runner.batches(total, desc="h extraction (DDIM inversion)"):
        with named_as(knobs):
            inputs = source.load_range(resolution, first, n)
        if first == 0:
            meta.update(labelling(opts, source, inputs))
        images = inputs.images.to(runner.device)
        x, cond = (latent.model.encode(images), latent.cond(n)) if latent else (images, None)
        hs = ddim_invert(denoiser, denoiser.schedule, x, grid, cond=cond, capture_h=opts.where, progress=False).hs
        yield images, hs.transpose(0, 1), inputs.label_columns(list(meta["attributes"])), inputs.names


def trajectory_batches(cfg: DictConfig, opts: Options, runner: Runner, denoiser, sampler, meta: dict,
                       latent: Latent | None = None):
    """Batches of the sampler's own trajectories, each final image labelled by the attribute classifier (a latent
    model: on meta's grid under its condition, decoded)."""
    classifier = load_classifier(opts.classifier, runner.device)
    wanted = list(opts.attributes)
    if not wanted or any(a not in classifier.heads for a in wanted):
        raise InputError(f"method.attributes={wanted}: the classifier {opts.classifier} predicts "
                         f"{', '.join(classifier.heads)}")
    meta.update(attributes={a: classifier.heads[a] for a in wanted}, label_source=f"classifier:{opts.classifier}",
                eta=float(getattr(sampler, "eta", 0.0)))
    unet, gen = denoiser.unet.config, runner.generator("sampling")
    for first, n in runner.batches(cfg.num_samples, desc="h extraction (trajectories)"):
        x_T = torch.randn(n, unet.in_channels, unet.sample_size, unet.sample_size, generator=gen, device=runner.device)
        with hspace(denoiser.unet, opts.where, capture=True) as hs:
            if latent:
                images = latent.model.decode(runner.sample(denoiser, x_T, sampler, (), gen, timesteps=meta["grid"],
                                                           final=0 if opts.ldm_grid else -1, cond=latent.cond(n)))
            else:
                images = runner.sample(denoiser, x_T, sampler, (), gen)
        probs = classifier.predict(resize_images(images, classifier.image_size))
        labels = torch.stack([probs[a].argmax(1) for a in wanted], 1)
        yield images, torch.stack(hs, 1), labels, [f"sample_{first + i:06d}" for i in range(n)]
