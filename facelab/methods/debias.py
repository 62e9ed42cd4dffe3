"""`method=debias`: Balancing Act, distribution-guided debiasing of an unconditional model in h-space.

    python -m facelab.sample method=debias target.Male=0.5                      # distribution guidance (default)
    python -m facelab.sample method=debias mode=sample target.Male=0            # every sample toward class 0
    python -m facelab.sample method=debias mode=vanilla                         # the unguided baseline
    python -m facelab.sample method=debias method.universal_guidance=true mode=sample target.Male=0   # image space
    python -m facelab.sample method=debias 'target={Male: 0.5, skin_tone: [0.34, 0.33, 0.33]}'

Guidance terms: `facelab.guidance.debias` (HSpaceDebias with the h-classifier `method.hclf`, or ImageDebias with the
attribute classifier `method.guidance_classifier`). The generated set is scored by the held-out evaluation classifier
`method.eval_classifier` (facelab.evaluators.AttributeEvaluator), which guidance never sees. Writes
samples/{batch:04d}_{i:03d}.png, grid.png, labels.csv (per image: hclf_<attribute>, the final h-classifier prediction
of each targeted attribute, and eval_<head>, every evaluation label), trajectory.csv (per guided t: mean predictions
before and after the edit, mean ‖Δh‖ and ‖h‖) and metrics.json (per targeted attribute: the target, the achieved class
fractions and the Fairness Discrepancy; the fractions of every evaluated attribute; the Fréchet distance to real
synthetic faces in the evaluator's features).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from facelab.evaluators import AttributeEvaluator, guidance_networks
from facelab.guidance.debias import DEFAULT_TARGET, MODES, HSpaceDebias, ImageDebias, target_distributions
from facelab.io.errors import InputError
from facelab.metrics.attributes import class_fractions
from facelab.models.classifier import load_classifier
from facelab.models.hclassifier import find_hclassifier, load_hclassifier
from facelab.models.pretrained import load_denoiser
from facelab.runner import Runner
from facelab.utils import typed_options

GRID_IMAGES = 64  # the first images shown in grid.png


@dataclass(frozen=True)
class Options:
    """cfg.method (conf/method/debias.yaml)."""

    mode: str
    target: dict | None
    hclf: str
    loss: str | None
    scale: object
    scale_per_sample: bool
    running_estimate: str
    temperature: float | None
    window: list | None
    step_schedule: dict
    grad_steps: int
    head_lookup: str
    asymmetric: bool
    universal_guidance: bool
    guidance_classifier: str
    universal_scale: float
    eval_classifier: str | None
    real_faces: dict


def run(cfg: DictConfig, runner: Runner) -> dict:
    opts = typed_options(Options, cfg.method)
    if opts.mode not in MODES:
        raise InputError(f"mode={opts.mode!r}: method=debias takes {', '.join(MODES)}")
    sampler = runner.sampler()
    sampler.check(asymmetric=bool(opts.asymmetric))
    target = {name: value for name, value in (opts.target or {}).items() if value is not None} or DEFAULT_TARGET
    others = runner.guidance()
    if any(isinstance(term, (HSpaceDebias, ImageDebias)) for term in others):
        raise InputError("method=debias already guides: drop guidance=[debias]")
    denoiser = load_denoiser(cfg.model.pretrained, runner.device)
    evaluator = AttributeEvaluator(opts.eval_classifier, cfg.batch_size, opts.real_faces, name="method",
                                   device=runner.device)
    term = guidance_term(opts, target, denoiser, sampler, runner.device)
    if term is not None:
        targets = term.objective.targets
    else:
        targets = target_distributions(target, evaluator.heads, opts.mode) if evaluator.enabled else {}
    goals = {name: r.tolist() for name, r in targets.items()}
    terms = ([term] if term is not None else []) + others
    evaluator.check(denoiser.unet.config.sample_size, guidance_networks(terms), targets=goals,
                    num_images=cfg.num_samples)

    calls = runner.count_calls(denoiser.unet)
    unet, gen = denoiser.unet.config, runner.generator("sampling")
    images, adp = [], {}
    for first, n in runner.batches(cfg.num_samples):
        with runner.timed("sampling"):
            x_T = torch.randn(n, unet.in_channels, unet.sample_size, unet.sample_size, generator=gen,
                              device=runner.device)
            images.append(runner.sample(denoiser, x_T, sampler, terms, gen).cpu())
        for name, probs in (term.last.items() if isinstance(term, HSpaceDebias) else ()):
            adp.setdefault(name, []).append(probs.argmax(1).cpu())
        runner.save_images(images[-1], "samples", names=[f"{first // cfg.batch_size:04d}_{i:03d}" for i in range(n)])
    images, adp = torch.cat(images), {name: torch.cat(labels) for name, labels in adp.items()}
    runner.grid(images[:GRID_IMAGES], "grid.png", "samples", f"the first {min(len(images), GRID_IMAGES)} samples",
                upscale=2)
    scores = evaluator.score(images, targets=goals) if evaluator.enabled else {}

    seconds = runner.seconds["sampling"]
    metrics = {"mode": opts.mode, "universal_guidance": bool(opts.universal_guidance), "num_samples": len(images),
               "sampler": sampler.name, "steps": sampler.steps, "eta": getattr(sampler, "eta", None),
               "seconds": seconds, "seconds_per_image": seconds / len(images), "eval_classifier": opts.eval_classifier,
               "network_calls_per_image": calls.count / -(-cfg.num_samples // cfg.batch_size),
               "target": goals, "attributes": {}}
    for name, r in goals.items():
        entry = metrics["attributes"][name] = {"target": r}
        if name in adp:
            entry["hclf_fractions"] = class_fractions(adp[name], len(r)).tolist()
        if scores:
            entry.update(fractions=scores["attributes"][name]["fractions"], fd=scores["attributes"][name]["fd"])
    if scores:
        metrics.update(fd_mean=scores["fd_mean"], fractions=scores["fractions"])
        metrics.update({key: scores[key] for key in ("frechet", "frechet_real_faces") if key in scores})
    write_tables(runner, len(images), cfg.batch_size, adp, evaluator.last.get("labels", {}), term)
    if isinstance(term, HSpaceDebias) and term.stats:
        rows = term.trajectory_rows()
        metrics["guided_steps"] = len(rows) if opts.mode != "vanilla" else 0
        metrics["dh_norm_mean"] = sum(row["dh_norm"] for row in rows) / len(rows)
        metrics["h_norm_mean"] = sum(row["h_norm"] for row in rows) / len(rows)
    return metrics


def guidance_term(opts: Options, target: dict, denoiser, sampler, device: torch.device):
    """The configured guidance term, checked against the model and grid; None for vanilla without an h-classifier."""
    common = dict(target=target, mode=opts.mode, loss=opts.loss, scale_per_sample=opts.scale_per_sample,
                  temperature=opts.temperature, window=opts.window)
    if opts.universal_guidance:
        return ImageDebias(load_classifier(opts.guidance_classifier, device), scale=opts.universal_scale, **common)
    if opts.mode == "vanilla" and find_hclassifier(opts.hclf) is None:
        return None  # the unguided baseline needs no h-classifier; with one it records its predictions
    term = HSpaceDebias(load_hclassifier(opts.hclf, device), scale=opts.scale, running_estimate=opts.running_estimate,
                        step_schedule=opts.step_schedule, grad_steps=opts.grad_steps, head_lookup=opts.head_lookup,
                        asymmetric=opts.asymmetric, **common)
    term.check(denoiser, sampler.timesteps(denoiser.schedule))
    return term


def write_tables(runner: Runner, count: int, batch_size: int, adp: dict, labels: dict, term) -> None:
    """labels.csv (hclf_<attribute>, eval_<head> per sample file) and trajectory.csv (HSpaceDebias' per-t means)."""
    columns = {**{f"hclf_{name}": values for name, values in adp.items()},
               **{f"eval_{head}": values for head, values in labels.items()}}
    runner.write_csv("labels.csv", [{"file": f"samples/{i // batch_size:04d}_{i % batch_size:03d}.png",
                                     **{column: int(values[i]) for column, values in columns.items()}}
                                    for i in range(count)])
    if isinstance(term, HSpaceDebias) and term.stats:
        runner.write_csv("trajectory.csv", term.trajectory_rows())
