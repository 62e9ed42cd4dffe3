"""Seeded sampling records for h-space directions: x_T and per-step noise per seed, h and x_t along the way."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from facelab.diffusion import DDIM, Denoiser, sample
from facelab.guidance.hedit import HEdit
from facelab.models.components.seeding import stream_generator as generator

X_T_STREAM, NOISE_STREAM = 0, 1  # x_T and the per-step z come from independent generators per seed


@dataclass
class Trajectory:
    x0: Tensor                  # [B, C, H, W] final images
    hs: Tensor | None = None    # [B, T, *h] un-edited h at each grid step
    x_ts: Tensor | None = None  # [B, T, C, H, W] the network inputs along the way


def seed_noise(seeds: list[int], shape: tuple[int, ...], steps: int, device) -> tuple[Tensor, Tensor]:
    """x_T [B, *shape] and the per-step noise [steps, B, *shape] of each seed: sample i depends only on seeds[i]."""
    x_T, z = [], []
    for seed in seeds:
        x_T.append(torch.randn(shape, generator=generator(seed, device, X_T_STREAM), device=device))
        z.append(torch.randn((steps, *shape), generator=generator(seed, device, NOISE_STREAM), device=device))
    return torch.stack(x_T), torch.stack(z, 1)


def run_trajectory(denoiser: Denoiser, x_T: Tensor, noises: Tensor, timesteps: list[int], eta: float,
                   edit: HEdit | None = None, record_x: bool = False, clip: bool = False,
                   progress: bool = False) -> Trajectory:
    """Decode x_T with the given per-step noise (η > 0) and an optional h edit; record what is asked for."""
    edit = edit or HEdit(record=True)
    edit.hs.clear()
    xs: list[Tensor] = []
    x0 = sample(denoiser, denoiser.schedule, x_T, timesteps, sampler=DDIM(eta=eta, clip=clip), guidance=[edit],
                noises=noises, progress=progress, callback=(lambda state: xs.append(state.x_t)) if record_x else None)
    return Trajectory(x0, torch.stack(edit.hs, 1) if edit.hs else None, torch.stack(xs, 1) if record_x else None)
