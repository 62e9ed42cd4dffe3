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

Classifier-free guidance (ClassifierFree, method.cfg_scale w; not in the original, whose model has no label dropout):
ε̃(x, t, y) = ε(x, t, ∅) + w·(ε(x, t, y) − ε(x, t, ∅)) with ∅ the null label 0 that label dropout trains, the null rows
batched into the same forward. It wraps the denoiser of the sampling loop (and so of the inversion and the decode);
the terms' own differentiable calls (ε_g, the cycle's) stay the plain conditional model (CycleDiffGuidance's
`model`): one extra batch of rows per step instead of three. w = 1 is the plain model, unwrapped.

Also method=cyclediff's pieces below the method: the original's attribute table and the edits (parse_edits, flip), the
classifier checks and clean predictions, the source attributes y_src (source_attributes), the feature networks, the
edit knobs (check_edit), the sampler / grid / start point of an edit, and edit_guidance (one edit's weighted terms).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn

from facelab.diffusion import (
    DDIM,
    DDPM,
    RePaint,
    Sampler,
    Schedule,
    State,
    ddim_invert,
    edit_friendly_invert,
    randn_like,
)
from facelab.guidance.base import Context, GradientGuidance
from facelab.io.errors import InputError
from facelab.io.images import resize_images
from facelab.models.classifier import load_classifier
from facelab.models.components.seeding import keyed_generator

LossTerm = Callable[["Context"], Tensor]  # a step's Context -> per-image loss [B]

# The original's 20 attributes (its preprocess/attributes.py, CelebA names; 1 and 3 merge several CelebA attributes);
# index 20 is reconstruction. Its README's editable ones: 2, 9, 11, 12, 15, 18, 19.
REFERENCE_ATTRIBUTES = [
    "Goatee", "Beard", "Bags_Under_Eyes", "Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair",
    "Eyeglasses", "Heavy_Makeup", "Male", "Mouth_Slightly_Open", "Narrow_Eyes", "Pale_Skin", "Smiling",
    "Straight_Hair", "Wavy_Hair", "Wearing_Lipstick", "Young",
]
REFERENCE_EDITABLE = [2, 9, 11, 12, 15, 18, 19]
RECONSTRUCTION = "reconstruction"
STARTS = ("original", "sdedit", "ddim_inversion", "edit_friendly")
AUTO = "auto"  # method.start's default: edit_friendly under DDIM with η > 0 (it measured best), else ddim_inversion
CYCLES = ("origin", "step", "step_reference", "none")


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
    {name: (weight, loss term)}; zero weights are dropped. `model`: the network the terms call (ε_g, the cycle's
    calls); None = the loop's. `rows` records each step's t and the batch-mean value of every term."""

    def __init__(self, terms: Mapping[str, tuple[float, LossTerm]], grad_norm: bool = False,
                 model: Callable | None = None):
        self.terms = {name: (float(w), fn) for name, (w, fn) in terms.items() if w}
        self.grad_norm, self.model = grad_norm, model
        self.rows: list[dict] = []

    def active(self, state: State) -> bool:
        return bool(self.terms)

    def gradient(self, ctx: Context) -> Tensor:
        if self.model is not None:
            ctx = Context(replace(ctx.state, model=self.model), ctx.x)
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


class ClassifierFree(nn.Module):
    """ε̃(x, t, y) = ε(x, t, ∅) + w·(ε(x, t, y) − ε(x, t, ∅)) of an attribute-conditional Denoiser trained with label
    dropout (∅: the null label 0), the null rows appended to the same forward. A drop-in for the denoiser (its unet,
    schedule and attributes; last_variance of the conditional rows)."""

    def __init__(self, denoiser: nn.Module, scale: float):
        super().__init__()
        self.denoiser, self.scale = denoiser, float(scale)
        self.unet, self.schedule, self.attributes = denoiser.unet, denoiser.schedule, denoiser.attributes
        self.last_variance: Tensor | None = None

    def forward(self, x_t: Tensor, t, cond: Tensor) -> Tensor:
        n = len(x_t)
        both = torch.cat([t, t]) if isinstance(t, Tensor) and t.ndim == 1 else t
        eps, eps_null = self.denoiser(torch.cat([x_t, x_t]), both, torch.cat([cond, torch.zeros_like(cond)])).split(n)
        variance = self.denoiser.last_variance
        self.last_variance = None if variance is None else variance[:n]
        return eps_null + self.scale * (eps - eps_null)


def classifier_free(denoiser: nn.Module, scale: float) -> nn.Module:
    """The denoiser under classifier-free guidance of scale w (ClassifierFree); w = 1: the denoiser itself."""
    return denoiser if scale == 1 else ClassifierFree(denoiser, scale)


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


# --- method=cyclediff's pieces: edits, classifiers, start points, one edit's guidance ---------------------------------
def parse_edits(spec, attributes: Sequence[str]) -> dict[str, list[str]]:
    """{edit name: attributes to flip} from `attribute`: a name, an index of the original's table, NAME+NAME (flipped
    together), `reconstruction` (index 20: nothing flipped), or a list of these; null = the original's table."""
    if spec is None:
        names = [REFERENCE_ATTRIBUTES[i] for i in REFERENCE_EDITABLE if REFERENCE_ATTRIBUTES[i] in attributes]
        return {**{name: [name] for name in names}, RECONSTRUCTION: []}
    edits = {}
    for item in spec if isinstance(spec, Sequence) and not isinstance(spec, str) else [spec]:
        flips = list(dict.fromkeys(resolve_attribute(token, attributes) for token in str(item).split("+")))
        if RECONSTRUCTION in flips and len(flips) > 1:
            raise InputError(f"attribute={item}: reconstruction flips nothing and cannot be combined")
        edits[flips[0] if flips == [RECONSTRUCTION] else "+".join(flips)] = [f for f in flips if f != RECONSTRUCTION]
    return edits


