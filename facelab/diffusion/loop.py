"""THE sampling loop: x_T → x_0 over a timestep sequence that may go back up, with guidance hook points.

Per reverse step t → s the hook points are, in order:
  1. `before_model(state)`  may replace state.x (e.g. RePaint/fuzzy blending);
  2. `h_edit(state)`        returns `fn(h) -> h_new` applied inside this step's network call, at the
                            term's `h_where` ("after" by default), or None;
  3. `after_model(state)`   may replace state.eps or state.x0 (the other follows), or set
                            state.eps_direction (Asyrp's asymmetric DDIM step);
  4. the update             the sampler's step (samplers.py);
  5. `after_update(state)`  sees state.x = x_s (record, project); then `callback(state)`.
A step to a higher time (RePaint jump) applies the forward kernel q(x_s | x_t) with fresh noise instead.
After every stage of a step (each guidance hook, the model's ε, the sampler's update) the loop watches its tensor
for NaN, ±inf and runaway values (|·| > RUNAWAY) per sample on the device, without a sync per step, and stops with
`NonFiniteError` naming the first bad step, the stage that produced it and the samples (read every CHECK_EVERY
steps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from facelab.io.errors import InputError

from .hspace import hspace
from .samplers import DDIM, Sampler
from .schedule import Schedule, step_pairs

RUNAWAY = 1e4      # |x| beyond this is a diverged run (pixels and latents live within a few units)
H_RUNAWAY = 1e3    # an h edit moving h by more than this many times its norm (the default debias scales: ≈ 10)
H_EDIT = "h edit (h_edit; its ‖Δh‖ / (‖h‖ + √dim))"
CHECK_EVERY = 10  # steps between the (synchronising) reads of the device-side flag
WATCH = ContextVar("facelab_watch", default=True)  # off for studies of presets known to diverge (check_finite=false)


class NonFiniteError(InputError):
    """A sample became NaN, ±inf or ran away during sampling: a bad model, statistics file or guidance scale.
    `samples` are the affected rows of the batch (the runner turns them into item numbers)."""

    def __init__(self, message: str, samples: Sequence[int] = ()):
        super().__init__(message)
        self.samples = list(samples)


class FiniteWatch:
    """Per sample, the first (reverse step, stage) whose tensor stopped being finite and bounded, tracked on the
    device: `see` costs one reduction and no sync; `check` reads the result."""

    def __init__(self):
        self.step: Tensor | None = None  # [B] first bad reverse step, -1 while good
        self.stage: Tensor | None = None  # [B] index into self.stages
        self.stages: list[str] = []
        self.bounds: dict[str, float] = {}
        self.times: list[int] = []

    def see(self, value: Tensor, i: int, stage: str, bound: float = RUNAWAY) -> None:
        if value is None:
            return
        if stage not in self.stages:
            self.stages.append(stage)
            self.bounds[stage] = bound
        flat = value.detach().reshape(len(value), -1) if value.dim() > 1 else value.detach()[:, None]
        bad = ~(torch.isfinite(flat) & (flat.abs() <= bound)).all(1)
        if self.step is None:
            self.step = torch.full(bad.shape, -1, dtype=torch.long, device=bad.device)
            self.stage = torch.zeros_like(self.step)
        if bad.shape != self.step.shape:  # a term changed the batch: watch it as one
            bad, self.step, self.stage = bad.any().expand(1), self.step[:1], self.stage[:1]
        new = bad & (self.step < 0)
        self.step = torch.where(new, i, self.step)
        self.stage = torch.where(new, self.stages.index(stage), self.stage)

    def check(self) -> None:
        if self.step is None or not (self.step >= 0).any():
            return
        i = int(self.step[self.step >= 0].min())
        rows = (self.step == i).nonzero().flatten().tolist()
        stage = self.stages[int(self.stage[rows[0]])]
        raise NonFiniteError(f"sampling diverged at reverse step {i} (t = {self.times[i]}): {stage} turned NaN, "
                             f"infinite or beyond ±{self.bounds[stage]:g} for sample(s) {_listed(rows)} of the batch; "
                             "check the model weights, statistics files and guidance scales", rows)


def _listed(rows: list[int], limit: int = 8) -> str:
    return ", ".join(map(str, rows[:limit])) + (f" (+{len(rows) - limit} more)" if len(rows) > limit else "")


def _watched(edit: Callable[[Tensor], Tensor], watch: FiniteWatch, i: int, stage: str) -> Callable[[Tensor], Tensor]:
    """An h edit whose size ‖Δh‖ / ‖h‖ the watch sees (a runaway edit shows at its own step, named, not only later
    in x or never, when x̂0 clipping hides it)."""
    def watched(h: Tensor) -> Tensor:
        edited = edit(h)
        flat = h.flatten(1)  # relative to ‖h‖, or to a unit-RMS h where h is near zero (an untrained network's)
        size = (edited - h).flatten(1).norm(dim=1) / (flat.norm(dim=1) + flat.shape[1] ** 0.5)
        watch.see(size, i, stage, bound=H_RUNAWAY)
        return edited

    return watched


def _stage(fn: Callable, hook: str) -> str:
    """How the watch names a guidance hook: its term's class."""
    owner = getattr(fn, "__self__", None)
    return f"the {hook} of guidance term {type(owner).__name__ if owner is not None else fn.__name__}"


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
    sampler: Sampler | None = field(default=None, repr=False)
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


