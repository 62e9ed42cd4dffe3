"""Face parser: a compact UNet predicting the 19 CelebAMask-HQ classes per pixel, the mask-consistency evaluator.

Cross-entropy, optionally class-weighted by (median class frequency / class frequency)^class_weight_power with the
frequencies counted on the first training masks, so that thin classes (eyes, brows, glasses, earrings) are learned.

Exported as a plain folder: `config.json` (architecture, training size, class names, the data it was trained on) +
`model.safetensors`. `parse` reads images of any size: they are resized (bilinear, antialiased) to the training size
and the logits are resized back (bilinear) before the argmax, so the labels have the input's size.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from facelab.data.synthetic import SEG_CLASSES
from facelab.io.errors import InputError
from facelab.metrics.parsing import confusion_matrix, scores
from facelab.models.base import DEFAULT, NOT_HYPERPARAMETERS, FacelabModule, one_cycle
from facelab.models.components.segnet import SegNet
from facelab.models.pretrained import load_model, plain_model_kind, register


class ParserNet(SegNet):
    """A SegNet that knows its training size and class names; `parse` turns images into label maps."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 128), image_size: int = 64,
                 classes: list[str] | None = None):
        classes = list(classes or SEG_CLASSES)
        super().__init__(len(classes), tuple(channels))
        self.classes, self.image_size = classes, image_size
        self.config = dict(channels=list(channels), image_size=image_size, classes=self.classes)

    @torch.no_grad()
    def parse(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> labels int64 [B, H, W] (any H, W: resized to the training size
        and back)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise InputError(f"parse reads RGB images [B, 3, H, W]; got shape {tuple(images.shape)}")
        size, s = tuple(images.shape[-2:]), self.image_size
        x = images.to(self.out.weight.device, torch.float32)
        if size != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        logits = self(x)
        if size != (s, s):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits.argmax(1)


class FaceParser(FacelabModule):
    """Trains a ParserNet on batches with `image` [B, 3, H, W] in [-1, 1] and `mask` int64 [B, H, W].

    Optimiser (facelab.models.base): default AdamW(lr, weight_decay) with a one-cycle LR schedule peaking at lr.
    """

    export_name = "parser"

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 128), image_size: int = 64,
                 class_weight_power: float = 0.5, weight_samples: int = 256, lr: float = 2e-3,
                 weight_decay: float = 1e-4, data_identity: dict | None = None, optimizer=None, lr_scheduler=DEFAULT):
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=NOT_HYPERPARAMETERS)
        self.net = ParserNet(tuple(channels), image_size)
        self.register_buffer("class_weights", torch.ones(len(SEG_CLASSES)), persistent=False)
        self.val_confusion: Tensor | None = None

    def setup(self, stage: str) -> None:
        if self.hparams.class_weight_power:
            self.class_weights = class_weights(self._first_masks(), len(SEG_CLASSES),
                                               self.hparams.class_weight_power).to(self.device)

    def _first_masks(self) -> Tensor:
        data = self.trainer.datamodule.train_set
        n = min(len(data), self.hparams.weight_samples)
        if n == 0 or "mask" not in data[0]:
            raise InputError("the face parser trains on data with label maps (`mask`): data=synthetic, data=celebahq "
                             "with CelebAMask-HQ-mask/ (or -mask-anno/), or data=image_mask "
                             "data.dataset.mask_kind=labels")
        return torch.stack([data[i]["mask"] for i in range(n)])

    def _loss(self, batch: dict) -> tuple[Tensor, Tensor]:
        image, mask = batch["image"], batch["mask"].long()
        if tuple(image.shape[-2:]) != (self.net.image_size,) * 2:
            raise InputError(f"training images of {tuple(image.shape[-2:])} px; model.image_size is "
                             f"{self.net.image_size}")
        logits = self.net(image)
        return F.cross_entropy(logits, mask, weight=self.class_weights), logits

    def training_step(self, batch, batch_idx):
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["image"]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_confusion = torch.zeros(len(SEG_CLASSES), len(SEG_CLASSES), dtype=torch.long, device=self.device)

    def validation_step(self, batch, batch_idx):
        loss, logits = self._loss(batch)
        self.val_confusion += confusion_matrix(logits.argmax(1), batch["mask"], len(SEG_CLASSES))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["image"]))

    def on_validation_epoch_end(self) -> None:
        result = scores(self.trainer.strategy.reduce(self.val_confusion, reduce_op="sum"))
        self.log("val/pixel_acc", result["pixel_acc"], prog_bar=True)
        self.log("val/miou", result["miou"], prog_bar=True)
        self.log_dict({f"val/iou/{name}": value for name, value in result["iou"].items()})

    def optimizer_params(self):
        return self.net.parameters()

    def default_lr_scheduler(self):
        return one_cycle(self.hparams.lr)

    def export(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": "ParserNet", **self.net.config, "data_identity": self.hparams.data_identity}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, folder / "model.safetensors")
        return folder


def class_weights(masks: Tensor, num_classes: int, power: float) -> Tensor:
    """(median frequency / frequency)^power per class from label maps [N, H, W] (their scale is irrelevant: the
    weighted cross-entropy divides by the weights of the targets). Absent classes get the rarest present class's."""
    counts = torch.bincount(masks.flatten().long(), minlength=num_classes).double()
    present = counts > 0
    counts = torch.where(present, counts, counts[present].min())
    return ((counts[present].median() / counts) ** power).float()


def load_parser(source: str | Path, device: str | torch.device = "cpu") -> ParserNet:
    """A ParserNet in eval mode from a zoo name, an exported folder or a Lightning .ckpt (never unpickled)."""
    return load_model("parser", source, device)


def _build(config: dict) -> ParserNet:
    return ParserNet(tuple(config["channels"]), config["image_size"], config.get("classes"))


register(plain_model_kind("parser", "face parser", "ParserNet", "class_weight_power", _build, ("data_identity",)))