def resolve_attribute(token: str, attributes: Sequence[str]) -> str:
    token = token.strip()
    index = int(token) if token.isdigit() else None
    if index is not None:
        token = RECONSTRUCTION if index == 20 else REFERENCE_ATTRIBUTES[index] if index < 20 else token
    if token == RECONSTRUCTION or token in attributes:
        return token
    table = ", ".join(f"{i} {REFERENCE_ATTRIBUTES[i]}" for i in REFERENCE_EDITABLE) + ", 20 reconstruction"
    which = f"{token} (index {index} of the original's table)" if index is not None and index < 20 else token
    raise InputError(f"attribute={which}: not an attribute of the model ({', '.join(attributes)}); give names, "
                     f"NAME+NAME, reconstruction, or the original's indices ({table})")


def flip(y_src: Tensor, flips: Sequence[str], attributes: Sequence[str]) -> tuple[Tensor, Tensor]:
    """(y_tgt, mask): y_src with the `flips` entries negated, and the mask [B, A] of those entries."""
    mask = torch.zeros_like(y_src)
    mask[:, [list(attributes).index(a) for a in flips]] = 1
    return y_src * (1 - 2 * mask), mask


def check_classifier(net, key: str, attributes: Sequence[str], denoiser):
    """A classifier with a binary head for every attribute of the model; a noise-aware one on the model's schedule."""
    missing = [a for a in attributes if net.heads.get(a) != 2]
    if missing:
        raise InputError(f"{key}={net.source} has no binary head for {', '.join(missing)} (it predicts "
                         f"{', '.join(net.heads)}): use a classifier trained on the model's attributes")
    if net.noise_aware:
        size = denoiser.unet.config.sample_size
        scheduler = net.meta.get("scheduler")
        same = scheduler is not None and torch.allclose(Schedule.from_config(scheduler).alphas_cumprod,
                                                        denoiser.schedule.alphas_cumprod)
        if not same or net.image_size != size:
            raise InputError(f"{key}={net.source} is noise-aware but was trained on another noise schedule or image "
                             f"size ({net.image_size} px) than the model ({size} px); retrain it with the model's")
    return net


def time_zero(net, x: Tensor) -> Tensor | None:
    """t = 0 for a noise-aware classifier reading clean images, else None."""
    return torch.zeros(len(x), dtype=torch.long, device=x.device) if net.noise_aware else None


