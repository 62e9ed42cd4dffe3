"""Fuzzy conditioning (FC-Diffusion): blend x_t with a freshly noised input under a continuous keep weight m.

At hook point 1 of every reverse step but the first, with g_t = √ᾱ_t·y + √(1−ᾱ_t)·z (fresh z):
    x ← m⊙g_t + (1−m)⊙x_t                       (RePaint's blend; m = 1 keeps y, m = 0 generates freely)
    x ← μ + (x − μ)/√(m² + (1−m)²), μ = √ᾱ_t·y   (variance re-normalisation, skipped with renormalize=False)

Strength. Each blend multiplies the free deviation x − √ᾱ_t·y by r(m) = (1−m)/√(m²+(1−m)²), i.e. removes
ℓ(m) = −ln r(m) = ½·ln(1 + (m/(1−m))²) of its log-magnitude. With strength="per_step" m is applied as given
at every step (the reference: its strength depends on the step count). With "per_time" m is a strength per
`reference_step` (Δt_ref = 4 training steps, the reference's 250-step grid) and a step of Δt applies
m_Δt = M((Δt/Δt_ref)·ℓ(m)), M the inverse of ℓ, so equal diffusion time gives equal conditioning at any step count.

`FuzzyImages` is the blend as a config-built term for any pixel-space method (conf/guidance/fuzzy.yaml): its inputs y
are read by the term itself (an image folder, or the held-out synthetic faces), one per sample, with one keep weight
everywhere (method=fuzzy's mode=replace). `keep_map` gives method=fuzzy's m from its masks or anomaly map.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from facelab.diffusion import Guidance, State, randn_like
from facelab.diffusion.projection import project_errors
from facelab.io.errors import InputError
from facelab.metrics.anomaly import anomaly_map

STRENGTHS = ("per_time", "per_step")
MASK_REDUCES = ("per_channel", "luminance")
LUMINANCE = (0.299, 0.587, 0.114)


def log_retention(m: Tensor) -> Tensor:
    """ℓ(m) = ½·ln(1 + (m/(1−m))²): the log-shrinkage of the free deviation in one blend (∞ at m = 1)."""
    return 0.5 * torch.log1p((m / (1 - m)) ** 2)


def weight_from_log_retention(ell: Tensor) -> Tensor:
    """M(ℓ) = k/(1+k) with k = √(e^{2ℓ} − 1), the inverse of `log_retention` (ℓ = 0 → 0, ℓ = ∞ → 1)."""
    k = torch.expm1(2 * ell).sqrt()
    return 1 / (1 + 1 / k)


def per_time_weight(m: Tensor, dt: float, reference_step: float = 4.0) -> Tensor:
    """The per-step weight m_Δt = M((Δt/Δt_ref)·ℓ(m)) for a step of Δt training steps (≈ m·√(Δt/Δt_ref) for small m)."""
    m64 = m.double()
    return weight_from_log_retention(dt / reference_step * log_retention(m64)).to(m.dtype)


def keep_weight(mode: str, mask_s: float, y: Tensor, keep: Tensor | None) -> Tensor:
    """m of method=fuzzy's mask (the keep-mask), modulate (keep-mask·mask_s) and replace (mask_s everywhere) modes."""
    if mode == "mask":
        return keep
    if mode == "modulate":
        return keep * mask_s
    return torch.full_like(y, mask_s)


