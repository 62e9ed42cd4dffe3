"""`method=hextract`: h-space vectors with attribute labels, the training data of the h-classifier (Balancing Act's
ADP).

Sources (`method.source`):
  synthetic      labelled synthetic faces, DDIM(η = 0)-inverted over the sampler grid (ground-truth labels);
  class_folders  the original's layout, one sub-folder of images per class (`method.root`, e.g. data/Male/{0,1}/),
                 DDIM(η = 0)-inverted (labels = the folders);
  trajectory     the sampler's own trajectories from x_T ~ N(0, I), the final image labelled by an attribute classifier
                 (`method.classifier`): h as guidance will see it (the original trained on inversions only).
h is recorded at `method.where` at every timestep of the grid, one network call per grid time.

    python -m facelab.sample method=hextract model.pretrained=ddpm64_biased method.out=data/hspace/ddpm64_biased

Files: `shard_NNNNN.safetensors` in `method.out` (default <run dir>/hspace), each with `h` [n, T_grid, C, H, W]
(`method.dtype`, rows in grid order, i.e. decreasing t) and `labels` [n, A] int64, and metadata (json values):
`meta` = format, model id and weight fingerprint, h location and shape, the grid, source, η, sampler, label source,
attributes {name: K}, class names; `names` = the images' names. `HSpaceDataset` reads a folder of shards lazily.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from facelab.data.datamodule import collate_faces
from facelab.data.layouts import ClassFolders
from facelab.data.synthetic import ATTRIBUTES, SyntheticFaces
from facelab.diffusion import ddim_invert, hspace
from facelab.diffusion.hspace import WHERE
from facelab.guidance.base import refuse_guidance
from facelab.io.errors import InputError
from facelab.io.grids import save_grid
from facelab.io.images import resize_images
from facelab.methods.common import build_sampler, device_of, generator, run_sampler
from facelab.models.classifier import load_classifier
from facelab.models.pretrained import load_denoiser, model_fingerprint
from facelab.runner import Runner

FORMAT = "facelab.hspace/1"
SOURCES = ("synthetic", "class_folders", "trajectory")
DTYPES = {"float16": torch.float16, "float32": torch.float32}
CATEGORICAL = {"skin_tone": 3}  # the synthetic faces' categorical groups (K classes)


def run(cfg: DictConfig, runner: Runner) -> dict:
    out, gallery = runner.out, runner.gallery
    refuse_guidance(cfg, "method=hextract", "it records h along unguided inversions and trajectories, the "
                    "h-classifier's training data")
    opts = cfg.method
    if opts.source not in SOURCES:
        raise InputError(f"method.source={opts.source!r}: use one of {', '.join(SOURCES)}")
    if opts.where not in WHERE:
        raise InputError(f"method.where={opts.where!r}: use one of {', '.join(WHERE)}")
    if opts.dtype not in DTYPES:
        raise InputError(f"method.dtype={opts.dtype!r}: use one of {', '.join(DTYPES)}")
    folder = Path(opts.out) if opts.out else out / "hspace"
    if folder.is_dir() and any(folder.glob("*.safetensors")):
        raise FileExistsError(f"{folder}: already holds h-space shards; choose another method.out")
    device = device_of(cfg)
    denoiser = load_denoiser(cfg.model.pretrained, device)
    sampler, sampler_options = build_sampler(cfg.sampler), OmegaConf.to_container(cfg.sampler, resolve=True)
    grid = extraction_grid(denoiser, sampler)
    meta = {"format": FORMAT, "model": str(cfg.model.pretrained), "fingerprint": model_fingerprint(denoiser),
            "where": opts.where, "grid": grid, "num_train_timesteps": denoiser.schedule.num_train_timesteps,
            "resolution": denoiser.unet.config.sample_size, "source": opts.source,
            "sampler": {"name": sampler.name, **{k: v for k, v in sampler_options.items() if not k.startswith("_")}}}
    start = time.perf_counter()
    if opts.source == "trajectory":
        batches, labelling = trajectory_batches(cfg, denoiser, sampler, grid, device)
    else:
        batches, labelling = inversion_batches(cfg, denoiser, grid, device)
    meta.update(labelling)
    writer = ShardWriter(folder, meta, opts.shard_size, DTYPES[opts.dtype])
    shown = []  # the first 64 images, for grid.png
    for images, h, labels, names in batches:
        writer.add(h, labels, names)
        shown += list(images[:64 - len(shown)].cpu())
    shards = writer.close()
    seconds = time.perf_counter() - start
    gallery.section(f"{opts.source} images (first {len(shown)})").append(
        [("images", save_grid(torch.stack(shown), out / "grid.png", upscale=2))])
    counts = {name: torch.bincount(writer.labels[:, j], minlength=k).tolist()
              for j, (name, k) in enumerate(meta["attributes"].items())}
    return {"source": opts.source, "num_images": writer.count, "out": str(folder), "shards": len(shards),
            "grid": grid, "h_shape": writer.h_shape, "class_counts": counts, "label_source": meta["label_source"],
            "seconds": seconds, "seconds_per_image": seconds / writer.count}


def extraction_grid(denoiser, sampler) -> list[int]:
    """The sampler's grid as a strictly decreasing list of training times (no RePaint jumps)."""
    grid = sampler.timesteps(denoiser.schedule)
    if any(s >= t for t, s in zip(grid, grid[1:])):
        raise InputError(f"sampler={sampler.name}: h extraction needs a decreasing grid (use sampler=ddim or ddpm)")
    return grid


