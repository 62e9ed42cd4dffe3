"""`method=fuzzy`: FC-Diffusion, fuzzy-conditioned sampling and projection-based face correction.

Modes (the keep weight m, 1 = keep the input y):
  mask      m = mask                     (mask images, white = keep, grey = partial)
  modulate  m = mask·mask_s              (inpaint where the mask is 0, fuzzy-condition at mask_s elsewhere)
  replace   m = mask_s everywhere        (a new face loosely tied to the input)
  zscore    m = ood_lambda·(1 − A)^ood_expon, A the anomaly map from projections at the depths zscore_set
Inputs: images in gt_path (masks in mask_path, matched by file stem) or, by default, `num_samples` synthetic test
faces (masks: keep everything but the face). `self_degrade` corrupts the inputs with seeded rectangles first and
scores the anomaly map and the correction against the clean faces in metrics.json.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc, binary_average_precision
from torchmetrics.functional.image import structural_similarity_index_measure
from tqdm.auto import tqdm

from facelab.data.layouts import ImageMaskFolder, keep_outside_face
from facelab.data.synthetic import SyntheticFaces
from facelab.diffusion import RePaint, step_pairs
from facelab.guidance.fuzzy import STRENGTHS, FuzzyBlend
from facelab.io.errors import InputError
from facelab.io.grids import save_grid
from facelab.io.images import save_image
from facelab.methods.common import build_sampler, device_of, generator, guidance_terms, run_sampler
from facelab.methods.fuzzy_stats import (
    PROJECTION_STREAM,
    STATS_FILE,
    check_depths,
    load_stats,
    project_errors,
    projection_times,
)
from facelab.models.pretrained import ZOO_DIR, load_denoiser, zoo_names
from facelab.runner import Runner

MODES = ("mask", "modulate", "replace", "zscore")
MASK_REDUCES = ("per_channel", "luminance")
LUMINANCE = (0.299, 0.587, 0.114)
SAMPLER_STREAM, DEGRADE_STREAM = 0, 2
# maps/{name}.npz keys of the per-image float results (plus m_applied_dt{Δt}: the per-step weight of a step Δt)
NPZ_KEYS = {"m": "m", "anomaly": "A", "errzscore": "zhat", "err": "err", "degradation": "degradation"}


def run(cfg: DictConfig, runner: Runner) -> dict:
    out, gallery = runner.out, runner.gallery
    sampler = build_sampler(cfg.sampler)
    strength = check_options(cfg, sampler)
    device = device_of(cfg)
    denoiser = load_denoiser(cfg.model.pretrained, device)
    resolution = denoiser.unet.config.sample_size
    depths = check_depths(cfg.method.zscore_set, denoiser.schedule.num_train_timesteps) if cfg.method.mode == "zscore" else []
    stats = load_stats(stats_path(cfg), denoiser, cfg.model.pretrained, depths, cfg.method.projection_offset,
                       cfg.method.projection_step, cfg.method.zscore_N) if depths else None
    if stats is not None and cfg.method.gt_path is None:
        check_disjoint(cfg, stats[2])
    names, images, keeps = read_inputs(cfg, resolution)
    terms = guidance_terms(cfg)
    sample_gen = generator(cfg.seed, device, SAMPLER_STREAM)
    projection_gen = generator(cfg.seed, device, PROJECTION_STREAM)
    degrade_gen = generator(cfg.seed, torch.device("cpu"), DEGRADE_STREAM)

    results: dict[str, list[Tensor]] = {}
    seconds = {"projection": 0.0, "sampling": 0.0}
    for first in tqdm(range(0, len(names), cfg.batch_size), desc="batches", disable=not cfg.progress):
        clean = images[first:first + cfg.batch_size]
        batch = {"clean": clean}
        if cfg.method.self_degrade:
            batch["gt_image"], batch["degradation"] = self_degrade(clean, degrade_gen)
        else:
            batch["gt_image"] = clean
        y = batch["gt_image"].to(device)
        start = time.perf_counter()
        keep = None if keeps is None else keeps[first:first + len(y)].to(device)
        batch.update(keep_map(cfg, denoiser, y, keep, stats, depths, projection_gen))
        seconds["projection"] += time.perf_counter() - start
        m = batch["m"]
        blend = FuzzyBlend(y, m, strength, renormalize=not cfg.method.fuzzy_off, final_composite=cfg.method.final_composite)
        start = time.perf_counter()
        x_T = torch.randn(y.shape, generator=sample_gen, device=device)
        batch["inpainted"] = run_sampler(denoiser, x_T, sampler, sample_gen, [blend, *terms],
                                         progress=cfg.progress)
        seconds["sampling"] += time.perf_counter() - start
        batch.update({f"m_applied_dt{dt}": w.expand_as(m) for dt, w in sorted(blend.applied.items())})
        for key, value in batch.items():
            results.setdefault(key, []).append(value.cpu())
    results = {key: torch.cat(values) for key, values in results.items()}

    write_outputs(out, gallery, names, results, depths)
    sampler_calls = sum(reverse for *_, reverse in step_pairs([*sampler.timesteps(denoiser.schedule), -1]))
    projection_calls = sum(len(projection_times(d, cfg.method.projection_offset, cfg.method.projection_step))
                           for d in depths)
    total = seconds["projection"] + seconds["sampling"]
    metrics = {"mode": cfg.method.mode, "num_images": len(names), "sampler": sampler.name, "steps": sampler.steps,
               "strength": strength, "mean_m": results["m"].mean().item(),
               "network_calls_per_image": sampler_calls + projection_calls,
               "projection_calls_per_image": projection_calls,
               "seconds": total, "seconds_per_image": total / len(names),
               "projection_seconds": seconds["projection"], "sampling_seconds": seconds["sampling"],
               "psnr_to_input": psnr(results["inpainted"], results["gt_image"])}
    if cfg.method.self_degrade:
        metrics.update(correction_metrics(results))
        if depths:
            metrics.update(anomaly_metrics(results, depths))
    return metrics


# --- options and inputs -------------------------------------------------------------------------------
def check_options(cfg: DictConfig, sampler) -> str:
    """Validate the knobs before any work; return the resolved strength (auto → per_step for sampler=repaint)."""
    if cfg.method.mode not in MODES:
        raise InputError(f"mode={cfg.method.mode!r}: use one of {', '.join(MODES)}")
    for key in ("mask_s", "ood_lambda"):
        if not 0 <= cfg.method[key] <= 1:
            raise InputError(f"{key}={cfg.method[key]}: must lie in [0, 1]")
    if cfg.method.ood_expon <= 0:
        raise InputError(f"ood_expon={cfg.method.ood_expon}: must be positive")
    if not cfg.method.lower_bound < cfg.method.upper_bound:
        raise InputError(f"lower_bound={cfg.method.lower_bound}, upper_bound={cfg.method.upper_bound}: need lower < upper")
    if cfg.method.mask_reduce not in MASK_REDUCES:
        raise InputError(f"method.mask_reduce={cfg.method.mask_reduce!r}: use one of {', '.join(MASK_REDUCES)}")
    if cfg.method.projection_step < 1:
        raise InputError(f"method.projection_step={cfg.method.projection_step}: must be at least 1")
    if cfg.method.mask_path is not None and cfg.method.gt_path is None:
        raise InputError("mask_path is set but gt_path is not: give the images the masks belong to")
    if cfg.method.mode in ("mask", "modulate") and cfg.method.gt_path is not None and cfg.method.mask_path is None:
        raise InputError(f"mode={cfg.method.mode} needs mask_path=DIR of keep-masks (white = keep) named like the "
                         "images in gt_path")
    strength = cfg.method.strength
    if strength == "auto":
        return "per_step" if isinstance(sampler, RePaint) else "per_time"
    if strength not in STRENGTHS:
        raise InputError(f"method.strength={strength!r}: use auto, {', '.join(STRENGTHS)}")
    return strength


def stats_path(cfg: DictConfig) -> Path:
    """zscore_path, or the zoo's statistics for a zoo model."""
    if cfg.method.zscore_path is not None:
        return Path(cfg.method.zscore_path)
    if str(cfg.model.pretrained) in zoo_names():
        return ZOO_DIR / str(cfg.model.pretrained) / STATS_FILE
    raise InputError(f"mode=zscore needs zscore_path=FILE: no shipped statistics for model.pretrained="
                     f"{cfg.model.pretrained}; compute them with `python -m facelab.fuzzy_stats "
                     f"model.pretrained={cfg.model.pretrained}`")


