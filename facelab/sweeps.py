"""Sweep summaries: every multirun tabulates its jobs' overrides, status and metrics in summary.csv and summary.md, and
shows them on a page (index.html: a row per job with a thumbnail, sortable, plots of the key metrics)."""
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
        shared = _shared(overrides, override_keys)
        _write_atomic(sweep_dir / "summary.csv", _csv(rows, ["job", "status", *override_keys, *metric_keys, "error"]))
        varying = [k for k in override_keys if k not in shared]
        _write_atomic(sweep_dir / "summary.md",
                      _markdown(rows, ["job", "status", *varying, *metric_keys, "error"], shared))
        write_page(sweep_dir, records)


def _shared(overrides: list[dict], keys: list[str]) -> dict:
    """The overrides every job has with the same value."""
    return {k: overrides[0][k] for k in keys if all(k in o for o in overrides) and len({o[k] for o in overrides}) == 1}


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


# --- the sweep page ---------------------------------------------------------------------------------------------------
def write_page(folder: Path, records: list[dict] | None = None, title: str | None = None) -> Path:
    """folder/index.html: one row per job (a sweep's records, or job_records) with its overrides, status, key metrics
    (facelab.io.gallery.METRICS), a thumbnail linking to its page and its error line; sortable by any column; plots
    of the key metrics against network calls or a numeric override (facelab.plots.sweep_plots)."""
    from facelab.io import gallery as g
    from facelab.plots import sweep_plots

    folder = Path(folder)
    records = job_records(folder) if records is None else records
    overrides = [dict(o.partition("=")[::2] for o in r["overrides"]) for r in records]
    keys = _keys(overrides)
    shared = _shared(overrides, keys)
    varying = [k for k in keys if k not in shared]
    flats = [g.flatten(g.read_json(folder / r["dir"] / "metrics.json") or {}) for r in records]
    metric_keys = _keys([g.key_metrics(flat) for flat in flats])
    finished = [flat for flat in flats if flat]
    constant = {k: finished[0].get(k) for k in metric_keys if len(finished) > 1
                and len({json.dumps(flat.get(k)) for flat in finished}) == 1}  # the same in every finished job
    metric_keys = [k for k in metric_keys if k not in constant]
    head = ["job", "status", *varying, "images", *metric_keys, "error"]
    rows = []
    for record, o, flat in zip(records, overrides, flats):
        job = folder / record["dir"]
        page = job / g.PAGE
        link = g.href(Path(record["dir"]) / g.PAGE)
        name = f"<a href='{link}'>{g.esc(record['job'])}</a>" if page.is_file() else g.esc(record["job"])
        thumb = _thumbnail(job)
        image = (f"<a href='{link if page.is_file() else g.href(thumb.relative_to(folder))}'><img class=thumb "
                 f"alt='{g.esc(record['dir'])}' src='{g.href(thumb.relative_to(folder))}'></a>") if thumb else ""
        cells = [f"<td data-v='{_job_number(record['job'])}'>{name}</td>",
                 f"<td class='{g.esc(record['status'])}'>{g.esc(record['status'])}</td>",
                 *(f"<td>{g.esc(o.get(k, ''))}</td>" for k in varying), f"<td>{image}</td>"]
        for key in metric_keys:
            value, spec = flat.get(key), (g.known(key) or ("", "", ".4g"))[2]
            text = "" if value is None else g.esc(g.fmt(value, spec))
            cells.append(f"<td class=n data-v='{g.sort_value(value)}'>{text}</td>")
        cells.append(f"<td class=failed>{g.esc(record.get('error', ''))}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    units = {k: " ".join(filter(None, [g.known(k)[0], g.better_html(g.known(k)[1])])) for k in metric_keys}
    header = "".join(f"<th>{g.esc(h)}{f'<br><small>{g.esc(units[h])}</small>' if units.get(h) else ''}</th>"
                     for h in head)
    counts = {s: sum(r["status"] == s for r in records) for s in dict.fromkeys(r["status"] for r in records)}
    parts = [f"<h1>{g.esc(title or 'facelab sweep')}</h1>",
             f"<p class=sub>{g.esc(folder.name)} · {len(records)} jobs: "
             f"{g.esc(', '.join(f'{n} {s}' for s, n in counts.items()))}</p>"]
    if shared:
        parts.append(f"<p>Shared overrides: <code>{g.esc(' '.join(f'{k}={v}' for k, v in shared.items()))}</code></p>")
    parts.append("<h2>Jobs</h2><p class=muted>Click a column header to sort.</p><div style='overflow-x:auto'>"
                 f"<table class='data jobs'><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody>"
                 "</table></div>")
    if constant:
        same = "".join(f"<tr><td><code>{g.esc(k)}</code></td><td class=n>{g.esc(g.fmt(v, g.known(k)[2]))}</td></tr>"
                       for k, v in constant.items())
        parts.append(f"<details><summary>Key metrics the same in every job ({len(constant)})</summary>"
                     f"<table class=data><tbody>{same}</tbody></table></details>")
    done = [{**o, **flat} for r, o, flat in zip(records, overrides, flats) if flat]
    try:
        plots = sweep_plots(done, varying, metric_keys) if len(done) > 1 else []
    except ImportError:  # no matplotlib: a page without plots
        plots = []
    if plots:
        parts.append("<h2>Plots</h2>" + "".join(f"<img class=plot alt='{g.esc(t)}' src='{g.data_uri(png)}'>"
                                                for t, png in plots))
    parts.append("<p class=muted>Rebuild this page: <code>python -m facelab.gallery SWEEP_FOLDER</code></p>")
    return g.write_page(folder / g.PAGE, title or "facelab sweep", "\n".join(parts))


def job_records(folder: Path) -> list[dict]:
    """A sweep's job records (.jobs/), or else one per run folder below `folder` (a study's cells, at most two levels
    down): status from metrics.json, overrides from Hydra's record or the cell's cell.json."""
    from facelab.io.gallery import run_overrides

    folder = Path(folder)
    if (folder / RECORDS).is_dir():
        return sorted((json.loads(p.read_text()) for p in (folder / RECORDS).glob("*.json")), key=lambda r: r["job"])
    runs = sorted({p.parent for pattern in ("*/config.yaml", "*/*/config.yaml") for p in folder.glob(pattern)})
    return [{"job": os.path.relpath(run, folder), "dir": os.path.relpath(run, folder),
             "status": "completed" if (run / "metrics.json").is_file() else "unfinished",
             "overrides": run_overrides(run) or [], "error": ""} for run in runs]


def _thumbnail(job: Path) -> Path | None:
    """The job's overview image: grid.png, or the first grid of its gallery.json, or its first image."""
    if (job / "grid.png").is_file():
        return job / "grid.png"
    from facelab.io.gallery import DESCRIPTION, read_json

    described = read_json(job / DESCRIPTION)
    for section in described.get("sections", []) if described else []:
        if "grid" in section and (job / section["grid"]["path"]).is_file():
            return job / section["grid"]["path"]
    return next(iter(sorted(job.glob("*.png"))), None) if job.is_dir() else None


def _job_number(job) -> str:
    try:
        return repr(float(job))
    except (TypeError, ValueError):
        return "NaN"
