"""CycleDiff guidance (Gong et al.): attribute-classifier guidance with cycle consistency for an attribute-conditional
DDPM sampled under the target attributes y_tgt (the loop's cond), editing a source x_src with attributes y_src.

At every reverse step t → s (hook point 3, after the network call), with x = x_t the only leaf:
  ε_g = ε_θ(x, t, y_tgt) (a second, differentiable network call), x̂0 = x̂0(x, ε_g), fac = √(1−ᾱ_t),
  x_in = fac·x̂0 + (1−fac)·x (≈ x̂0 early, ≈ x_t late), and L = Σ_k w_k·Σ_b L_k(b) from the loss terms:
  attribute   Σ_{a flipped} BCE(p_a, y_tgt_a): p from a clean classifier on x_in (the original) or from a
              noise-aware one on (x_t, t). The original's 20·BCE_mean(m⊙p + (1−m)⊙y_tgt, y_tgt) is the same sum.
  range       mean((x̂0 − clip(x̂0, −1, 1))²)
  perceptual / identity   feature distances of x_in to x_src in a configurable network (see FeatureLoss)
  cycle       CycleToOrigin: x̃_t = √ᾱ_t·x_in + √(1−ᾱ_t)·ε′ (fresh ε′), MSE(x̂0_θ(x̃_t, t, y_src), x_src)
              CycleStepByStep: x_s = the sampler's step from x under y_tgt with this step's noise z;
              x̃_t ~ q(x_t | x_s), the one-step forward kernel (√(1−β_t)·x_{t−1} + √β_t·ξ on the full grid);
              MSE(step(x̃_t, y_src, z), x^src_s) with x^src_s the source's own trajectory at s (x_src after the last
              step). `reference=True` is the original's commented-out version: every noise independent, x_s
              re-noised with √ᾱ_s as if it were clean, the target q_sample(x_src, s) with fresh noise, and s = −1
              wrapped to T − 1.
Sum over the batch: each image gets its own loss's gradient, whatever the batch size. Then, with g = −∇_x L,
ε' = ε − c·g with c the sampler's `eps_scale`:
  DDPM (mean form, the original's p_sample): μ' = μ_θ + Σ_t·g, i.e. c = √α_t·√(1−ᾱ_t)·(Σ_t/β_t);
  DDIM and DPM-Solver++ (score form, the original's ddim_sample): c = √(1−ᾱ_t).
The step-by-step cycle takes the sampler's own step (DPM-Solver++: its first-order step, i.e. DDIM with η = 0).
`grad_norm` rescales each term's gradient to unit RMS per image before weighting (one backward pass per term).
Per step: one network call without gradient (the loop's), one with (ε_g), one more for a cycle loss.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from facelab.diffusion import Schedule, State, randn_like
from facelab.guidance.base import Context, GradientGuidance
from facelab.io.errors import InputError
from facelab.io.images import resize_images
from facelab.models.components.seeding import keyed_generator

LossTerm = Callable[["Context"], Tensor]  # a step's Context -> per-image loss [B]


class StepNoise(Sequence):
    """z_i of reverse step i, drawn on demand from a generator keyed by (*key, i): the loop and the step-by-step cycle
    loss read the same noise without holding every step's."""

    def __init__(self, shape: Sequence[int], steps: int, key: Sequence[int], device: torch.device | str):
        self.shape, self.steps, self.key, self.device = tuple(shape), steps, tuple(key), device

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> Tensor:
        if not 0 <= i < self.steps:
            raise IndexError(i)
        return torch.randn(self.shape, generator=keyed_generator(self.device, *self.key, i), device=self.device)


def _mse(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).pow(2).flatten(1).mean(1)


class AttributeLoss:
    """Σ_a mask_a·BCE(p_a, y_tgt_a) per image: `mask` [B, A] marks the flipped attributes, `attributes` names the
    columns of y_tgt / mask among the classifier's heads; a noise-aware classifier reads (x_t, t), a clean one x_in."""

    def __init__(self, classifier, attributes: Sequence[str], y_tgt: Tensor, mask: Tensor):
        self.classifier, self.attributes = classifier, list(attributes)
        self.target, self.mask = (y_tgt > 0).float(), mask.float()

    def __call__(self, ctx: Context) -> Tensor:
        net = self.classifier
        if net.noise_aware:
            logits = net(ctx.x, torch.full((len(ctx.x),), ctx.state.t, device=ctx.x.device))
        else:
            logits = net(resize_images(ctx.x_in, net.image_size))
        logits = torch.stack([logits[a] for a in self.attributes], 1)
        bce = F.binary_cross_entropy_with_logits(logits, self.target, reduction="none")
        return (bce * self.mask).sum(1)


def range_loss(ctx: Context) -> Tensor:
    return _mse(ctx.x0, ctx.x0.clamp(-1, 1))


class FeatureLoss:
    """A feature distance of x_in to x_src in `network` (images in [-1, 1] → [B, D] or [B, C, H, W] features):
    identity = 1 − cos(f(x_in), f(x_src)) (ArcFace's use in the original); perceptual = LPIPS's distance without its
    learned weights: channel-normalised features, squared difference summed over channels, averaged over positions."""

    KINDS = ("perceptual", "identity")

    def __init__(self, network: Callable[[Tensor], Tensor], x_src: Tensor, kind: str):
        if kind not in self.KINDS:
            raise ValueError(f"kind={kind!r}; use one of {self.KINDS}")
        self.network, self.kind = network, kind
        with torch.no_grad():
            self.reference = network(x_src)

    def __call__(self, ctx: Context) -> Tensor:
        f, ref = self.network(ctx.x_in), self.reference
        if self.kind == "identity":
            return 1 - F.cosine_similarity(f.flatten(1), ref.flatten(1), dim=1)
        return (F.normalize(f, dim=1) - F.normalize(ref, dim=1)).pow(2).sum(1).reshape(len(f), -1).mean(1)


