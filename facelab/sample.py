"""Sampling entry point: `python -m facelab.sample method=ddim num_samples=16 sampler.steps=50`."""
from __future__ import annotations

import json
from pathlib import Path

import hydra
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from facelab.io.gallery import Gallery
from facelab.utils import entry_point


def run_sample(cfg: DictConfig) -> dict:
    """Run the configured method into the run directory; write metrics.json, config.yaml and index.html."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "metrics.json").exists():
        raise FileExistsError(f"{out} already holds a finished run; choose another hydra.run.dir")
    config_text = OmegaConf.to_yaml(cfg, resolve=True)
    (out / "config.yaml").write_text(config_text)
    gallery = Gallery(out, f"facelab {cfg.method.name}")
    metrics = get_method(cfg.method._target_)(cfg, out, gallery)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    gallery.write(metrics, config_text)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
@entry_point
def main(cfg: DictConfig) -> None:
    run_sample(cfg)


if __name__ == "__main__":
    main()