def sample(model: Callable, schedule: Schedule, x: Tensor, timesteps: Sequence[int] | Tensor | None = None, *,
           sampler: Sampler | None = None, guidance: Sequence = (), generator: torch.Generator | None = None,
           noises: Sequence[Tensor | None] | Tensor | None = None, cond: Any = None, final: int = -1,
           progress: bool = True, callback: Callable[[State], None] | None = None) -> Tensor:
    """Run `model` (any `eps = model(x_t, t, cond)`) from x at timesteps[0] down the sequence; return x_final.

    sampler: the step rule (samplers.py; default DDIM with η = 0, x̂0 unclipped). timesteps: training times, decreasing
    except for
    RePaint jumps (default: the sampler's own); `final` (default −1: ᾱ = 1) is appended unless the sequence already
    ends with it. noises: per-reverse-step noise z (a list, entries may be None, or a stacked tensor) so that a
    re-decode follows a recorded trajectory; otherwise noise comes from `generator`. A learned_range DDPM reads
    `model.last_variance`. Hooks may replace state.cond (e.g. per step). Runs under torch.no_grad; terms that need
    gradients open torch.enable_grad themselves.
    """
    sampler = DDIM(clip=False) if sampler is None else sampler
    if timesteps is None:
        timesteps = sampler.timesteps(schedule)
    times = timesteps.tolist() if isinstance(timesteps, Tensor) else [int(t) for t in timesteps]
    if not times or times[-1] != final:
        times.append(final)
    pairs = step_pairs(times)
    n_reverse = sum(reverse for _, _, reverse in pairs)
    if noises is not None and len(noises) < n_reverse:
        raise ValueError(f"noises must give one entry per reverse step ({n_reverse})")
    learned = sampler.reads_variance(schedule)
    before, after, updated = ([getattr(g, name) for g in guidance if _defines(g, name)]
                              for name in ("before_model", "after_model", "after_update"))
    editors = [(getattr(g, "h_where", "after"), g.h_edit) for g in guidance if _defines(g, "h_edit")]
    unet = getattr(model, "unet", model)

    state = State(x=x, cond=cond, generator=generator, model=model, schedule=schedule, sampler=sampler)
    memory: dict = {}
    watch = FiniteWatch() if WATCH.get() else None
    i = 0
    with torch.no_grad():
        for t, s, reverse in tqdm(pairs, desc=f"{sampler.name} sampling", disable=not progress, leave=False):
            if not reverse:
                state.x = schedule.forward_step(state.x, t, s, generator=generator)
                continue
            state.t, state.s, state.i = t, s, i
            state.eps_direction = state.v = state._eps = state._x0 = None
            if watch is not None:
                watch.times.append(t)
            for fn in before:
                fn(state)
                if watch is not None:
                    watch.see(state.x, i, _stage(fn, "x_t edit (before_model)"))
            state.x_t = state.x
            if editors:
                with ExitStack() as stack:
                    for where, editor in editors:
                        edit = editor(state)
                        if edit is not None:
                            if watch is not None:
                                edit = _watched(edit, watch, i, _stage(editor, H_EDIT))
                            stack.enter_context(hspace(unet, where, edit=edit))
                    state.eps = model(state.x_t, t, state.cond)
            else:
                state.eps = model(state.x_t, t, state.cond)
            if learned:
                state.v = model.last_variance
            if watch is not None:
                watch.see(state.eps, i, "the model's output ε")
            for fn in after:
                fn(state)
                if watch is not None:
                    watch.see(state._eps if state._eps is not None else state._x0, i,
                              _stage(fn, "ε / x̂0 edit (after_model)"))
            if state.eps_direction is not None:
                sampler.check(asymmetric=True)
            noise = None if noises is None else noises[i]
            state.x = sampler.step(schedule, state.x_t, t, s, state.eps, noise, x0=state.x0, i=i, v=state.v,
                                   eps_direction=state.eps_direction, generator=generator, memory=memory)
            if watch is not None:
                watch.see(state.x, i, f"x after the {sampler.name} update")
            for fn in updated:
                fn(state)
                if watch is not None:
                    watch.see(state.x, i, _stage(fn, "x edit (after_update)"))
            if callback is not None:
                callback(state)
            i += 1
            if watch is not None and i % CHECK_EVERY == 0:
                watch.check()
    if watch is not None:
        watch.check()
    return state.x
