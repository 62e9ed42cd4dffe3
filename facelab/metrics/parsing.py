"""Mask consistency: pixel accuracy and IoU of predicted label maps against reference label maps.

The reference is resized to the prediction's size by nearest neighbour ('nearest-exact': each output pixel takes the
reference pixel under its centre), so a parser's output at the generated image's size is scored as it is.
IoU_c = |pred = c ∧ ref = c| / |pred = c ∨ ref = c| from a confusion matrix; mIoU is the mean over the classes
with a nonzero union (present in the reference or the prediction). Batch scores come from the confusion matrix
summed over the batch (the standard dataset-level mIoU; sum `confusion_matrix` over batches and call `scores` for
larger sets); the per-image scores use each image's own confusion matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from facelab.data.synthetic import SEG_CLASSES
from facelab.io.errors import InputError


def _check_labels(name: str, labels: Tensor, num_classes: int) -> None:
    if labels.dim() != 3 or labels.is_floating_point() or labels.is_complex():
        raise InputError(f"{name}: expected integer label maps [B, H, W]; got {labels.dtype} {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(f"{name}: labels must lie in 0..{num_classes - 1}; found {labels.min().item()}.."
                         f"{labels.max().item()}")


def _confusions(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Per-image confusion matrices int64 [B, K, K] (rows: reference class, columns: predicted class)."""
    _check_labels("pred", pred, num_classes)
    _check_labels("target", target, num_classes)
    if len(pred) != len(target):
        raise InputError(f"pred has {len(pred)} label maps but target has {len(target)}")
    if target.shape[-2:] != pred.shape[-2:]:
        target = F.interpolate(target[:, None].float(), size=tuple(pred.shape[-2:]), mode="nearest-exact")[:, 0]
    k = num_classes
    image = torch.arange(len(pred), device=pred.device)[:, None, None]
    index = (image * k + target.long().to(pred.device)) * k + pred.long()
    return torch.bincount(index.flatten(), minlength=len(pred) * k * k).reshape(len(pred), k, k)


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int = 19) -> Tensor:
    """The confusion matrix int64 [K, K] of label maps pred [B, H, W] against target [B, H', W'], summed over B."""
    return _confusions(pred, target, num_classes).sum(0)


def _iou(confusion: Tensor) -> Tensor:
    """IoU per class [..., K] (NaN where the union is empty) of confusion matrices [..., K, K]."""
    tp = confusion.diagonal(dim1=-2, dim2=-1).double()
    union = confusion.sum(-1).double() + confusion.sum(-2).double() - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.nan)


def scores(confusion: Tensor) -> dict:
    """pixel_acc, miou (over the classes with a nonzero union) and iou {class name: IoU} of those classes."""
    iou = _iou(confusion)
    names = SEG_CLASSES if len(iou) == len(SEG_CLASSES) else [str(c) for c in range(len(iou))]
    present = ~iou.isnan()
    return {
        "pixel_acc": (confusion.trace().double() / confusion.sum().clamp_min(1)).item(),
        "miou": iou[present].mean().item() if present.any() else float("nan"),
        "iou": {names[c]: iou[c].item() for c in present.nonzero().flatten().tolist()},
    }


def mask_consistency(pred: Tensor, target: Tensor, num_classes: int = 19) -> dict:
    """Scores of label maps pred [B, H, W] against target [B, H', W'] (resized to pred's size, nearest-exact).

    Returns the batch's pixel_acc, miou and iou {class: IoU} (from the summed confusion matrix, see `scores`), and
    pixel_acc_per_image, miou_per_image: float64 [B].
    """
    confusions = _confusions(pred, target, num_classes)
    per_image = _iou(confusions)
    counts = confusions.flatten(1).sum(1).double().clamp_min(1)
    return {
        **scores(confusions.sum(0)),
        "pixel_acc_per_image": confusions.diagonal(dim1=-2, dim2=-1).sum(1).double() / counts,
        "miou_per_image": per_image.nanmean(1),
    }
