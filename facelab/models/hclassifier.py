"""The h-classifier (Balancing Act's attribute distribution predictor): linear attribute heads on the U-Net's h_t.

`HNet` maps h (flattened, D values) at timestep t to logits for every attribute (K classes each: 2 for binary
attributes, 3 for skin_tone). Two kinds:
  per_t        one linear layer per timestep of the training grid, keyed by the integer t (not by position), so a
               run on any grid finds its heads by time (`head_time`: exact, or the nearest trained t);
  conditioned  one head whose weights are a piecewise-linear function of t: W(t) = Σ_a hat_a(t)·W_a over `anchors`
               evenly spaced anchors in [0, T−1]; still linear in h at every t, defined for any t.
A per_t net can have its directions fixed (`fix_directions`, HClassifier's `direction=class_means`): each class's
weight vector is its centred class mean of h at that t, and only a gain per t and attribute and the biases train.
Its gradient w.r.t. h then points along the class-mean differences, the directions the faces actually differ in;
a free head also uses directions the decoder ignores (a free Male head on the zoo's biased model has cosine 0.29
with the mean difference, experiments/debias/results_heads_inverted.md), so guiding with it moves h more and the
faces less.
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

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Subset

from facelab.io.errors import InputError
from facelab.models.base import DEFAULT, NOT_HYPERPARAMETERS, FacelabModule
from facelab.models.pretrained import ModelKind, frozen, load_model, locate, register

KINDS = ("per_t", "conditioned")
DIRECTIONS = ("free", "class_means")
LOOKUPS = ("exact", "nearest")
ACCURACY_CSV, ACCURACY_PNG = "hclf_accuracy.csv", "hclf_accuracy.png"
HSPACE_KEYS = {"attributes", "h_shape", "grid", "num_train_timesteps"}  # the shard metadata an HNet is built from


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
        self.keys = torch.tensor(keys, dtype=torch.float64)  # on the CPU: looking up heads never waits for a GPU
        outputs = sum(self.heads.values())
        self.weight = nn.Parameter(torch.zeros(len(keys), outputs, self.dim))
        self.bias = nn.Parameter(torch.zeros(len(keys), outputs))
        self.meta = dict(meta or {})
        self.config = dict(heads=self.heads, dim=self.dim, times=self.times, kind=kind, anchors=anchors,
                           num_train_timesteps=num_train_timesteps)
        self.register_buffer("directions", None)
        self.register_buffer("centre", None)

    def fix_directions(self, directions: Tensor, centre: Tensor) -> None:
        """Replace the free weights by weight = exp(log_gain[slot, attribute])·directions [slots, outputs, dim],
        with logits centred at `centre` [slots, dim]: logit = weight·(h − centre) + bias. Only per_t nets."""
        if self.kind != "per_t":
            raise InputError("h-classifier direction=class_means needs head=per_t (one set of class means per t)")
        if self.directions is None:
            del self.weight
            self.log_gain = nn.Parameter(torch.zeros(len(self.keys), len(self.heads)))
        self.register_buffer("directions", directions.float().to(self.bias.device))
        self.register_buffer("centre", centre.float().to(self.bias.device))

    def stored_heads(self) -> tuple[Tensor, Tensor]:
        """(weight [slots, outputs, dim], bias [slots, outputs]) of the stored heads, free or fixed-direction."""
        if self.directions is None:
            return self.weight, self.bias
        sizes = torch.tensor(list(self.heads.values()), device=self.log_gain.device)
        weight = self.log_gain.exp().repeat_interleave(sizes, 1)[..., None] * self.directions
        return weight, self.bias - torch.einsum("sod,sd->so", weight, self.centre)

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
        times = times.to("cpu", torch.float64)
        if self.kind == "per_t":
            hits = times[:, None] == self.keys[None]
            missing = times[~hits.any(1)]
            if len(missing):
                raise InputError(f"no h-classifier head for t={missing.long().tolist()}; heads exist for t in "
                                 f"{self.times}")
            return hits.to(self.bias.dtype)
        spacing = self.keys[1] - self.keys[0]
        return (1 - (times[:, None] - self.keys[None]).abs() / spacing).clamp(min=0).to(self.bias.dtype)

    def logits(self, h: Tensor, t: int | Sequence[int] | Tensor) -> Tensor:
        """All heads' logits: h [B, ...] at one time t → [B, ΣK]; h [B, n, D] at times t [n] → [B, n, ΣK]."""
        single = isinstance(t, int) or (isinstance(t, Tensor) and t.ndim == 0)
        times = torch.as_tensor([int(t)] if single else t).reshape(-1)
        mix = self.mixing(times).to(self.bias.device)
        stored_weight, stored_bias = self.stored_heads()
        weight, bias = torch.einsum("ns,sod->nod", mix, stored_weight), mix @ stored_bias
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
    """Export `net` as config.json + model.safetensors (a fixed-direction net as its plain linear heads)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    direction = "free" if net.directions is None else "class_means"
    config = {"_class_name": "HNet", **net.config, "direction": direction, "hspace": net.meta,
              "accuracy": accuracy or {}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    weight, bias = net.stored_heads()
    save_file({"weight": weight.detach().contiguous(), "bias": bias.detach().contiguous()},
              folder / "model.safetensors")
    return folder


def find_hclassifier(source: str | Path) -> Path | None:
    """The h-classifier a source names: a .ckpt, an exported folder, a model folder or zoo name holding `hclf/`."""
    found = locate("hclassifier", source)
    if found is None or (found[0] == "checkpoint" and not found[1].is_file()):
        return None
    return found[1]


def load_hclassifier(source: str | Path, device: str | torch.device = "cpu") -> HNet:
    """An HNet in eval mode from an exported folder, a model folder / zoo name with `hclf/`, or a .ckpt (never
    unpickled)."""
    return load_model("hclassifier", source, device)


def _holds(path: Path) -> Path | None:
    """The exported h-classifier in `path`: the folder itself or its hclf/."""
    return next((folder for folder in (path, path / "hclf")
                 if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()), None)


def _from_checkpoint(ckpt: dict, path: Path, source: str, device) -> HNet:
    if "hspace_meta" not in ckpt or "hclf_config" not in ckpt:
        raise InputError(f"{path}: not an h-classifier checkpoint")
    state = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    directions = (state["directions"], state["centre"]) if "directions" in state else None
    return _hnet(ckpt["hclf_config"], ckpt["hspace_meta"], state, directions, source, device)


def _from_folder(folder: Path, source: str, device) -> HNet:
    config = json.loads((folder / "config.json").read_text())
    if config.pop("_class_name", None) != "HNet":
        raise InputError(f"{folder}: not an h-classifier (config _class_name is not HNet)")
    meta = config.pop("hspace", {})
    config.pop("accuracy", None)
    config.pop("direction", None)  # how the heads were trained; exported as plain linear heads either way
    return _hnet(config, meta, load_file(folder / "model.safetensors"), None, source, device)


def _hnet(config: dict, meta: dict, state: dict, directions, source: str, device) -> HNet:
    net = HNet(**config, meta=meta)
    if directions is not None:
        net.fix_directions(*directions)
    net.load_state_dict({k: v.float() for k, v in state.items()})
    net.source = source
    return frozen(net, device)


register(ModelKind(
    "hclassifier", holds=_holds, in_zoo=lambda folder: _holds(folder / "hclf") is not None,
    from_folder=_from_folder, from_checkpoint=_from_checkpoint,
    not_found=lambda source: f"h-classifier {source}: not found (an exported hclf/ folder, a .ckpt, or a model folder "
                             "or zoo name holding hclf/); make one: `python -m facelab.sample method=hextract "
                             "method.out=DIR`, then `python -m facelab.train +experiment=hclf_gender "
                             "data.dataset.path=DIR`"))


class HClassifier(FacelabModule):
    """Trains an HNet on `data=hspace` (an HSpaceDataset); the net is built in `setup` from the shards' metadata.

    attributes: the heads to train (default: every attribute the shards label). head: per_t | conditioned.
    direction: free (every weight trains, the original) | class_means (each class's weight vector is fixed to its
    centred class mean of h over the training faces at that t, scaled so that the class means are 2 logits apart;
    a gain per t and attribute and the biases train; per_t only). Optimiser (facelab.models.base): default
    AdamW(lr, weight_decay), no LR schedule.
    """

    export_name = "hclf"

    def __init__(self, attributes: list[str] | None = None, head: str = "per_t", anchors: int = 8,
                 direction: str = "free", lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
                 optimizer=None, lr_scheduler=DEFAULT):
        super().__init__(optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=NOT_HYPERPARAMETERS)
        if head not in KINDS:
            raise InputError(f"model.head={head!r}: use one of {', '.join(KINDS)}")
        if direction not in DIRECTIONS:
            raise InputError(f"model.direction={direction!r}: use one of {', '.join(DIRECTIONS)}")
        if direction == "class_means" and head != "per_t":
            raise InputError("model.direction=class_means needs model.head=per_t (one set of class means per t)")
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
        meta = getattr(dataset, "meta", None)  # an HSpaceDataset (facelab.data.hspace): the shards' metadata
        if not isinstance(meta, dict) or not HSPACE_KEYS <= meta.keys():
            raise InputError("model=hclf trains on h-space shards: use data=hspace data.dataset.path=<shards>")
        self.build(meta)
        if self.hparams.direction == "class_means":
            self.net.fix_directions(*self.class_mean_directions(self.trainer.datamodule.train_set))

    def class_mean_directions(self, dataset) -> tuple[Tensor, Tensor]:
        """(directions [T, outputs, D], centre [T, D]) from the class means of h over `dataset` at every grid t:
        direction_k = (μ_k − c)/Σ_j ‖μ_j − c‖², c the mean of the attribute's class means, so that the head's logit
        differences are 2 between the class means at gain 1; centre = the mean of all h."""
        sums = [torch.zeros(k, len(self.net.times), self.net.dim, dtype=torch.float64) for k in self.net.heads.values()]
        counts = [torch.zeros(k, dtype=torch.float64) for k in self.net.heads.values()]
        for batch in torch.utils.data.DataLoader(dataset, batch_size=64):
            h, labels = batch["h"].double(), batch["labels"][:, self.columns]
            for j, k in enumerate(self.net.heads.values()):
                onehot = F.one_hot(labels[:, j], k).double()
                sums[j] += torch.einsum("bk,btd->ktd", onehot, h)
                counts[j] += onehot.sum(0)
        directions = []
        for name, total, count in zip(self.net.heads, sums, counts):
            if (count == 0).any():
                raise InputError(f"direction=class_means: class {int((count == 0).nonzero()[0])} of {name} has no "
                                 "training faces")
            means = total / count[:, None, None]
            offsets = means - means.mean(0)
            directions.append(offsets / offsets.pow(2).sum((0, 2))[None, :, None])
        centre = sums[0].sum(0) / counts[0].sum()
        return torch.cat(directions).transpose(0, 1).float(), centre.float()

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
        if self.hparams.direction == "class_means":  # filled in by setup, or by a checkpoint's state
            self.net.fix_directions(torch.zeros_like(self.net.weight), torch.zeros(len(self.net.times), self.net.dim))

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

    def optimizer_params(self):
        return self.net.parameters()

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
