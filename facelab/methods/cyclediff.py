"""`method=cyclediff`: CycleDiff attribute editing with an attribute-conditional DDPM (facelab.guidance.cyclediff).

    python -m facelab.sample method=cyclediff attribute=Smiling                 # DDIM-50 (η = 1), edit-friendly start
    python -m facelab.sample method=cyclediff attribute=Smiling method.cfg_scale=3  # classifier-free guidance
    python -m facelab.sample method=cyclediff 'attribute=[Smiling,Male,reconstruction]'
    python -m facelab.sample method=cyclediff attribute=Smiling+Eyeglasses     # both flipped in one edit
    python -m facelab.sample method=cyclediff_reference attribute=15            # the original: DDPM-1000, x_T := x_src
    python -m facelab.sample method=cyclediff method.input=images gt_path=DIR [method.labels=FILE]

Inputs: a composed source (`+source=NAME`), else `num_samples` held-out synthetic faces (method.faces) or, with
method.input=images, the images of gt_path (labels from method.labels). Each face's source attributes y_src come from
the inputs' labels (or a method.labels 0/1 list) or are predicted by the guidance classifier; an edit flips the chosen
entries into y_tgt, samples under y_tgt from the start point (`method.start`: the image itself as x_T, SDEdit noising
to t0, DDIM or edit-friendly inversion under y_src) and guides every step with the weighted attribute, cycle, range
and optional feature terms. method.cfg_scale ≠ 1 samples (inversion, decode, edits) under classifier-free guidance
(ClassifierFree); the guidance terms' own network calls stay the plain conditional model. The start is also decoded
under y_src without guidance ("decoded": what the start reproduces; with an inversion, the source's own trajectory
the step-by-step cycle loss matches).

Writes inputs/, decoded/, edits/{face}_{edit}.png, counterfactuals/ (synthetic: the renderer's ground truth of the same
face with the attributes flipped), previews/ (per-step x̂0, method.previews > 0), grid.png (rows = faces; columns =
input, decoded, each edit), losses.csv (per step: each guidance term's batch mean) and metrics.json: per edit, by the
held-out evaluation classifier (facelab.evaluators.AttributeEvaluator), the flip rate of the flipped attributes and the
preservation rate of the others (against the counterfactual's ground truth, else y_src with the flips), PSNR/SSIM
(SimilarityEvaluator) to the counterfactual (and the input's own, the baseline), PSNR/SSIM/L1 to the input for
`reconstruction`, time and network calls per edit.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from omegaconf import DictConfig
from torch import Tensor

from facelab.diffusion import DDIM, Sampler
from facelab.evaluators import AttributeEvaluator, SimilarityEvaluator, guidance_networks, score_edit
from facelab.guidance.base import refuse_guidance
from facelab.guidance.cyclediff import (
    StepNoise,
    check_classifier,
    check_edit,
    classifier_free,
    edit_guidance,
    edit_timesteps,
    feature_networks,
    parse_edits,
    source_attributes,
    start_point,
)
from facelab.guidance.record import Previews
from facelab.io.errors import InputError
from facelab.models.classifier import load_classifier
from facelab.models.pretrained import load_denoiser
from facelab.runner import Runner, stream_number
from facelab.sources import ImageFolderSource, Inputs, Source, SyntheticSource, build, named_as
from facelab.utils import typed_options

GRID_FACES = 16
KNOBS = {"source.path": "gt_path", "source.attributes": "method.labels", "source.count": "num_samples",
         "source.seed": "method.faces.seed", "source.start": "method.faces.start"}  # the default source's knobs


@dataclass(frozen=True)
class Options:
    """cfg.method (conf/method/cyclediff.yaml)."""

    attribute: object
    gt_path: str | None
    start: str
    t0: int
    cycle: str
    weights: dict
    networks: dict
    grad_norm: bool
    variance_type: str
    classifier: str
    eval_classifier: str | None
    input: str
    faces: dict
    source_attributes: str
    labels: object
    previews: int
    cfg_scale: float


def run(cfg: DictConfig, runner: Runner) -> dict:
    opts = typed_options(Options, cfg.method)
    sampler, start = check_options(cfg, opts, runner.sampler())
    opts = replace(opts, start=start)  # `auto` resolved
    source, knobs = input_source(cfg, opts)
    with named_as(knobs):
        source.check()
    denoiser = load_denoiser(cfg.model.pretrained, runner.device)
    if denoiser.attributes is None:
        raise InputError(f"model.pretrained={cfg.model.pretrained} is not attribute-conditional; train one with "
                         "python -m facelab.train +experiment=cyclediff_ddpm")
    attributes, size = denoiser.attributes, denoiser.unet.config.sample_size
    model = classifier_free(denoiser, opts.cfg_scale)  # the sampling loop's; the terms call the plain denoiser
    edits = parse_edits(opts.attribute, attributes)
    classifier = check_classifier(load_classifier(opts.classifier, runner.device), "method.classifier", attributes,
                                  denoiser)
    networks = feature_networks(opts.networks, opts.weights, runner.device)
    others = runner.guidance()
    evaluator = AttributeEvaluator(opts.eval_classifier, cfg.batch_size, {"num": 0}, device=runner.device)
    evaluator.check(size, [classifier, *(getattr(n, "net", n) for n in networks.values()), *guidance_networks(others)])
    if evaluator.enabled:
        check_classifier(evaluator.net, "method.eval_classifier", attributes, denoiser)
    grid = edit_timesteps(sampler.timesteps(denoiser.schedule), opts.start, opts.t0)

    with named_as(knobs):
        inputs = source.load(size)
    y_source, labelled = source_attributes(inputs, attributes, classifier, cfg.batch_size, opts.source_attributes,
                                           opts.labels)
    truth = {name: inputs.counterfactuals(flips) for name, flips in edits.items()}

    calls = runner.count_calls(denoiser.unet)
    decoded, edited, network_calls, losses = [], {name: [] for name in edits}, {}, []
    previews = []  # (face, edit, its x̂0 at the preview steps): strips in the gallery, after the grids
    for first, n in runner.batches(len(inputs), desc="faces"):
        names = inputs.names[first:first + n]
        x_src, y_src = inputs.images[first:first + n].to(runner.device), y_source[first:first + n].to(runner.device)
        noises = StepNoise(x_src.shape, len(grid), (runner.seed, first, stream_number("cyclediff.noise")),
                           runner.device)
        with runner.timed("start"):
            x_T, noises = start_point(opts.start, model, sampler, grid, x_src, y_src, noises,
                                      runner.keyed_generator("cyclediff.start", first), runner.progress)
        trajectory = [] if opts.cycle == "step" and opts.start in ("ddim_inversion", "edit_friendly") else None
        record = None if trajectory is None else lambda state, path=trajectory: path.append(state.x)
        decoded.append(runner.sample(model, x_T, sampler, timesteps=grid, cond=y_src, noises=noises,
                                     callback=record).cpu())
        runner.save_images(inputs.images[first:first + n], "inputs", names=names)
        runner.save_images(decoded[-1], "decoded", names=names)
        for name, flips in edits.items():
            guidance, y_tgt = edit_guidance(opts.weights, opts.cycle, classifier, networks, attributes, x_src, y_src,
                                            flips, noises, trajectory, runner.keyed_generator("cyclediff.term", first),
                                            opts.grad_norm, None if model is denoiser else denoiser)
            preview, before = Previews(opts.previews, len(grid)), calls.count
            with runner.timed(f"edit {name}"):
                edited[name].append(runner.sample(model, x_T, sampler, [guidance, *others], timesteps=grid,
                                                  cond=y_tgt, noises=noises, callback=preview).cpu())
            network_calls[name] = calls.count - before
            losses += [{"edit": name, "first_face": first, "step": i, **row} for i, row in enumerate(guidance.rows)]
            runner.save_images(edited[name][-1], "edits", names=[f"{face}_{name}" for face in names])
            found = [i for i in range(n) if truth[name][first + i] is not None]
            if found:
                runner.save_images(torch.stack([truth[name][first + i]["image"] for i in found]), "counterfactuals",
                                   names=[f"{names[i]}_{name}" for i in found])
            previews += [(face, name, steps) for face, steps in zip(names, preview.images())]
    decoded, edited = torch.cat(decoded), {name: torch.cat(batches) for name, batches in edited.items()}
    write_grids(runner, inputs, decoded, edited, truth)
    for face, name, steps in previews:
        runner.grid(steps, f"previews/{face}_{name}.png", "previews: x̂0 along each edit", f"{face}, edit {name}",
                    nrow=opts.previews, upscale=2,
                    cols=[f"t = {grid[i]}" for i in Previews(opts.previews, len(grid)).steps])
    if losses:
        runner.write_csv("losses.csv", losses)

    similarity = SimilarityEvaluator()
    metrics = {"model": str(cfg.model.pretrained), "attributes": attributes, "faces": len(inputs),
               "source_attributes": labelled, "sampler": sampler.name, "steps": len(grid),
               "first_t": grid[0], "eta": sampler.eta if isinstance(sampler, DDIM) else None,
               "start": opts.start, "cycle": opts.cycle, "weights": opts.weights, "cfg_scale": opts.cfg_scale,
               "grad_norm": opts.grad_norm, "classifier": str(opts.classifier),
               "classifier_input": "noise_aware" if classifier.noise_aware else "clean_blend",
               "eval_classifier": opts.eval_classifier and str(opts.eval_classifier),
               "start_seconds_per_face": runner.seconds["start"] / len(inputs),
               "decoded_psnr": similarity.score(decoded, inputs.images)["psnr"]}
    metrics["edits"] = {name: {"flipped": flips, "seconds_per_edit": runner.seconds[f"edit {name}"] / len(inputs),
                               "network_calls": network_calls[name],
                               **score_edit(inputs, y_source, flips, edited[name], truth[name], attributes,
                                            similarity, evaluator)}
                        for name, flips in edits.items()}
    return metrics


# --- options and inputs ----------------------------------------------------------------------------------------------
def check_options(cfg: DictConfig, opts: Options, sampler: Sampler) -> tuple[Sampler, str]:
    """Validate the knobs before any work; return the sampler of the edits and the start (check_edit)."""
    for key, allowed in {"input": ("synthetic", "images"), "source_attributes": ("labels", "predicted")}.items():
        if getattr(opts, key) not in allowed:
            raise InputError(f"method.{key}={getattr(opts, key)}: use one of {', '.join(allowed)}")
    if cfg.num_samples < 1 or cfg.batch_size < 1:
        raise InputError(f"num_samples={cfg.num_samples}, batch_size={cfg.batch_size}: both must be at least 1")
    if opts.cfg_scale != 1:
        refuse_guidance(cfg, "method=cyclediff with method.cfg_scale ≠ 1", {
            "h_space": "the UNet's call then also holds the null-label rows, which its h edit would change too; use "
                       "method.cfg_scale=1"})
    return check_edit(sampler, opts.start, opts.cycle, opts.variance_type, opts.weights, opts.networks, opts.cfg_scale)


def input_source(cfg: DictConfig, opts: Options) -> tuple[Source, dict]:
    """(the faces' source, the knob names its errors use): a composed `+source=NAME`, else the held-out synthetic faces
    of method.faces or (method.input=images) the images of gt_path, exactly the model's size, labelled by a
    method.labels attribute file."""
    if cfg.get("source") is not None:
        return build(cfg.source), {}
    if opts.input == "synthetic":
        return SyntheticSource(cfg.num_samples, opts.faces["seed"], opts.faces["start"]), KNOBS
    labels = opts.labels if opts.source_attributes == "labels" and isinstance(opts.labels, str) else None
    return ImageFolderSource(opts.gt_path, resize="exact", attributes=labels), KNOBS


# --- outputs and scores ----------------------------------------------------------------------------------------------
def write_grids(runner: Runner, inputs: Inputs, decoded: Tensor, edited: dict, truth: dict) -> None:
    """grid.png (rows = faces; columns = input, decoded, each edit) and counterfactuals.png, in the gallery."""
    columns = [inputs.images, decoded, *edited.values()]
    faces = inputs.names[:GRID_FACES]
    runner.grid(torch.stack([c[:GRID_FACES] for c in columns], 1).flatten(0, 1), "grid.png", "edits",
                f"rows = faces; columns = input, decoded, {', '.join(edited)}", nrow=len(columns), upscale=2,
                rows=faces, cols=["input", "decoded (no edit)", *(f"edit: {name}" for name in edited)])
    shown = [edit for edit in edited if any(item is not None for item in truth[edit])]
    if shown:
        blank = torch.zeros_like(inputs.images[0])
        columns = [inputs.images[:GRID_FACES]] + [torch.stack([blank if item is None else item["image"]
                                                               for item in truth[edit][:GRID_FACES]]) for edit in shown]
        runner.grid(torch.stack(columns, 1).flatten(0, 1), "counterfactuals.png", "ground truth",
                    f"columns = input, counterfactual {', '.join(shown)}", nrow=len(columns), upscale=2,
                    rows=faces, cols=["input", *(f"counterfactual: {name}" for name in shown)])

