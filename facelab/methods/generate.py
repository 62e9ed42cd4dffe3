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
    for first, n in runner.batches(cfg.num_samples):
        with runner.timed("sampling"):
            x_T = torch.randn(n, unet.in_channels, unet.sample_size, unet.sample_size, generator=gen,
                              device=runner.device)
            images = runner.sample(denoiser, x_T, sampler, terms, gen).cpu()
        runner.save_images(images, "samples", first)
        shown += list(images[:GRID_IMAGES - len(shown)])
    runner.grid(torch.stack(shown), "grid.png", "samples", "grid", upscale=2)
    for term in terms:
        if getattr(term, "frames", None):  # RecordTrajectory: the last batch's trajectory
            steps = ", ".join(str(f[0]) for f in term.frames)
            runner.grid(term.grid_images(), "trajectory.png", "trajectory",
                        f"x_t (upper) and x̂0 (lower) at t = {steps}", nrow=len(term.frames), upscale=2)
    seconds = runner.seconds["sampling"]
    return {"num_samples": cfg.num_samples, "seconds": seconds, "seconds_per_image": seconds / cfg.num_samples,
            "sampler": sampler.name, "steps": sampler.steps,
            "network_calls_per_image": calls.count / -(-cfg.num_samples // cfg.batch_size)}

