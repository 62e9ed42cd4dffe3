"""Samplers: the reverse-step rule and its timestep grid, as small config-built objects (conf/sampler/*.yaml).

The loop (loop.py) asks a sampler for its time sequence once and calls `step` once per reverse step; a guidance term
that adds a classifier gradient g to ε reads the step's `eps_scale` (ε' = ε − c·g). Every step takes ε or x̂0 (the
loop passes whichever the hooks set last), so hooks and samplers stay independent. Deterministic steps
(DDIM with η = 0, DPM-Solver++) ignore the per-step noise the loop may pass.

- DDIM(η):           x_s = √ᾱ_s·x̂0 + √(1−ᾱ_s−σ²)·ε + σ·z, σ = η·√((1−ᾱ_s)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_s).
- DDPM:              ancestral step with Σ_t of `variance_type` (fixed_small, fixed_large, learned_range).
- RePaint:           DDPM over the jump schedule (the loop applies q(x_s | x_t) on the upward steps).
- DPMSolverPP2M:     DPM-Solver++(2M), data prediction, deterministic; multistep over the previous step's x̂0.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from facelab.io.errors import InputError

from .schedule import VARIANCE_TYPES, Schedule, repaint_timesteps


@dataclass
class Sampler:
    """Base: `steps` times of `spacing` (null: the schedule's timestep_spacing); `clip` clamps x̂0 to the schedule's
    range (null: the schedule's clip_sample)."""

    steps: int = 50
    spacing: str | None = None
    clip: bool | None = None

    name: ClassVar[str] = ""
    asymmetric: ClassVar[bool] = False      # takes Asyrp's eps_direction (a separate direction ε)

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"sampler.steps={self.steps!r}: use a whole number ≥ 1")

    def timesteps(self, schedule: Schedule) -> list[int]:
        """The decreasing training times of this sampler's grid (RePaint: with its upward jumps)."""
        if self.steps > schedule.num_train_timesteps:
            raise InputError(f"sampler.steps={self.steps}: the model has {schedule.num_train_timesteps} training "
                             "steps, use at most that many")
        return schedule.timesteps(self.steps, spacing=self.spacing).tolist()

    def clips(self, schedule: Schedule) -> bool:
        return schedule.clip_sample if self.clip is None else bool(self.clip)

    def reads_variance(self, schedule: Schedule) -> bool:
        """Whether the step needs the model's variance channels (`model.last_variance`)."""
        return False

    def check(self, *, asymmetric: bool = False) -> None:
        """Refuse, with one line, what this sampler cannot do."""
        if asymmetric and not self.asymmetric:
            raise InputError(f"an asymmetric (Asyrp) step needs sampler=ddim, not sampler={self.name}")

    def step(self, schedule: Schedule, x_t: Tensor, t: int, s: int, eps: Tensor | None = None,
             noise: Tensor | None = None, *, x0: Tensor | None = None, i: int = 0, v: Tensor | None = None,
             eps_direction: Tensor | None = None, generator: torch.Generator | None = None,
             memory: dict | None = None) -> Tensor:
        """x_s from x_t and the prediction (ε or x̂0) for reverse step i, t → s < t."""
        raise NotImplementedError

    def eps_scale(self, schedule: Schedule, t: int, s: int) -> float:
        """c in ε' = ε − c·g: how a gradient g = ∇_x log p(y | x_t) enters this sampler's step (score form)."""
        return math.sqrt(1 - schedule.alpha_bar(t))


@dataclass
class DDIM(Sampler):
    """DDIM(η): η = 0 deterministic, η = 1 the ancestral DDPM step with Σ = β̃ on the same grid. `eta` may be a
    list, one per reverse step."""

    eta: float | Sequence[float] = 0.0
    spacing: str | None = "leading"

    name: ClassVar[str] = "ddim"
    asymmetric: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        etas = [self.eta] if isinstance(self.eta, (int, float)) else list(self.eta)
        for eta in etas:
            if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
                raise InputError(f"sampler.eta={eta!r}: use a number in [0, 1]")

    def eta_at(self, i: int) -> float:
        return float(self.eta) if isinstance(self.eta, (int, float)) else float(self.eta[i])

    def step(self, schedule, x_t, t, s, eps=None, noise=None, *, x0=None, i=0, v=None, eps_direction=None,
             generator=None, memory=None):
        return schedule.ddim_step(x_t, t, s, eps, self.eta_at(i), noise, eps_direction, self.clips(schedule), x0=x0,
                                  generator=generator)


@dataclass
class DDPM(Sampler):
    """Ancestral DDPM over a respaced grid (steps = T: the full chain); `variance_type` null: the schedule's."""

    spacing: str | None = "respaced"
    clip: bool | None = True
    variance_type: str | None = None

    name: ClassVar[str] = "ddpm"

    def __post_init__(self):
        super().__post_init__()
        if self.variance_type not in (None, *VARIANCE_TYPES):
            raise InputError(f"sampler.variance_type={self.variance_type!r}: use one of {', '.join(VARIANCE_TYPES)}")

    def reads_variance(self, schedule):
        return (self.variance_type or schedule.variance_type) == "learned_range"

    def step(self, schedule, x_t, t, s, eps=None, noise=None, *, x0=None, i=0, v=None, eps_direction=None,
             generator=None, memory=None):
        return schedule.ddpm_step(x_t, t, s, eps, noise, self.variance_type, self.clips(schedule), x0=x0, v=v,
                                  generator=generator)

    def eps_scale(self, schedule, t, s):
        """The mean-form shift Σ_t·g expressed on ε: √(ᾱ_t/ᾱ_s)·√(1−ᾱ_t)·Σ_t/β_t (β_t = 1 − ᾱ_t/ᾱ_s)."""
        a, b = schedule.alpha_bar(t), schedule.alpha_bar(s)
        kind = self.variance_type or schedule.variance_type
        ratio = 1.0 if kind == "fixed_large" else (1 - b) / (1 - a)
        return math.sqrt(a / b) * math.sqrt(1 - a) * ratio


@dataclass
class RePaint(DDPM):
    """RePaint's resampling: DDPM steps over `steps` respaced times, jumping back `jump_length` steps
    `jump_n_sample` − 1 times at every multiple of jump_length."""

    steps: int = 250
    jump_length: int = 10
    jump_n_sample: int = 10

    name: ClassVar[str] = "repaint"

    def __post_init__(self):
        super().__post_init__()
        for key in ("jump_length", "jump_n_sample"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"sampler.{key}={value!r}: use a whole number ≥ 1")

    def timesteps(self, schedule):
        return repaint_timesteps(super().timesteps(schedule), self.jump_length, self.jump_n_sample)


@dataclass
class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
    solver_order=2). With λ = log(√ᾱ/√(1−ᾱ)), h = λ_s − λ_t and D = x̂0 (first order) or
    x̂0 + (x̂0 − x̂0_prev)·h/(2·(λ_t − λ_prev)) (second order): x_s = (σ_s/σ_t)·x_t − √ᾱ_s·(e^{−h} − 1)·D.
    The first step and a step to the clean end (ᾱ_s = 1, where it returns x̂0) are first order."""

    spacing: str | None = "trailing"
    clip: bool | None = False

    name: ClassVar[str] = "dpmpp_2m"

    @staticmethod
    def _lambda(schedule: Schedule, t: int) -> float:
        a = schedule.alpha_bar(t)
        return 0.5 * (math.log(a) - math.log(1 - a))

    def step(self, schedule, x_t, t, s, eps=None, noise=None, *, x0=None, i=0, v=None, eps_direction=None,
             generator=None, memory=None):
        if x0 is None:
            x0 = schedule.pred_x0(x_t, t, eps)
        if self.clips(schedule):
            x0 = schedule.clip(x0)
        memory = {} if memory is None else memory
        previous, memory["previous"] = memory.get("previous"), (t, x0)
        b = schedule.alpha_bar(s)
        if b >= 1.0:
            return x0
        lam_t, lam_s = self._lambda(schedule, t), self._lambda(schedule, s)
        h = lam_s - lam_t
        D = x0
        if previous is not None:
            t_prev, x0_prev = previous
            r = (lam_t - self._lambda(schedule, t_prev)) / h
            D = x0 + (x0 - x0_prev) / (2 * r)
        a = schedule.alpha_bar(t)
        return x_t * math.sqrt((1 - b) / (1 - a)) - D * (math.sqrt(b) * math.expm1(-h))
