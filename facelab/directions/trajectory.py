"""The faces directions are found on and applied to: x_T and per-step noise per face (seeded, or from inverting an
image), decoded with a sampler along the same noise with and without h edits, recording h and x_t on the way."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from facelab.diffusion import DDIM, Denoiser, Sampler, ddim_invert, edit_friendly_invert, sample
from facelab.guidance.hedit import HEdit
from facelab.io.errors import InputError
from facelab.models.components.seeding import stream_generator as generator

X_T_STREAM, NOISE_STREAM = 0, 1  # per seed: facelab.runner.STREAMS' "directions.x_T" and "directions.noise"
INVERSIONS = ("ddim", "edit_friendly")


@dataclass
class Trajectory:
    x0: Tensor                  # [B, C, H, W] final images
    hs: Tensor | None = None    # [B, T, *h] un-edited h at each grid step
    x_ts: Tensor | None = None  # [B, T, C, H, W] the network inputs along the way


@dataclass
class Start:
    """Faces to decode: names, x_T [B, ...], per-step noise [T, B, ...] and the sampler that decodes them (an
    inversion's own), with the images and label maps of real inputs."""

    names: list[str]
    x_T: Tensor
    noises: Tensor
    sampler: Sampler
    images: Tensor | None = None
    labels: Tensor | None = None


def decoding_grid(sampler: Sampler, schedule, inverts: bool = False, asymmetric: bool = False) -> list[int]:
    """The sampler's grid, refused (one line) where directions cannot use it: a grid that jumps back (one Δh and one
    noise per step), image inputs with another sampler than DDIM (the inversions invert its step), Asyrp's step."""
    grid = sampler.timesteps(schedule)
    if any(s >= t for t, s in zip(grid, grid[1:])):
        raise InputError(f"sampler={sampler.name}: directions need a decreasing grid, one Δh per step (use "
                         "sampler=ddim, ddpm or dpmpp_2m)")
    if inverts and not isinstance(sampler, DDIM):
        raise InputError(f"the inversions of image inputs invert the DDIM(η) step: use sampler=ddim, not "
                         f"sampler={sampler.name}")
    sampler.check(asymmetric=asymmetric)
    return grid


def seed_noise(seeds: list[int], shape: tuple[int, ...], steps: int, device) -> tuple[Tensor, Tensor]:
    """x_T [B, *shape] and the per-step noise [steps, B, *shape] of each seed: sample i depends only on seeds[i]."""
    x_T, z = [], []
    for seed in seeds:
        x_T.append(torch.randn(shape, generator=generator(seed, device, X_T_STREAM), device=device))
        z.append(torch.randn((steps, *shape), generator=generator(seed, device, NOISE_STREAM), device=device))
    return torch.stack(x_T), torch.stack(z, 1)


def seeded_start(denoiser: Denoiser, sampler: Sampler, names: list[str], seeds: list[int]) -> Start:
    """Sampled faces: x_T and the per-step noise of each seed (a deterministic sampler ignores the noise)."""
    unet = denoiser.unet.config
    shape = (unet.in_channels, unet.sample_size, unet.sample_size)
    steps = len(sampler.timesteps(denoiser.schedule))
    return Start(names, *seed_noise(seeds, shape, steps, denoiser.unet.device), sampler)


def inverted_start(denoiser: Denoiser, sampler: DDIM, names: list[str], images: Tensor, labels: Tensor | None,
                   inversion: str, generator: torch.Generator | None = None, progress: bool = False) -> Start:
    """Real faces inverted over the sampler's grid: `ddim` (decoded with η = 0, no noise) or `edit_friendly` (the
    sampler's η, the noise that lands on q-sampled x_t; `generator` draws them)."""
    schedule = denoiser.schedule
    grid = sampler.timesteps(schedule)
    if inversion == "ddim":
        x_T = ddim_invert(denoiser, schedule, images, grid, progress=progress).latents[0]
        noises = torch.zeros(len(grid), *images.shape, device=images.device)
        return Start(names, x_T, noises, replace(sampler, eta=0.0), images, labels)
    x_T, noises = edit_friendly_invert(denoiser, schedule, images, grid, eta=sampler.eta, generator=generator,
                                       clip=sampler.clips(schedule), progress=progress)
    return Start(names, x_T, noises, sampler, images, labels)


def start_of(denoiser: Denoiser, sampler: Sampler, inputs, inversion: str = "edit_friendly", seed: int = 0,
             progress: bool = False) -> Start:
    """The start of a source's inputs (facelab.sources.Inputs): seeded for seeds, else its images inverted (the
    edit-friendly inversion draws from a generator on the model's device seeded with `seed`, the run's seed)."""
    if inputs.images is None:
        return seeded_start(denoiser, sampler, inputs.names, inputs.seeds)
    device = denoiser.unet.device
    generator = torch.Generator(device).manual_seed(int(seed))
    return inverted_start(denoiser, sampler, inputs.names, inputs.images.to(device), inputs.label_maps, inversion,
                          generator, progress)


def run_trajectory(denoiser: Denoiser, x_T: Tensor, noises: Tensor, sampler: Sampler, edit: HEdit | None = None,
                   where: str = "after", record_x: bool = False, progress: bool = False,
                   timesteps: list[int] | None = None) -> Trajectory:
    """Decode x_T with the given per-step noise over the sampler's grid (or `timesteps`) and an optional h edit;
    without an edit, h is recorded at `where`; x_t too with `record_x`."""
    edit = edit or HEdit(where=where, record=True)
    edit.hs.clear()
    xs: list[Tensor] = []
    x0 = sample(denoiser, denoiser.schedule, x_T, timesteps, sampler=sampler, guidance=[edit], noises=noises,
                progress=progress, callback=(lambda state: xs.append(state.x_t)) if record_x else None)
    return Trajectory(x0, torch.stack(edit.hs, 1) if edit.hs else None, torch.stack(xs, 1) if record_x else None)


def decode_scales(denoiser: Denoiser, start: Start, delta: dict[int, Tensor], scales: list[float],
                  where: str = "after", asymmetric: bool = False) -> Tensor:
    """Every face of `start` decoded with Δh_t = scale·delta[t] at every scale (one batch of scales per face), on the
    CPU: [faces, scales, C, H, W]."""
    n, images = len(scales), []
    for face in range(len(start.names)):
        x_T = start.x_T[face:face + 1].repeat(n, 1, 1, 1)
        noises = start.noises[:, face:face + 1].repeat(1, n, 1, 1, 1)
        edit = HEdit(delta, torch.tensor(scales), where, asymmetric=asymmetric)
        images.append(run_trajectory(denoiser, x_T, noises, start.sampler, edit).x0.cpu())
    return torch.stack(images)
