"""Inversions of the sampling loop: deterministic DDIM (η = 0) and edit-friendly DDPM (Huberman-Spiegelglas et al.)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .hspace import hspace
from .schedule import Schedule, randn_like


class Inversion(NamedTuple):
    """latents[i] is x at timesteps[i] (latents[0] = x_T, the sampler's start); hs[i] the h of the
    network call that produced it (or None when not captured)."""

    latents: Tensor
    hs: Tensor | None


def _grid(timesteps: Sequence[int] | Tensor) -> list[int]:
    return timesteps.tolist() if isinstance(timesteps, Tensor) else [int(t) for t in timesteps]


def ddim_invert(model: Callable, schedule: Schedule, x0: Tensor, timesteps: Sequence[int] | Tensor,
                cond: Any = None, capture_h: str | None = None, progress: bool = True) -> Inversion:
    """Walk the decreasing sampling grid upward, x0 (t = −1) → x_T, with η = 0 DDIM steps.

    The step s → t uses ε_θ(x_s, t) (the network at the target time, as diffusers' DDIMInverseScheduler),
    so `sample(model, schedule, latents[0], timesteps)` returns ≈ x0. capture_h: an h-space location
    ("after", "before", "middle") to record h at every step.
    """
    grid = _grid(timesteps)
    unet = getattr(model, "unet", model)
    latents, hs = [], []
    x, s = x0, -1
    with torch.no_grad():
        for t in tqdm(grid[::-1], desc="DDIM inversion", disable=not progress, leave=False):
            with hspace(unet, capture_h, capture=hs) if capture_h else nullcontext():
                eps = model(x, t, cond)
            x, s = schedule.ddim_step(x, s, t, eps), t
            latents.append(x)
    return Inversion(torch.stack(latents[::-1]), torch.stack(hs[::-1]) if capture_h else None)


def edit_friendly_invert(model: Callable, schedule: Schedule, x0: Tensor, timesteps: Sequence[int] | Tensor,
                         eta: float | Sequence[float] = 1.0, generator: torch.Generator | None = None,
                         cond: Any = None, clip: bool = False, progress: bool = True) -> tuple[Tensor, Tensor]:
    """Edit-friendly DDPM inversion: returns (x_T, noises) with noises[i] the z of reverse step i.

    Every grid x_t is drawn independently from q(x_t | x0); then z_t = (x_s − μ_t(x_t))/σ_t(η), with μ_t the
    DDIM(η) mean (whose direction term uses √(1 − ᾱ_s − η²σ_t²)), so each step of
    `sample(..., timesteps, eta=eta, noises=noises, clip=clip)` lands exactly on the drawn x_s.
    The last step (to ᾱ = 1) has σ = 0, so its z is 0 and the output is x̂0 of the last grid latent, which
    differs from x0 by √((1−ᾱ)/ᾱ)·(ε̃ − ε̂) at that time (≈ 1% of the noise at t = 0).
    """
    grid = _grid(timesteps)
    etas = [float(eta)] * len(grid) if isinstance(eta, (int, float)) else [float(e) for e in eta]
    xs = [schedule.q_sample(x0, t, randn_like(x0, generator)) for t in grid] + [x0]
    noises = []
    with torch.no_grad():
        for i in tqdm(range(len(grid)), desc="edit-friendly inversion", disable=not progress, leave=False):
            t, s = grid[i], (grid + [-1])[i + 1]
            eps = model(xs[i], t, cond)
            mean = schedule.ddim_step(xs[i], t, s, eps, etas[i], torch.zeros_like(x0), clip=clip)
            sigma = schedule.ddim_sigma(t, s, etas[i])
            z = (xs[i + 1] - mean) / sigma if sigma > 0 else torch.zeros_like(x0)
            noises.append(z)
            if i + 1 < len(grid):  # continue from exactly what the sampler will compute (mean + σz)
                xs[i + 1] = mean + z * sigma if sigma > 0 else mean
    return xs[0], torch.stack(noises)
