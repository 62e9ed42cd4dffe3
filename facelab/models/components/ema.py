"""Exponential moving average of a module's weights, with a warm-up so short runs are not dominated by init."""
from __future__ import annotations

import copy

import torch


class EMA(torch.nn.Module):
    """Holds `module`'s EMA copy; decay ramps as min(decay, (1 + n) / (10 + n)) over n updates."""

    def __init__(self, module: torch.nn.Module, decay: float = 0.999):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay={decay} must lie in [0, 1)")
        self.decay = decay
        self.module = copy.deepcopy(module).requires_grad_(False).eval()
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        n = int(self.updates)
        d = min(self.decay, (1 + n) / (10 + n))
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), module.buffers()):
            b_ema.copy_(b)
        self.updates += 1

    def train(self, mode: bool = True):  # the averaged copy always stays in eval mode
        super().train(mode)
        self.module.eval()
        return self
