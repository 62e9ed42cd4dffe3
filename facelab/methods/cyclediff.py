"""`method=cyclediff`: CycleDiff attribute editing with an attribute-conditional DDPM (facelab.guidance.cyclediff).

    python -m facelab.sample method=cyclediff attribute=Smiling                 # DDIM-50 from a DDIM inversion
    python -m facelab.sample method=cyclediff 'attribute=[Smiling,Male,reconstruction]'
    python -m facelab.sample method=cyclediff attribute=Smiling+Eyeglasses     # both flipped in one edit
    python -m facelab.sample method=cyclediff_reference attribute=15            # the original: DDPM-1000, x_T := x_src
    python -m facelab.sample method=cyclediff method.input=images gt_path=DIR [method.labels=FILE]

Each face's source attributes y_src come from labels (synthetic ground truth, or `method.labels` for images) or are
predicted by the guidance classifier; an edit flips the chosen entries into y_tgt, samples under y_tgt from the start
point (`method.start`: the image itself as x_T, SDEdit noising to t0, DDIM or edit-friendly inversion under y_src)
and guides every step with the weighted attribute, cycle, range and optional feature terms. The start is also decoded
under y_src without guidance ("decoded": what the start reproduces; with an inversion, the source's own trajectory the
step-by-step cycle loss matches).

Writes inputs/, decoded/, edits/{face}_{edit}.png, counterfactuals/ (synthetic: the renderer's ground truth of the same
face with the attributes flipped), previews/ (per-step x̂0, method.previews > 0), grid.png (rows = faces; columns =
input, decoded, each edit), losses.csv (per step: each guidance term's batch mean) and metrics.json: per edit, by the
held-out evaluation classifier, the flip rate of the flipped attributes and the preservation rate of the others
(against the counterfactual's ground truth, else y_src with the flips), PSNR/SSIM to the counterfactual (and the
input's own, the baseline), PSNR/L1 to the input for `reconstruction`, time and network calls per edit.
"""
from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor
from tqdm.auto import tqdm

from facelab.data.layouts import read_attribute_file
from facelab.data.synthetic import SyntheticFaces
from facelab.diffusion import (
    DDIM,
    DDPM,
    Denoiser,
    RePaint,
    Sampler,
    Schedule,
    ddim_invert,
    edit_friendly_invert,
    sample,
)
from facelab.guidance.cyclediff import (
    AttributeLoss,
    CycleDiffGuidance,
    CycleStepByStep,
    CycleToOrigin,
    FeatureLoss,
    StepNoise,
    range_loss,
)
from facelab.io.errors import InputError
from facelab.io.grids import save_grid
from facelab.io.images import read_image_folder, resize_images, save_image
from facelab.methods.common import build_sampler, clock, device_of, guidance_terms
from facelab.metrics.images import l1, psnr, ssim
from facelab.models.classifier import AttributeNet, load_classifier
from facelab.models.components.seeding import keyed_generator
from facelab.models.pretrained import load_denoiser
from facelab.runner import Runner

# The original's 20 attributes (its preprocess/attributes.py, CelebA names; 1 and 3 merge several CelebA attributes);
# index 20 is reconstruction. Its README's editable ones: 2, 9, 11, 12, 15, 18, 19.
REFERENCE_ATTRIBUTES = [
    "Goatee", "Beard", "Bags_Under_Eyes", "Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair",
    "Eyeglasses", "Heavy_Makeup", "Male", "Mouth_Slightly_Open", "Narrow_Eyes", "Pale_Skin", "Smiling",
    "Straight_Hair", "Wavy_Hair", "Wearing_Lipstick", "Young",
]
REFERENCE_EDITABLE = [2, 9, 11, 12, 15, 18, 19]
RECONSTRUCTION = "reconstruction"
STARTS = ("original", "sdedit", "ddim_inversion", "edit_friendly")
CYCLES = ("origin", "step", "step_reference", "none")
FEATURE_TERMS = FeatureLoss.KINDS
NOISE_STREAM, START_STREAM, TERM_STREAM = 1, 2, 3  # generator keys (seed, stream, first face of the batch)
GRID_FACES = 16


