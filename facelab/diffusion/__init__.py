"""Diffusion core: schedule maths, the ε-denoiser, h-space hooks, the sampling loop, inversions."""

from .denoiser import Denoiser
from .hspace import h_module, hspace
from .inversion import Inversion, ddim_invert, edit_friendly_invert
from .loop import Guidance, NonFiniteError, State, sample
from .samplers import DDIM, DDPM, DPMSolverPP2M, RePaint, Sampler
from .schedule import Schedule, randn_like, repaint_schedule, repaint_timesteps, step_pairs

__all__ = [
    "DDIM",
    "DDPM",
    "DPMSolverPP2M",
    "RePaint",
    "Sampler",
    "Denoiser",
    "Guidance",
    "Inversion",
    "NonFiniteError",
    "Schedule",
    "State",
    "ddim_invert",
    "edit_friendly_invert",
    "h_module",
    "hspace",
    "randn_like",
    "repaint_schedule",
    "repaint_timesteps",
    "sample",
    "step_pairs",
]