def reduce_mask(m: Tensor, how: str) -> Tensor:
    """per_channel keeps m as is; luminance gives one weight per pixel [B, 1, H, W] (Rec. 601 weights)."""
    if how == "per_channel" or m.shape[1] == 1:
        return m
    return (m * m.new_tensor(LUMINANCE)[:, None, None]).sum(1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """x blurred over its last two dimensions by a separable Gaussian of σ = `sigma` px (kernel truncated at
    round(3σ), normalised to sum 1, edges replicated); σ = 0 returns x."""
    if not sigma:
        return x
    radius = int(3 * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    flat = F.pad(x.reshape(-1, 1, *x.shape[-2:]), [radius] * 4, mode="replicate")
    flat = F.conv2d(F.conv2d(flat, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))
    return flat.reshape(x.shape)


def keep_map(opts, denoiser, y: Tensor, keep: Tensor | None, stats, depths: list[int],
             generator: torch.Generator) -> dict[str, Tensor]:
    """method=fuzzy's keep weight m of a batch of inputs y, by its options `opts` (mode, mask_s, mask_reduce; zscore:
    ood_lambda, ood_expon, lower_bound, upper_bound, sigma_floor, projection_offset, projection_step, zscore_draws,
    anomaly_blur): from the keep-masks `keep`, or with projection statistics `stats` (μ, σ, ...) at `depths`
    m = ood_lambda·(1 − A)^ood_expon, returned with the projections ŷ, errors e, ẑ_d and A it comes from
    (facelab.diffusion.projection, facelab.metrics.anomaly). With zscore_draws K > 1 the K projections (each its own
    ε, in one batch) give e_d, ẑ_d and A as means over the draws (ŷ: the first draw's); anomaly_blur σ > 0 smooths A
    with a Gaussian of σ px (gaussian_blur)."""
    if stats is None:
        return {"m": reduce_mask(keep_weight(opts.mode, opts.mask_s, y, keep), opts.mask_reduce)}
    draws = opts.zscore_draws
    projected, errors = project_errors(denoiser, y.repeat(draws, 1, 1, 1), depths, generator, opts.projection_offset,
                                       opts.projection_step)
    zhat, anomaly = anomaly_map(errors, stats[0].to(y.device), stats[1].to(y.device), opts.lower_bound,
                                opts.upper_bound, opts.sigma_floor)
    if draws > 1:
        projected = projected[:len(y)]
        errors, zhat, anomaly = (value.unflatten(0, (draws, len(y))).mean(0) for value in (errors, zhat, anomaly))
    anomaly = gaussian_blur(anomaly, opts.anomaly_blur)
    m = reduce_mask(opts.ood_lambda * (1 - anomaly) ** opts.ood_expon, opts.mask_reduce)
    return {"projected": projected, "err": errors, "errzscore": zhat, "anomaly": anomaly, "m": m}


def fuzzy_blend(x: Tensor, y: Tensor, m: Tensor, alpha_bar: float, noise: Tensor, renormalize: bool = True) -> Tensor:
    """Blend x_t with g_t = √ᾱ·y + √(1−ᾱ)·noise under keep weight m (broadcast to x), re-normalising the spread.

    Written as x_b + (x_b − μ)·(1/s − 1), so that binary m (s = 1) gives exactly RePaint's blend x_b.
    """
    mean = y * alpha_bar ** 0.5
    blended = m * (mean + noise * (1 - alpha_bar) ** 0.5) + (1 - m) * x
    if not renormalize:
        return blended
    spread = (m ** 2 + (1 - m) ** 2).sqrt()
    return blended + (blended - mean) * (1 / spread - 1)


class FuzzyBlend(Guidance):
    """The fuzzy blend at hook point 1 (`before_model`), for a batch of inputs y [B,C,H,W] in [−1, 1] and keep
    weights m [B,C,H,W] or [B,1,H,W] in [0, 1].

    Skipped on the very first reverse step. `final_composite` copies y where m == 1 after the last step.
    `applied` maps each step size Δt seen to the per-step weight used for it.
    """

    needs = ("pixels",)

    def __init__(self, y: Tensor, m: Tensor, strength: str = "per_time", renormalize: bool = True,
                 final_composite: bool = False, reference_step: float = 4.0):
        if strength not in STRENGTHS:
            raise ValueError(f"strength={strength!r}; use one of {STRENGTHS}")
        self.y, self.m = y, m.to(y)
        self.strength, self.renormalize = strength, renormalize
        self.final_composite, self.reference_step = final_composite, reference_step
        self.applied: dict[int, Tensor] = {}

    def weight(self, dt: int) -> Tensor:
        """The per-step keep weight for a reverse step of dt training steps."""
        if dt not in self.applied:
            self.applied[dt] = (per_time_weight(self.m, dt, self.reference_step) if self.strength == "per_time"
                                else self.m)
        return self.applied[dt]

    def before_model(self, state: State) -> None:
        if state.i == 0:
            return
        noise = randn_like(state.x, state.generator)
        state.x = fuzzy_blend(state.x, self.y, self.weight(state.t - state.s), state.schedule.alpha_bar(state.t),
                              noise, self.renormalize)

    def after_update(self, state: State) -> None:
        if self.final_composite and state.s < 0:
            state.x = torch.where(self.m == 1, self.y, state.x)


class FuzzyImages(FuzzyBlend):
    """The fuzzy blend toward images the term reads itself: `images` a folder of .png/.jpg at the model's resolution
    (sorted by name, taken in turn and wrapped around), or null for the held-out synthetic faces (`faces`: seed and
    first index, disjoint from the zoo models' training faces); keep weight m = `mask_s` everywhere. Sample k of a
    run (counting over its batches) is tied to input k. strength: per_time | per_step | auto (per_step with
    sampler=repaint, else per_time). `names` lists the inputs used, in sample order."""

    def __init__(self, images: str | Path | None = None, mask_s: float = 0.07, strength: str = "auto",
                 renormalize: bool = True, final_composite: bool = False, reference_step: float = 4.0,
                 faces: dict | None = None):
        if not 0 <= float(mask_s) <= 1:
            raise InputError(f"guidance.fuzzy.mask_s={mask_s}: must lie in [0, 1]")
        if strength not in (*STRENGTHS, "auto"):
            raise InputError(f"guidance.fuzzy.strength={strength!r}: use auto, {', '.join(STRENGTHS)}")
        if images is not None and not Path(images).is_dir():
            raise InputError(f"guidance.fuzzy.images={images}: no such folder (null: the held-out synthetic faces)")
        m = torch.full((1, 1, 1, 1), float(mask_s))
        super().__init__(m, m, "per_time" if strength == "auto" else strength, renormalize, final_composite,
                         reference_step)
        self.auto, self.folder = strength == "auto", images
        self.faces = {"seed": 0, "start": 900000, **dict(faces or {})}
        self.pool: Tensor | None = None  # the folder's images
        self.pool_names: list[str] = []
        self.names: list[str] = []

    def inputs(self, n: int, shape: tuple[int, ...], device) -> Tensor:
        """The next n inputs [n, C, H, W] for samples of `shape` [C, H, W]."""
        channels, size = shape[0], shape[-1]
        if channels != 3 or shape[-2] != size:
            raise InputError(f"guidance=[fuzzy] blends RGB images; this model samples x of shape {list(shape)} "
                             "(a latent model?): use a pixel-space model")
        first = len(self.names)
        if self.folder is None:
            from facelab.data.synthetic import SyntheticFaces

            faces = SyntheticFaces(size, first + n, int(self.faces["seed"]), start=int(self.faces["start"]))
            items = [faces[i] for i in range(first, first + n)]
            self.names += [f"face{item['name']}" for item in items]
            return torch.stack([item["image"] for item in items]).to(device)
        if self.pool is None:
            from facelab.io.images import read_image_folder

            self.pool_names, self.pool = read_image_folder(self.folder, size)
        index = [(first + k) % len(self.pool) for k in range(n)]
        self.names += [self.pool_names[i] for i in index]
        return self.pool[index].to(device)

    def before_model(self, state: State) -> None:
        if state.i == 0:  # a new batch: its inputs
            self.y = self.inputs(len(state.x), tuple(state.x.shape[1:]), state.x.device).to(state.x.dtype)
            self.m = self.m.to(self.y)
            self.applied.clear()
            if self.auto:
                self.strength = "per_step" if getattr(state.sampler, "name", "") == "repaint" else "per_time"
        super().before_model(state)