def check_disjoint(cfg: DictConfig, meta: dict) -> None:
    """The default synthetic test faces must not be among the faces the statistics were computed on."""
    faces, test = meta["faces"], cfg.method.faces
    overlap = test.start < faces["start"] + meta["N"] and faces["start"] < test.start + cfg.num_samples
    if faces["seed"] == test.seed and overlap:
        raise InputError(f"method.faces (seed {test.seed}, from {test.start}) overlap the {meta['N']} statistics "
                         f"faces (from {faces['start']}); choose another method.faces.start")


def read_inputs(cfg: DictConfig, resolution: int) -> tuple[list[str], Tensor, Tensor | None]:
    """(names, images [N, 3, R, R] in [−1, 1], keep-masks [N, 3, R, R] in [0, 1] or None) at the model's size R."""
    needs_masks = cfg.method.mode in ("mask", "modulate")
    if cfg.method.gt_path is None:
        faces = SyntheticFaces(size=resolution, length=cfg.num_samples, seed=cfg.method.faces.seed,
                               start=cfg.method.faces.start)
        items = [faces[i] for i in range(len(faces))]
        keeps = torch.stack([keep_outside_face(item).expand(3, -1, -1) for item in items]) if needs_masks else None
        return [item["name"] for item in items], torch.stack([item["image"] for item in items]), keeps
    folder = ImageMaskFolder(cfg.method.gt_path, cfg.method.mask_path if needs_masks else None)
    items = [folder[i] for i in range(len(folder))]
    for item, path in zip(items, folder.image_paths):
        height, width = item["image"].shape[-2:]
        if height != width:
            raise InputError(f"{path}: image is {width}x{height}; fuzzy needs square images (the model works at "
                             f"{resolution}x{resolution})")
    images = torch.stack([_resize(item["image"], resolution, "bicubic").clamp(-1, 1) for item in items])
    keeps = torch.stack([_resize(item["keep"], resolution, "bilinear") for item in items]) if needs_masks else None
    return folder.names, images, keeps


