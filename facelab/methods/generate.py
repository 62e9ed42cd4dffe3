"""`method=ddim`: unconditional generation with the configured sampler and guidance terms."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from facelab.io.grids import save_grid
from facelab.io.images import save_image
from facelab.methods.common import build_sampler, device_of, generator, guidance_terms, run_sampler
from facelab.models.pretrained import load_denoiser


def run(cfg: DictConfig, out: Path, gallery) -> dict:
    device = device_of(cfg)
    denoiser = load_denoiser(cfg.model.pretrained, device)
    gen = generator(cfg.seed, device)
    sampler = build_sampler(cfg.sampler)
    terms = guidance_terms(cfg)
    unet = denoiser.unet.config
    images, start = [], time.perf_counter()
    for first in tqdm(range(0, cfg.num_samples, cfg.batch_size), desc="batches", disable=not cfg.progress):
        n = min(cfg.batch_size, cfg.num_samples - first)
        x_T = torch.randn(n, unet.in_channels, unet.sample_size, unet.sample_size, generator=gen, device=device)
        images.append(run_sampler(denoiser, x_T, sampler, gen, terms, progress=cfg.progress).cpu())
    seconds = time.perf_counter() - start
    images = torch.cat(images)
    for i, image in enumerate(images):
        save_image(image, out / "samples" / f"{i:05d}.png")
    grid = save_grid(images, out / "grid.png", upscale=2)
    gallery.section("samples").append([("grid", grid)])
    for term in terms:
        if getattr(term, "frames", None):  # RecordTrajectory: the last batch's trajectory
            path = save_grid(term.grid_images(), out / "trajectory.png", nrow=len(term.frames), upscale=2)
            steps = ", ".join(str(f[0]) for f in term.frames)
            gallery.section("trajectory").append([(f"x_t (upper) and x̂0 (lower) at t = {steps}", path)])
    return {"num_samples": len(images), "seconds": seconds, "seconds_per_image": seconds / len(images),
            "sampler": sampler.name, "steps": sampler.steps}
