"""Attribute classifier: one head per face attribute on a small ConvNet, optionally noise-aware (reads x_t and t).

Binary attributes (CelebA names) get one logit each (BCE); categorical groups such as the 3-way `skin_tone` get
K logits (cross-entropy). `predict` returns every head as class probabilities [B, K] (K = 2 for binary heads,
column 1 = attribute present), the common currency of the methods that use classifiers (guidance, evaluation).

Exported as a plain folder: `config.json` (architecture, heads, the data it was trained on) + `model.safetensors`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from facelab.diffusion import Schedule
from facelab.io.errors import InputError
from facelab.models.base import DEFAULT, NOT_HYPERPARAMETERS, FacelabModule, one_cycle
from facelab.models.components.convnet import ConvEncoder
from facelab.models.pretrained import load_model, plain_model_kind, register


class AttributeNet(nn.Module):
    """ConvEncoder + one linear layer producing every head's logits; `forward` returns {head: logits}."""

    def __init__(self, attributes: list[str], categorical: dict[str, int] | None = None,
                 channels: tuple[int, ...] = (32, 64, 128, 128), noise_aware: bool = False, image_size: int = 64):
        super().__init__()
        self.attributes, self.categorical = list(attributes), dict(categorical or {})
        clash = set(self.attributes) & set(self.categorical)
        if clash:
            raise ValueError(f"heads {sorted(clash)} are both binary and categorical")
        self.noise_aware, self.image_size = noise_aware, image_size
        self.encoder = ConvEncoder(3, tuple(channels), time_conditioned=noise_aware)
        self.head = nn.Linear(self.encoder.out_dim, len(self.attributes) + sum(self.categorical.values()))
        self.config = dict(attributes=self.attributes, categorical=self.categorical, channels=list(channels),
                           noise_aware=noise_aware, image_size=image_size)

    @property
    def heads(self) -> dict[str, int]:
        """Head name -> number of classes (2 for binary attributes)."""
        return {**{a: 2 for a in self.attributes}, **self.categorical}

    def features(self, x: Tensor, t: Tensor | int | None = None) -> Tensor:
        """The pooled encoder features [B, D] (e.g. for Fréchet distances)."""
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise InputError(f"images of {tuple(x.shape[-2:])} px; this classifier reads {self.image_size} px")
        return self.encoder(x, t if self.noise_aware else None)

    def forward(self, x: Tensor, t: Tensor | int | None = None) -> dict[str, Tensor]:
        logits = self.head(self.features(x, t))
        out = dict(zip(self.attributes, logits[:, :len(self.attributes)].unbind(1)))
        start = len(self.attributes)
        for name, k in self.categorical.items():
            out[name], start = logits[:, start:start + k], start + k
        return out

    def predict(self, x: Tensor, t: Tensor | int | None = None, temperature: float = 1.0) -> dict[str, Tensor]:
        """Class probabilities [B, K] per head (binary heads: [P(absent), P(present)])."""
        probs = {}
        for name, logit in self(x, t).items():
            logit = logit / temperature
            probs[name] = torch.stack([-logit, logit], 1).div(2).softmax(1) if logit.dim() == 1 else logit.softmax(1)
        return probs


