"""The h-classifier (Balancing Act's attribute distribution predictor): linear attribute heads on the U-Net's h_t.

`HNet` maps h (flattened, D values) at timestep t to logits for every attribute (K classes each: 2 for binary
attributes, 3 for skin_tone). Two kinds:
  per_t        one linear layer per timestep of the training grid, keyed by the integer t (not by position), so a
               run on any grid finds its heads by time (`head_time`: exact, or the nearest trained t);
  conditioned  one head whose weights are a piecewise-linear function of t: W(t) = Σ_a hat_a(t)·W_a over `anchors`
               evenly spaced anchors in [0, T−1]; still linear in h at every t, defined for any t.
`HClassifier` trains it (cross-entropy per attribute and timestep) on the shards of `method=hextract`
(`data=hspace`), logs the validation accuracy per attribute and timestep and writes it as `hclf_accuracy.csv` and
`hclf_accuracy.png` in the run directory. Export: `hclf/` = config.json (heads, kind, grid, the model id and
fingerprint, h location and shape, label source, accuracy) + model.safetensors (+ the accuracy table and plot).
"""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Subset

from facelab.io.errors import InputError
from facelab.methods.hextract import HSpaceDataset

KINDS = ("per_t", "conditioned")
LOOKUPS = ("exact", "nearest")
ACCURACY_CSV, ACCURACY_PNG = "hclf_accuracy.csv", "hclf_accuracy.png"


class HNet(nn.Module):
    """Linear heads {attribute: K} on h of `dim` values, per timestep of `times` or conditioned on t.

    `meta` describes the h it reads (model id and fingerprint, h location and shape, grid, label source).
    """

    def __init__(self, heads: dict[str, int], dim: int, times: Sequence[int], kind: str = "per_t", anchors: int = 8,
                 num_train_timesteps: int = 1000, meta: dict | None = None):
        super().__init__()
        if kind not in KINDS:
            raise InputError(f"h-classifier head={kind!r}: use one of {', '.join(KINDS)}")
        if kind == "conditioned" and anchors < 2:
            raise InputError(f"h-classifier anchors={anchors}: need at least 2")
        self.heads, self.dim, self.kind = dict(heads), int(dim), kind
        self.times = [int(t) for t in times]
        keys = self.times if kind == "per_t" else torch.linspace(0, num_train_timesteps - 1, anchors).tolist()
        self.register_buffer("keys", torch.tensor(keys, dtype=torch.float64), persistent=False)
        outputs = sum(self.heads.values())
        self.weight = nn.Parameter(torch.zeros(len(keys), outputs, self.dim))
        self.bias = nn.Parameter(torch.zeros(len(keys), outputs))
        self.meta = dict(meta or {})
        self.config = dict(heads=self.heads, dim=self.dim, times=self.times, kind=kind, anchors=anchors,
                           num_train_timesteps=num_train_timesteps)

    def head_time(self, t: int, lookup: str = "exact") -> int | None:
        """The time whose head serves grid time t: t itself (exact; None if untrained), the nearest trained t
        (nearest), or t (a conditioned head reads any t)."""
        if self.kind == "conditioned" or t in self.times:
            return t
        if lookup == "nearest":
            return min(self.times, key=lambda s: (abs(s - t), s))
        return None

    def mixing(self, times: Tensor) -> Tensor:
        """Weights [n, slots] that combine the stored heads into the heads of `times` [n]."""
        times = times.to(self.keys.device, torch.float64)
        if self.kind == "per_t":
            hits = times[:, None] == self.keys[None]
            missing = times[~hits.any(1)]
            if len(missing):
                raise InputError(f"no h-classifier head for t={missing.long().tolist()}; heads exist for t in "
                                 f"{self.times}")
            return hits.to(self.weight.dtype)
        spacing = self.keys[1] - self.keys[0]
        return (1 - (times[:, None] - self.keys[None]).abs() / spacing).clamp(min=0).to(self.weight.dtype)

    def logits(self, h: Tensor, t: int | Sequence[int] | Tensor) -> Tensor:
        """All heads' logits: h [B, ...] at one time t → [B, ΣK]; h [B, n, D] at times t [n] → [B, n, ΣK]."""
        single = isinstance(t, int) or (isinstance(t, Tensor) and t.ndim == 0)
        times = torch.as_tensor([int(t)] if single else t).reshape(-1)
        mix = self.mixing(times)
        weight, bias = torch.einsum("ns,sod->nod", mix, self.weight), mix @ self.bias
        x = h.reshape(len(h), 1, self.dim) if single else h.reshape(len(h), len(times), self.dim)
        if x.shape[-1] != self.dim:
            raise InputError(f"h has {x.shape[-1]} values; this h-classifier reads {self.dim}")
        out = torch.einsum("bnd,nod->bno", x.to(weight.dtype), weight) + bias
        return out[:, 0] if single else out

    def forward(self, h: Tensor, t: int | Sequence[int] | Tensor) -> dict[str, Tensor]:
        """{attribute: logits [..., K]}."""
        return dict(zip(self.heads, self.logits(h, t).split(list(self.heads.values()), -1)))

    def predict(self, h: Tensor, t: int | Sequence[int] | Tensor, temperature: float = 1.0) -> dict[str, Tensor]:
        """{attribute: class probabilities softmax(logits / temperature) [..., K]}."""
        return {name: (logit / temperature).softmax(-1) for name, logit in self(h, t).items()}


