"""Sampling entry point: `python -m facelab.sample method=ddim num_samples=16 sampler.steps=50`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import hydra
from omegaconf import DictConfig

from facelab.runner import run_method
from facelab.utils import entry_point


def run_sample(cfg: DictConfig) -> dict:
    """Run the configured method into the run directory (facelab.runner.run_method)."""
    return run_method(cfg, Path(cfg.paths.output_dir))


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
