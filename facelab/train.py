"""Training entry point: `python -m facelab.train +experiment=ddpm_synthetic`.

Resuming (`ckpt_path=auto` or a .ckpt) is checked before anything is built: the checkpoint loads with
`weights_only=True` (never code), is a Lightning training checkpoint, and was saved by a run whose config (recorded
in the checkpoint by `facelab.callbacks.RunRecord`) equals this one except for the keys in `SAFE_TO_CHANGE`;
anything else is refused with one line naming the differing keys, unless `resume.force=true`. A finished run
directory (its metrics.json exists) is never overwritten: re-running it is refused; with trainer.max_steps raised
above the steps it finished at, it continues from its own last.ckpt in the same directory, after moving its
metrics.json, export and step checkpoints to `<run dir>/archive/<n>/` (nothing is deleted or overwritten).
Ctrl-C stops training with one line naming the last checkpoint and the command that resumes it (exit 130).
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shlex
import signal
import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment

from facelab.callbacks import RUN_RECORD, RunRecord
from facelab.io.checkpoints import load_checkpoint
from facelab.io.errors import InputError
from facelab.utils import entry_point, in_sweep, resolve_checkpoint

# Config keys (dotted, fnmatch patterns; a pattern also covers the keys under it) that may differ between a checkpoint's
# run and the run resuming it: where things are written, how long to train, on what hardware, what is logged or
# sampled and how often. Every other key (model, data, optimiser, seed, precision, ...) must match.
SAFE_TO_CHANGE = (
    "task_name", "run_name", "ckpt_path", "resume", "export", "optimized_metric", "hparams_search", "paths",
    "logger",
    "trainer.max_steps", "trainer.max_epochs", "trainer.devices", "trainer.num_nodes", "trainer.accelerator",
    "trainer.strategy", "trainer.default_root_dir", "trainer.log_every_n_steps", "trainer.val_check_interval",
    "trainer.check_val_every_n_epoch", "trainer.limit_val_batches", "trainer.num_sanity_val_steps",
    "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "data.num_workers", "data.pin_memory", "data.persistent_workers",
    "callbacks.*.every_n_steps", "callbacks.*.every_n_train_steps", "callbacks.model_checkpoint.dirpath",
    "callbacks.sample_grid", "callbacks.lr_monitor",
)
TRAINING_CHECKPOINT_KEYS = ("state_dict", "global_step", "loops")  # what Trainer.fit(ckpt_path=...) restores
MAX_KEYS_SHOWN = 6
ARCHIVE = "archive"  # <run dir>/archive/<n>/: a finished run's results, kept when it is trained further


class TrainingInterrupted(BaseException):
    """Ctrl-C during training. Not a KeyboardInterrupt, so Lightning tears down quietly and re-raises it."""


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


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def _is_safe(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, p) or fnmatch.fnmatchcase(key, p + ".*") for p in SAFE_TO_CHANGE)


def config_differences(saved: dict, current: dict) -> list[str]:
    """The dotted keys whose values differ between two configs (plain containers), except those SAFE_TO_CHANGE."""
    a, b = _flatten(saved), _flatten(current)
    return sorted(k for k in a.keys() | b.keys() if (k not in a or k not in b or a[k] != b[k]) and not _is_safe(k))


def _some(keys: list[str]) -> str:
    more = f" (+{len(keys) - MAX_KEYS_SHOWN} more)" if len(keys) > MAX_KEYS_SHOWN else ""
    return ", ".join(keys[:MAX_KEYS_SHOWN]) + more


def check_resume(path: str, config: dict, force: bool) -> dict:
    """Load the training checkpoint `path` safely and check it belongs to a run of `config`; return it."""
    ckpt = load_checkpoint(path)
    missing = [k for k in TRAINING_CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise InputError(f"ckpt_path={path}: not a Lightning training checkpoint (no {', '.join(missing)}); to start "
                         "from a model's weights use the model's init_from")
    record = ckpt.get(RUN_RECORD)
    force_hint = "resume.force=true resumes it anyway"
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        if force:
            return ckpt
        raise InputError(f"ckpt_path={path}: the checkpoint carries no facelab run config (not saved by this "
                         f"facelab.train), so it cannot be checked to belong to this run; {force_hint}")
    saved = record["config"]
    was = (saved.get("model") or {}).get("_target_") if isinstance(saved.get("model"), dict) else None
    now = (config.get("model") or {}).get("_target_")
    if was != now and not force:
        raise InputError(f"ckpt_path={path}: a checkpoint of model {was}, not of this run's {now}")
    differing = config_differences(saved, config)
    if differing and not force:
        raise InputError(f"ckpt_path={path}: saved by a run with other settings, differing in {_some(differing)}; "
                         "(facelab.train.SAFE_TO_CHANGE lists what may change on resume); " + force_hint)
    return ckpt


def check_state_dict(model: pl.LightningModule, state: dict, path: str) -> None:
    """Refuse a checkpoint whose weights do not fit `model` (unexpected names or other shapes)."""
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)]
    if unexpected or mismatched:
        what = (f"{len(unexpected)} unknown weights ({_some(unexpected)})" if unexpected else
                f"{len(mismatched)} weights of another shape ({_some(mismatched)})")
        raise InputError(f"ckpt_path={path}: its weights do not fit this model: {what}")


def finished_steps(ckpt: dict) -> int:
    """The step a finished run stopped at: its trainer.max_steps as recorded, at least the checkpoint's step."""
    record = ckpt.get(RUN_RECORD) if isinstance(ckpt.get(RUN_RECORD), dict) else {}
    planned = ((record.get("config") or {}).get("trainer") or {}).get("max_steps")
    return max(int(ckpt["global_step"]), planned if isinstance(planned, int) else 0)


