"""Diffusion projection and its clean-face error statistics (FC-Diffusion's anomaly map, `method=fuzzy mode=zscore`).

Projection at depth d: x_d = √ᾱ_d·y + √(1−ᾱ_d)·ε (one ε per image, shared by all depths), then ancestral DDPM
down to t = −1 gives ŷ_d. With `offset` (the reference's convention) the first network call labels x_d as d−1;
`step` > 1 walks a strided grid (d−1, d−1−step, …) instead of every training step. The error
e_d = (127.5·(ŷ_d − y))² is z-scored against per-pixel, per-channel μ_d, σ_d of e_d over clean training faces
(facelab.metrics.anomaly.anomaly_map).

Statistics files are safetensors (`mean`, `std`: [D, C, H, W] float64) whose metadata names the model (with a
weight fingerprint), resolution, depths, step convention, N, seed and faces; `load_stats` checks them. They are
computed by `python -m facelab.fuzzy_stats` (facelab/fuzzy_stats.py).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from facelab.io.errors import InputError
from facelab.io.metadata import INT, int_list, require, tensor

from .denoiser import Denoiser
from .schedule import randn_like

FORMAT = "facelab.fuzzy_stats/1"
STATS_FILE = "fuzzy_stats.safetensors"


def projection_times(depth: int, offset: bool, step: int) -> list[int]:
    """The reverse grid of the projection from depth d: d−1 (offset) or d, then every `step`, down to ≥ 0."""
    return list(range(depth - 1 if offset else depth, -1, -step))


def check_depths(depths: Sequence[int], num_train_timesteps: int) -> list[int]:
    depths = [int(d) for d in depths]
    bad = [d for d in depths if not 1 <= d < num_train_timesteps]
    if not depths or bad or len(set(depths)) != len(depths):
        raise InputError(f"zscore_set={depths}: projection depths must be distinct integers in "
                         f"[1, {num_train_timesteps - 1}] (the model's schedule has {num_train_timesteps} steps)")
    return depths


def project(denoiser: Denoiser, y: Tensor, depths: Sequence[int], eps: Tensor, generator: torch.Generator,
            offset: bool = True, step: int = 1) -> Tensor:
    """ŷ_d for every image and depth in one batched pass: [B, D, C, H, W].

    The batch is images × depths; each image's x_d uses its own ε for all depths. The pass walks the union of
    the depths' grids downwards and, at each time, calls the network only on the rows whose grid holds it.
    """
    schedule, n_depths = denoiser.schedule, len(depths)
    rows = [d for _ in range(len(y)) for d in depths]
    level = torch.tensor(rows, device=y.device)
    x = schedule.q_sample(y.repeat_interleave(n_depths, 0), level, eps.repeat_interleave(n_depths, 0))
    following = [dict(zip(grid, grid[1:] + [-1])) for grid in (projection_times(d, offset, step) for d in rows)]
    for t in sorted(set().union(*following), reverse=True):
        active = [r for r, nxt in enumerate(following) if t in nxt]
        index = torch.tensor(active, device=y.device)
        s = torch.tensor([following[r][t] for r in active], device=y.device)
        x_t = x[index]
        model_eps = denoiser(x_t, t)
        x[index] = schedule.ddpm_step(x_t, t, s, model_eps, clip=True, v=denoiser.last_variance, generator=generator)
    return x.view(len(y), n_depths, *y.shape[1:])


def projection_errors(y: Tensor, projected: Tensor) -> Tensor:
    """e_d = (127.5·(ŷ_d − y))² in 0–255² units: [B, D, C, H, W]."""
    return (127.5 * (projected - y[:, None])) ** 2


def project_errors(denoiser: Denoiser, y: Tensor, depths: Sequence[int], gen: torch.Generator, offset: bool,
                   step: int) -> tuple[Tensor, Tensor]:
    """(ŷ, e) for a batch, drawing each image's shared ε from `gen`."""
    projected = project(denoiser, y, depths, randn_like(y, gen), gen, offset, step)
    return projected, projection_errors(y, projected)


