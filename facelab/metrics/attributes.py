"""Attribute-level metrics of a generated set, scored by a held-out classifier.

- `class_fractions`: the share of each class among hard labels.
- `fairness_discrepancy`: FD = ‖p_ref − (1/M)·Σ_j onehot(ŷ_j)‖₂ (Choi et al.; Balancing Act's metric).
  80/20 against 50/50 gives √(2·0.3²) = 0.424; the sampling floor at a balanced binary target is ≈ 0.56/√M.
- `frechet_distance`: ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2·(Σ₁^½ Σ₂ Σ₁^½)^½) between Gaussians fitted to features (FID's
  formula, here in the evaluation classifier's features).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def class_fractions(labels: Tensor, num_classes: int) -> Tensor:
    """The fraction of each class among integer labels [M]: float64 [K]."""
    return torch.bincount(labels.long().flatten().cpu(), minlength=num_classes).double() / max(labels.numel(), 1)


def fairness_discrepancy(target: Sequence[float] | Tensor, labels: Tensor) -> float:
    """‖target − class fractions of `labels`‖₂, with K = len(target)."""
    target = torch.as_tensor(target, dtype=torch.float64)
    return (target - class_fractions(labels, len(target))).norm().item()


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    x = features.detach().double().cpu().flatten(1)
    return x.mean(0), torch.cov(x.T, correction=1).reshape(x.shape[1], x.shape[1])


def _sqrt_psd(matrix: Tensor) -> Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative round-off clamped)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """The Fréchet (2-Wasserstein) distance between N(μ₁, Σ₁) and N(μ₂, Σ₂) (squared, as FID reports it)."""
    root = _sqrt_psd(cov1)
    cross = torch.linalg.eigvalsh(root @ cov2 @ root).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * cross).item()


def feature_frechet(features: Tensor, reference: Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets [N, D] and [M, D]."""
    return frechet_distance(*gaussian_stats(features), *gaussian_stats(reference))