def run(cfg: DictConfig, runner: Runner) -> dict:
    out, gallery = runner.out, runner.gallery
    sampler = check_options(cfg)
    opts, device = cfg.method, device_of(cfg)
    denoiser = load_denoiser(cfg.model.pretrained, device)
    if denoiser.attributes is None:
        raise InputError(f"model.pretrained={cfg.model.pretrained} is not attribute-conditional; train one with "
                         "python -m facelab.train +experiment=cyclediff_ddpm")
    attributes = denoiser.attributes
    edits = parse_edits(cfg.method.attribute, attributes)
    if opts.eval_classifier is not None and str(opts.eval_classifier) == str(opts.classifier):
        raise InputError(f"method.classifier={opts.classifier} is also the evaluation classifier; guidance must not "
                         "see the evaluator")
    classifier = check_classifier(load_classifier(opts.classifier, device), "method.classifier", attributes, denoiser)
    evaluator = (check_classifier(load_classifier(opts.eval_classifier, device), "method.eval_classifier", attributes,
                                  denoiser) if opts.eval_classifier else None)
    networks = feature_networks(opts, device)
    faces = load_faces(cfg, denoiser, classifier)
    grid = edit_grid(denoiser, sampler, cfg)
    result = edit_faces(cfg, denoiser, sampler, grid, edits, faces, classifier, networks)
    truth = {name: counterfactuals(faces, flips) for name, flips in edits.items()}
    write_outputs(out, gallery, faces, edits, result, truth, opts.previews)
    metrics = {"model": str(cfg.model.pretrained), "attributes": attributes, "faces": len(faces.names),
               "source_attributes": faces.source, "sampler": sampler.name, "steps": len(grid),
               "first_t": grid[0], "eta": sampler.eta if isinstance(sampler, DDIM) else None,
               "start": opts.start, "cycle": opts.cycle, "weights": OmegaConf.to_container(opts.weights),
               "grad_norm": opts.grad_norm, "classifier": str(opts.classifier),
               "classifier_input": "noise_aware" if classifier.noise_aware else "clean_blend",
               "eval_classifier": opts.eval_classifier and str(opts.eval_classifier),
               "start_seconds_per_face": result.start_seconds / len(faces.names),
               "decoded_psnr": float(psnr(result.decoded, faces.images).mean())}
    metrics["edits"] = {name: {"flipped": flips, "seconds_per_edit": result.seconds[name] / len(faces.names),
                               "network_calls": result.calls[name],
                               **evaluate_edit(cfg, faces, flips, result.edits[name], truth[name], evaluator,
                                               attributes)}
                        for name, flips in edits.items()}
    return metrics


# --- options -----------------------------------------------------------------------------------------------
def check_options(cfg: DictConfig) -> Sampler:
    """Validate the knobs before any work; return the sampler (DDPM with Σ_t of method.variance_type)."""
    opts = cfg.method
    choices = {"start": STARTS, "cycle": CYCLES, "input": ("synthetic", "images"),
               "source_attributes": ("labels", "predicted"), "variance_type": ("fixed_large", "fixed_small")}
    for key, allowed in choices.items():
        if opts[key] not in allowed:
            raise InputError(f"method.{key}={opts[key]}: use one of {', '.join(allowed)}")
    sampler = build_sampler(cfg.sampler)
    if isinstance(sampler, RePaint):
        raise InputError("sampler=repaint resamples for inpainting: method=cyclediff takes sampler=ddim, ddpm or "
                         "dpmpp_2m")
    if isinstance(sampler, DDPM):
        sampler = replace(sampler, variance_type=opts.variance_type)
    if opts.start == "edit_friendly" and not isinstance(sampler, DDIM):
        raise InputError("method.start=edit_friendly inverts the DDIM(η) step: use sampler=ddim (sampler.eta=1 is the "
                         "DDPM-like step)")
    for kind in FEATURE_TERMS:
        if opts.weights[kind] and opts.networks[kind] is None:
            raise InputError(f"method.weights.{kind}={opts.weights[kind]} needs method.networks.{kind}: a classifier "
                             "(zoo name or folder) or {_target_: ...} building a feature network")
    if cfg.num_samples < 1 or cfg.batch_size < 1:
        raise InputError(f"num_samples={cfg.num_samples}, batch_size={cfg.batch_size}: both must be at least 1")
    return sampler