class CycleToOrigin:
    """Step-to-origin cycle loss: x_in re-noised to t with fresh noise, denoised under y_src in one call, vs x_src."""

    def __init__(self, x_src: Tensor, y_src: Tensor, generator: torch.Generator | None = None):
        self.x_src, self.y_src, self.generator = x_src, y_src, generator

    def __call__(self, ctx: Context) -> Tensor:
        state, schedule = ctx.state, ctx.state.schedule
        x_noisy = schedule.q_sample(ctx.x_in, state.t, randn_like(ctx.x, self.generator))
        return _mse(schedule.pred_x0(x_noisy, state.t, state.model(x_noisy, state.t, self.y_src)), self.x_src)


class CycleStepByStep:
    """Step-by-step cycle loss (see the module docstring). noises[i]: the z of reverse step i, the loop's own (None:
    a deterministic sampler); trajectory[i]: the source's x_s after step i (None: q_sample(x_src, s) with one ε fixed
    for the run)."""

    def __init__(self, x_src: Tensor, y_src: Tensor, noises: Sequence[Tensor] | None = None,
                 trajectory: Sequence[Tensor] | None = None, generator: torch.Generator | None = None,
                 reference: bool = False):
        self.x_src, self.y_src = x_src, y_src
        self.noises, self.trajectory, self.generator, self.reference = noises, trajectory, generator, reference
        self.eps_target = randn_like(x_src, generator)

    def fresh(self, x: Tensor) -> Tensor:
        return randn_like(x, self.generator)

    def __call__(self, ctx: Context) -> Tensor:
        state, schedule, update = ctx.state, ctx.state.schedule, ctx.state.sampler
        t, s, model = state.t, state.s, state.model
        if self.reference:
            s_ref = s if s >= 0 else schedule.num_train_timesteps - 1  # the original's t − 1 wraps at t = 0
            x_s = update.step(schedule, ctx.x, t, s, ctx.eps, self.fresh(ctx.x))
            x_noisy = schedule.q_sample(x_s, s_ref, self.fresh(ctx.x))
            x_back = update.step(schedule, x_noisy, t, s, model(x_noisy, t, self.y_src), self.fresh(ctx.x))
            return _mse(x_back, schedule.q_sample(self.x_src, s_ref, self.fresh(ctx.x)))
        z = None if self.noises is None else self.noises[state.i].to(ctx.x)
        x_s = update.step(schedule, ctx.x, t, s, ctx.eps, z)
        x_noisy = schedule.forward_step(x_s, s, t, self.fresh(ctx.x))
        x_back = update.step(schedule, x_noisy, t, s, model(x_noisy, t, self.y_src), z)
        return _mse(x_back, self.target(schedule, state))

    def target(self, schedule: Schedule, state: State) -> Tensor:
        if state.s < 0:
            return self.x_src
        if self.trajectory is not None:
            return self.trajectory[state.i].to(self.x_src)
        return schedule.q_sample(self.x_src, state.s, self.eps_target)


class CycleDiffGuidance(GradientGuidance):
    """ε ← ε − c_t·g, g = −∇_{x_t} Σ_k w_k·Σ_b L_k (module docstring; the step itself is GradientGuidance's). terms:
    {name: (weight, loss term)}; zero weights are dropped. `rows` records each step's t and the batch-mean value of
    every term."""

    def __init__(self, terms: Mapping[str, tuple[float, LossTerm]], grad_norm: bool = False):
        self.terms = {name: (float(w), fn) for name, (w, fn) in terms.items() if w}
        self.grad_norm = grad_norm
        self.rows: list[dict] = []

    def active(self, state: State) -> bool:
        return bool(self.terms)

    def gradient(self, ctx: Context) -> Tensor:
        x = ctx.x
        losses = {name: fn(ctx) for name, (_, fn) in self.terms.items()}
        if self.grad_norm:
            grad = 0
            for (w, _), loss in zip(self.terms.values(), losses.values()):
                g, = torch.autograd.grad(loss.sum(), x, retain_graph=True)
                grad = grad + w * g / g.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12).view(-1, 1, 1, 1)
        else:
            grad, = torch.autograd.grad(sum(w * losses[name].sum() for name, (w, _) in self.terms.items()), x)
        self.rows.append({"t": ctx.state.t, **{name: float(loss.detach().mean()) for name, loss in losses.items()}})
        return grad


class RangeGuidance(CycleDiffGuidance):
    """CycleDiff's range term alone, for any pixel-space model: L = weight·mean((x̂0 − clip(x̂0, −1, 1))²) per image,
    x̂0 from a differentiable network call (conf/guidance/range.yaml)."""

    needs = ("pixels",)

    def __init__(self, weight: float = 3.0):
        super().__init__({"range": (weight, range_loss)})


SOURCE_TERMS = {  # CycleDiff's terms that compare with the source: (what they read, method=cyclediff's knobs for them)
    "cycle": ("source image and attributes (x_src, y_src)", "method.cycle=origin|step and method.weights.cycle"),
    "feature": ("source image (x_src)", "method.weights.perceptual / identity and method.networks.perceptual / "
                "identity"),
}


def source_only(term: str):
    """The config of a CycleDiff term that needs each batch's source (conf/guidance/cycle.yaml, feature.yaml): refused
    with one line everywhere, pointing at method=cyclediff's knobs."""
    reads, knobs = SOURCE_TERMS[term]
    raise InputError(f"guidance=[{term}]: this CycleDiff loss compares every edit with its {reads}, which only "
                     f"method=cyclediff supplies; there it is built from {knobs}, not from guidance=[...]")
