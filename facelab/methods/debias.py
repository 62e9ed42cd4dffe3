"""`method=debias`: Balancing Act, distribution-guided debiasing of an unconditional model in h-space.

    python -m facelab.sample method=debias target.Male=0.5                      # distribution guidance (default)
    python -m facelab.sample method=debias mode=sample target.Male=0            # every sample toward class 0
    python -m facelab.sample method=debias mode=vanilla                         # the unguided baseline
    python -m facelab.sample method=debias method.universal_guidance=true mode=sample target.Male=0   # image space
    python -m facelab.sample method=debias 'target={Male: 0.5, skin_tone: [0.34, 0.33, 0.33]}'

Guidance terms: `facelab.guidance.debias` (HSpaceDebias with the h-classifier `method.hclf`, or ImageDebias with the
attribute classifier `method.guidance_classifier`). The generated set is scored by the held-out evaluation classifier
`method.eval_classifier`, which guidance never sees. Writes samples/{batch:04d}_{i:03d}.png, grid.png, labels.csv
(per image: hclf_<attribute>, the final h-classifier prediction of each targeted attribute, and eval_<head>, every
evaluation label), trajectory.csv (per guided t: mean predictions before and after the edit, mean ‖Δh‖ and ‖h‖) and
metrics.json (per targeted attribute: the target, the achieved class fractions and the Fairness Discrepancy; the
fractions of every evaluated attribute; the Fréchet distance to real synthetic faces in the evaluator's features).
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from facelab.data.synthetic import SyntheticFaces
from facelab.guidance.debias import DEFAULT_TARGET, MODES, HSpaceDebias, ImageDebias, target_distributions
from facelab.io.errors import InputError
from facelab.io.grids import save_grid
from facelab.io.images import resize_images, save_image
from facelab.methods.common import build_sampler, guidance_terms
from facelab.metrics.attributes import class_fractions, fairness_discrepancy, feature_frechet
from facelab.models.classifier import AttributeNet, load_classifier
from facelab.models.hclassifier import find_hclassifier, load_hclassifier
from facelab.models.pretrained import load_denoiser
from facelab.runner import Runner


def run(cfg: DictConfig, runner: Runner) -> dict:
    out, gallery = runner.out, runner.gallery
    opts, mode = cfg.method, cfg.method.mode
    if mode not in MODES:
        raise InputError(f"mode={mode!r}: method=debias takes {', '.join(MODES)}")
    sampler = build_sampler(cfg.sampler)
    sampler.check(asymmetric=bool(opts.asymmetric))
    target = {name: value for name, value in OmegaConf.to_container(cfg.method.target, resolve=True).items()
              if value is not None} or DEFAULT_TARGET
    others = guidance_terms(cfg)
    if any(isinstance(term, (HSpaceDebias, ImageDebias)) for term in others):
        raise InputError("method=debias already guides: drop guidance=[debias]")
    device = runner.device
    denoiser = load_denoiser(cfg.model.pretrained, device)
    evaluator = load_classifier(opts.eval_classifier, device) if opts.eval_classifier else None
    term = guidance_term(cfg, mode, target, denoiser, sampler, device)
    if term is not None:
        targets = term.objective.targets
    elif evaluator is not None:
        targets = target_distributions(target, evaluator.heads, mode)
    else:
        targets = {}
    if evaluator is not None:
        for name, r in targets.items():
            if evaluator.heads.get(name) != len(r):
                raise InputError(f"target.{name}: the evaluation classifier {opts.eval_classifier} has no "
                                 f"{len(r)}-class head {name} (it predicts {evaluator.heads})")

    calls = runner.count_calls(denoiser.unet)
    images, adp, seconds = sample_batches(cfg, runner, denoiser, sampler, term, others)
    evaluation = evaluate(evaluator, images, cfg.batch_size) if evaluator is not None else {}
    write_outputs(out, gallery, images, cfg.batch_size, adp, evaluation, term)

    metrics = {"mode": mode, "universal_guidance": bool(opts.universal_guidance), "num_samples": len(images),
               "sampler": sampler.name, "steps": sampler.steps, "eta": getattr(sampler, "eta", None),
               "seconds": seconds,
               "seconds_per_image": seconds / len(images), "eval_classifier": opts.eval_classifier,
               "network_calls_per_image": calls.count / -(-cfg.num_samples // cfg.batch_size),
               "target": {name: r.tolist() for name, r in targets.items()}, "attributes": {}}
    for name, r in targets.items():
        entry = {"target": r.tolist()}
        if name in adp:
            entry["hclf_fractions"] = class_fractions(adp[name], len(r)).tolist()
        if evaluation:
            entry["fractions"] = class_fractions(evaluation["labels"][name], len(r)).tolist()
            entry["fd"] = fairness_discrepancy(r, evaluation["labels"][name])
        metrics["attributes"][name] = entry
    if evaluation:
        metrics["fd_mean"] = sum(e["fd"] for e in metrics["attributes"].values()) / max(len(targets), 1)
        metrics["fractions"] = {head: class_fractions(labels, evaluator.heads[head]).tolist()
                                for head, labels in evaluation["labels"].items()}
        metrics.update(frechet(cfg, evaluator, evaluation["features"]))
    if isinstance(term, HSpaceDebias) and term.stats:
        rows = term.trajectory_rows()
        metrics["guided_steps"] = len(rows) if mode != "vanilla" else 0
        metrics["dh_norm_mean"] = sum(row["dh_norm"] for row in rows) / len(rows)
        metrics["h_norm_mean"] = sum(row["h_norm"] for row in rows) / len(rows)
    return metrics


def guidance_term(cfg: DictConfig, mode: str, target: dict, denoiser, sampler, device: torch.device):
    """The configured guidance term, checked against the model and grid; None for vanilla without an h-classifier."""
    opts = OmegaConf.to_container(cfg.method, resolve=True)
    common = dict(target=target, mode=mode, loss=opts["loss"], scale_per_sample=opts["scale_per_sample"],
                  temperature=opts["temperature"], window=opts["window"])
    if opts["universal_guidance"]:
        if opts["guidance_classifier"] == opts["eval_classifier"]:
            raise InputError(f"method.guidance_classifier={opts['guidance_classifier']} is also the evaluation "
                             "classifier; guidance must not see the evaluator")
        classifier = load_classifier(opts["guidance_classifier"], device)
        return ImageDebias(classifier, scale=opts["universal_scale"], **common)
    if mode == "vanilla" and find_hclassifier(opts["hclf"]) is None:
        return None  # the unguided baseline needs no h-classifier; with one it records its predictions
    term = HSpaceDebias(load_hclassifier(opts["hclf"], device), scale=opts["scale"],
                        running_estimate=opts["running_estimate"], step_schedule=opts["step_schedule"],
                        grad_steps=opts["grad_steps"], head_lookup=opts["head_lookup"], asymmetric=opts["asymmetric"],
                        **common)
    term.check(denoiser, sampler.timesteps(denoiser.schedule))
    return term


def sample_batches(cfg: DictConfig, runner: Runner, denoiser, sampler, term, others: list):
    """(images [M, 3, H, W] on the CPU, final h-classifier labels {attribute: [M]}, sampling seconds)."""
    unet = denoiser.unet.config
    gen = runner.generator("sampling")
    terms = ([term] if term is not None else []) + others
    images, adp = [], {}
    for _, n in runner.batches(cfg.num_samples):
        with runner.timed("sampling"):
            x_T = torch.randn(n, unet.in_channels, unet.sample_size, unet.sample_size, generator=gen,
                              device=runner.device)
            images.append(runner.sample(denoiser, x_T, sampler, terms, gen).cpu())
        for name, probs in (term.last.items() if isinstance(term, HSpaceDebias) else ()):
            adp.setdefault(name, []).append(probs.argmax(1).cpu())
    return torch.cat(images), {name: torch.cat(labels) for name, labels in adp.items()}, runner.seconds["sampling"]


@torch.no_grad()
def evaluate(evaluator: AttributeNet, images: Tensor, batch_size: int) -> dict:
    """The evaluator's hard labels {head: [M]} and features [M, D] of the images."""
    device = next(evaluator.parameters()).device
    labels, features = {}, []
    for chunk in images.split(batch_size):
        x = resize_images(chunk.to(device), evaluator.image_size)
        for head, probs in evaluator.predict(x).items():
            labels.setdefault(head, []).append(probs.argmax(1).cpu())
        features.append(evaluator.features(x).cpu())
    return {"labels": {head: torch.cat(v) for head, v in labels.items()}, "features": torch.cat(features)}