def parse_edits(spec, attributes: list[str]) -> dict[str, list[str]]:
    """{edit name: attributes to flip} from `attribute`: a name, an index of the original's table, NAME+NAME (flipped
    together), `reconstruction` (index 20: nothing flipped), or a list of these; null = the original's table."""
    if spec is None:
        names = [REFERENCE_ATTRIBUTES[i] for i in REFERENCE_EDITABLE if REFERENCE_ATTRIBUTES[i] in attributes]
        return {**{name: [name] for name in names}, RECONSTRUCTION: []}
    edits = {}
    for item in spec if isinstance(spec, (list, ListConfig, tuple)) else [spec]:
        flips = list(dict.fromkeys(resolve_attribute(token, attributes) for token in str(item).split("+")))
        if RECONSTRUCTION in flips and len(flips) > 1:
            raise InputError(f"attribute={item}: reconstruction flips nothing and cannot be combined")
        edits[flips[0] if flips == [RECONSTRUCTION] else "+".join(flips)] = [f for f in flips if f != RECONSTRUCTION]
    return edits


def resolve_attribute(token: str, attributes: list[str]) -> str:
    token = token.strip()
    index = int(token) if token.isdigit() else None
    if index is not None:
        token = RECONSTRUCTION if index == 20 else REFERENCE_ATTRIBUTES[index] if index < 20 else token
    if token == RECONSTRUCTION or token in attributes:
        return token
    table = ", ".join(f"{i} {REFERENCE_ATTRIBUTES[i]}" for i in REFERENCE_EDITABLE) + ", 20 reconstruction"
    which = f"{token} (index {index} of the original's table)" if index is not None and index < 20 else token
    raise InputError(f"attribute={which}: not an attribute of the model ({', '.join(attributes)}); give names, "
                     f"NAME+NAME, reconstruction, or the original's indices ({table})")


def check_classifier(net: AttributeNet, key: str, attributes: list[str], denoiser: Denoiser) -> AttributeNet:
    """A classifier with a binary head for every attribute of the model; a noise-aware one on the model's schedule."""
    missing = [a for a in attributes if net.heads.get(a) != 2]
    if missing:
        raise InputError(f"{key}={net.source} has no binary head for {', '.join(missing)} (it predicts "
                         f"{', '.join(net.heads)}): use a classifier trained on the model's attributes")
    if net.noise_aware:
        size = denoiser.unet.config.sample_size
        scheduler = net.meta.get("scheduler")
        same = scheduler is not None and torch.allclose(Schedule.from_config(scheduler).alphas_cumprod,
                                                        denoiser.schedule.alphas_cumprod)
        if not same or net.image_size != size:
            raise InputError(f"{key}={net.source} is noise-aware but was trained on another noise schedule or image "
                             f"size ({net.image_size} px) than the model ({size} px); retrain it with the model's")
    return net


def feature_networks(opts: DictConfig, device: torch.device) -> dict:
    """The feature network of each active perceptual / identity term: images in [-1, 1] → features."""
    networks = {}
    for kind in FEATURE_TERMS:
        spec = opts.networks[kind]
        if not opts.weights[kind]:
            continue
        if isinstance(spec, Mapping):
            networks[kind] = instantiate(spec).to(device).eval().requires_grad_(False)
            continue
        if opts.eval_classifier is not None and str(spec) == str(opts.eval_classifier):
            raise InputError(f"method.networks.{kind}={spec} is the evaluation classifier; guidance must not see it")
        net = load_classifier(spec, device)
        networks[kind] = lambda x, net=net: net.features(resize_images(x, net.image_size), time_zero(net, x))
    return networks


