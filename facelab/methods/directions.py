"""`method=directions`: discover semantic directions in h-space and apply them to sampled or real faces.

  discover=pca          per-step PCA of h over `num_samples` samples (method.pca=joint: one PCA over all steps)
  discover=jacobian     top singular vectors of the (region-masked) ε Jacobian w.r.t. h along one face's own trajectory;
                        the region comes from ground-truth label maps, mask_path, or else the face parser
                        `method.parser` run on the face (a sample's own final image)
  discover=supervised   mean h of the top minus the bottom `num_examples` of an indexed set scored by a classifier
  discover=conditional  the supervised direction with the `condition` directions projected out exactly
  apply=FILE            decode with Δh_t = scale·direction_t added at every step, same x_T and per-step noise
A discovery writes `directions.safetensors` and previews its directions; both write a grid per face (rows =
directions, columns = scales), every image as edits/{face}_{direction}_{scale}.png, and the held-out evaluation
classifier's attribute probabilities per direction and scale in metrics.json.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from facelab.data.synthetic import SEG, SyntheticFaces
from facelab.diffusion import Denoiser, ddim_invert, edit_friendly_invert
from facelab.directions import discover as maths
from facelab.directions.files import Directions
from facelab.directions.trajectory import run_trajectory, seed_noise
from facelab.guidance.base import refuse_guidance
from facelab.guidance.hedit import HEdit
from facelab.io.errors import InputError
from facelab.io.grids import save_grid
from facelab.io.images import read_image_folder, read_mask, save_image
from facelab.methods.common import device_of
from facelab.models.classifier import AttributeNet, load_classifier
from facelab.models.parser import ParserNet, load_parser
from facelab.models.pretrained import fingerprint, load_denoiser, model_fingerprint
from facelab.runner import Runner

DISCOVER = ("pca", "jacobian", "supervised", "conditional")
REGIONS = {  # composite face regions in CelebAMask-HQ classes
    "eye": ["l_eye", "r_eye"], "brow": ["l_brow", "r_brow"], "ear": ["l_ear", "r_ear"],
    "mouth": ["mouth", "u_lip", "l_lip"], "nose": ["nose"], "hair": ["hair"], "skin": ["skin"], "neck": ["neck"],
    "eyeglasses": ["eye_g"],
}
# default `scales` per method, measured on the zoo model (the reference's ±5, ±50-100 and ±1 were for the 256 px
# model; on ddpm64 Jacobian singular values are ~0.02 and supervised edits cross P = 0.5 at about 2)
NATURAL_SCALES = {"pca": [-5, -2.5, 0, 2.5, 5], "jacobian": [-1500, -750, 0, 750, 1500],
                  "supervised": [-4, -2, 0, 2, 4], "conditional": [-4, -2, 0, 2, 4]}


def run(cfg: DictConfig, runner: Runner) -> dict:
    out, gallery = runner.out, runner.gallery
    refuse_guidance(cfg, "method=directions", "it decodes every face with and without its directions from the same "
                    "x_T and noise, unguided (guidance=[hedit] applies a direction file in method=generate)")
    opts = cfg.method
    if cfg.method.discover not in (None, *DISCOVER):
        raise InputError(f"discover={cfg.method.discover}: use one of {', '.join(DISCOVER)}")
    if not cfg.method.discover and not cfg.method.apply:
        raise InputError("method=directions needs discover=pca|jacobian|supervised|conditional or apply=FILE")
    scales = check_scales(cfg.method.scales)
    indices = check_indices(cfg.method.index) if cfg.method.apply else []
    device = device_of(cfg)
    denoiser = load_denoiser(cfg.model.pretrained, device)
    if opts.clip is None:
        opts.clip = denoiser.schedule.clip_sample
    grid = denoiser.schedule.timesteps(opts.steps).tolist()
    model = {"model": str(cfg.model.pretrained), "fingerprint": model_fingerprint(denoiser), "h_space": opts.h_space}
    sources = load_sources(cfg, denoiser, grid)  # checked before any long computation
    metrics: dict = {}
    start = time.perf_counter()
    if cfg.method.discover:
        directions = DISCOVERERS[cfg.method.discover](cfg, denoiser, grid, sources, metrics)
        directions.meta.update(model, timesteps=grid, eta=opts.eta, method=cfg.method.discover, seed=cfg.seed)
        path = directions.save(out / "directions.safetensors")
        metrics["discover_seconds"] = time.perf_counter() - start
        metrics["directions_file"] = str(path)
        indices = list(range(min(cfg.method.num_directions, len(directions))))
    else:
        directions = Directions.load(cfg.method.apply)
        directions.check(model["fingerprint"], opts.h_space, grid, cfg.method.apply)
    scales = scales or NATURAL_SCALES[directions.meta.get("method", "pca")]
    start = time.perf_counter()
    metrics |= apply_directions(cfg, denoiser, grid, directions, indices, scales, sources, out, gallery)
    metrics.update(apply_seconds=time.perf_counter() - start, scales=scales, indices=indices,
                   method=directions.meta.get("method"), steps=len(grid), eta=opts.eta)
    return metrics


def check_scales(scales) -> list[float] | None:
    if scales is None:
        return None
    values = list(scales) if isinstance(scales, (list, ListConfig, tuple)) else [scales]
    try:
        return [float(s) for s in values]
    except (TypeError, ValueError):
        raise InputError(f"scales={OmegaConf.to_container(scales) if isinstance(scales, ListConfig) else scales}: "
                         "give numbers, e.g. scales=[-5,0,5]") from None


def check_indices(index) -> list[int]:
    values = list(index) if isinstance(index, (list, ListConfig, tuple)) else [index]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in values):  # no silent int(1.5) = 1
        shown = OmegaConf.to_container(index) if isinstance(index, ListConfig) else index
        raise InputError(f"index={shown}: give direction numbers, e.g. index=0 or index=[0,2]")
    return values


# ----------------------------------------------------------------------------------------------- inputs
@dataclass
class Sources:
    """The faces to edit: names, x_T and per-step noise (seeded, or from inverting images), optional label maps."""

    names: list[str]
    x_T: Tensor
    noises: Tensor
    eta: float
    images: Tensor | None = None
    labels: Tensor | None = None


def load_sources(cfg: DictConfig, denoiser: Denoiser, grid: list[int]) -> Sources:
    opts, unet = cfg.method, denoiser.unet.config
    shape = (unet.in_channels, unet.sample_size, unet.sample_size)
    device = denoiser.unet.device
    if opts.input == "samples":
        seeds = list(range(cfg.seed, cfg.seed + opts.edit_seeds))
        x_T, noises = seed_noise(seeds, shape, len(grid), device)
        return Sources([f"seed{s}" for s in seeds], x_T, noises, opts.eta)
    if opts.input == "synthetic":
        faces = SyntheticFaces(unet.sample_size, opts.edit_seeds, opts.faces.seed, start=opts.faces.start + cfg.seed)
        items = [faces[i] for i in range(len(faces))]
        images = torch.stack([it["image"] for it in items]).to(device)
        labels = torch.stack([it["mask"] for it in items])
        names = [f"face{it['name']}" for it in items]
    elif opts.input == "images":
        names, images = read_image_folder(cfg.method.gt_path, unet.sample_size)
        images, labels = images.to(device), None
        if cfg.method.label_path:
            labels = torch.stack([read_mask(Path(cfg.method.label_path) / f"{name}.png", shape[1:]) for name in names])
    else:
        raise InputError(f"method.input={opts.input}: use samples, synthetic or images")
    return invert(cfg, denoiser, grid, names, images, labels)


def invert(cfg, denoiser: Denoiser, grid: list[int], names, images: Tensor, labels) -> Sources:
    opts = cfg.method
    if opts.inversion == "ddim":
        latents = ddim_invert(denoiser, denoiser.schedule, images, grid, progress=cfg.progress).latents
        return Sources(names, latents[0], torch.zeros(len(grid), *images.shape, device=images.device), 0.0,
                       images, labels)
    if opts.inversion == "edit_friendly":
        gen = torch.Generator(images.device).manual_seed(int(cfg.seed))
        x_T, noises = edit_friendly_invert(denoiser, denoiser.schedule, images, grid, eta=opts.eta, generator=gen,
                                           clip=opts.clip, progress=cfg.progress)
        return Sources(names, x_T, noises, opts.eta, images, labels)
    raise InputError(f"method.inversion={opts.inversion}: use ddim or edit_friendly")


def region_classes(cfg: DictConfig) -> list[int] | None:
    """The CelebAMask-HQ class indices of `region` (composite names or classes); None without a region."""
    if not cfg.method.region:
        return None
    names = [cfg.method.region] if isinstance(cfg.method.region, str) else list(cfg.method.region)
    classes = []
    for name in names:
        if name not in REGIONS and name not in SEG:
            raise InputError(f"region={name}: unknown; use one of {', '.join(REGIONS)} or a mask class "
                             f"({', '.join(SEG)})")
        classes += [SEG[c] for c in REGIONS.get(name, [name])]
    return classes


def region_parser(cfg: DictConfig, device) -> ParserNet:
    """`method.parser`, for faces without label maps (sampled seeds, images without mask_path)."""
    if not cfg.method.parser:
        raise InputError("region masks need label maps: set method.parser=parser64 (segments the face), or use "
                         "method.input=synthetic (ground truth) or input=images with mask_path=DIR")
    parser = load_parser(cfg.method.parser, device)
    if unknown := [c for c in parser.classes if c not in SEG]:
        raise InputError(f"method.parser={cfg.method.parser}: classes {unknown} are not CelebAMask-HQ classes")
    return parser


def region_mask(cfg: DictConfig, sources: Sources, classes: list[int], parser: ParserNet | None = None,
                image: Tensor | None = None) -> tuple[Tensor, str]:
    """The binary mask [1, H, W] of the first source's region and where its labels came from: the source's label
    map (ground_truth / mask_path) or else the parser's labels of `image` [C, H, W] (parser:<name>)."""
    if sources.labels is not None:
        labels, origin = sources.labels[0], "ground_truth" if cfg.method.input == "synthetic" else "mask_path"
    else:  # the parser's classes renumbered as the ground truth's (SEG); `parse` resizes to its own size and back
        numbering = torch.tensor([SEG[c] for c in parser.classes])
        labels = numbering[parser.parse(image[None].clamp(-1, 1))[0].cpu()]
        origin = f"parser:{cfg.method.parser}"
    mask = torch.isin(labels.cpu(), torch.tensor(classes)).float()[None]
    if not mask.any():
        raise InputError(f"region={cfg.method.region}: {origin} finds no such pixels on {sources.names[0]}; "
                         "choose another face (seed=...) or region")
    return mask, origin