def _labels_from_faces(attributes: Sequence[str]) -> dict[str, int]:
    """{name: K} for synthetic-face labels, checked against the renderer's attributes."""
    known = [*ATTRIBUTES, *CATEGORICAL]
    unknown = [a for a in attributes if a not in known]
    if unknown or not attributes:
        raise InputError(f"method.attributes={list(attributes)}: give some of the synthetic faces' attributes "
                         f"{', '.join(known)}")
    return {a: CATEGORICAL.get(a, 2) for a in attributes}


def inversion_batches(cfg: DictConfig, denoiser, grid: list[int], device: torch.device):
    """(batches of (images, h [B, T, ...], labels [B, A], names), labelling metadata) for inverted images."""
    opts, resolution = cfg.method, denoiser.unet.config.sample_size
    if opts.source == "class_folders":
        if opts.root is None:
            raise InputError("method.source=class_folders needs method.root=DIR (one sub-folder of images per class)")
        dataset = ClassFolders(opts.root, size=resolution)
        attribute = opts.attribute or Path(opts.root).name
        k = len(dataset.classes)
        bad = sorted({label for _, label, _ in dataset.samples if not 0 <= label < k})
        if bad:
            raise InputError(f"{opts.root}: numeric class folders must be named 0..{k - 1}, found {dataset.classes}")
        heads = {attribute: k}
        labelling = {"attributes": heads, "classes": {attribute: dataset.classes},
                     "label_source": f"class_folders:{Path(opts.root).resolve()}"}
    else:
        heads = _labels_from_faces(list(opts.attributes))
        faces = opts.faces
        dataset = SyntheticFaces(size=resolution, length=cfg.num_samples, seed=faces.seed, start=faces.start,
                                 priors=OmegaConf.to_container(faces.priors, resolve=True))
        labelling = {"attributes": heads, "label_source": f"synthetic:seed={faces.seed},start={faces.start},"
                                                          f"priors={json.dumps(dict(dataset.priors))}"}
    labelling["inversion_eta"] = 0.0

    def label_columns(batch: dict) -> Tensor:
        if opts.source == "class_folders":
            return batch["label"][:, None]
        columns = [batch[a] if a in CATEGORICAL else batch["attributes"][:, ATTRIBUTES.index(a)] for a in heads]
        return torch.stack([c.long() for c in columns], 1)

    def batches():
        loader = DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=collate_faces)
        for batch in tqdm(loader, desc="h extraction (DDIM inversion)", disable=not cfg.progress):
            images = batch["image"].to(device)
            hs = ddim_invert(denoiser, denoiser.schedule, images, grid, capture_h=opts.where, progress=False).hs
            yield images, hs.transpose(0, 1), label_columns(batch), [str(n) for n in batch["name"]]

    return batches(), labelling


def trajectory_batches(cfg: DictConfig, denoiser, sampler, grid: list[int], device: torch.device):
    """Batches of the sampler's own trajectories, each final image labelled by the attribute classifier."""
    opts = cfg.method
    classifier = load_classifier(opts.classifier, device)
    wanted = list(opts.attributes)
    unknown = [a for a in wanted if a not in classifier.heads]
    if unknown or not wanted:
        raise InputError(f"method.attributes={wanted}: the classifier {opts.classifier} predicts "
                         f"{', '.join(classifier.heads)}")
    heads = {a: classifier.heads[a] for a in wanted}
    labelling = {"attributes": heads, "label_source": f"classifier:{opts.classifier}",
                 "eta": float(getattr(sampler, "eta", 0.0))}
    unet = denoiser.unet.config
    gen = generator(cfg.seed, device)

    def batches():
        for first in tqdm(range(0, cfg.num_samples, cfg.batch_size), desc="h extraction (trajectories)",
                          disable=not cfg.progress):
            n = min(cfg.batch_size, cfg.num_samples - first)
            x_T = torch.randn(n, unet.in_channels, unet.sample_size, unet.sample_size, generator=gen, device=device)
            with hspace(denoiser.unet, opts.where, capture=True) as hs:
                images = run_sampler(denoiser, x_T, sampler, gen, progress=False)
            probs = classifier.predict(resize_images(images, classifier.image_size))
            labels = torch.stack([probs[a].argmax(1) for a in heads], 1)
            yield images, torch.stack(hs, 1), labels, [f"sample_{first + i:06d}" for i in range(n)]

    return batches(), labelling