@torch.no_grad()
def frechet(cfg: DictConfig, evaluator: AttributeNet, features: Tensor) -> dict:
    """The Fréchet distance in evaluator features to `method.real_faces.num` real synthetic faces (0 = skip)."""
    real = cfg.method.real_faces
    if not real.num:
        return {}
    if real.num < 2 or len(features) < 2:
        raise InputError(f"method.real_faces.num={real.num}, num_samples={len(features)}: the Fréchet distance needs "
                         "at least 2 of each (or real_faces.num=0 to skip it)")
    faces = SyntheticFaces(size=evaluator.image_size, length=real.num, seed=real.seed, start=real.start,
                           priors=OmegaConf.to_container(real.priors, resolve=True))
    device = next(evaluator.parameters()).device
    reference = torch.cat([evaluator.features(torch.stack([faces[i]["image"] for i in range(first, min(
        first + cfg.batch_size, real.num))]).to(device)).cpu() for first in range(0, real.num, cfg.batch_size)])
    return {"frechet": feature_frechet(features, reference), "frechet_real_faces": int(real.num)}


def write_outputs(out: Path, gallery, images: Tensor, batch_size: int, adp: dict, evaluation: dict, term) -> None:
    """samples/{batch:04d}_{i:03d}.png, grid.png, labels.csv and trajectory.csv, and the gallery rows."""
    names = [f"samples/{i // batch_size:04d}_{i % batch_size:03d}.png" for i in range(len(images))]
    for name, image in zip(names, images):
        save_image(image, out / name)
    grid = save_grid(images[:64], out / "grid.png", upscale=2)
    gallery.section("samples").append([("grid", grid)])
    columns = {**{f"hclf_{name}": labels for name, labels in adp.items()},
               **{f"eval_{head}": labels for head, labels in evaluation.get("labels", {}).items()}}
    with open(out / "labels.csv", "x", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["file", *columns])
        for i, name in enumerate(names):
            writer.writerow([name, *(int(labels[i]) for labels in columns.values())])
    if isinstance(term, HSpaceDebias) and term.stats:
        rows = term.trajectory_rows()
        fields = list(dict.fromkeys(key for row in rows for key in row))
        with open(out / "trajectory.csv", "x", newline="") as file:
            writer = csv.DictWriter(file, fields)
            writer.writeheader()
            writer.writerows(rows)