def save_hclassifier(net: HNet, folder: str | Path, accuracy: dict | None = None) -> Path:
    """Export `net` as config.json + model.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "HNet", **net.config, "hspace": net.meta, "accuracy": accuracy or {}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({"weight": net.weight.detach().contiguous(), "bias": net.bias.detach().contiguous()},
              folder / "model.safetensors")
    return folder


def find_hclassifier(source: str | Path) -> Path | None:
    """The h-classifier a source names: a .ckpt, an exported folder, a model folder or zoo name holding `hclf/`."""
    from facelab.models.pretrained import ZOO_DIR

    path = Path(str(source)).expanduser()
    if path.suffix == ".ckpt" and path.is_file():
        return path
    for folder in (path, path / "hclf", ZOO_DIR / str(source) / "hclf"):
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder
    return None


def load_hclassifier(source: str | Path, device: str | torch.device = "cpu") -> HNet:
    """An HNet in eval mode from an exported folder, a model folder / zoo name with `hclf/`, or a .ckpt (never
    unpickled)."""
    from facelab.io.checkpoints import load_checkpoint

    path = find_hclassifier(source)
    if path is None:
        raise InputError(f"h-classifier {source}: not found (an exported hclf/ folder, a .ckpt, or a model folder or "
                         "zoo name holding hclf/); make one: `python -m facelab.sample method=hextract "
                         "method.out=DIR`, then `python -m facelab.train +experiment=hclf_gender data.dataset.path=DIR`")
    if path.suffix == ".ckpt":
        ckpt = load_checkpoint(path)
        if "hspace_meta" not in ckpt or "hclf_config" not in ckpt:
            raise InputError(f"{path}: not an h-classifier checkpoint")
        config, meta = ckpt["hclf_config"], ckpt["hspace_meta"]
        state = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    else:
        config = json.loads((path / "config.json").read_text())
        if config.pop("_class_name", None) != "HNet":
            raise InputError(f"{path}: not an h-classifier (config _class_name is not HNet)")
        meta = config.pop("hspace", {})
        config.pop("accuracy", None)
        state = load_file(path / "model.safetensors")
    net = HNet(**config, meta=meta)
    net.load_state_dict({k: v.float() for k, v in state.items()})
    net.source = str(source)
    return net.to(device).eval().requires_grad_(False)


class HClassifier(pl.LightningModule):
    """Trains an HNet on `data=hspace` (an HSpaceDataset); the net is built in `setup` from the shards' metadata.

    attributes: the heads to train (default: every attribute the shards label). head: per_t | conditioned.
    """

    export_name = "hclf"

    def __init__(self, attributes: list[str] | None = None, head: str = "per_t", anchors: int = 8, lr: float = 1e-3,
                 weight_decay: float = 1e-4, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        if head not in KINDS:
            raise InputError(f"model.head={head!r}: use one of {', '.join(KINDS)}")
        self.net: HNet | None = None
        self.meta: dict | None = None
        self.columns: list[int] = []
        self.accuracy: dict[str, dict[int, float]] = {}
        self._correct = self._seen = None

    def setup(self, stage: str) -> None:
        if self.net is not None:
            return
        dataset = self.trainer.datamodule.train_set
        while isinstance(dataset, Subset):
            dataset = dataset.dataset
        if not isinstance(dataset, HSpaceDataset):
            raise InputError("model=hclf trains on h-space shards: use data=hspace data.dataset.path=<shards>")
        self.build(dataset.meta)

    def build(self, meta: dict) -> None:
        """Create the net for h described by `meta` (the shards' metadata)."""
        available = meta["attributes"]
        chosen = list(self.hparams.attributes or available)
        unknown = [a for a in chosen if a not in available]
        if unknown:
            raise InputError(f"model.attributes {unknown}: the h-space shards label only {list(available)}")
        self.meta = meta
        self.columns = [list(available).index(a) for a in chosen]
        self.net = HNet({a: available[a] for a in chosen}, math.prod(meta["h_shape"]), meta["grid"],
                        self.hparams.head, self.hparams.anchors, meta["num_train_timesteps"], meta)

    def _step(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(mean cross-entropy over attributes and timesteps, correct predictions [A, T_grid])."""
        logits = self.net(batch["h"].float(), self.net.times)
        labels = batch["labels"][:, self.columns]
        losses, correct = [], []
        for j, logit in enumerate(logits.values()):
            target = labels[:, j, None].expand(-1, logit.shape[1])
            losses.append(F.cross_entropy(logit.flatten(0, 1), target.flatten()))
            correct.append((logit.argmax(-1) == target).sum(0))
        return torch.stack(losses).mean(), torch.stack(correct)

    def training_step(self, batch, batch_idx):
        loss, _ = self._step(batch)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["h"]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._correct = torch.zeros(len(self.net.heads), len(self.net.times), device=self.device)
        self._seen = torch.zeros((), device=self.device)

    def validation_step(self, batch, batch_idx):
        loss, correct = self._step(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["h"]))
        self._correct += correct
        self._seen += len(batch["h"])

    def on_validation_epoch_end(self) -> None:
        correct = self.trainer.strategy.reduce(self._correct, reduce_op="sum")
        seen = self.trainer.strategy.reduce(self._seen, reduce_op="sum")
        accuracy = (correct / seen.clamp(min=1)).cpu()
        self.accuracy = {a: dict(zip(self.net.times, row.tolist())) for a, row in zip(self.net.heads, accuracy)}
        self.log("val/acc", accuracy.mean().item(), prog_bar=True)
        for name, row in zip(self.net.heads, accuracy):
            self.log(f"val/acc/{name}", row.mean().item())
            self.log_dict({f"val/acc/{name}/t{t:04d}": acc for t, acc in zip(self.net.times, row.tolist())})
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            write_accuracy(Path(self.trainer.default_root_dir), self.accuracy)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["hspace_meta"], checkpoint["hclf_config"] = self.meta, self.net.config

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.net is None:
            self.build(checkpoint["hspace_meta"])

    def export(self, folder: str | Path) -> Path:
        folder = save_hclassifier(self.net, folder, {a: {str(t): v for t, v in row.items()}
                                                     for a, row in self.accuracy.items()})
        for name in (ACCURACY_CSV, ACCURACY_PNG):
            if (Path(self.trainer.default_root_dir) / name).is_file():
                shutil.copy(Path(self.trainer.default_root_dir) / name, folder / name)
        return folder


def write_accuracy(folder: Path, accuracy: dict[str, dict[int, float]]) -> None:
    """hclf_accuracy.csv (t, one column per attribute) and hclf_accuracy.png (accuracy against t) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(accuracy)
    times = sorted({t for row in accuracy.values() for t in row})
    lines = [",".join(["t", *names])] + [",".join([str(t), *(f"{accuracy[a][t]:.4f}" for a in names)]) for t in times]
    (folder / ACCURACY_CSV).write_text("\n".join(lines) + "\n")
    plot_accuracy(accuracy, folder / ACCURACY_PNG)


def plot_accuracy(accuracy: dict[str, dict[int, float]], path: Path, width: int = 480, height: int = 300) -> None:
    """A line plot of accuracy (0 .. 1) against t, one colour per attribute."""
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 40, width - 10, 10, height - 30
    t_max = max(max(row) for row in accuracy.values()) or 1

    def point(t: int, acc: float) -> tuple[float, float]:
        return left + (right - left) * t / t_max, bottom - (bottom - top) * acc

    draw.rectangle([left, top, right, bottom], outline="black")
    for acc in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = point(0, acc)[1]
        draw.line([left, y, right, y], fill=(220, 220, 220))
        draw.text((4, y - 6), f"{acc:.2f}", fill="black")
    draw.text((left, bottom + 8), "t = 0", fill="black")
    draw.text((right - 50, bottom + 8), f"t = {t_max}", fill="black")
    for k, (name, row) in enumerate(accuracy.items()):
        colour = colours[k % len(colours)]
        points = [point(t, row[t]) for t in sorted(row)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        draw.text((left + 8, top + 4 + 12 * k), f"{name} (val accuracy)", fill=colour)
    image.save(path)
