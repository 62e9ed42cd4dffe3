"""Sampling entry point: `python -m facelab.sample method=ddim num_samples=16 sampler.steps=50`."""
from __future__ import annotations

import json
import shutil
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


def run_cell(out: Path, overrides: list[str]) -> dict:
    """`run_sample` for studies of many runs (experiments/): a finished run in `out` with the same overrides (its
    cell.json) is read back, an unfinished one starts over, and one finished with other overrides is an error."""
    from facelab.utils import compose_config

    record = out / "cell.json"
    if (out / "metrics.json").is_file() and record.is_file():
        earlier = json.loads(record.read_text())["overrides"]
        if earlier != overrides:
            raise SystemExit(f"{out} was run with other settings ({' '.join(earlier)}); use another --runs folder")
        return json.loads((out / "metrics.json").read_text())
    shutil.rmtree(out, ignore_errors=True)  # an interrupted run of an earlier invocation
    metrics = run_sample(compose_config("sample", overrides, out))
    record.write_text(json.dumps({"overrides": overrides}, indent=2))
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
@entry_point
def main(cfg: DictConfig) -> None:
    run_sample(cfg)


if __name__ == "__main__":
    main()
