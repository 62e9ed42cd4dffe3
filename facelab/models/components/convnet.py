"""A small residual ConvNet encoder for 32..256 px faces, optionally conditioned on the diffusion time."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def time_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of integer diffusion times [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv ×2 with a skip; an optional per-channel time shift after the first conv."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int, temb_dim: int | None):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(min(groups, cin), cin), nn.Conv2d(cin, cout, 3, stride, 1)
        self.norm2, self.conv2 = nn.GroupNorm(min(groups, cout), cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1, stride) if (cin != cout or stride != 1) else nn.Identity()
        self.time = nn.Linear(temb_dim, cout) if temb_dim else None

    def forward(self, x: Tensor, temb: Tensor | None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time is not None:
            h = h + self.time(temb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class ConvEncoder(nn.Module):
    """Stem conv, one stride-2 ResBlock per entry of `channels`, global average pooling -> [B, channels[-1]].

    With `time_conditioned`, forward takes the diffusion time t (noise-aware classifiers read x_t).
    """

    def __init__(self, in_channels: int = 3, channels: tuple[int, ...] = (32, 64, 128, 128), groups: int = 8,
                 time_conditioned: bool = False):
        super().__init__()
        self.temb_dim = 4 * channels[0] if time_conditioned else None
        self.time_mlp = (nn.Sequential(nn.Linear(channels[0], self.temb_dim), nn.SiLU(),
                                       nn.Linear(self.temb_dim, self.temb_dim)) if time_conditioned else None)
        self.stem = nn.Conv2d(in_channels, channels[0], 3, 1, 1)
        widths = [channels[0], *channels]
        self.blocks = nn.ModuleList(ResBlock(a, b, 2, groups, self.temb_dim) for a, b in zip(widths, widths[1:]))
        self.out_norm = nn.GroupNorm(min(groups, channels[-1]), channels[-1])
        self.out_dim = channels[-1]

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        temb = None
        if self.time_mlp is not None:
            if t is None:
                raise ValueError("this encoder is time-conditioned (noise-aware): pass the diffusion time t")
            t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
            temb = self.time_mlp(time_embedding(t, self.stem.out_channels))
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, temb)
        return F.silu(self.out_norm(h)).mean(dim=(2, 3))