class ClassifierFeatures:
    """A classifier's pooled encoder features of clean images in [-1, 1] (resized to its size), for FeatureLoss."""

    def __init__(self, net):
        self.net = net

    def __call__(self, x: Tensor) -> Tensor:
        return self.net.features(resize_images(x, self.net.image_size), time_zero(self.net, x))


@torch.no_grad()
def predict_attributes(net, images: Tensor, attributes: Sequence[str], batch_size: int) -> Tensor:
    """The classifier's hard 0/1 labels [N, A] of clean images (CPU), in chunks of batch_size."""
    device, labels = next(net.parameters()).device, []
    for chunk in images.split(batch_size):
        x = resize_images(chunk.to(device), net.image_size)
        probs = net.predict(x, time_zero(net, x))
        labels.append(torch.stack([probs[a][:, 1] > 0.5 for a in attributes], 1).float().cpu())
    return torch.cat(labels)


def source_attributes(inputs, attributes: Sequence[str], classifier, batch_size: int, mode: str = "labels",
                      labels=None) -> tuple[Tensor, str]:
    """(y_src ∈ {−1, 1}^[N, A] of the inputs (facelab.sources.Inputs), where it came from): with mode=labels the inputs'
    labels, else `labels` as a 0/1 list in the model's attribute order (labels); else the classifier's (predicted)."""
    if inputs.images is None:
        raise InputError("source: method=cyclediff edits images and this source gives none; use +source=synthetic or "
                         "+source=images")
    if mode == "labels" and inputs.labels is not None:
        missing = [a for a in attributes if a not in inputs.labels]
        if missing:
            raise InputError(f"the inputs have no labels for {', '.join(missing)}: use "
                             "method.source_attributes=predicted")
        return inputs.label_columns(attributes).float() * 2 - 1, "labels"
    if mode == "labels" and isinstance(labels, list):
        if len(labels) != len(attributes) or any(v not in (0, 1) for v in labels):
            raise InputError(f"method.labels={labels}: give {len(attributes)} values 0/1, one per attribute of the "
                             f"model ({', '.join(attributes)})")
        return torch.tensor([[float(v) for v in labels]]).expand(len(inputs), -1) * 2 - 1, "labels"
    return predict_attributes(classifier, inputs.images, attributes, batch_size) * 2 - 1, "predicted"

def check_edit(sampler: Sampler, start: str, cycle: str, variance_type: str, weights: Mapping[str, float],
               networks: Mapping, cfg_scale: float = 1.0) -> tuple[Sampler, str]:
    """method=cyclediff's edit knobs (method.start, cycle, variance_type, weights, networks, cfg_scale), checked before
    any work; returns the sampler of the edits (check_sampler) and the start (`auto` resolved)."""
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not 0 <= cfg_scale < float("inf"):
        raise InputError(f"method.cfg_scale={cfg_scale}: give a number ≥ 0 (1 = no classifier-free guidance, 0 = the "
                         "unconditional model)")
    for key, value, allowed in (("start", start, (AUTO, *STARTS)), ("cycle", cycle, CYCLES),
                                ("variance_type", variance_type, ("fixed_large", "fixed_small"))):
        if value not in allowed:
            raise InputError(f"method.{key}={value}: use one of {', '.join(allowed)}")
    for kind in FeatureLoss.KINDS:
        if weights[kind] and networks[kind] is None:
            raise InputError(f"method.weights.{kind}={weights[kind]} needs method.networks.{kind}: a classifier "
                             "(zoo name or folder) or {_target_: ...} building a feature network")
    if start == AUTO:
        start = "edit_friendly" if stochastic_ddim(sampler) else "ddim_inversion"
    return check_sampler(sampler, start, variance_type), start


def stochastic_ddim(sampler: Sampler) -> bool:
    """DDIM with η > 0 at some step: what the edit-friendly inversion inverts."""
    return isinstance(sampler, DDIM) and any([sampler.eta] if isinstance(sampler.eta, (int, float)) else sampler.eta)