def _resize(x: Tensor, size: int, mode: str) -> Tensor:
    if x.shape[-1] == size:
        return x
    return F.interpolate(x[None], size=(size, size), mode=mode, antialias=True, align_corners=False)[0]


# --- keep weights -------------------------------------------------------------------------------------
def keep_map(cfg: DictConfig, denoiser, y: Tensor, keep: Tensor | None, stats, depths: list[int],
             gen: torch.Generator) -> dict[str, Tensor]:
    """The keep weight m of a batch; in zscore mode also the projections, errors, ẑ_d and A it comes from."""
    if stats is None:
        return {"m": reduce_mask(keep_weight(cfg.method.mode, cfg.method.mask_s, y, keep), cfg.method.mask_reduce)}
    projected, errors = project_errors(denoiser, y, depths, gen, cfg.method.projection_offset,
                                       cfg.method.projection_step)
    zhat, anomaly = anomaly_map(errors, stats[0].to(y.device), stats[1].to(y.device), cfg.method.lower_bound,
                                cfg.method.upper_bound, cfg.method.sigma_floor)
    m = reduce_mask(cfg.method.ood_lambda * (1 - anomaly) ** cfg.method.ood_expon, cfg.method.mask_reduce)
    return {"projected": projected, "err": errors, "errzscore": zhat, "anomaly": anomaly, "m": m}