class AttributeClassifier(FacelabModule):
    """Trains an AttributeNet on batches with `image`, `attributes` (columns named by the data's attribute_names)
    and one integer column per categorical head (e.g. `skin_tone`).

    noise_aware: images are noised to a random t with `scheduler` (a diffusers scheduler config) and the
    net reads (x_t, t), so its gradients are meaningful along a sampling trajectory; `t_power` weights the times
    (training_times).
    Optimiser (facelab.models.base): default AdamW(lr, weight_decay) with a one-cycle LR schedule peaking at lr.
    """

    export_name = "classifier"

    def __init__(self, attributes: list[str], categorical: dict[str, int] | None = None,
                 channels: tuple[int, ...] = (32, 64, 128, 128), image_size: int = 64, noise_aware: bool = False,
                 scheduler: dict | None = None, lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
                 data_identity: dict | None = None, optimizer=None, lr_scheduler=DEFAULT, t_power: float = 1.0):
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=NOT_HYPERPARAMETERS)
        if not t_power > 0:
            raise InputError(f"model.t_power={t_power}: must be > 0 (1 = uniform, > 1 weights low t)")
        if noise_aware and scheduler is None:
            raise InputError("a noise-aware classifier needs model.scheduler (the diffusion schedule it reads)")
        self.net = AttributeNet(attributes, categorical, tuple(channels), noise_aware, image_size)
        self.schedule = Schedule.from_config(scheduler) if noise_aware else None
        self.columns: list[int] | None = None

    def setup(self, stage: str) -> None:
        names = list(getattr(self.trainer.datamodule, "attribute_names", []))
        missing = [a for a in self.net.attributes if a not in names]
        if missing:
            raise InputError(f"model.attributes {missing} are not in the data's attributes ({names or 'none'})")
        self.columns = [names.index(a) for a in self.net.attributes]
        data = self.trainer.datamodule.train_set
        absent = [head for head in self.net.categorical if len(data) and head not in data[0]]
        if absent:
            raise InputError(f"model.categorical heads {absent} have no labels in the data (CelebA's attributes are "
                             "all binary): set model.categorical=null")

    def _step(self, batch: dict, generator: torch.Generator | None) -> tuple[Tensor, dict[str, Tensor]]:
        x, t = batch["image"], None
        if self.schedule is not None:
            t = training_times(len(x), self.schedule.num_train_timesteps, self.hparams.t_power, x.device, generator)
            noise = torch.randn(x.shape, device=x.device, generator=generator)
            x = self.schedule.q_sample(x, t, noise)
        logits = self.net(x, t)
        binary = batch["attributes"][:, self.columns].float()
        losses, correct = [], {}
        for j, name in enumerate(self.net.attributes):
            losses.append(F.binary_cross_entropy_with_logits(logits[name], binary[:, j]))
            correct[name] = ((logits[name] > 0).float() == binary[:, j]).float()
        for name in self.net.categorical:
            labels = torch.as_tensor(batch[name], device=x.device).long()
            losses.append(F.cross_entropy(logits[name], labels))
            correct[name] = (logits[name].argmax(1) == labels).float()
        return torch.stack(losses).mean(), correct

    def training_step(self, batch, batch_idx):
        loss, correct = self._step(batch, self.generator(0, self.global_step))
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["image"]))
        return loss

    def validation_step(self, batch, batch_idx):
        loss, correct = self._step(batch, self.generator(1, batch_idx))
        n = len(batch["image"])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        accs = {name: c.mean() for name, c in correct.items()}
        self.log("val/acc", torch.stack(list(accs.values())).mean(), prog_bar=True, sync_dist=True, batch_size=n)
        self.log_dict({f"val/acc/{k}": v for k, v in accs.items()}, sync_dist=True, batch_size=n)

    def optimizer_params(self):
        return self.net.parameters()

    def default_lr_scheduler(self):
        return one_cycle(self.hparams.lr)

    def export(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": "AttributeNet", **self.net.config, "scheduler": self.hparams.scheduler,
                  "data_identity": self.hparams.data_identity}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, folder / "model.safetensors")
        return folder


def training_times(n: int, steps: int, power: float, device, generator: torch.Generator | None) -> Tensor:
    """n training times of a noise-aware classifier: t = ⌊steps·u^power⌋, u ~ U[0, 1) (density ∝ t^(1/power − 1)):
    power 1 is uniform (drawn as randint), power > 1 weights low t."""
    if power == 1:
        return torch.randint(0, steps, (n,), device=device, generator=generator)
    u = torch.rand(n, device=device, generator=generator)
    return (steps * u ** power).long().clamp_max(steps - 1)


def load_classifier(source: str | Path, device: str | torch.device = "cpu") -> AttributeNet:
    """An AttributeNet in eval mode from a zoo name, an exported folder or a Lightning .ckpt (never unpickled)."""
    return load_model("classifier", source, device)


def _build(config: dict) -> AttributeNet:
    return AttributeNet(config["attributes"], config.get("categorical"), tuple(config["channels"]),
                        config["noise_aware"], config["image_size"])


register(plain_model_kind("classifier", "attribute classifier", "AttributeNet", "attributes", _build,
                          ("scheduler", "data_identity")))
