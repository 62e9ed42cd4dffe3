"""Noise-schedule maths: ᾱ tables, q_sample, x̂0/ε conversions, DDPM and DDIM(η) steps, grids, RePaint jumps.

Times are 0-based training steps t ∈ {0, …, T−1}; t = −1 means ᾱ = 1 (clean data). Every function takes
t as a Python int (coefficients become Python floats: no device work, no sync) or as a LongTensor
(0-dim or per-sample [B]). Coefficients are computed in float64 and applied in x's dtype.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

Time = int | Tensor

DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "trained_betas": None,
    "prediction_type": "epsilon",
    "variance_type": "fixed_small",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "steps_offset": 0,
    "timestep_spacing": "leading",
}
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
SPACINGS = ("leading", "trailing", "linspace", "respaced", "floored")


def _read_config(cfg) -> dict:
    """A scheduler config as a dict, from a mapping, a diffusers scheduler, a json file, or a (pipeline) folder."""
    cfg = getattr(cfg, "config", cfg)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    path = Path(cfg)
    if path.is_dir():
        candidates = [path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(f"no scheduler_config.json in {path} or {path / 'scheduler'}")
        path = found[0]
    return json.loads(path.read_text())


def _betas(cfg: dict) -> Tensor:
    """float64 betas for a diffusers beta_schedule."""
    n, kind = int(cfg["num_train_timesteps"]), cfg["beta_schedule"]
    if cfg.get("trained_betas") is not None:
        return torch.tensor(list(cfg["trained_betas"]), dtype=torch.float64)
    if kind == "linear":
        return torch.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":
        abar = [math.cos((i / n + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(n + 1)]
        return torch.tensor([min(1 - abar[i + 1] / abar[i], 0.999) for i in range(n)], dtype=torch.float64)
    raise ValueError(f"scheduler config: beta_schedule={kind!r} is not supported; use linear, scaled_linear "
                     "or squaredcos_cap_v2, or give trained_betas")


def _sqrt(v):
    return v.clamp(min=0).sqrt() if isinstance(v, Tensor) else math.sqrt(max(v, 0.0))


def _log(v):
    return v.log() if isinstance(v, Tensor) else math.log(v)


def _coef(c, x: Tensor):
    """A float stays a float; a float64 tensor ([B] or 0-dim) becomes x's dtype/device, broadcastable to x."""
    if isinstance(c, Tensor):
        return c.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return c