class ShardWriter:
    """Buffers rows and writes `shard_NNNNN.safetensors` files of `shard_size` rows (the last may be shorter)."""

    def __init__(self, folder: Path, meta: dict, shard_size: int, dtype: torch.dtype):
        if shard_size < 1:
            raise InputError(f"method.shard_size={shard_size}: must be at least 1")
        self.folder, self.meta, self.shard_size, self.dtype = Path(folder), meta, shard_size, dtype
        self.h: list[Tensor] = []
        self.rows: list[Tensor] = []
        self.names: list[str] = []
        self.all_labels: list[Tensor] = []
        self.paths: list[Path] = []
        self.count, self.h_shape = 0, None

    def add(self, h: Tensor, labels: Tensor, names: list[str]) -> None:
        if h.shape[1] != len(self.meta["grid"]):
            raise RuntimeError(f"captured {h.shape[1]} h per image for a grid of {len(self.meta['grid'])}")
        self.h_shape = list(h.shape[2:])
        self.h += list(h.to("cpu", self.dtype))
        self.rows += list(labels.cpu().long())
        self.names += names
        while len(self.h) >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        h, labels, names = torch.stack(self.h[:n]), torch.stack(self.rows[:n]), self.names[:n]
        del self.h[:n], self.rows[:n], self.names[:n]
        path = self.folder / f"shard_{len(self.paths):05d}.safetensors"
        self.folder.mkdir(parents=True, exist_ok=True)
        if path.exists():
            raise FileExistsError(f"{path}: already exists; not overwriting it")
        meta = {**self.meta, "h_shape": self.h_shape}
        save_file({"h": h.contiguous(), "labels": labels.contiguous()}, str(path),
                  metadata={"meta": json.dumps(meta), "names": json.dumps(names)})
        self.paths.append(path)
        self.all_labels.append(labels)
        self.count += n

    def close(self) -> list[Path]:
        if self.h:
            self._flush(len(self.h))
        if not self.paths:
            raise InputError("no images to extract h from (num_samples=0?)")
        return self.paths

    @property
    def labels(self) -> Tensor:
        return torch.cat(self.all_labels)


# --- reading ----------------------------------------------------------------------------------------------
def shard_paths(path: str | Path) -> list[Path]:
    """The shards of an h-space folder (or the one file given)."""
    path = Path(path)
    shards = [path] if path.is_file() else sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not shards:
        raise InputError(f"{path}: no h-space shards (*.safetensors); extract them first, e.g. `python -m "
                         f"facelab.sample method=hextract model.pretrained=<model> method.out={path}`")
    return shards


def read_shard_meta(path: Path) -> tuple[dict, int]:
    """(metadata without names, number of rows) of one shard, with a clear error for a foreign file."""
    try:
        with safe_open(str(path), "pt") as file:
            meta = json.loads((file.metadata() or {}).get("meta", "{}"))
            rows = file.get_slice("h").get_shape()[0] if "h" in file.keys() else 0
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f"{path}: not a safetensors file ({err})") from None
    if meta.get("format") != FORMAT:
        raise InputError(f"{path}: not a facelab h-space shard (format {meta.get('format')!r})")
    return meta, rows


class HSpaceDataset(Dataset):
    """The rows of a folder of h-space shards: {"h": [T_grid, D] (stored dtype), "labels": [A] int64, "index"}.

    `meta` is the shards' common metadata (they must agree on everything). The folder is scanned on first use (so
    that a missing folder is a plain InputError of the training run, not a config instantiation error) and files are
    opened lazily, per process.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._files: dict[int, object] = {}

    @cached_property
    def _shards(self) -> tuple[list[Path], dict, list[tuple[int, int]]]:
        """(shard paths, common metadata, (shard, row) of every item)."""
        paths, common, rows = shard_paths(self.path), None, []
        for k, shard in enumerate(paths):
            meta, n = read_shard_meta(shard)
            if common is not None and meta != common:
                differ = sorted(key for key in set(meta) | set(common) if meta.get(key) != common.get(key))
                raise InputError(f"{shard}: its metadata ({', '.join(differ)}) differs from {paths[0].name}'s; "
                                 "a folder holds the shards of one extraction")
            common = meta
            rows += [(k, row) for row in range(n)]
        return paths, common, rows

    @property
    def paths(self) -> list[Path]:
        return self._shards[0]

    @property
    def meta(self) -> dict:
        return self._shards[1]

    def __len__(self) -> int:
        return len(self._shards[2])

    def __getitem__(self, i: int) -> dict:
        k, row = self._shards[2][i]
        if k not in self._files:
            self._files[k] = safe_open(str(self.paths[k]), "pt")
        file = self._files[k]
        h = file.get_slice("h")[row:row + 1][0]
        return {"h": h.reshape(len(h), -1), "labels": file.get_slice("labels")[row:row + 1][0], "index": i}

    def __getstate__(self) -> dict:  # open files do not travel to loader workers
        return {**self.__dict__, "_files": {}}