def check_sampler(sampler: Sampler, start: str, variance_type: str) -> Sampler:
    """The sampler of the edits: not RePaint; DDPM with Σ_t of `variance_type`; DDIM(η > 0) for the edit-friendly
    start."""
    if isinstance(sampler, RePaint):
        raise InputError("sampler=repaint resamples for inpainting: method=cyclediff takes sampler=ddim, ddpm or "
                         "dpmpp_2m")
    if isinstance(sampler, DDPM):
        sampler = replace(sampler, variance_type=variance_type)
    if start == "edit_friendly" and not stochastic_ddim(sampler):
        raise InputError("method.start=edit_friendly inverts the DDIM(η) step with η > 0 (at η = 0 its noises vanish): "
                         "use sampler=ddim with sampler.eta > 0 (η = 1 is the DDPM-like step)")
    return sampler


def edit_timesteps(grid: Sequence[int], start: str, t0: int) -> list[int]:
    """The sampler's grid; for sdedit and the inversions only its times ≤ t0."""
    grid = [t for t in grid if start == "original" or t <= t0]
    if not grid:
        raise InputError(f"method.t0={t0}: no time of the sampler's grid is ≤ t0")
    return grid


def feature_networks(specs: Mapping, weights: Mapping[str, float], device: torch.device | str) -> dict:
    """{kind: network} of each active (nonzero weight) FeatureLoss kind: a classifier source (its ClassifierFeatures)
    or a {_target_: ...} config building a module images → features."""
    networks = {}
    for kind in FeatureLoss.KINDS:
        spec = specs[kind]
        if weights[kind]:
            networks[kind] = (instantiate(spec).to(device).eval().requires_grad_(False) if isinstance(spec, Mapping)
                              else ClassifierFeatures(load_classifier(spec, device)))
    return networks


def start_point(start: str, denoiser, sampler: Sampler, grid: Sequence[int], x_src: Tensor, y_src: Tensor,
                noises: Sequence[Tensor], generator: torch.Generator, progress: bool = False):
    """(x at grid[0], the per-step noises of the decode and every edit): `original` = the clean image itself (the
    reference's DDPM path), `sdedit` = q_sample to grid[0], `ddim_inversion` / `edit_friendly` under y_src (the
    edit-friendly inversion gives its own noises)."""
    schedule = denoiser.schedule
    if start == "original":
        return x_src, noises
    if start == "sdedit":
        return schedule.q_sample(x_src, grid[0], torch.randn(x_src.shape, generator=generator,
                                                             device=x_src.device)), noises
    if start == "ddim_inversion":
        return ddim_invert(denoiser, schedule, x_src, grid, cond=y_src, progress=progress).latents[0], noises
    return edit_friendly_invert(denoiser, schedule, x_src, grid, eta=sampler.eta, generator=generator, cond=y_src,
                                clip=sampler.clips(schedule), progress=progress)


def edit_guidance(weights: Mapping[str, float], cycle: str, classifier, networks: Mapping, attributes: Sequence[str],
                  x_src: Tensor, y_src: Tensor, flips: Sequence[str], noises, trajectory, generator,
                  grad_norm: bool = False, model: Callable | None = None) -> tuple[CycleDiffGuidance, Tensor]:
    """(the guidance of one edit of a source batch, y_tgt): the weighted attribute, range, cycle (`cycle`: origin,
    step, step_reference or none) and feature terms ({kind: network}); inactive terms are not built. model: the
    network the terms call (None: the loop's)."""
    y_tgt, mask = flip(y_src, flips, attributes)
    terms = {"attribute": (weights["attribute"] if mask.any() else 0.0,
                           AttributeLoss(classifier, attributes, y_tgt, mask)),
             "range": (weights["range"], range_loss)}
    if cycle == "origin":
        terms["cycle"] = (weights["cycle"], CycleToOrigin(x_src, y_src, generator))
    elif cycle in ("step", "step_reference"):
        terms["cycle"] = (weights["cycle"], CycleStepByStep(x_src, y_src, noises, trajectory, generator,
                                                             reference=cycle == "step_reference"))
    for kind, network in networks.items():
        terms[kind] = (weights[kind], FeatureLoss(network, x_src, kind))
    return CycleDiffGuidance(terms, grad_norm, model), y_tgt
