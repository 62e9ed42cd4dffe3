"""Training entry point: `python -m facelab.train +experiment=ddpm_synthetic`."""
from __future__ import annotations

import json
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from pytorch_lightning.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from facelab.utils import entry_point, resolve_checkpoint


def run_train(cfg: DictConfig) -> dict[str, float]:
    """Build datamodule, model, callbacks, loggers and trainer from `cfg`, fit, export; return final metrics."""
    pl.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, _convert_="all")
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(model, datamodule=datamodule, ckpt_path=resolve_checkpoint(cfg.get("ckpt_path")))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for logger in loggers:
        if isinstance(logger, WandbLogger):  # finish the run so the next job (multirun) starts its own
            logger.experiment.finish()
    if trainer.is_global_zero:
        if cfg.export and hasattr(model, "export"):
            model.export(out / "diffusers")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@entry_point
def main(cfg: DictConfig) -> float | None:
    metrics = run_train(cfg)
    return metrics.get(cfg.get("optimized_metric", ""))


if __name__ == "__main__":
    main()
