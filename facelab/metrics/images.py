"""Per-image similarity of batches in [-1, 1] (data range 2): PSNR, SSIM (torchmetrics) and L1."""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure


def psnr(x: Tensor, reference: Tensor) -> Tensor:
    """10·log10(2² / MSE) per image [N]."""
    mse = (x.float() - reference.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4 / mse.clamp_min(1e-12))


def ssim(x: Tensor, reference: Tensor) -> Tensor:
    """SSIM per image [N] (Gaussian window 11, σ 1.5)."""
    return structural_similarity_index_measure(x.float(), reference.float(), data_range=2.0, reduction="none")


def l1(x: Tensor, reference: Tensor) -> Tensor:
    """Mean absolute difference per image [N]."""
    return (x.float() - reference.float()).abs().flatten(1).mean(1)
