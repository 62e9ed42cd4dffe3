"""THE sampling loop: x_T → x_0 over a timestep sequence that may go back up, with guidance hook points.

Per reverse step t → s the hook points are, in order:
  1. `before_model(state)`  may replace state.x (e.g. RePaint/fuzzy blending);
  2. `h_edit(state)`        returns `fn(h) -> h_new` applied inside this step's network call, at the
                            term's `h_where` ("after" by default), or None;
  3. `after_model(state)`   may replace state.eps or state.x0 (the other follows), or set
                            state.eps_direction (Asyrp's asymmetric DDIM step);
  4. the update             DDIM(η) or DDPM;
  5. `after_update(state)`  sees state.x = x_s (record, project); then `callback(state)`.
A step to a higher time (RePaint jump) applies the forward kernel q(x_s | x_t) with fresh noise instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .hspace import hspace
from .schedule import Schedule, step_pairs


class Guidance:
    """Base for guidance terms: override any subset of the hook methods (the defaults do nothing).

    Plain objects with some of these methods work too; `h_where` picks the h-space location for h_edit.
    """

    h_where: str = "after"

    def before_model(self, state: State) -> None:
        pass

    def h_edit(self, state: State) -> Callable[[Tensor], Tensor] | None:
        return None

    def after_model(self, state: State) -> None:
        pass

    def after_update(self, state: State) -> None:
        pass


@dataclass
class State:
    """What the hooks see and may change. `x` is x_t up to the update and x_s after it; `x_t` is the
    network input of the step. `eps` and `x0` are two views of one prediction: assigning one
    recomputes the other (lazily, from x_t). `extra` persists across steps for the terms' own use."""

    x: Tensor
    t: int = 0
    s: int = -1
    i: int = 0
    eps_direction: Tensor | None = None
    v: Tensor | None = None
    cond: Any = None
    generator: torch.Generator | None = None
    extra: dict = field(default_factory=dict)
    x_t: Tensor | None = None
    model: Any = field(default=None, repr=False)
    schedule: Schedule | None = field(default=None, repr=False)
    _eps: Tensor | None = field(default=None, repr=False)
    _x0: Tensor | None = field(default=None, repr=False)

    @property
    def eps(self) -> Tensor | None:
        if self._eps is None and self._x0 is not None:
            self._eps = self.schedule.pred_eps(self.x_t, self.t, self._x0)
        return self._eps

    @eps.setter
    def eps(self, value: Tensor) -> None:
        self._eps, self._x0 = value, None

    @property
    def x0(self) -> Tensor | None:
        if self._x0 is None and self._eps is not None:
            self._x0 = self.schedule.pred_x0(self.x_t, self.t, self._eps)
        return self._x0

    @x0.setter
    def x0(self, value: Tensor) -> None:
        self._x0, self._eps = value, None


def _defines(term: Any, name: str) -> bool:
    """Whether a guidance term has its own `name` hook (the base class no-ops do not count)."""
    return callable(getattr(term, name, None)) and getattr(type(term), name, None) is not getattr(Guidance, name)


def sample(model: Callable, schedule: Schedule, x: Tensor, timesteps: Sequence[int] | Tensor, *,
           guidance: Sequence = (), eta: float | Sequence[float] = 0.0, sampler: str = "ddim",
           generator: torch.Generator | None = None, noises: Sequence[Tensor | None] | Tensor | None = None,
           cond: Any = None, clip: bool = False, final: int = -1, variance_type: str | None = None,
           progress: bool = True, callback: Callable[[State], None] | None = None) -> Tensor:
    """Run `model` (any `eps = model(x_t, t, cond)`) from x at timesteps[0] down the sequence; return x_final.

    timesteps: training times, decreasing except for RePaint jumps; `final` (default −1: ᾱ = 1) is
    appended unless the sequence already ends with it. eta: η for DDIM, a number or one per reverse step.
    noises: per-reverse-step noise z (a list, entries may be None, or a stacked tensor) so that a
    re-decode follows a recorded trajectory; otherwise noise comes from `generator`.
    sampler="ddpm" uses `variance_type` (default the schedule's); learned_range reads `model.last_variance`.
    Hooks may replace state.cond (e.g. per step). Runs under torch.no_grad; terms that need gradients
    open torch.enable_grad themselves.
    """
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler={sampler!r}; use 'ddim' or 'ddpm'")
    times = timesteps.tolist() if isinstance(timesteps, Tensor) else [int(t) for t in timesteps]
    if not times or times[-1] != final:
        times.append(final)
    pairs = step_pairs(times)
    n_reverse = sum(reverse for _, _, reverse in pairs)
    etas = [float(eta)] * n_reverse if isinstance(eta, (int, float)) else [float(e) for e in eta]
    if len(etas) < n_reverse or (noises is not None and len(noises) < n_reverse):
        raise ValueError(f"eta / noises must give one entry per reverse step ({n_reverse})")
    variance_type = variance_type or schedule.variance_type
    learned = sampler == "ddpm" and variance_type == "learned_range"
    before, after, updated = ([getattr(g, name) for g in guidance if _defines(g, name)]
                              for name in ("before_model", "after_model", "after_update"))
    editors = [(getattr(g, "h_where", "after"), g.h_edit) for g in guidance if _defines(g, "h_edit")]
    unet = getattr(model, "unet", model)

    state = State(x=x, cond=cond, generator=generator, model=model, schedule=schedule)
    i = 0
    with torch.no_grad():
        for t, s, reverse in tqdm(pairs, desc=f"{sampler} sampling", disable=not progress, leave=False):
            if not reverse:
                state.x = schedule.forward_step(state.x, t, s, generator=generator)
                continue
            state.t, state.s, state.i = t, s, i
            state.eps_direction = state.v = state._eps = state._x0 = None
            for fn in before:
                fn(state)
            state.x_t = state.x
            if editors:
                with ExitStack() as stack:
                    for where, editor in editors:
                        edit = editor(state)
                        if edit is not None:
                            stack.enter_context(hspace(unet, where, edit=edit))
                    state.eps = model(state.x_t, t, state.cond)
            else:
                state.eps = model(state.x_t, t, state.cond)
            if learned:
                state.v = model.last_variance
            for fn in after:
                fn(state)
            noise = None if noises is None else noises[i]
            if sampler == "ddim":
                state.x = schedule.ddim_step(state.x_t, t, s, state.eps, etas[i], noise, state.eps_direction, clip,
                                             x0=state.x0, generator=generator)
            elif state.eps_direction is not None:
                raise ValueError("an asymmetric step (eps_direction) needs sampler='ddim'")
            else:
                state.x = schedule.ddpm_step(state.x_t, t, s, noise=noise, variance_type=variance_type, clip=clip,
                                             x0=state.x0, v=state.v, generator=generator)
            for fn in updated:
                fn(state)
            if callback is not None:
                callback(state)
            i += 1
    return state.x
