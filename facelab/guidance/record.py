"""Record the trajectory (x_t and x̂0) at a few steps, for intermediate grids."""
from __future__ import annotations

import torch

from facelab.diffusion import Guidance, State


class RecordTrajectory(Guidance):
    """After every `every`-th update, keep x_t and x̂0 of the first `num_images` images of the current run.

    A new run (step index 0) starts a fresh record; `frames` is a list of (t, x_t, x̂0) on the CPU.
    """

    needs = ("frames",)  # the method writes them (method=generate: trajectory.png)

    def __init__(self, every: int = 10, num_images: int = 4):
        self.every, self.num_images = every, num_images
        self.frames: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def after_update(self, state: State) -> None:
        if state.i == 0:
            self.frames = []
        if state.i % self.every == 0 or state.s < 0:
            n = self.num_images
            self.frames.append((state.t, state.x[:n].float().cpu(), state.x0[:n].float().cpu()))

    def grid_images(self) -> torch.Tensor:
        """Rows = images, columns = recorded steps, x_t above x̂0 for each image: [2·n·steps, C, H, W]."""
        x_t = torch.stack([f[1] for f in self.frames], 1)
        x0 = torch.stack([f[2] for f in self.frames], 1)
        return torch.stack([x_t, x0], 1).flatten(0, 2)


class Previews:
    """A sampling callback (`sample(..., callback=)`) keeping x̂0 on the CPU at `count` evenly spaced steps of a grid
    of `steps` steps (count 0: none). `steps` lists the step indices, `images()` gives [B, kept, C, H, W]."""

    def __init__(self, count: int, steps: int):
        self.steps = sorted(set(torch.linspace(0, steps - 1, count).round().long().tolist())) if count else []
        self.frames: list[torch.Tensor] = []

    def __call__(self, state: State) -> None:
        if state.i in self.steps:
            self.frames.append(state.x0.cpu())

    def images(self) -> torch.Tensor:
        return torch.stack(self.frames, 1) if self.frames else torch.empty(0)
