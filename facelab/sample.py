"""Sampling entry point: `python -m facelab.sample method=ddim num_samples=16 sampler.steps=50`."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig

from facelab.runner import run_method
from facelab.utils import RunDirRefused, entry_point, in_sweep, one_line


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


def _resume_command(out: Path) -> str:
    """The command line that completes the run in `out`: this one, into the same directory."""
    args = [a for a in sys.argv[1:] if not a.startswith("hydra.run.dir=")]
    return shlex.join(["python", "-m", "facelab.sample", *args, f"hydra.run.dir={out}"])


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
@entry_point
def _task(cfg: DictConfig) -> None:
    _restore_full_error()  # errors of the run itself: Hydra's own report, as before
    out = Path(cfg.paths.output_dir)
    try:
        run_sample(cfg)
    except KeyboardInterrupt:
        images = sum(1 for p in out.rglob("*.png") if not p.name.startswith("."))
        if in_sweep() or (out / "metrics.json").exists():
            print(f"facelab: interrupted; {images} images are saved in {out}", file=sys.stderr)
        else:
            print(f"facelab: interrupted; {images} images are saved in {out}; to complete the run: "
                  f"{_resume_command(out)}", file=sys.stderr)
        sys.exit(130)
    print(f"page: {out / 'index.html'}")  # the run's page (facelab.io.gallery)


_USER_FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR")


def _restore_full_error() -> None:
    if _USER_FULL_ERROR is None:
        os.environ.pop("HYDRA_FULL_ERROR", None)
    else:
        os.environ["HYDRA_FULL_ERROR"] = _USER_FULL_ERROR


def main() -> None:
    """The CLI: Hydra's `main` with its command-line mistakes (unknown config group option, unknown key, a parse
    error) and a refused run directory (facelab.utils.claim_run_dir) as one line and exit code 2, Ctrl-C as one line
    and exit code 130. HYDRA_FULL_ERROR=1 shows the full tracebacks instead."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises its errors to us instead of printing them and exiting 1
    try:
        _task()
    except (HydraException, RunDirRefused) as err:
        if _USER_FULL_ERROR:
            raise
        print(f"facelab: error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("facelab: interrupted before the run started; nothing was saved", file=sys.stderr)
        sys.exit(130)
    finally:
        _restore_full_error()


if __name__ == "__main__":
    main()
