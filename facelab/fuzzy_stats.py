"""Projection statistics for `method=fuzzy mode=zscore`:

    python -m facelab.fuzzy_stats model.pretrained=ddpm64 N=1000 out=facelab/zoo/ddpm64/fuzzy_stats.safetensors
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from facelab.methods.fuzzy_stats import compute_stats
from facelab.utils import entry_point


@hydra.main(version_base="1.3", config_path="conf", config_name="fuzzy_stats")
@entry_point
def main(cfg: DictConfig) -> None:
    print(f"wrote {compute_stats(cfg)}")


if __name__ == "__main__":
    main()
