"""Projection statistics for `method=fuzzy mode=zscore`: μ_d, σ_d of the projection error e_d over N clean synthetic
training faces (facelab.diffusion.projection), written as safetensors with their metadata; `model_stats` finds and
checks a model's statistics for a run.

    python -m facelab.fuzzy_stats model.pretrained=ddpm64 N=1000 out=facelab/zoo/ddpm64/fuzzy_stats.safetensors
"""
from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
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
from facelab.sources import SyntheticSource
from facelab.utils import entry_point


def compute_stats(cfg: DictConfig) -> Path:
    """μ_d, σ_d of e_d over cfg.N clean synthetic faces (cfg.faces: seed and first index); returns the file written.
    The projection noise is the run's `projection` stream (facelab.runner.STREAMS), as method=fuzzy draws it."""
    if cfg.N < 2:
        raise InputError(f"N={cfg.N}: statistics need at least 2 images")
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out}: already exists; not overwriting it (pass overwrite=true or another out=)")
    source = SyntheticSource(count=cfg.N, seed=cfg.faces.seed, start=cfg.faces.start)
    source.check()
    device = resolve_device(str(cfg.get("device", "auto")))
    gen = stream_generator(check_seed(cfg.seed), device, stream_number("projection"))
    denoiser = load_denoiser(cfg.model.pretrained, device)
    depths = check_depths(cfg.zscore_set, denoiser.schedule.num_train_timesteps)
    resolution = denoiser.unet.config.sample_size
    faces = source.dataset(resolution)
    moments = RunningMoments()
    for first in tqdm(range(0, cfg.N, cfg.batch_size), desc="projection statistics", disable=not cfg.progress):
        y = torch.stack([faces[i]["image"] for i in range(first, min(first + cfg.batch_size, cfg.N))]).to(device)
        moments.update(project_errors(denoiser, y, depths, gen, cfg.projection_offset, cfg.projection_step)[1])
    metadata = {"model": str(cfg.model.pretrained), "model_sha256": model_fingerprint(denoiser),
                "resolution": resolution, **convention(cfg.projection_offset, cfg.projection_step),
                "seed": int(cfg.seed), "faces": {"dataset": "synthetic", "seed": source.seed, "start": source.start}}
    return save_stats(out, moments, depths, metadata, cfg.overwrite)


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
