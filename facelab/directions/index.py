"""The index of sampled trajectories that PCA and supervised directions are computed from: h [N, T, *h] (float16) of
`seeds` and a classifier's P(attribute) of their final images, cached under a key of every input."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from facelab.diffusion import Denoiser, Sampler
from facelab.io.errors import InputError
from facelab.models.classifier import AttributeNet
from facelab.models.pretrained import fingerprint, model_fingerprint

from .trajectory import run_trajectory, seeded_start


def check_heads(classifier: AttributeNet, heads: dict[str, str], name: str, resolution: int) -> None:
    """Refuse an index classifier (`name`) that reads another resolution or lacks a binary head of `heads` ({head: the
    argument that asks for it})."""
    if classifier.image_size != resolution:
        raise InputError(f"method.classifier={name} reads {classifier.image_size} px images, the model makes "
                         f"{resolution} px")
    binary = [head for head, n in classifier.heads.items() if n == 2]  # the heads an index scores
    for head, arg in heads.items():
        if head not in binary:
            raise InputError(f"{arg}: the classifier {name} has no such binary head (known: {', '.join(binary)})")


def index_key(denoiser: Denoiser, sampler: Sampler, where: str, seeds: list[int],
              classifier: AttributeNet | None = None) -> dict:
    """What an index depends on: model weights, h location, the sampler and its grid, the seeds, the classifier."""
    schedule = denoiser.schedule
    return {"model": model_fingerprint(denoiser), "h": where, "grid": sampler.timesteps(schedule),
            "sampler": {**asdict(sampler), "name": sampler.name, "clip": sampler.clips(schedule)},
            "seeds": [seeds[0], len(seeds)], "classifier": classifier and fingerprint(classifier)}


def index_samples(denoiser: Denoiser, sampler: Sampler, where: str, seeds: list[int],
                  batches: Iterable[tuple[int, int]], classifier: AttributeNet | None = None,
                  cache_dir: str | Path | None = None) -> dict[str, Tensor]:
    """{"hs": [N, T, *h] float16, "seeds", "score.<head>": P(class 1) [N] per binary head} of the trajectories of
    `seeds`, decoded in `batches` ((first, size) pairs); read from / written to cache_dir/index_<key>.safetensors."""
    key = index_key(denoiser, sampler, where, seeds, classifier)
    path = None
    if cache_dir is not None:
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"index_{digest}.safetensors"
        if path.is_file():
            return load_file(path)
    hs, scores = [], {}
    for first, n in batches:
        batch = seeds[first:first + n]
        start = seeded_start(denoiser, sampler, [str(s) for s in batch], batch)
        traj = run_trajectory(denoiser, start.x_T, start.noises, sampler, where=where)
        hs.append(traj.hs.half().cpu())
        if classifier is not None:
            for name, p in classifier.predict(traj.x0).items():
                if p.shape[1] == 2:
                    scores.setdefault(name, []).append(p[:, 1].cpu())
    index = {"hs": torch.cat(hs), "seeds": torch.tensor(seeds)}
    index.update({f"score.{k}": torch.cat(v) for k, v in scores.items()})
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(index, path, metadata={"key": json.dumps(key)})
    return index