# ----------------------------------------------------------------------------------------------- discovery
def index_samples(cfg: DictConfig, denoiser: Denoiser, grid: list[int], seeds: list[int], eta: float,
                  classifier: AttributeNet | None = None) -> dict[str, Tensor]:
    """h [N, T, *h] (float16) along the trajectories of `seeds` and the classifier's P(attribute) of their x0.

    Cached under paths.cache_dir by a key of every input (model weights, h location, grid, η, seeds, classifier)."""
    opts = cfg.method
    key = {"model": model_fingerprint(denoiser), "h": opts.h_space, "grid": grid, "eta": float(eta),
           "seeds": [seeds[0], len(seeds)], "clip": bool(opts.clip),
           "classifier": classifier and fingerprint(classifier)}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cfg.paths.cache_dir) / "directions" / f"index_{digest}.safetensors"
    if path.is_file():
        return load_file(path)
    unet = denoiser.unet.config
    shape = (unet.in_channels, unet.sample_size, unet.sample_size)
    hs, scores = [], {}
    for first in tqdm(range(0, len(seeds), cfg.batch_size), desc="indexing samples", disable=not cfg.progress):
        batch = seeds[first:first + cfg.batch_size]
        x_T, noises = seed_noise(batch, shape, len(grid), denoiser.unet.device)
        traj = run_trajectory(denoiser, x_T, noises, grid, eta, clip=opts.clip)
        hs.append(traj.hs.half().cpu())
        if classifier is not None:
            for name, p in classifier.predict(traj.x0).items():
                if p.shape[1] == 2:
                    scores.setdefault(name, []).append(p[:, 1].cpu())
    index = {"hs": torch.cat(hs), "seeds": torch.tensor(seeds)}
    index.update({f"score.{k}": torch.cat(v) for k, v in scores.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(index, path, metadata={"key": json.dumps(key)})
    return index


def discover_pca(cfg, denoiser, grid, sources, metrics) -> Directions:
    opts = cfg.method
    seeds = list(range(opts.index_offset, opts.index_offset + cfg.num_samples))
    hs = index_samples(cfg, denoiser, grid, seeds, opts.eta)["hs"]
    fn = {"per_t": maths.pca_per_t, "joint": maths.pca_joint}.get(opts.pca)
    if fn is None:
        raise InputError(f"method.pca={opts.pca}: use per_t or joint")
    basis, std, ratio = fn(hs, opts.num_svectors)
    metrics["explained_variance"] = ratio.tolist()
    return Directions(basis, std, grid, {"params": {"num_samples": cfg.num_samples, "pca": opts.pca}},
                      {"explained_variance": ratio})


def discover_jacobian(cfg, denoiser, grid, sources, metrics) -> Directions:
    from facelab.directions.jacobian import trajectory_jacobian

    opts = cfg.method
    classes = region_classes(cfg)
    parser = region_parser(cfg, denoiser.unet.device) if classes and sources.labels is None else None
    traj = run_trajectory(denoiser, sources.x_T[:1], sources.noises[:, :1], grid, sources.eta, record_x=True,
                          clip=opts.clip)
    image = (traj.x0 if sources.images is None else sources.images)[0]  # a sample's own final image
    mask, origin = region_mask(cfg, sources, classes, parser, image) if classes else (None, None)
    sigma, v, passes = trajectory_jacobian(denoiser, traj.x_ts[0][:, None], grid, mask,
                                           k=opts.num_eigvecs, where=opts.h_space, tol=opts.tol,
                                           max_iters=opts.max_iters, progress=cfg.progress,
                                           generator=torch.Generator().manual_seed(int(cfg.seed)))
    metrics.update(network_passes=passes, singular_values=sigma.tolist(), source=sources.names[0], mask=origin)
    if mask is not None:
        mask = mask.to(image.device)
        save_image(image * mask + (1 - mask) * -1, Path(cfg.paths.output_dir) / "masked_source.png")
    region = OmegaConf.to_container(cfg.method.region) if isinstance(cfg.method.region, ListConfig) else cfg.method.region
    return Directions(v, sigma, grid, {"params": {"region": region, "mask": origin, "source": sources.names[0],
                                                  "num_eigvecs": opts.num_eigvecs}, "global_at_idx": True})


def supervised_index(cfg, denoiser, grid, heads: dict[str, str]) -> dict[str, Tensor]:
    """The index scored by `method.classifier`, which must have the binary `heads` {head: the argument naming it}."""
    opts = cfg.method
    classifier = load_classifier(opts.classifier, denoiser.unet.device)
    if classifier.image_size != denoiser.unet.config.sample_size:
        raise InputError(f"method.classifier={opts.classifier} reads {classifier.image_size} px images, the model "
                         f"makes {denoiser.unet.config.sample_size} px")
    binary = [name for name, n in classifier.heads.items() if n == 2]  # the heads the index scores
    for head, arg in heads.items():  # checked before indexing idx_size samples
        if head not in binary:
            raise InputError(f"{arg}: the classifier {opts.classifier} has no such binary head "
                             f"(known: {', '.join(binary)})")
    seeds = list(range(opts.index_offset, opts.index_offset + opts.idx_size))
    return index_samples(cfg, denoiser, grid, seeds, opts.index_eta, classifier)


def mean_difference(index: dict[str, Tensor], attribute: str, num_examples: int, opts) -> Tensor:
    key = f"score.{attribute}"  # present: supervised_index checked the heads
    groups = index["score.Male"] > 0.5 if opts.balance_gender and attribute != "Male" else None
    try:
        return maths.supervised(index["hs"], index[key], num_examples, groups)[0]
    except ValueError as err:
        raise InputError(f"{err} (method.idx_size={opts.idx_size})") from None


def discover_supervised(cfg, denoiser, grid, sources, metrics) -> Directions:
    opts = cfg.method
    if not cfg.method.attribute:
        raise InputError(f"discover={cfg.method.discover} needs attribute=NAME (e.g. attribute=Smiling)")
    conditions = [cfg.method.condition] if isinstance(cfg.method.condition, str) else list(cfg.method.condition or [])
    if cfg.method.discover == "conditional" and not conditions:
        raise InputError("discover=conditional needs condition=[NAME,...] (e.g. condition=[Male])")
    heads = {c: f"condition=[{c}]" for c in conditions if cfg.method.discover == "conditional"}
    heads |= {"Male": "method.balance_gender=true"} if opts.balance_gender else {}
    index = supervised_index(cfg, denoiser, grid, {**heads, cfg.method.attribute: f"attribute={cfg.method.attribute}"})
    primal = mean_difference(index, cfg.method.attribute, opts.num_examples, opts)
    vectors, params = [primal], {"attribute": cfg.method.attribute, "idx_size": opts.idx_size,
                                 "num_examples": opts.num_examples, "classifier": opts.classifier,
                                 "balance_gender": opts.balance_gender}
    if cfg.method.discover == "conditional":
        projected = maths.project_out(primal, torch.stack([mean_difference(index, c, opts.num_examples, opts)
                                                           for c in conditions]))
        metrics["kept_norm_fraction"] = float(projected.norm() / primal.norm())
        vectors, params["condition"] = [projected, primal], conditions
    basis, scale = maths.as_directions(torch.stack(vectors))
    return Directions(basis, scale, grid, {"params": params})


DISCOVERERS = {"pca": discover_pca, "jacobian": discover_jacobian, "supervised": discover_supervised,
               "conditional": discover_supervised}


# ----------------------------------------------------------------------------------------------- apply
def apply_directions(cfg, denoiser, grid, directions: Directions, indices: list[int], scales: list[float],
                     sources: Sources, out: Path, gallery) -> dict:
    """Decode every source at every (direction, scale), batched over scales; write images, grids and scores."""
    opts = cfg.method
    global_at_idx = directions.meta.get("global_at_idx", False) if opts.global_at_idx is None else opts.global_at_idx
    window = None if opts.window is None or opts.window >= len(grid) else int(opts.window)
    evaluator = load_classifier(opts.eval_classifier, denoiser.unet.device) if opts.eval_classifier else None
    n_src, n_s = len(sources.names), len(scales)
    rows: dict[int, list[Tensor]] = {}
    results: dict = {"edits": {}}
    for k in tqdm(indices, desc="directions", disable=not cfg.progress):
        delta = directions.delta(k, opts.t_idx, global_at_idx, window, opts.apply_svals)
        images = []
        for b in range(n_src):
            x_T = sources.x_T[b:b + 1].repeat(n_s, 1, 1, 1)
            noises = sources.noises[:, b:b + 1].repeat(1, n_s, 1, 1, 1)
            edit = HEdit(delta, torch.tensor(scales), opts.h_space, asymmetric=opts.asyrp)
            images.append(run_trajectory(denoiser, x_T, noises, grid, sources.eta, edit, clip=opts.clip).x0.cpu())
        images = torch.stack(images)  # [sources, scales, C, H, W]
        rows[k] = images
        for b, name in enumerate(sources.names):
            for j, scale in enumerate(scales):
                save_image(images[b, j], out / "edits" / f"{name}_{k}_{scale:g}.png")
        if evaluator is not None:
            probs = evaluator.predict(images.flatten(0, 1).to(denoiser.unet.device))
            results["edits"][str(k)] = {f"{scale:g}": {a: round(float(p[:, 1].reshape(n_src, n_s)[:, j].mean()), 4)
                                              for a, p in probs.items() if p.shape[1] == 2}
                               for j, scale in enumerate(scales)}
    every = torch.cat([rows[k][b] for b in range(n_src) for k in indices])
    gallery.section("all faces").append([(f"rows = (face, direction), columns = scales {scales}",
                                          save_grid(every, out / "grid.png", nrow=n_s, upscale=2))])
    for b, name in enumerate(sources.names):
        path = save_grid(torch.cat([rows[k][b] for k in indices]), out / f"grid_{name}.png", nrow=n_s, upscale=2)
        row = [(f"{name}: rows = directions {indices}, columns = scales {scales}", path)]
        if sources.images is not None:
            row.insert(0, ("input", save_image(sources.images[b].cpu(), out / "inputs" / f"{name}.png")))
        gallery.section(name).append(row)
    if sources.images is not None and 0.0 in scales:  # scale 0 must reproduce the inverted input
        decoded = rows[indices[0]][:, scales.index(0.0)]
        mse = (decoded - sources.images.cpu()).pow(2).flatten(1).mean(1) / 4  # images in [-1, 1]: range 2
        results["reconstruction_psnr"] = round(float((-10 * torch.log10(mse.clamp_min(1e-12))).mean()), 2)
    return results