def randn_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (then moved to x's)."""
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


class Schedule:
    """A discrete DDPM noise schedule defined by a diffusers scheduler config."""

    def __init__(self, config: Mapping | None = None, **overrides):
        given = {**dict(config or {}), **overrides}
        if given.get("rescale_betas_zero_snr"):
            raise ValueError("scheduler config: rescale_betas_zero_snr is not supported (ᾱ_T = 0 breaks x̂0)")
        cfg = {**DEFAULTS, **{k: v for k, v in given.items() if k in DEFAULTS}}
        if cfg["prediction_type"] not in PREDICTION_TYPES:
            raise ValueError(f"scheduler config: prediction_type={cfg['prediction_type']!r}; "
                             f"use one of {PREDICTION_TYPES}")
        if cfg["trained_betas"] is not None:
            cfg["trained_betas"] = [float(b) for b in cfg["trained_betas"]]
        self.config = cfg
        self.betas = _betas(cfg)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.num_train_timesteps = len(self.betas)
        # Index -1 (the clean end) reads ᾱ = 1 from the appended last entry.
        self._abar = self.alphas_cumprod.tolist() + [1.0]
        self._tables: dict[torch.device, Tensor] = {}

    @classmethod
    def from_config(cls, cfg) -> Schedule:
        """Build from a config dict, a diffusers scheduler, a `scheduler_config.json`, or a folder holding one
        (directly or in `scheduler/`)."""
        return cls(_read_config(cfg))

    def to_config(self) -> dict:
        """A diffusers-compatible scheduler config dict."""
        return {"_class_name": "DDPMScheduler", **self.config}

    @property
    def prediction_type(self) -> str:
        return self.config["prediction_type"]

    @property
    def variance_type(self) -> str:
        return self.config["variance_type"]

    @property
    def clip_sample(self) -> bool:
        return bool(self.config["clip_sample"])

    def __repr__(self) -> str:
        c = self.config
        return (f"Schedule(T={self.num_train_timesteps}, {c['beta_schedule']}, {c['prediction_type']}, "
                f"{c['variance_type']})")

    # --- ᾱ lookup -------------------------------------------------------------------------------------
    def alpha_bar(self, t: Time):
        """ᾱ_t as a Python float (int t) or a float64 tensor on t's device (tensor t); ᾱ_{−1} = 1."""
        if isinstance(t, Tensor):
            table = self._tables.get(t.device)
            if table is None:
                table = self._tables[t.device] = torch.tensor(self._abar, dtype=torch.float64, device=t.device)
            return table[t.long()]
        if not -1 <= t < self.num_train_timesteps:
            raise IndexError(f"timestep {t} outside [-1, {self.num_train_timesteps - 1}]")
        return self._abar[t]

    def clip(self, x0: Tensor) -> Tensor:
        r = self.config["clip_sample_range"]
        return x0.clamp(-r, r)

    # --- forward process and conversions -------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Time, noise: Tensor) -> Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·noise."""
        a = self.alpha_bar(t)
        return x0 * _coef(_sqrt(a), x0) + noise * _coef(_sqrt(1 - a), x0)

    def forward_step(self, x_s: Tensor, s: Time, t: Time, noise: Tensor | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
        """Sample q(x_t | x_s) for s < t: √(ᾱ_t/ᾱ_s)·x_s + √(1−ᾱ_t/ᾱ_s)·z (RePaint's undo step)."""
        r = self.alpha_bar(t) / self.alpha_bar(s)
        noise = randn_like(x_s, generator) if noise is None else noise
        return x_s * _coef(_sqrt(r), x_s) + noise * _coef(_sqrt(1 - r), x_s)

    def pred_x0(self, x_t: Tensor, t: Time, eps: Tensor) -> Tensor:
        """x̂0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t."""
        a = self.alpha_bar(t)
        return x_t * _coef(1 / _sqrt(a), x_t) - eps * _coef(_sqrt((1 - a) / a), x_t)

    def pred_eps(self, x_t: Tensor, t: Time, x0: Tensor) -> Tensor:
        """ε = (x_t − √ᾱ_t·x̂0)/√(1−ᾱ_t) (undefined at t = −1)."""
        a = self.alpha_bar(t)
        return x_t * _coef(1 / _sqrt(1 - a), x_t) - x0 * _coef(_sqrt(a / (1 - a)), x_t)

    def model_output_to_eps(self, output: Tensor, x_t: Tensor, t: Time) -> Tensor:
        """Convert a network output of this schedule's prediction_type to ε."""
        kind = self.prediction_type
        if kind == "epsilon":
            return output
        if kind == "sample":
            return self.pred_eps(x_t, t, output)
        a = self.alpha_bar(t)  # v_prediction: ε = √ᾱ·v + √(1−ᾱ)·x_t
        return output * _coef(_sqrt(a), x_t) + x_t * _coef(_sqrt(1 - a), x_t)

    # --- reverse steps --------------------------------------------------------------------------------
    def ddim_sigma(self, t: Time, s: Time, eta: float = 1.0):
        """σ_t(η) = η·√((1−ᾱ_s)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_s)."""
        a, b = self.alpha_bar(t), self.alpha_bar(s)
        return eta * _sqrt((1 - b) / (1 - a) * (1 - a / b))

    def ddim_step(self, x_t: Tensor, t: Time, s: Time, eps: Tensor | None = None, eta: float = 0.0,
                  noise: Tensor | None = None, eps_direction: Tensor | None = None, clip: bool = False, *,
                  x0: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """x_s = √ᾱ_s·x̂0(ε_P) + √(1−ᾱ_s−σ²)·ε_D + σ·z, from t to any s (s > t: inversion, with η = 0).

        ε_P = eps (or x̂0 given directly as `x0`); ε_D = eps_direction if given (Asyrp's asymmetric step)
        else eps. `clip` clamps x̂0 only; the direction keeps the unclipped ε (diffusers' convention).
        """
        if isinstance(t, int) and isinstance(s, int) and s > t and eta != 0:
            raise ValueError("a DDIM step to a higher time (inversion) needs eta = 0")
        if eps_direction is None:
            eps_direction = eps if eps is not None else self.pred_eps(x_t, t, x0)
        if x0 is None:
            x0 = self.pred_x0(x_t, t, eps)
        if clip:
            x0 = self.clip(x0)
        b = self.alpha_bar(s)
        sigma = self.ddim_sigma(t, s, eta) if eta else 0.0
        x_s = x0 * _coef(_sqrt(b), x_t) + eps_direction * _coef(_sqrt(1 - b - sigma ** 2), x_t)
        if isinstance(sigma, Tensor) or sigma > 0:
            noise = randn_like(x_t, generator) if noise is None else noise
            x_s = x_s + noise * _coef(sigma, x_t)
        return x_s

    def ddpm_step(self, x_t: Tensor, t: Time, s: Time, eps: Tensor | None = None, noise: Tensor | None = None,
                  variance_type: str | None = None, clip: bool = False, *, x0: Tensor | None = None,
                  v: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Ancestral step t → s < t with the respaced β_t = 1 − ᾱ_t/ᾱ_s (s = t−1 on the full grid).

        x_s = μ̃(x̂0, x_t) + 1[s ≥ 0]·σ·z with σ² = β̃ (fixed_small), β (fixed_large), or
        exp(f·log β + (1−f)·log β̃), f = (v+1)/2 (learned_range, v = the extra model channels).
        """
        variance_type = variance_type or self.variance_type
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type={variance_type!r}; use one of {VARIANCE_TYPES}")
        a, b = self.alpha_bar(t), self.alpha_bar(s)
        alpha = a / b
        beta = 1 - alpha
        if x0 is None:
            x0 = self.pred_x0(x_t, t, eps)
        if clip:
            x0 = self.clip(x0)
        mean = x0 * _coef(_sqrt(b) * beta / (1 - a), x_t) + x_t * _coef(_sqrt(alpha) * (1 - b) / (1 - a), x_t)
        if isinstance(s, int) and s < 0:
            return mean
        small = beta * (1 - b) / (1 - a)
        if variance_type == "fixed_small":
            std = _coef(_sqrt(small), x_t)
        elif variance_type == "fixed_large":
            std = _coef(_sqrt(beta), x_t)
        else:
            if v is None:
                raise ValueError("learned_range variance needs the model's variance channels v")
            small = small.clamp(min=1e-20) if isinstance(small, Tensor) else max(small, 1e-20)
            f = (v + 1) / 2
            std = torch.exp(0.5 * (f * _coef(_log(beta), x_t) + (1 - f) * _coef(_log(small), x_t)))
        noise = randn_like(x_t, generator) if noise is None else noise
        if isinstance(s, Tensor):
            std = std * _coef((s >= 0).double(), x_t)
        return mean + std * noise

    # --- grids ----------------------------------------------------------------------------------------
    def timesteps(self, steps: int, spacing: str | None = None, offset: int | None = None) -> Tensor:
        """A decreasing grid of `steps` training times.

        leading / trailing / linspace follow diffusers' DDIMScheduler.set_timesteps (leading adds
        `offset`, default the config's steps_offset); respaced = round(i·(T−1)/(S−1)) as guided-diffusion;
        floored = ⌊i·(T−1)/(S−1)⌋ as Asyrp and Balancing Act (`int(linspace(0, 1, S)·t_0 + 1e-6)`, t_0 = T−1: 50
        steps give 999, 978, …, 40, 20, 0 where respaced gives …, 41, 20, 0). One step: [T−1] for both.
        `spacing` defaults to the config's timestep_spacing.
        """
        T = self.num_train_timesteps
        spacing = spacing or self.config["timestep_spacing"]
        if not 1 <= steps <= T:
            raise ValueError(f"steps={steps} must lie in [1, {T}]")
        if spacing == "leading":
            offset = self.config["steps_offset"] if offset is None else offset
            grid = np.arange(steps)[::-1] * (T // steps) + offset
        elif spacing == "trailing":
            grid = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
        elif spacing == "linspace":
            grid = np.linspace(0, T - 1, steps).round()[::-1]
        elif spacing == "respaced":
            grid = [round(i * (T - 1) / (steps - 1)) for i in range(steps)][::-1] if steps > 1 else [T - 1]
        elif spacing == "floored":
            grid = [i * (T - 1) // (steps - 1) for i in range(steps)][::-1] if steps > 1 else [T - 1]
        else:
            raise ValueError(f"spacing={spacing!r}; use one of {SPACINGS}")
        return torch.tensor(np.asarray(grid, dtype=np.int64))


def repaint_schedule(t_T: int = 250, jump_length: int = 10, jump_n_sample: int = 10) -> list[int]:
    """RePaint's jump schedule over respaced indices t_T−1 … 0, ending at −1.

    Going down one index at a time; on reaching a multiple of `jump_length` below t_T − jump_length,
    it climbs back `jump_length` indices, `jump_n_sample − 1` times per such point.
    """
    jumps_left = {j: jump_n_sample - 1 for j in range(0, t_T - jump_length, jump_length)}
    t, times = t_T - 1, [t_T - 1]
    while t >= 0:
        if jumps_left.get(t, 0) > 0:
            jumps_left[t] -= 1
            times.extend(range(t + 1, t + jump_length + 1))
            t += jump_length
        else:
            t -= 1
            times.append(t)
    return times


def repaint_timesteps(grid: Sequence[int] | Tensor, jump_length: int = 10, jump_n_sample: int = 10) -> list[int]:
    """The jump schedule in training times: respaced index k ↦ the k-th smallest time of `grid`, −1 ↦ −1."""
    ascending = sorted(int(t) for t in grid)
    return [ascending[k] if k >= 0 else -1 for k in repaint_schedule(len(ascending), jump_length, jump_n_sample)]


def step_pairs(times: Sequence[int]) -> list[tuple[int, int, bool]]:
    """Consecutive (t, s, reverse) pairs of a time sequence; reverse is True when s < t (a denoising step)."""
    times = [int(t) for t in times]
    return [(t, s, s < t) for t, s in pairwise(times)]
