"""Projection statistics for `method=fuzzy mode=zscore`: μ_d, σ_d of the projection error e_d over N clean faces
(facelab.diffusion.projection): synthetic training faces, or any folder of real faces at the model's size; written as
safetensors with their metadata; `model_stats` finds and checks a model's statistics for a run.

    python -m facelab.fuzzy_stats model.pretrained=ddpm64 N=1000 out=facelab/zoo/ddpm64/fuzzy_stats.safetensors
    python -m facelab.fuzzy_stats model.pretrained=DIR source=images source.path=FACES/ N=1000
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor
from tqdm.auto import tqdm

from facelab.diffusion import Denoiser
from facelab.diffusion.projection import (
    STATS_FILE,
    RunningMoments,
    check_depths,
    convention,
    load_stats,
    project_errors,
    save_stats,
)
from facelab.io.errors import InputError
from facelab.models.components.seeding import stream_generator
from facelab.models.pretrained import ZOO_DIR, load_denoiser, model_fingerprint, zoo_names
from facelab.runner import check_seed, resolve_device, stream_number
from facelab.sources import ImageFolderSource, SyntheticSource, build
from facelab.utils import entry_point


def compute_stats(cfg: DictConfig) -> Path:
    """μ_d, σ_d of e_d over cfg.N clean faces (clean_faces); returns the file written. The projection noise is the
    run's `projection` stream (facelab.runner.STREAMS), as method=fuzzy draws it."""
    if cfg.N < 2:
        raise InputError(f"N={cfg.N}: statistics need at least 2 images")
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out}: already exists; not overwriting it (pass overwrite=true or another out=)")
    device = resolve_device(str(cfg.get("device", "auto")))
    gen = stream_generator(check_seed(cfg.seed), device, stream_number("projection"))
    denoiser = load_denoiser(cfg.model.pretrained, device)
    depths = check_depths(cfg.zscore_set, denoiser.schedule.num_train_timesteps)
    resolution = denoiser.unet.config.sample_size
    count, faces, described = clean_faces(cfg, resolution)
    moments = RunningMoments()
    for first in tqdm(range(0, count, cfg.batch_size), desc="projection statistics", disable=not cfg.progress):
        y = faces(first, min(first + cfg.batch_size, count)).to(device)
        moments.update(project_errors(denoiser, y, depths, gen, cfg.projection_offset, cfg.projection_step)[1])
    metadata = {"model": str(cfg.model.pretrained), "model_sha256": model_fingerprint(denoiser),
                "resolution": resolution, **convention(cfg.projection_offset, cfg.projection_step),
                "seed": int(cfg.seed), "faces": described}
    return save_stats(out, moments, depths, metadata, cfg.overwrite)


def clean_faces(cfg: DictConfig, resolution: int) -> tuple[int, Callable[[int, int], Tensor], dict]:
    """(their number, faces(first, stop) -> [n, 3, R, R], their metadata) of the clean faces: the first cfg.N images
    of `source` (source=images source.path=DIR; every image read and size-checked before any projection), else cfg.N
    synthetic training faces from cfg.faces."""
    if cfg.get("source") is None:
        source = SyntheticSource(count=cfg.N, seed=cfg.faces.seed, start=cfg.faces.start)
        synthetic = source.dataset(resolution)
        return (cfg.N, lambda first, stop: torch.stack([synthetic[i]["image"] for i in range(first, stop)]),
                {"dataset": "synthetic", "seed": source.seed, "start": source.start})
    source = build(cfg.source)
    if type(source) is not ImageFolderSource:
        raise InputError(f"source={type(source).__name__}: fuzzy_stats reads an image folder (source=images "
                         "source.path=DIR) or, without source, the synthetic training faces")
    source.count = cfg.N if source.count is None else min(int(source.count), cfg.N)
    images = source.load(resolution).images
    if len(images) < 2:
        raise InputError(f"source.path={source.path}: {len(images)} image(s); statistics need at least 2")
    if len(images) < cfg.N:
        print(f"fuzzy_stats: {len(images)} images in {source.path} (fewer than N={cfg.N}): using all of them")
    return (len(images), lambda first, stop: images[first:stop],
            {"dataset": "images", "path": str(Path(source.path).resolve()), "resize": source.resize})


def model_stats(denoiser: Denoiser, model: str, path: str | Path | None, depths: list[int], offset: bool, step: int,
                N: int | None = None) -> tuple:
    """(μ, σ, metadata) for `depths` from the statistics file `path`, or the zoo model's own (path None), checked
    against the model's weights, resolution and the run's projection convention."""
    model = str(model)
    if path is None:
        if model not in zoo_names():
            raise InputError(f"mode=zscore needs zscore_path=FILE: no shipped statistics for model.pretrained={model}; "
                             f"compute them with `python -m facelab.fuzzy_stats model.pretrained={model}`")
        path = ZOO_DIR / model / STATS_FILE
    return load_stats(Path(path), model_fingerprint(denoiser), denoiser.unet.config.sample_size, model, depths, offset,
                      step, N)


@hydra.main(version_base="1.3", config_path="conf", config_name="fuzzy_stats")
@entry_point
def main(cfg: DictConfig) -> None:
    print(f"wrote {compute_stats(cfg)}")


if __name__ == "__main__":
    main()
