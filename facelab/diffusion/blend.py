"""Edit regions and the soft paste of an edit into its input (Blended Latent Diffusion, Avrahami et al. 2023; DiffEdit,
Couairon et al. 2023), as plain functions on [B, 1, H, W] maps.

`label_region`: where a target label map differs from the face's own (both at the image's size).
`noise_region` (DiffEdit): where the model's ε under the target conditions differs from its ε under the source
conditions, averaged over noise draws at one t. `decoded_region`: where each decoded edit differs from the decoded
α = 0 one. `binary` thresholds such a map at a fraction of its maximum; `dilate` grows a region by whole pixels
(square); `feather` ramps it down linearly over a few pixels outside; `paste` keeps the input exactly where the
feathered mask is 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .tuning import interpolate


def dilate(region: Tensor, px: int) -> Tensor:
    """A {0, 1} float map grown by px pixels in every direction (a (2px + 1)² square)."""
    region = region.float()
    return F.max_pool2d(region, 2 * px + 1, 1, px) if px > 0 else region


def feather(region: Tensor, px: int) -> Tensor:
    """1 on the region, (px + 1 − d) / (px + 1) at chessboard distance d ≤ px from it, 0 beyond."""
    return torch.stack([dilate(region, k) for k in range(px + 1)]).mean(0)


def binary(difference: Tensor, size: tuple[int, int], threshold: float) -> Tensor:
    """A difference map [B, 1, h, w] resized (bilinear) to size, each map scaled to its maximum, above threshold."""
    difference = F.interpolate(difference.float(), size=size, mode="bilinear", align_corners=False) \
        if tuple(difference.shape[-2:]) != tuple(size) else difference.float()
    peak = difference.amax(dim=(1, 2, 3), keepdim=True)
    return ((difference > threshold * peak) & (peak > 0)).float()


def label_region(own: Tensor, target: Tensor, px: int) -> Tensor:
    """[1, 1, H, W]: where two label maps [H, W] differ, dilated by px."""
    return dilate((own.cpu() != target.cpu())[None, None], px)


@torch.no_grad()
def noise_region(denoiser, schedule, z0: Tensor, target: list, source: list, t: int, draws: int,
                 generator: torch.Generator) -> Tensor:
    """DiffEdit's map [1, 1, h, w]: mean over `draws` noises of |ε(z_t, t, target) − ε(z_t, t, source)| (channel
    mean), z_t = q(z0, t). target / source: per modality (tokens [1, N, D], attention [1, N]); one batched call."""
    noise = torch.randn(draws, *z0.shape[1:], generator=generator, device=generator.device).to(z0)
    z_t = schedule.q_sample(z0.expand(draws, -1, -1, -1), t, noise)
    which = torch.cat([torch.ones(draws), torch.zeros(draws)]).to(z0)  # α = 1: target, α = 0: source
    eps = denoiser(torch.cat([z_t, z_t]), t, [interpolate(which, tgt, src) for tgt, src in zip(target, source)])
    return (eps[:draws] - eps[draws:]).abs().mean(dim=(0, 1))[None, None]


def decoded_region(images: Tensor, reference: Tensor) -> Tensor:
    """[B, 1, H, W]: |image − reference| averaged over the colour channels (reference: the decoded α = 0 edit)."""
    return (images - reference).abs().mean(dim=1, keepdim=True)


def paste(edit: Tensor, image: Tensor, mask: Tensor) -> Tensor:
    """mask · edit + (1 − mask) · image: the input's pixels where mask = 0, the edit's where mask = 1."""
    return torch.where(mask > 0, mask * edit + (1 - mask) * image, image)
