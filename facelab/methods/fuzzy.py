"""`method=fuzzy`: FC-Diffusion, fuzzy-conditioned sampling and projection-based face correction.

Modes (the keep weight m, 1 = keep the input y):
  mask      m = mask                     (mask images, white = keep, grey = partial)
  modulate  m = mask·mask_s              (inpaint where the mask is 0, fuzzy-condition at mask_s elsewhere)
  replace   m = mask_s everywhere        (a new face loosely tied to the input)
  zscore    m = ood_lambda·(1 − A)^ood_expon, A the anomaly map from projections at the depths zscore_set
Inputs: a composed source (`+source=NAME`), else the images in gt_path (masks in mask_path, matched by file stem) or,
by default, `num_samples` held-out synthetic faces (method.faces; masks: keep everything but the face).
`self_degrade` corrupts the inputs with seeded rectangles first and scores the anomaly map and the correction against
the clean faces in metrics.json.

Pieces: the keep map and the blend (facelab.guidance.fuzzy), the projection and its statistics
(facelab.diffusion.projection, computed by `python -m facelab.fuzzy_stats`), the anomaly map and its AUROC / AP
(facelab.metrics.anomaly), PSNR / SSIM (facelab.evaluators: SimilarityEvaluator, pooled over the run, images clamped,
and correction_metrics), the files (facelab.io.fuzzy).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from facelab.diffusion import RePaint
from facelab.diffusion.projection import check_depths
from facelab.evaluators import SimilarityEvaluator, correction_metrics
from facelab.fuzzy_stats import model_stats
from facelab.guidance.fuzzy import MASK_REDUCES, STRENGTHS, FuzzyBlend, keep_map
from facelab.io.errors import InputError
from facelab.io.fuzzy import FuzzyOutputs
from facelab.metrics.anomaly import anomaly_metrics, self_degrade
from facelab.models.pretrained import load_denoiser
from facelab.runner import Runner
from facelab.sources import ImageFolderSource, ImageMaskSource, Source, SyntheticSource, build, check_disjoint, named_as
from facelab.utils import typed_options

MODES = ("mask", "modulate", "replace", "zscore")
KEPT = ("clean", "gt_image", "degradation", "errzscore", "anomaly", "m", "inpainted")  # for the run's metrics
# the default source's knobs as this method names them, in its error messages
KNOBS = {"source.path": "gt_path", "source.keep_masks": "mask_path", "source.count": "num_samples",
         "source.seed": "method.faces.seed", "source.start": "method.faces.start"}
GRID = "grid: (clean,) input, keep map (1 − A in zscore mode), output"


@dataclass(frozen=True)
class Options:
    """cfg.method (conf/method/fuzzy.yaml)."""

    mode: str
    mask_s: float
    gt_path: str | None
    mask_path: str | None
    ood_lambda: float
    ood_expon: float
    lower_bound: float
    upper_bound: float
    zscore_set: list
    zscore_path: str | None
    self_degrade: bool
    fuzzy_off: bool
    strength: str
    final_composite: bool
    mask_reduce: str
    projection_offset: bool
    projection_step: int
    zscore_draws: int
    anomaly_blur: float
    sigma_floor: float
    zscore_N: int | None
    faces: dict

    @property
    def needs_masks(self) -> bool:
        return self.mode in ("mask", "modulate")

    def check(self, sampler) -> str:
        """Validate the knobs before any work; return the resolved strength (auto → per_step for sampler=repaint)."""
        for bad, message in (
                (self.mode not in MODES, f"mode={self.mode!r}: use one of {', '.join(MODES)}"),
                (not 0 <= self.mask_s <= 1, f"mask_s={self.mask_s}: must lie in [0, 1]"),
                (not 0 <= self.ood_lambda <= 1, f"ood_lambda={self.ood_lambda}: must lie in [0, 1]"),
                (self.ood_expon <= 0, f"ood_expon={self.ood_expon}: must be positive"),
                (not self.lower_bound < self.upper_bound,
                 f"lower_bound={self.lower_bound}, upper_bound={self.upper_bound}: need lower < upper"),
                (self.mask_reduce not in MASK_REDUCES,
                 f"method.mask_reduce={self.mask_reduce!r}: use one of {', '.join(MASK_REDUCES)}"),
                (self.projection_step < 1, f"method.projection_step={self.projection_step}: must be at least 1"),
                (self.zscore_draws < 1, f"method.zscore_draws={self.zscore_draws}: must be at least 1"),
                (self.anomaly_blur < 0, f"method.anomaly_blur={self.anomaly_blur}: must be at least 0 (px)"),
                (self.mask_path is not None and self.gt_path is None,
                 "mask_path is set but gt_path is not: give the images the masks belong to"),
                (self.needs_masks and self.gt_path is not None and self.mask_path is None,
                 f"mode={self.mode} needs mask_path=DIR of keep-masks (white = keep) named like the images in gt_path"),
                (self.strength not in (*STRENGTHS, "auto"),
                 f"method.strength={self.strength!r}: use auto, {', '.join(STRENGTHS)}")):
            if bad:
                raise InputError(message)
        if self.strength == "auto":
            return "per_step" if isinstance(sampler, RePaint) else "per_time"
        return self.strength


def run(cfg: DictConfig, runner: Runner) -> dict:
    opts = typed_options(Options, cfg.method)
    sampler, terms = runner.sampler(), runner.guidance()
    strength = opts.check(sampler)
    source, knobs = input_source(cfg, opts)
    with named_as(knobs):
        source.check()
    denoiser = load_denoiser(cfg.model.pretrained, runner.device)
    resolution = denoiser.unet.config.sample_size
    depths = check_depths(opts.zscore_set, denoiser.schedule.num_train_timesteps) if opts.mode == "zscore" else []
    stats = model_stats(denoiser, cfg.model.pretrained, opts.zscore_path, depths, opts.projection_offset,
                        opts.projection_step, opts.zscore_N) if depths else None
    similarity = SimilarityEvaluator(reduction="pooled", clamp=True)
    similarity.check(resolution)
    with named_as(knobs):
        if stats is not None:
            check_disjoint(source, stats[2])
        inputs = source.load(resolution)
    if inputs.images is None:
        raise InputError("method=fuzzy corrects images: this source gives none (use synthetic, images or image_masks)")
    if opts.needs_masks and inputs.masks is None:
        raise InputError(f"mode={opts.mode} needs keep-masks: compose +source=image_masks with source.keep_masks=DIR "
                         "(or +source=synthetic)")

    sample_gen, projection_gen = runner.generator("sampling"), runner.generator("projection")
    degrade_gen = runner.generator("degradation", device="cpu")
    calls = runner.count_calls(denoiser.unet)
    outputs, kept, projection_calls = FuzzyOutputs(runner, depths), {}, 0
    for first, n in runner.batches(len(inputs)):
        batch = {"clean": inputs.images[first:first + n]}
        if opts.self_degrade:
            batch["gt_image"], batch["degradation"] = self_degrade(batch["clean"], degrade_gen)
        else:
            batch["gt_image"] = batch["clean"]
        y = batch["gt_image"].to(runner.device)
        keep = inputs.masks[first:first + n].to(runner.device) if opts.needs_masks else None
        before = calls.rows
        with runner.timed("projection"):
            batch.update(keep_map(opts, denoiser, y, keep, stats, depths, projection_gen))
        projection_calls += calls.rows - before
        m = batch["m"]
        blend = FuzzyBlend(y, m, strength, renormalize=not opts.fuzzy_off, final_composite=opts.final_composite)
        with runner.timed("sampling"):
            x_T = torch.randn(y.shape, generator=sample_gen, device=runner.device)
            batch["inpainted"] = runner.sample(denoiser, x_T, sampler, [blend, *terms], sample_gen)
        batch.update({f"m_applied_dt{dt}": w.expand_as(m) for dt, w in sorted(blend.applied.items())})
        batch = {key: value.cpu() for key, value in batch.items()}
        outputs.write(inputs.names[first:first + n], batch)
        for key in KEPT:
            if key in batch:
                kept.setdefault(key, []).append(batch[key])
    results = {key: torch.cat(values) for key, values in kept.items()}
    cols = ["clean face", "damaged input"] if opts.self_degrade else ["input"]
    cols += ["1 − A (anomaly-free)" if depths else "keep weight m", "output"]
    tiles = torch.stack(outputs.grid)
    runner.grid(tiles, "grid.png", "overview", GRID, nrow=len(tiles) // len(inputs), upscale=2, rows=inputs.names,
                cols=cols, maps={"label": cols[-2], "vmin": 0, "vmax": 1, "cols": [len(cols) - 2]})

    seconds, count = runner.seconds, len(inputs)
    total = seconds["projection"] + seconds["sampling"]
    metrics = {"mode": opts.mode, "num_images": count, "sampler": sampler.name, "steps": sampler.steps,
               "strength": strength, "mean_m": results["m"].mean().item(),
               "network_calls_per_image": per_image(calls.rows, count),
               "projection_calls_per_image": per_image(projection_calls, count),
               "seconds": total, "seconds_per_image": total / count,
               "projection_seconds": seconds["projection"], "sampling_seconds": seconds["sampling"],
               "psnr_to_input": similarity.score(results["inpainted"], results["gt_image"])["psnr"]}
    if opts.self_degrade:
        metrics.update(correction_metrics(results))
        if depths:
            metrics.update(anomaly_metrics(results["anomaly"], results["errzscore"], results["degradation"], depths))
    return metrics


def input_source(cfg: DictConfig, opts: Options) -> tuple[Source, dict]:
    """(the inputs' source, the knob names its errors use): a composed `+source=NAME`, else gt_path (with mask_path
    where the mode needs masks; square images resized bicubic) or the held-out synthetic faces of method.faces."""
    if cfg.get("source") is not None:
        if opts.gt_path is not None:
            raise InputError(f"gt_path={opts.gt_path} and +source both give the inputs: use one")
        return build(cfg.source), {}
    if opts.gt_path is None:
        return SyntheticSource(cfg.num_samples, opts.faces["seed"], opts.faces["start"], prefix=""), KNOBS
    if opts.needs_masks:
        return ImageMaskSource(opts.gt_path, keep_masks=opts.mask_path, resize="bicubic"), KNOBS
    return ImageFolderSource(opts.gt_path, resize="bicubic"), KNOBS


def per_image(rows: int, images: int) -> int | float:
    """Network calls per image from the rows the network evaluated (whole where it divides)."""
    return rows // images if rows % images == 0 else rows / images