def time_zero(net: AttributeNet, x: Tensor) -> Tensor | None:
    """t = 0 for a noise-aware classifier reading clean images, else None."""
    return torch.zeros(len(x), dtype=torch.long, device=x.device) if net.noise_aware else None


def edit_grid(denoiser: Denoiser, sampler: Sampler, cfg: DictConfig) -> list[int]:
    """The sampler's grid; for sdedit and the inversions only its times ≤ t0."""
    grid = sampler.timesteps(denoiser.schedule)
    if cfg.method.start != "original":
        grid = [t for t in grid if t <= cfg.method.t0]
    if not grid:
        raise InputError(f"method.t0={cfg.method.t0}: no time of the sampler's grid is ≤ t0")
    return grid


# --- inputs ------------------------------------------------------------------------------------------------
@dataclass
class Faces:
    """The faces to edit: names, images [N, 3, H, W] in [-1, 1] (CPU), y_src ∈ {−1, 1}^[N, A], where y_src came from
    (labels | predicted), and for synthetic faces their dataset (ground-truth counterfactuals)."""

    names: list[str]
    images: Tensor
    y_src: Tensor
    source: str
    synthetic: SyntheticFaces | None = None


def load_faces(cfg: DictConfig, denoiser: Denoiser, classifier: AttributeNet) -> Faces:
    opts, size, attributes = cfg.method, denoiser.unet.config.sample_size, denoiser.attributes
    labels, synthetic = None, None
    if opts.input == "synthetic":
        synthetic = SyntheticFaces(size, cfg.num_samples, opts.faces.seed, start=opts.faces.start)
        items = [synthetic[i] for i in range(len(synthetic))]
        names, images = [f"face{item['name']}" for item in items], torch.stack([item["image"] for item in items])
        if opts.source_attributes == "labels":
            missing = [a for a in attributes if a not in synthetic.attribute_names]
            if missing:
                raise InputError(f"the synthetic faces have no label for {', '.join(missing)}: use "
                                 "method.source_attributes=predicted")
            columns = [synthetic.attribute_names.index(a) for a in attributes]
            labels = torch.stack([item["attributes"] for item in items])[:, columns]
    else:
        names, images = read_image_folder(cfg.method.gt_path, size)
        if opts.source_attributes == "labels" and opts.labels is not None:
            labels = image_labels(opts.labels, names, attributes)
    if labels is None:
        return Faces(names, images, predict(classifier, images, attributes, cfg.batch_size) * 2 - 1, "predicted",
                     synthetic)
    return Faces(names, images, labels * 2 - 1, "labels", synthetic)


def image_labels(spec, names: list[str], attributes: list[str]) -> Tensor:
    """0/1 labels [N, A]: one vector (in the model's attribute order) for every image, or a CelebA-style file."""
    if isinstance(spec, (list, ListConfig)):
        if len(spec) != len(attributes) or any(v not in (0, 1) for v in spec):
            raise InputError(f"method.labels={list(spec)}: give {len(attributes)} values 0/1, one per attribute of the "
                             f"model ({', '.join(attributes)})")
        return torch.tensor([float(v) for v in spec]).expand(len(names), -1)
    if not Path(spec).is_file():
        raise InputError(f"method.labels={spec}: no such file; give a CelebA-style attribute file or a 0/1 list")
    columns, rows = read_attribute_file(spec)
    missing = [a for a in attributes if a not in columns]
    if missing:
        raise InputError(f"method.labels={spec} has no column for {', '.join(missing)}")
    unlabelled = [n for n in names if n not in rows]
    if unlabelled:
        raise InputError(f"method.labels={spec} has no row for {', '.join(unlabelled[:3])}")
    return torch.tensor([[rows[n][columns.index(a)] for a in attributes] for n in names], dtype=torch.float32)


