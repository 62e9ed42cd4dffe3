"""Sweep summaries: every multirun tabulates its jobs' overrides, status and metrics in summary.csv and summary.md."""
from __future__ import annotations

import csv
import fcntl
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger("facelab")
RECORDS = ".jobs"  # <sweep dir>/.jobs/<job num>.json: one record per job


class SweepSummary(Callback):
    """Record each job of a multirun and keep `summary.csv` / `summary.md` in the sweep directory up to date.

    A job records itself from its own process, whatever the launcher: `running` when it starts, then `completed` or
    `failed` (with the error, from its JobReturn status) when it ends, and rewrites the summary. So results are never
    lost: not when a job fails (Hydra then stops the multirun before `on_multirun_end`), not when one is killed (it
    stays `running`), not when jobs run in parallel on a cluster.
    """

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        _record(config, "running")

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value  # the property would raise it
            _record(config, "failed", f"{type(error).__name__}: {error}")
        else:
            _record(config, "completed")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if (sweep_dir / RECORDS).is_dir():
            write_summary(sweep_dir)
            log.info(f"Sweep summary: {sweep_dir / 'summary.md'}")


def _record(config: DictConfig, status: str, error: str = "") -> None:
    """Write this job's record and refresh the summary (once per job: launcher task 0 only)."""
    if config.hydra.mode != RunMode.MULTIRUN or _launcher_rank() != 0:
        return
    sweep_dir = Path(config.hydra.sweep.dir)
    job_dir = Path(config.hydra.runtime.output_dir)
    record = {"job": config.hydra.job.num, "status": status, "overrides": list(config.hydra.overrides.task),
              "dir": os.path.relpath(job_dir, sweep_dir), "error": error.strip().splitlines()[0] if error else ""}
    _write_atomic(sweep_dir / RECORDS / f"{record['job']}.json", json.dumps(record, indent=2))
    write_summary(sweep_dir)


def _launcher_rank() -> int:
    """Rank of this process among the tasks a submitit launcher started for one job (0 for other launchers)."""
    return int(os.environ.get("SLURM_PROCID") or os.environ.get("SUBMITIT_LOCAL_GLOBALID") or 0)


def write_summary(sweep_dir: Path) -> None:
    """Tabulate the job records of `sweep_dir` with their metrics.json into summary.csv and summary.md.

    Columns: job, status, one per override key, one per metric (metrics/<name> where an override has its name),
    error. The markdown table leaves out the overrides every job shares and lists them above it instead.
    """
    with open(sweep_dir / RECORDS / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel jobs each rewrite the tables
        records = sorted((json.loads(p.read_text()) for p in (sweep_dir / RECORDS).glob("*.json")),
                         key=lambda r: r["job"])
        overrides = [dict(o.partition("=")[::2] for o in r["overrides"]) for r in records]
        override_keys = _keys(overrides)
        metrics = [{f"metrics/{k}" if k in override_keys else k: v
                    for k, v in _metrics(sweep_dir / r["dir"] / "metrics.json").items()} for r in records]
        metric_keys = _keys(metrics)
        rows = [{"job": r["job"], "status": r["status"], **o, **m, "error": r["error"]}
                for r, o, m in zip(records, overrides, metrics)]
        shared = {k: overrides[0][k] for k in override_keys
                  if all(k in o for o in overrides) and len({o[k] for o in overrides}) == 1}
        _write_atomic(sweep_dir / "summary.csv", _csv(rows, ["job", "status", *override_keys, *metric_keys, "error"]))
        varying = [k for k in override_keys if k not in shared]
        _write_atomic(sweep_dir / "summary.md",
                      _markdown(rows, ["job", "status", *varying, *metric_keys, "error"], shared))


def _keys(dicts: list[dict]) -> list[str]:
    return list(dict.fromkeys(key for d in dicts for key in d))


def _metrics(path: Path) -> dict:
    """metrics.json flattened to one level (nested keys joined by /); {} if the job wrote none."""
    return _flatten(json.loads(path.read_text())) if path.is_file() else {}


def _flatten(metrics: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = json.dumps(value) if isinstance(value, list) else value
    return flat


def _csv(rows: list[dict], columns: list[str]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, columns)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def _markdown(rows: list[dict], columns: list[str], shared: dict) -> str:
    def cell(value: Any) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)
        return text.replace("|", "\\|")

    lines = [f"Shared overrides: `{' '.join(f'{k}={v}' for k, v in shared.items())}`", ""] if shared else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
