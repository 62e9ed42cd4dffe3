"""What guidance terms share: the classifier-gradient step, and what a term needs from the method that runs it.

`GradientGuidance` (hook point 3, after the loop's network call) is the scaffolding of every classifier-style term
(CycleDiff, the image-space debiasing baseline, attribute guidance). With x = x_t a fresh leaf under enable_grad:
  ε_g     = ε_θ(x, t, cond): one differentiable network call, or the loop's ε held fixed when `through_model` is
            False (no backpropagation through the network: ∂x̂0/∂x_t = 1/√ᾱ_t; `through(state)` may decide per step);
  x̂0      = x̂0(x, ε_g); `images` = x̂0 decoded by `state.model.decode` (a latent model) or x̂0 itself;
  L       = the term's loss (`loss`, per image [B] or already summed; summed over the batch, so each image gets its
            own loss's gradient whatever the batch size), g = ∇_x L;
  ε'      = ε + c·g, c = the sampler's `eps_scale` (ε' = ε − c·∇ log p for L = −log p).
Each of ε_g, x̂0 and the images is computed only when the loss reads it (`Context`): a noise-aware classifier that
reads (x_t, t) costs no network call.

`needs` (a class attribute) says what a term requires of the method; `refuse_guidance` checks a method's
`guidance=[...]` against it before anything is built:
  h_space  it edits h inside one UNet's call (state.model.unet);
  pixels   it reads or blends x_t as an image in [-1, 1] (not a latent);
  frames   it records frames that the method writes out (method=generate's trajectory.png).
A method may also refuse a term by its class name (method=ldm refuses DirectionEdit: no direction file fits it).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cached_property

import torch
from hydra.utils import get_object
from torch import Tensor

from facelab.diffusion import Guidance, State
from facelab.io.errors import InputError


class Context:
    """One step as a gradient term's loss sees it: the leaf x = x_t and, computed on first use, ε_g (a differentiable
    network call, unless `eps` is given: then held fixed), x̂0, the decoded images and x_in (CycleDiff's blend
    √(1−ᾱ_t)·x̂0 + (1−√(1−ᾱ_t))·x_t: ≈ x̂0 early, ≈ x_t late)."""

    def __init__(self, state: State, x: Tensor, eps: Tensor | None = None):
        self.state, self.x = state, x
        if eps is not None:
            self.eps = eps  # shadows the cached property: no network call

    @cached_property
    def eps(self) -> Tensor:
        return self.state.model(self.x, self.state.t, self.state.cond)

    @cached_property
    def x0(self) -> Tensor:
        return self.state.schedule.pred_x0(self.x, self.state.t, self.eps)

    @cached_property
    def images(self) -> Tensor:
        decode = getattr(self.state.model, "decode", None)
        return self.x0 if decode is None else decode(self.x0)

    @cached_property
    def x_in(self) -> Tensor:
        fac = math.sqrt(1 - self.state.schedule.alpha_bar(self.state.t))
        return self.x0 * fac + self.x * (1 - fac)


class GradientGuidance(Guidance):
    """ε ← ε + c·∇_{x_t} L at hook point 3 (module docstring). Subclasses define `loss(ctx)` (or `gradient(ctx)` for
    more than one backward pass) and may restrict the steps (`active`), the network call (`through`) or the factor c
    (`eps_scale`)."""

    through_model: bool = True

    def active(self, state: State) -> bool:
        return True

    def loss(self, ctx: Context) -> Tensor:
        raise NotImplementedError

    def gradient(self, ctx: Context) -> Tensor:
        grad, = torch.autograd.grad(self.loss(ctx).sum(), ctx.x)
        return grad

    def through(self, state: State) -> bool:
        """Whether this step's x̂0 comes from a differentiable network call (else from the loop's ε, held fixed)."""
        return self.through_model

    def eps_scale(self, state: State) -> float:
        return state.sampler.eps_scale(state.schedule, state.t, state.s)

    def after_model(self, state: State) -> None:
        if not self.active(state):
            return
        with torch.enable_grad():
            x = state.x_t.detach().requires_grad_(True)
            grad = self.gradient(Context(state, x, None if self.through(state) else state.eps.detach()))
        state.eps = state.eps + self.eps_scale(state) * grad


def needs(node) -> tuple[str, ...]:
    """What the term a guidance config builds needs (its class's `needs`), then its class name; () when its
    _target_ is missing or broken (instantiation reports that)."""
    try:
        target = get_object(node["_target_"])
    except Exception:
        return ()
    return (*getattr(target, "needs", ()), getattr(target, "__name__", ""))


def refuse_guidance(cfg, method: str, reasons: str | Mapping[str, str]) -> None:
    """Raise one InputError line for the first term of cfg.guidance that `method` cannot take, before any term or
    model is built. reasons: one reason for every term, or {need or term class name: reason} for the terms whose
    class `needs` it or has that name."""
    for name, node in (cfg.get("guidance") or {}).items():
        if isinstance(reasons, str):
            why = reasons
        else:
            why = next((reasons[need] for need in needs(node) if need in reasons), None)
        if why:
            raise InputError(f"guidance=[{name}]: {method} cannot take this term: {why}")
