"""Image grids from batches in [-1, 1]."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N,C,H,W] or [C,H,W] in [-1,1] -> uint8 [N,H,W,C] / [H,W,C] as clamp((x+1)·127.5)."""
    x = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def grid_columns(count: int, nrow: int | None = None) -> int:
    """Images a row of a grid of `count` images: `nrow`, or a square's side by default."""
    return nrow or math.ceil(math.sqrt(count))


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile [N,C,H,W] images in [-1,1] into one uint8 RGB array, `nrow` images per row."""
    n, c, h, w = images.shape
    nrow = grid_columns(n, nrow)
    rows = math.ceil(n / nrow)
    tiles = to_uint8(images if c == 3 else images[:, :1].expand(-1, 3, -1, -1))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), pad_value, np.uint8)
    for i, tile in enumerate(tiles):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = tile
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, upscale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(image_grid(images, nrow))
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    img.save(path)
    return path
