"""`method=generate` (alias `ddim`): unconditional generation with the configured sampler and guidance terms."""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from facelab.models.pretrained import load_denoiser
from facelab.runner import Runner

GRID_IMAGES = 64  # the first images shown in grid.png


def run(cfg: DictConfig, runner: Runner) -> dict:
    denoiser = load_denoiser(cfg.model.pretrained, runner.device)
    sampler, terms = runner.sampler(), runner.guidance()
    gen = runner.generator("sampling")
    calls = runner.count_calls(denoiser.unet)
    unet = denoiser.unet.config
    shown = []
    for first, n in runner.batches(cfg.num_samples, resume="samples", generators=[gen]):
        if runner.kept:  # finished by an interrupted try of this run; `gen` continues where that batch left it
            images = runner.read_images("samples", first, n)
        else:
            with runner.timed("sampling"):
                x_T = torch.randn(n, unet.in_channels, unet.sample_size, unet.sample_size, generator=gen,
                                  device=runner.device)
                images = runner.sample(denoiser, x_T, sampler, terms, gen).cpu()
            runner.save_images(images, "samples", first)
        shown += list(images[:GRID_IMAGES - len(shown)])
    runner.grid(torch.stack(shown), "grid.png", "samples", f"the first {len(shown)} samples", upscale=2)
    for term in terms:
        if getattr(term, "frames", None):  # RecordTrajectory: the last batch's trajectory
            steps = ", ".join(str(f[0]) for f in term.frames)
            tiles = term.grid_images()
            images = len(tiles) // (2 * len(term.frames))
            rows = [f"{kind} (image {i})" for i in range(images) for kind in ("x_t", "x̂0")]
            runner.grid(tiles, "trajectory.png", "trajectory", f"x_t (upper) and x̂0 (lower) at t = {steps}",
                        rows=rows, cols=[f"t = {f[0]}" for f in term.frames], nrow=len(term.frames), upscale=2)
    seconds = runner.seconds["sampling"]
    return {"num_samples": cfg.num_samples, "seconds": seconds, "seconds_per_image": seconds / cfg.num_samples,
            "sampler": sampler.name, "steps": sampler.steps,
            "network_calls_per_image": calls.count / runner.computed}  # network calls per computed batch