@torch.no_grad()
def predict(net: AttributeNet, images: Tensor, attributes: list[str], batch_size: int) -> Tensor:
    """The classifier's hard 0/1 labels [N, A] of clean images."""
    device, labels = next(net.parameters()).device, []
    for chunk in images.split(batch_size):
        x = resize_images(chunk.to(device), net.image_size)
        probs = net.predict(x, time_zero(net, x))
        labels.append(torch.stack([probs[a][:, 1] > 0.5 for a in attributes], 1).float().cpu())
    return torch.cat(labels)


# --- editing -----------------------------------------------------------------------------------------------
@dataclass
class EditResult:
    decoded: Tensor                    # [N, 3, H, W]: the start decoded under y_src without guidance
    edits: dict[str, Tensor]           # edit name -> [N, 3, H, W]
    seconds: dict[str, float]          # edit name -> guided sampling seconds over all faces
    calls: dict[str, int]              # edit name -> network calls of one edit run (one batch)
    start_seconds: float               # start points (inversions) over all faces
    losses: list[dict]                 # losses.csv rows
    previews: dict[str, Tensor]        # edit name -> [N, K, 3, H, W]


def edit_faces(cfg: DictConfig, denoiser: Denoiser, sampler: Sampler, grid: list[int], edits: dict[str, list[str]],
               faces: Faces, classifier: AttributeNet, networks: dict) -> EditResult:
    device, attributes, opts = denoiser.unet.device, denoiser.attributes, cfg.method
    sampling = dict(sampler=sampler, progress=cfg.progress)
    others = guidance_terms(cfg)
    preview_steps = set(torch.linspace(0, len(grid) - 1, opts.previews).round().long().tolist()) if opts.previews \
        else set()
    calls = [0]
    hook = denoiser.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    result = EditResult([], {}, dict.fromkeys(edits, 0.0), dict.fromkeys(edits, 0), 0.0, [], {})
    try:
        for first in tqdm(range(0, len(faces.names), cfg.batch_size), desc="faces", disable=not cfg.progress):
            x_src = faces.images[first:first + cfg.batch_size].to(device)
            y_src = faces.y_src[first:first + cfg.batch_size].to(device)
            key = (int(cfg.seed), first)
            start = clock(device)
            x_T, noises = start_point(cfg, denoiser, sampler, grid, x_src, y_src, key)
            result.start_seconds += clock(device) - start
            trajectory = [] if opts.cycle == "step" and opts.start in ("ddim_inversion", "edit_friendly") else None
            record = None if trajectory is None else lambda state, path=trajectory: path.append(state.x)
            result.decoded.append(sample(denoiser, denoiser.schedule, x_T, grid, cond=y_src, noises=noises,
                                         callback=record, **sampling).cpu())
            for name, flips in edits.items():
                y_tgt, mask = flip(y_src, flips, attributes)
                terms = loss_terms(opts, classifier, networks, attributes, x_src, y_src, y_tgt, mask, noises,
                                   trajectory, keyed_generator(device, *key, TERM_STREAM))
                guidance, frames = CycleDiffGuidance(terms, opts.grad_norm), []

                def keep(state, frames=frames):
                    if state.i in preview_steps:
                        frames.append(state.x0.cpu())

                calls[0], start = 0, clock(device)
                edited = sample(denoiser, denoiser.schedule, x_T, grid, guidance=[guidance, *others], cond=y_tgt,
                                noises=noises, callback=keep if preview_steps else None, **sampling)
                result.seconds[name] += clock(device) - start
                result.calls[name] = calls[0]
                result.edits.setdefault(name, []).append(edited.cpu())
                if frames:
                    result.previews.setdefault(name, []).append(torch.stack(frames, 1))
                result.losses += [{"edit": name, "first_face": first, "step": i, **row}
                                  for i, row in enumerate(guidance.rows)]
    finally:
        hook.remove()
    result.decoded = torch.cat(result.decoded)
    result.edits = {name: torch.cat(batches) for name, batches in result.edits.items()}
    result.previews = {name: torch.cat(batches) for name, batches in result.previews.items()}
    return result


