"""Anomaly maps and how well they find known damage (FC-Diffusion's `mode=zscore` with `self_degrade`).

  anomaly_map      projection errors z-scored against clean-face statistics (facelab.diffusion.projection), clamped
                   to [L, U], scaled to [0, 1] and averaged over depths: A in [0, 1], 1 = anomalous
  self_degrade     seeded rectangles of zeroed channels: damaged inputs with their true damage mask
  anomaly_metrics  exact pixel-level AUROC and average precision of A (and of each depth) against that mask
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc, binary_average_precision


def anomaly_map(errors: Tensor, mean: Tensor, std: Tensor, lower: float, upper: float,
                sigma_floor: float) -> tuple[Tensor, Tensor]:
    """(ẑ_d [B, D, C, H, W], A [B, C, H, W]): z-scores clamped to [L, U], scaled to [0, 1], and their mean over
    depths."""
    z = (errors.double() - mean) / std.clamp(min=sigma_floor)
    zhat = ((z.clamp(lower, upper) - lower) / (upper - lower)).to(errors.dtype)
    return zhat, zhat.mean(1)


def self_degrade(images: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Zero (0.0 in [−1, 1]) random RGB channels in 1 or 2 random rectangles per image; with p = 1/8 leave it.

    Rectangle sides are |round(N(S/4, S/8))| for an image side S, redrawn with the corner until both exceed S/32
    and the rectangle fits. Returns (degraded images, degradation mask D [B, C, H, W] bool).
    """
    def uniform() -> float:
        return torch.rand((), generator=gen).item()

    batch, channels, height, width = images.shape
    hit = torch.zeros(images.shape, dtype=torch.bool)
    for b in range(batch):
        if uniform() < 1 / 8:
            continue
        for _ in range(1 if uniform() < 0.5 else 2):
            while True:
                h, w = (abs(round(side / 4 + side / 8 * torch.randn((), generator=gen).item()))
                        for side in (height, width))
                top, left = int(uniform() * height), int(uniform() * width)
                if h > height / 32 and w > width / 32 and top + h <= height and left + w <= width:
                    break
            chosen = torch.rand(channels, generator=gen) < 0.5
            hit[b, chosen, top:top + h, left:left + w] = True
    return images.masked_fill(hit, 0.0), hit


def auroc_ap(scores: Tensor, labels: Tensor) -> tuple[float | None, float | None]:
    """Exact pixel-level AUROC and average precision of `scores` against boolean `labels` (None if one class only)."""
    labels = labels.flatten().long()
    if labels.min() == labels.max():
        return None, None
    scores = scores.flatten().float()
    return binary_auroc(scores, labels).item(), binary_average_precision(scores, labels).item()


def anomaly_metrics(anomaly: Tensor, zhat: Tensor, hit: Tensor, depths: list[int]) -> dict:
    """AUROC/AP of the fused map A [N, C, H, W] (per channel against the damage D_c [N, C, H, W]; per pixel, mean or
    max over channels, against D in any channel) and AUROC per channel of every single depth's ẑ_d [N, D, C, H, W]."""
    pixel = hit.any(1)
    metrics = {}
    for name, scores, labels in (("", anomaly, hit), ("_pixel_mean", anomaly.mean(1), pixel),
                                 ("_pixel_max", anomaly.amax(1), pixel)):
        metrics[f"auroc{name}"], metrics[f"ap{name}"] = auroc_ap(scores, labels)
    metrics["auroc_depth"] = {d: auroc_ap(zhat[:, k], hit)[0] for k, d in enumerate(depths)}
    return metrics
