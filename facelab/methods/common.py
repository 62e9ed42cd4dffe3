"""Pieces every method composes: device, generators, the configured sampler and guidance terms."""
from __future__ import annotations

import time

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from facelab.diffusion import Denoiser, Sampler, sample


def device_of(cfg: DictConfig) -> torch.device:
    name = cfg.get("device", "auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def clock(device: torch.device) -> float:
    """perf_counter after the device's queued work (timings of GPU runs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def generator(seed: int, device: torch.device, stream: int = 0) -> torch.Generator:
    """An independent generator per purpose (`stream`), so adding one random draw never shifts another."""
    return torch.Generator(device).manual_seed(int(seed) * 1000003 + stream)


def guidance_terms(cfg: DictConfig) -> list:
    return [instantiate(term) for term in (cfg.get("guidance") or {}).values()]


def build_sampler(cfg: DictConfig) -> Sampler:
    """The configured sampler object (conf/sampler/*.yaml: a `_target_` in facelab.diffusion.samplers)."""
    return instantiate(cfg)


def run_sampler(denoiser: Denoiser, x_T: torch.Tensor, sampler: Sampler, generator: torch.Generator,
                guidance=(), progress: bool = True, **kwargs) -> torch.Tensor:
    """Sample x_0 from x_T with the sampler over its own grid and the guidance terms."""
    return sample(denoiser, denoiser.schedule, x_T, sampler=sampler, guidance=guidance, generator=generator,
                  progress=progress, **kwargs)