def start_point(cfg: DictConfig, denoiser: Denoiser, sampler: Sampler, grid: list[int], x_src: Tensor, y_src: Tensor,
                key):
    """(x at grid[0], the per-step noises shared by the decode and every edit of this batch)."""
    opts, schedule, device = cfg.method, denoiser.schedule, x_src.device
    noises = StepNoise(x_src.shape, len(grid), (*key, NOISE_STREAM), device)
    gen = keyed_generator(device, *key, START_STREAM)
    if opts.start == "original":  # the reference's DDPM path: the clean image is x_T
        return x_src, noises
    if opts.start == "sdedit":
        return schedule.q_sample(x_src, grid[0], torch.randn(x_src.shape, generator=gen, device=device)), noises
    if opts.start == "ddim_inversion":
        return ddim_invert(denoiser, schedule, x_src, grid, cond=y_src, progress=cfg.progress).latents[0], noises
    return edit_friendly_invert(denoiser, schedule, x_src, grid, eta=sampler.eta, generator=gen, cond=y_src,
                                clip=sampler.clips(schedule), progress=cfg.progress)


def flip(y_src: Tensor, flips: list[str], attributes: list[str]) -> tuple[Tensor, Tensor]:
    """(y_tgt, mask): y_src with the `flips` entries negated, and the mask [B, A] of those entries."""
    mask = torch.zeros_like(y_src)
    mask[:, [attributes.index(a) for a in flips]] = 1
    return y_src * (1 - 2 * mask), mask


def loss_terms(opts, classifier, networks: dict, attributes, x_src, y_src, y_tgt, mask, noises,
               trajectory, generator) -> dict:
    """{name: (weight, term)} of one edit run (inactive terms are not built)."""
    weights = opts.weights
    terms = {"attribute": (weights.attribute if mask.any() else 0.0,
                           AttributeLoss(classifier, attributes, y_tgt, mask)),
             "range": (weights.range, range_loss)}
    if opts.cycle == "origin":
        terms["cycle"] = (weights.cycle, CycleToOrigin(x_src, y_src, generator))
    elif opts.cycle in ("step", "step_reference"):
        terms["cycle"] = (weights.cycle, CycleStepByStep(x_src, y_src, noises, trajectory, generator,
                                                          reference=opts.cycle == "step_reference"))
    for kind, network in networks.items():
        terms[kind] = (weights[kind], FeatureLoss(network, x_src, kind))
    return terms


# --- outputs and metrics -----------------------------------------------------------------------------------
def counterfactuals(faces: Faces, flips: list[str]) -> list[dict | None]:
    """The renderer's ground truth of each synthetic face with `flips` flipped (an item of SyntheticFaces), or None
    where there is none: image inputs, reconstruction, flips the renderer cannot express (a hair colour set to 0)."""
    if faces.synthetic is None or not flips:
        return [None] * len(faces.names)
    data, result = faces.synthetic, []
    for index in range(len(faces.names)):
        face = data.face(index)
        try:
            result.append(data.item(face.with_attributes(**{a: 1 - face.attributes[a] for a in flips}), index))
        except (KeyError, ValueError):
            result.append(None)
    return result


