"""h-space editing: add Δh_t inside each step's network call (directions, Asyrp), recording the un-edited h.

`DirectionEdit` applies one direction of a direction file (method=directions' directions.safetensors) in any method
that samples with one UNet (conf/guidance/hedit.yaml); the file is checked against the model and the sampler's grid.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from facelab.diffusion.loop import Guidance, State
from facelab.diffusion.schedule import SPACINGS
from facelab.directions.files import Directions
from facelab.io.errors import InputError


class HEdit(Guidance):
    """Adds `scales[b]·delta[t]` to h at every step whose t has an entry in `delta` (other steps are unedited:
    that is how time windows work), at the h-space location `where`.

    record: keep the un-edited h of every step in `self.hs` (one [B, *h] tensor per step).
    asymmetric: Asyrp's step, x̂0 from the edited ε and the direction term from an extra unedited pass.
    """

    needs = ("h_space",)

    def __init__(self, delta: Mapping[int, Tensor] | None = None, scales: Tensor | float = 1.0, where: str = "after",
                 asymmetric: bool = False, record: bool = False):
        self.delta, self.scales, self.h_where = dict(delta or {}), scales, where
        self.asymmetric, self.record = asymmetric, record
        self.hs: list[Tensor] = []

    def h_edit(self, state: State) -> Callable[[Tensor], Tensor] | None:
        delta = self.delta.get(state.t)
        if delta is None and not self.record:
            return None

        def edit(h: Tensor) -> Tensor:
            if self.record:
                self.hs.append(h.detach().clone())
            if delta is None:
                return h
            scales = torch.as_tensor(self.scales, dtype=h.dtype, device=h.device)
            return h + scales.reshape(-1, *[1] * (h.dim() - 1)) * delta.to(h)

        return edit

    def after_model(self, state: State) -> None:
        if self.asymmetric and state.t in self.delta:
            state.eps_direction = state.model(state.x_t, state.t, state.cond)  # outside the hook: unedited


class DirectionEdit(HEdit):
    """Direction `index` of a direction file as an h-space edit: Δh_t = scale·natural length_t·direction_t
    (Directions.delta: `t_idx`, `global_at_idx` (null: as the file was found), `window` (steps farther than this from
    t_idx stay unedited; null: all), `apply_svals`), at the file's h location; `asymmetric`: Asyrp's step
    (sampler=ddim). Before the first step on a model, the file must match its weights and the sampler's grid."""

    def __init__(self, file: str | Path | None = None, index: int = 0, scale: float = 1.0, t_idx: int = 0,
                 global_at_idx: bool | None = None, window: int | None = None, apply_svals: bool = True,
                 asymmetric: bool = False):
        if not file:
            raise InputError("guidance=[hedit] needs guidance.hedit.file=PATH: a direction file (method=directions "
                             "discover=... writes directions.safetensors)")
        if isinstance(index, bool) or not isinstance(index, int):
            raise InputError(f"guidance.hedit.index={index!r}: give a direction number, e.g. 0")
        directions = Directions.load(file)
        global_at_idx = directions.meta.get("global_at_idx", False) if global_at_idx is None else global_at_idx
        if window is not None and window >= len(directions.timesteps):
            window = None
        delta = directions.delta(index, t_idx, bool(global_at_idx), window, apply_svals)
        super().__init__(delta, float(scale), directions.meta.get("h_space", "after"), asymmetric=bool(asymmetric))
        self.file, self.directions, self.checked = str(file), directions, None

    def check(self, state: State) -> None:
        """Refuse a file found on another model or another grid than this run's (one line each)."""
        from facelab.models.pretrained import model_fingerprint

        model, found = state.model, self.directions.meta
        if hasattr(model, "unet") and hasattr(model, "schedule") and found.get("fingerprint") \
                and model_fingerprint(model) != found["fingerprint"]:
            raise InputError(f"guidance.hedit.file={self.file}: the directions were found on model "
                             f"{found.get('model')!r}, not this one (different weights); discover them for this model")
        grid, found_grid = list(state.sampler.timesteps(state.schedule)), list(self.directions.timesteps)
        if grid != found_grid:
            steps = len(found_grid)
            hint = next((f"sampler.steps={steps} sampler.spacing={spacing}" for spacing in SPACINGS
                         if state.schedule.timesteps(steps, spacing=spacing).tolist() == found_grid),
                        f"sampler.steps={steps}")
            raise InputError(f"guidance.hedit.file={self.file}: the directions were found on the {steps}-step grid "
                             f"{found_grid}, this run samples on {grid}: set {hint}")
        self.checked = model

    def h_edit(self, state: State) -> Callable[[Tensor], Tensor] | None:
        if self.checked is not state.model:
            self.check(state)
        return super().h_edit(state)