def continues_finished(out: Path, own_last: Path | None, ckpt_path: str | None, ckpt: dict | None,
                       max_steps: int | None) -> bool:
    """Whether this run continues the finished run in `out` (metrics.json exists); refuse anything that would
    overwrite it. Only its own last.ckpt, trained beyond the steps it finished at, may continue there."""
    if not (out / "metrics.json").is_file():
        return False
    own = ckpt is not None and own_last is not None and Path(ckpt_path).resolve() == own_last.resolve()
    done = finished_steps(ckpt) if own else None
    if own and isinstance(max_steps, int) and max_steps > done:
        return True
    more = f" above {done}" if done is not None else ""
    raise InputError(f"{out} holds a finished run (metrics.json exists) and is never overwritten; to train it further "
                     f"raise trainer.max_steps{more} (with ckpt_path=auto it continues there, keeping the finished "
                     f"results under {ARCHIVE}/), or resume its checkpoint into a new run dir")


def archive_finished(out: Path, export_name: str, checkpoint_dir: Path | None) -> Path:
    """Move a finished run's metrics.json, export and step checkpoints (not last.ckpt) to <out>/archive/<n>/."""
    n = 1
    while (out / ARCHIVE / str(n)).exists():
        n += 1
    dest = out / ARCHIVE / str(n)
    (dest / "checkpoints").mkdir(parents=True)
    for path in (out / export_name, out / "metrics.json"):
        if path.exists():
            path.rename(dest / path.name)
    if checkpoint_dir is not None and checkpoint_dir.is_dir():
        for path in checkpoint_dir.glob("*.ckpt"):
            if path.name != "last.ckpt":
                path.rename(dest / "checkpoints" / path.name)
    return dest


@contextlib.contextmanager
def sigint_stops_training():
    """Within the block, Ctrl-C raises TrainingInterrupted (main thread only; elsewhere it is left alone)."""
    def stop(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not interrupt the shutdown
        raise TrainingInterrupted

    try:
        previous = signal.signal(signal.SIGINT, stop)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def interrupted_message(trainer: pl.Trainer, out: Path) -> str:
    """One line: where training stopped, what is saved, and the command that resumes it."""
    callback = trainer.checkpoint_callback
    last = Path(callback.dirpath) / "last.ckpt" if isinstance(callback, ModelCheckpoint) and callback.dirpath else None
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else ["<the same overrides>"]
    overrides = [o for o in overrides if not o.startswith(("ckpt_path=", "run_name=", "hydra.run.dir="))]
    command = " ".join(["python -m facelab.train", *map(shlex.quote, overrides), shlex.quote(f"hydra.run.dir={out}")])
    if last is None or not last.is_file():
        return f"interrupted at step {trainer.global_step}; no checkpoint was saved yet, nothing to resume"
    step = getattr(callback, "_last_global_step_saved", 0)
    saved = f"{last} (step {step})" if step else str(last)
    return f"interrupted at step {trainer.global_step}; saved: {saved}; resume with: {command}"


def run_train(cfg: DictConfig) -> dict[str, float]:
    """Build datamodule, model, callbacks, loggers and trainer from `cfg`, fit, export; return final metrics."""
    out = Path(cfg.paths.output_dir)
    record = OmegaConf.to_container(cfg, resolve=False)
    checkpoints = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath")
    ckpt_path = resolve_checkpoint(cfg.get("ckpt_path"), checkpoints and Path(checkpoints) / "last.ckpt")
    force = bool(OmegaConf.select(cfg, "resume.force", default=False))
    ckpt = check_resume(ckpt_path, record, force) if ckpt_path else None
    own_last = Path(checkpoints) / "last.ckpt" if checkpoints else None
    continuing = continues_finished(out, own_last, ckpt_path, ckpt, OmegaConf.select(cfg, "trainer.max_steps"))
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, _convert_="all")
    if ckpt is not None:
        check_state_dict(model, ckpt["state_dict"], ckpt_path)
        del ckpt
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if not loggers:  # logger=none: nothing would receive the learning rate
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks.append(RunRecord(record))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                      plugins=launcher_plugins())
    if trainer.world_size > 1 and in_sweep() and not trainer.strategy.cluster_environment.creates_processes_externally:
        raise InputError(f"trainer.devices={cfg.trainer.devices} in a multirun needs a launcher that starts one "
                         "process per device: add hydra/launcher=submitit_local (or slurm)")
    if continuing and trainer.is_global_zero:
        archive_finished(out, getattr(model, "export_name", "model"), own_last.parent)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        with sigint_stops_training():
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except TrainingInterrupted:
        raise TrainingInterrupted(interrupted_message(trainer, out)) from None
    except RuntimeError as err:  # resume.force with weights that do not load
        if "Error(s) in loading state_dict" not in str(err):
            raise
        raise InputError(f"ckpt_path={ckpt_path}: {str(err).strip().splitlines()[0]}") from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for logger in loggers:
        if isinstance(logger, WandbLogger):  # finish the run so the next job (multirun) starts its own
            logger.experiment.finish()
    if trainer.is_global_zero:
        if cfg.export and hasattr(model, "export"):
            model.export(out / model.export_name)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))  # written last: marks the run finished
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@entry_point
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = run_train(cfg)
    except TrainingInterrupted as stop:
        print(f"facelab: {stop}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("facelab: interrupted outside training; nothing new was saved", file=sys.stderr)
        sys.exit(130)
    return metrics.get(cfg.get("optimized_metric") or "")


if __name__ == "__main__":
    main()
