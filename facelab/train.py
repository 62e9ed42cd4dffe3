"""Training entry point: `python -m facelab.train +experiment=ddpm_synthetic`."""
from __future__ import annotations

import json
import os
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment

from facelab.io.errors import InputError
from facelab.utils import entry_point, in_sweep, resolve_checkpoint


def launcher_plugins() -> list:
    """Let Lightning join the processes a launcher started, one per device.

    SLURM tasks: Lightning's own auto-requeue is off, submitit requeues (the resubmitted job resumes from last.ckpt).
    submitit's local tasks carry no variables Lightning reads: export them as torch.distributed's.
    """
    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    if int(os.environ.get("SUBMITIT_LOCAL_NTASKS", 1)) > 1:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return []


def run_train(cfg: DictConfig) -> dict[str, float]:
    """Build datamodule, model, callbacks, loggers and trainer from `cfg`, fit, export; return final metrics."""
    pl.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, _convert_="all")
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if not loggers:  # logger=none: nothing would receive the learning rate
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                      plugins=launcher_plugins())
    if trainer.world_size > 1 and in_sweep() and not trainer.strategy.cluster_environment.creates_processes_externally:
        raise InputError(f"trainer.devices={cfg.trainer.devices} in a multirun needs a launcher that starts one "
                         "process per device: add hydra/launcher=submitit_local (or slurm)")
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    checkpoints = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath")
    ckpt_path = resolve_checkpoint(cfg.get("ckpt_path"), checkpoints and Path(checkpoints) / "last.ckpt")
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics_file = out / "metrics.json"
    if not metrics and metrics_file.is_file():  # resumed a finished run (late requeue, re-run sweep): keep its record
        metrics = json.loads(metrics_file.read_text())
    for logger in loggers:
        if isinstance(logger, WandbLogger):  # finish the run so the next job (multirun) starts its own
            logger.experiment.finish()
    if trainer.is_global_zero:
        if cfg.export and hasattr(model, "export"):
            model.export(out / model.export_name)
        metrics_file.write_text(json.dumps(metrics, indent=2))
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@entry_point
def main(cfg: DictConfig) -> float | None:
    metrics = run_train(cfg)
    return metrics.get(cfg.get("optimized_metric") or "")


if __name__ == "__main__":
    main()