def keep_weight(mode: str, mask_s: float, y: Tensor, keep: Tensor | None) -> Tensor:
    """m for the mask / modulate / replace modes."""
    if mode == "mask":
        return keep
    if mode == "modulate":
        return keep * mask_s
    return torch.full_like(y, mask_s)


def anomaly_map(errors: Tensor, mean: Tensor, std: Tensor, lower: float, upper: float,
                sigma_floor: float) -> tuple[Tensor, Tensor]:
    """(ẑ_d [B, D, C, H, W], A [B, C, H, W]): z-scores clamped to [L, U], scaled to [0, 1], and their mean over
    depths."""
    z = (errors.double() - mean) / std.clamp(min=sigma_floor)
    zhat = ((z.clamp(lower, upper) - lower) / (upper - lower)).to(errors.dtype)
    return zhat, zhat.mean(1)


def reduce_mask(m: Tensor, how: str) -> Tensor:
    """per_channel keeps m as is; luminance gives one weight per pixel [B, 1, H, W] (Rec. 601 weights)."""
    if how == "per_channel" or m.shape[1] == 1:
        return m
    return (m * m.new_tensor(LUMINANCE)[:, None, None]).sum(1, keepdim=True)


def self_degrade(images: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Zero (0.0 in [−1, 1]) random RGB channels in 1 or 2 random rectangles per image; with p = 1/8 leave it.

    Rectangle sides are |round(N(S/4, S/8))| for an image side S, redrawn with the corner until both exceed S/32
    and the rectangle fits. Returns (degraded images, degradation mask D [B, C, H, W] bool).
    """
    def uniform() -> float:
        return torch.rand((), generator=gen).item()

    batch, channels, height, width = images.shape
    hit = torch.zeros(images.shape, dtype=torch.bool)
    for b in range(batch):
        if uniform() < 1 / 8:
            continue
        for _ in range(1 if uniform() < 0.5 else 2):
            while True:
                h, w = (abs(round(side / 4 + side / 8 * torch.randn((), generator=gen).item()))
                        for side in (height, width))
                top, left = int(uniform() * height), int(uniform() * width)
                if h > height / 32 and w > width / 32 and top + h <= height and left + w <= width:
                    break
            chosen = torch.rand(channels, generator=gen) < 0.5
            hit[b, chosen, top:top + h, left:left + w] = True
    return images.masked_fill(hit, 0.0), hit


# --- metrics ------------------------------------------------------------------------------------------
def psnr(x: Tensor, reference: Tensor, region: Tensor | None = None) -> float | None:
    """PSNR in dB for images in [−1, 1] (peak-to-peak 2), pooled over all elements of `region` (default all)."""
    squared = (x.clamp(-1, 1) - reference) ** 2
    if region is not None:
        if not region.any():
            return None
        squared = squared[region.expand_as(squared)]
    return (10 * torch.log10(4 / squared.mean().clamp(min=1e-12))).item()


def ssim(x: Tensor, reference: Tensor, region: Tensor | None = None) -> float | None:
    """Mean of the SSIM map over `region` (pixels of [B, 1, H, W]; default all), on images in [−1, 1]."""
    if region is not None and not region.any():
        return None
    _, full = structural_similarity_index_measure(x.clamp(-1, 1), reference, data_range=2.0, return_full_image=True)
    return full.mean().item() if region is None else full[region.expand_as(full)].mean().item()


def correction_metrics(results: dict) -> dict:
    """PSNR and SSIM against the clean faces inside / outside the degraded pixels and over the whole image, before
    and after correction."""
    inside = results["degradation"].any(1, keepdim=True)
    metrics = {"degraded_fraction": inside.float().mean().item()}
    for when, key in (("before", "gt_image"), ("after", "inpainted")):
        for where, region in (("inside", inside), ("outside", ~inside), ("all", None)):
            metrics[f"psnr_{where}_{when}"] = psnr(results[key], results["clean"], region)
            metrics[f"ssim_{where}_{when}"] = ssim(results[key], results["clean"], region)
    return metrics


def auroc_ap(scores: Tensor, labels: Tensor) -> tuple[float | None, float | None]:
    """Exact pixel-level AUROC and average precision of `scores` against boolean `labels` (None if one class only)."""
    labels = labels.flatten().long()
    if labels.min() == labels.max():
        return None, None
    scores = scores.flatten().float()
    return binary_auroc(scores, labels).item(), binary_average_precision(scores, labels).item()


def anomaly_metrics(results: dict, depths: list[int]) -> dict:
    """AUROC/AP of the fused map A (per channel against D_c; per pixel, mean or max over channels, against D
    any channel) and per channel of every single depth's ẑ_d."""
    anomaly, hit = results["anomaly"], results["degradation"]
    pixel = hit.any(1)
    metrics = {}
    for name, scores, labels in (("", anomaly, hit), ("_pixel_mean", anomaly.mean(1), pixel),
                                 ("_pixel_max", anomaly.amax(1), pixel)):
        metrics[f"auroc{name}"], metrics[f"ap{name}"] = auroc_ap(scores, labels)
    metrics["auroc_depth"] = {d: auroc_ap(results["errzscore"][:, k], hit)[0] for k, d in enumerate(depths)}
    return metrics


# --- outputs ------------------------------------------------------------------------------------------
def write_outputs(out: Path, gallery, names: list[str], results: dict, depths: list[int]) -> None:
    """The reference's folders (PNG = clamp((v+1)·127.5)), float maps per image, grid.png and gallery rows."""
    images = gallery.section("images")
    projections = gallery.section("projections") if depths else None
    grid = []
    for i, name in enumerate(names):
        m, y = results["m"][i], results["gt_image"][i]
        pictures = []
        if "degradation" in results:
            pictures += [("clean", results["clean"][i]),
                         ("degradation_mask", results["degradation"][i].float() * 2 - 1)]
        pictures += [("gt_image", y), ("mask_used", m * 2 - 1), ("gt_masked", m * (y + 1) - 1)]
        if depths:
            pictures.append(("mask_nolambda", (1 - results["anomaly"][i]) * 2 - 1))
        pictures.append(("inpainted", results["inpainted"][i]))
        images.append([(folder, save_image(picture, out / folder / f"{name}.png")) for folder, picture in pictures])
        shown = dict(pictures)
        columns = [shown[key] for key in ("clean", "gt_image", "mask_nolambda", "mask_used", "inpainted")
                   if key in shown and not (key == "mask_used" and depths)]
        grid += [picture.expand_as(y) for picture in columns]
        if depths:
            row = []
            for k, d in enumerate(depths):
                for folder, picture in (("projected", results["projected"][i, k]),
                                        ("err", results["err"][i, k] / 65025 * 2 - 1),
                                        ("errzscore", results["errzscore"][i, k] * 2 - 1)):
                    row.append((f"{folder} {d}", save_image(picture, out / folder / f"{name}_{d:04d}.png")))
            projections.append(row)
        arrays = {NPZ_KEYS.get(key, key): results[key][i] for key in results
                  if key in NPZ_KEYS or key.startswith("m_applied")}
        (out / "maps").mkdir(exist_ok=True)
        with open(out / "maps" / f"{name}.npz", "xb") as file:
            np.savez_compressed(file, depths=np.asarray(depths, dtype=np.int64),
                                **{key: value.numpy() for key, value in arrays.items()})
    path = save_grid(torch.stack(grid), out / "grid.png", nrow=len(columns), upscale=2)
    gallery.section("grid: (clean,) input, keep map (1 − A in zscore mode), output").append([("grid", path)])