def evaluate_edit(cfg: DictConfig, faces: Faces, flips: list[str], edited: Tensor, truth: list[dict | None],
                  evaluator: AttributeNet | None, attributes: list[str]) -> dict:
    """PSNR/SSIM to the ground truth (the counterfactual; the input for reconstruction), and by the evaluator the flip
    rate (all flipped attributes read as intended) and the preservation rate (the other attributes read as expected:
    the counterfactual's ground truth, else y_src with the flips), each also for the unedited input as a baseline."""
    entry, found = {}, [i for i, item in enumerate(truth) if item is not None]
    if not flips:
        entry.update(psnr=float(psnr(edited, faces.images).mean()), ssim=float(ssim(edited, faces.images).mean()),
                     l1=float(l1(edited, faces.images).mean()))
    elif found:
        reference = torch.stack([truth[i]["image"] for i in found])
        entry.update(ground_truths=len(found), psnr=float(psnr(edited[found], reference).mean()),
                     ssim=float(ssim(edited[found], reference).mean()),
                     psnr_input=float(psnr(faces.images[found], reference).mean()),
                     ssim_input=float(ssim(faces.images[found], reference).mean()))
    if evaluator is None:
        return entry
    columns = [attributes.index(a) for a in flips]
    expected = (faces.y_src > 0).float()
    expected[:, columns] = 1 - expected[:, columns]
    names = faces.synthetic.attribute_names if faces.synthetic is not None else []
    if set(attributes) <= set(names):  # the renderer's consequences of a flip (no beard on a woman) are expected too
        for i in found:
            expected[i] = truth[i]["attributes"][[names.index(a) for a in attributes]]
    flipped = torch.zeros(len(attributes), dtype=torch.bool)
    flipped[columns] = True
    for suffix, images in (("", edited), ("_input", faces.images)):
        correct = predict(evaluator, images, attributes, cfg.batch_size) == expected
        if flips:
            entry[f"flip_rate{suffix}"] = float(correct[:, flipped].all(1).float().mean())
        entry[f"preservation{suffix}"] = float(correct[:, ~flipped].float().mean())
        if not suffix:
            entry["preserved"] = {a: float(correct[:, j].float().mean()) for j, a in enumerate(attributes)
                                  if not flipped[j]}
    return entry


def write_outputs(out: Path, gallery, faces: Faces, edits: dict, result: EditResult, truth: dict,
                  previews: int) -> None:
    """inputs/, decoded/, edits/, counterfactuals/, previews/, grid.png, counterfactuals.png, losses.csv."""
    blank = torch.zeros_like(faces.images[0])
    for i, name in enumerate(faces.names):
        save_image(faces.images[i], out / "inputs" / f"{name}.png")
        save_image(result.decoded[i], out / "decoded" / f"{name}.png")
        for edit in edits:
            save_image(result.edits[edit][i], out / "edits" / f"{name}_{edit}.png")
            if truth[edit][i] is not None:
                save_image(truth[edit][i]["image"], out / "counterfactuals" / f"{name}_{edit}.png")
            if edit in result.previews:
                save_grid(result.previews[edit][i], out / "previews" / f"{name}_{edit}.png", nrow=previews, upscale=2)
    columns = [faces.images, result.decoded, *result.edits.values()]
    path = save_grid(torch.stack([c[:GRID_FACES] for c in columns], 1).flatten(0, 1), out / "grid.png",
                     nrow=len(columns), upscale=2)
    gallery.section("edits").append([(f"rows = faces; columns = input, decoded, {', '.join(edits)}", path)])
    shown = [edit for edit in edits if any(item is not None for item in truth[edit])]
    if shown:
        columns = [faces.images[:GRID_FACES]] + [torch.stack([blank if item is None else item["image"]
                                                              for item in truth[edit][:GRID_FACES]]) for edit in shown]
        path = save_grid(torch.stack(columns, 1).flatten(0, 1), out / "counterfactuals.png", nrow=len(columns),
                         upscale=2)
        gallery.section("ground truth").append([(f"columns = input, counterfactual {', '.join(shown)}", path)])
    if result.losses:
        fields = list(dict.fromkeys(key for row in result.losses for key in row))
        with open(out / "losses.csv", "x", newline="") as file:
            writer = csv.DictWriter(file, fields)
            writer.writeheader()
            writer.writerows(result.losses)
