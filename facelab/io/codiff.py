"""Collaborative Diffusion's sample files, named as the reference's generate.py names them.

Under samples/<mask stem>/<text slug>/: the mask again as a colour PNG, {idx:06d}_x_0.png, and on request
{idx:06d}_x_inter.png / _pred_x0.png (every step decoded, NROW tiles a row), _<name>_influence_function.png (each
modality's effective weights per step; the mask's is named seg_mask), _z_0.png and _mixed.png (a 0.3 blend with the
colour mask); with an Influence, influence/{idx:06d}.npz (learned I and effective weights [steps, M, h, w], t, names).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from facelab.io.grids import save_grid
from facelab.io.images import colorize_mask, resize_mask, save_image, save_mask

FILE_NAMES = {"mask": "seg_mask"}  # modality -> the reference's name in {idx}_<name>_influence_function.png
NROW = 10                           # tiles per row of the per-step grids, as the reference


def slug(text: str | None) -> str:
    """The caption's folder name: lower-case words joined by _, at most 80 characters ("none" without a caption)."""
    return (re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:80] or "text") if text is not None else "none"


class SampleFolder:
    """samples/<mask name>/<text slug>/ of one run, written batch by batch (the mask with the first)."""

    def __init__(self, out: str | Path, mask: Tensor | None, mask_name: str, text: str | None, names: Sequence[str],
                 modalities: Sequence[str], *, save_z: bool = False, save_mixed: bool = False,
                 influence_maps: bool = False):
        self.folder = Path(out) / "samples" / mask_name / slug(text)
        self.mask, self.names = mask, list(names)
        self.map_names = [FILE_NAMES.get(modality, name) for name, modality in zip(names, modalities)]
        self.save_z, self.save_mixed, self.influence_maps = save_z, save_mixed, influence_maps
        self.mask_png = None if mask is None else self.folder / f"{mask_name}.png"  # written with the first batch
        self._pending_mask = mask is not None

    def write(self, first: int, images: Tensor, z0: Tensor, trajectories: Sequence[tuple[Tensor, Tensor]] = (),
              influence=None) -> None:
        """One batch of samples first, first + 1, …: images [n, 3, H, W] in [-1, 1] and latents z0 [n, C, h, w];
        trajectories: per sample (decoded x_T and x after each step, decoded x̂0 of each step); influence: the batch's
        facelab.diffusion.collab.Influence."""
        if self._pending_mask:
            save_mask(self.mask, self.mask_png, style="colour")
            self._pending_mask = False
        colour = None
        if self.save_mixed and self.mask is not None:
            colour = torch.from_numpy(colorize_mask(resize_mask(self.mask, images.shape[-1]))).permute(2, 0, 1)
            colour = colour.float() / 127.5 - 1
        for i, image in enumerate(images):
            stem = f"{first + i:06d}"
            save_image(image, self.folder / f"{stem}_x_0.png")
            if i < len(trajectories):
                for name, tiles in zip(("x_inter", "pred_x0"), trajectories[i]):
                    save_grid(tiles, self.folder / f"{stem}_{name}.png", min(NROW, len(tiles)))
            if self.save_z:  # the reference's (z + 40)·4 for its raw latents; ours have unit variance: (z + 4)·32
                z = z0[i]
                save_image((z[:3] if len(z) >= 3 else z.mean(0, keepdim=True)) / 4, self.folder / f"{stem}_z_0.png")
            if colour is not None:
                save_image(0.7 * image + 0.3 * colour, self.folder / f"{stem}_mixed.png")
            if influence is None:
                continue
            if self.influence_maps:
                for j, name in enumerate(self.map_names):  # [steps, 1, h, w]: the weight ×255 once saved
                    maps = influence.weights[i, :, j, None] * 2 - 1
                    save_grid(maps, self.folder / f"{stem}_{name}_influence_function.png", min(NROW, len(maps)))
            npz = self.folder / "influence" / f"{stem}.npz"
            npz.parent.mkdir(parents=True, exist_ok=True)
            with open(npz, "xb") as file:
                np.savez(file, learned=influence.learned[i].numpy(), weights=influence.weights[i].numpy(),
                         t=np.array(influence.t), names=np.array(self.names))
