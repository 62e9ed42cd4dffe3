"""h-space editing: add Δh_t inside each step's network call (directions, Asyrp), recording the un-edited h."""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from facelab.diffusion.loop import Guidance, State


class HEdit(Guidance):
    """Adds `scales[b]·delta[t]` to h at every step whose t has an entry in `delta` (other steps are unedited:
    that is how time windows work), at the h-space location `where`.

    record: keep the un-edited h of every step in `self.hs` (one [B, *h] tensor per step).
    asymmetric: Asyrp's step, x̂0 from the edited ε and the direction term from an extra unedited pass.
    """

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