class RunningMoments:
    """Per-element mean and population std over batches, float64, merged with Chan et al.'s parallel update."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def update(self, batch: Tensor) -> None:
        batch = batch.double()
        nb, mean_b = len(batch), batch.mean(0)
        m2_b = ((batch - mean_b) ** 2).sum(0)
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mean_b, m2_b
            return
        total = self.n + nb
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (nb / total)
        self.m2 = self.m2 + m2_b + delta ** 2 * (self.n * nb / total)
        self.n = total

    @property
    def std(self) -> Tensor:
        return (self.m2 / self.n).sqrt()


# --- the statistics file ------------------------------------------------------------------------------------------
def convention(offset: bool, step: int) -> dict:
    return {"projection_offset": bool(offset), "projection_step": int(step)}


def save_stats(path: Path, moments: RunningMoments, depths: Sequence[int], metadata: dict,
               overwrite: bool = False) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; not overwriting it (pass overwrite=true or another out=)")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**metadata, "format": FORMAT, "depths": list(map(int, depths)), "N": moments.n}  # what it holds wins
    save_file({"mean": moments.mean.contiguous(), "std": moments.std.contiguous()}, str(path),
              metadata={key: json.dumps(value) for key, value in meta.items()})
    return path


def read_stats(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a statistics file, with clear errors for a missing or foreign file."""
    path = Path(path)
    if path.is_dir():
        path = path / STATS_FILE
    if not path.is_file():
        raise InputError(f"{path}: no such statistics file; compute it with "
                         f"`python -m facelab.fuzzy_stats model.pretrained=<model> out={path}`")
    try:
        with safe_open(str(path), "pt") as file:
            tensors = {key: file.get_tensor(key) for key in file.keys()}
            meta = {key: json.loads(value) for key, value in (file.metadata() or {}).items()}
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f"{path}: not a safetensors statistics file ({err})") from None
    if meta.get("format") != FORMAT:
        raise InputError(f"{path}: not a facelab fuzzy statistics file (format {meta.get('format')!r})")
    for key, types in (("model_sha256", (str,)), ("model", (str,)), ("resolution", INT), ("N", INT),
                       ("projection_offset", (bool,)), ("projection_step", INT)):
        require(path, meta, key, types)
    depths = int_list(path, meta, "depths")
    mean, std = tensor(path, tensors, "mean", dims=4), tensor(path, tensors, "std", dims=4)
    if mean.shape != std.shape or len(mean) != len(depths):
        raise InputError(f"{path}: mean {list(mean.shape)} and std {list(std.shape)} do not fit {len(depths)} depths "
                         "(expected both [depths, C, H, W]); the file is damaged")
    if (std < 0).any():
        raise InputError(f"{path}: tensor 'std' has negative values; the file is damaged (recompute it)")
    return {"mean": mean, "std": std}, meta


def load_stats(path: Path, fingerprint: str, resolution: int, model_name: str, depths: Sequence[int], offset: bool,
               step: int, N: int | None = None) -> tuple[Tensor, Tensor, dict]:
    """(μ, σ) [D, C, H, W] for `depths` and the metadata, after checking the file was made for this model (its
    weight `fingerprint`: facelab.models.pretrained.model_fingerprint), resolution and convention."""
    tensors, meta = read_stats(path)
    if meta["model_sha256"] != fingerprint:
        raise InputError(f"{path}: statistics were computed for model {meta['model']!r}, not for "
                         f"model.pretrained={model_name} (different weights); recompute them with "
                         f"`python -m facelab.fuzzy_stats model.pretrained={model_name}`")
    if meta["resolution"] != resolution:
        raise InputError(f"{path}: statistics are for {meta['resolution']} px images but the model works at "
                         f"{resolution} px")
    wanted = convention(offset, step)
    if any(meta[key] != value for key, value in wanted.items()):
        got = {key: meta[key] for key in wanted}
        raise InputError(f"{path}: statistics use the projection convention {got} but the run asks for {wanted}")
    missing = [d for d in depths if d not in meta["depths"]]
    if missing:
        raise InputError(f"{path}: no statistics for depth(s) {missing} of zscore_set; the file has "
                         f"{meta['depths']}")
    if N is not None and meta["N"] != N:
        raise InputError(f"{path}: statistics come from N={meta['N']} images, but zscore_N={N}")
    index = [meta["depths"].index(d) for d in depths]
    return tensors["mean"][index], tensors["std"][index], meta
