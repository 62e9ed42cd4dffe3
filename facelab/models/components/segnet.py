"""A compact UNet for per-pixel classification (face parsing) built from the ConvNet's GroupNorm/SiLU ResBlocks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facelab.models.components.convnet import ResBlock


class SegNet(nn.Module):
    """Stem conv, one ResBlock per level of `channels` (each level after the first halves the resolution), a second
    ResBlock at the bottom, then per level back up: nearest ×2 upsampling, concatenation of the encoder's skip and a
    ResBlock; a 1×1 conv gives `num_classes` logits per pixel. Inputs must be divisible by 2^(len(channels) - 1).
    """

    def __init__(self, num_classes: int = 19, channels: tuple[int, ...] = (16, 32, 64, 128), in_channels: int = 3,
                 groups: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, channels[0], 3, 1, 1)
        widths = [channels[0], *channels]
        self.down = nn.ModuleList(ResBlock(a, b, 1 if i == 0 else 2, groups, None)
                                  for i, (a, b) in enumerate(zip(widths, widths[1:])))
        self.mid = ResBlock(channels[-1], channels[-1], 1, groups, None)
        self.up = nn.ModuleList(ResBlock(deep + skip, skip, 1, groups, None)
                                for deep, skip in zip(channels[:0:-1], channels[-2::-1]))
        self.out_norm = nn.GroupNorm(min(groups, channels[0]), channels[0])
        self.out = nn.Conv2d(channels[0], num_classes, 1)
        self.factor = 2 ** (len(channels) - 1)

    def forward(self, x: Tensor) -> Tensor:
        """Images [B, C, H, W] -> logits [B, num_classes, H, W]."""
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"SegNet input of {tuple(x.shape[-2:])} px: sides must be divisible by {self.factor}")
        h, skips = self.stem(x), []
        for block in self.down:
            h = block(h, None)
            skips.append(h)
        h = self.mid(skips.pop(), None)
        for block in self.up:
            h = block(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), skips.pop()], 1), None)
        return self.out(F.silu(self.out_norm(h)))
