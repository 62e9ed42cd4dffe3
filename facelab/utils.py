"""Small helpers shared by the entry points."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode

from facelab.io.errors import InputError

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR / "conf"  # the Hydra configs ship inside the package; the repository's conf/ links here
ROOT = PACKAGE_DIR.parent  # the repository root in a source checkout (site-packages in an installed package)


def compose_config(config_name: str, overrides: list[str], run_dir: Path):
    """Compose a primary config as the CLI would, with the run directory at `run_dir`."""
    from hydra import compose, initialize_config_dir

    # paths.root_dir (data/, outputs/cache) is the repository root in a source checkout; an installed package keeps
    # the config's default (FACELAB_ROOT, else the working directory), never site-packages.
    root = [f"paths.root_dir={ROOT}"] if (ROOT / "pyproject.toml").is_file() else []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=[*overrides, f"paths.output_dir={run_dir}", *root])


def in_sweep() -> bool:
    """Whether this process runs a job of a Hydra multirun."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def entry_point(fn):
    """Turn bad-input errors raised inside an entry point into one clear line on stderr and exit code 2.

    In a multirun the error propagates instead, so that Hydra records the job as failed and runs the others.
    """

    bad_input = (InputError, FileNotFoundError, FileExistsError)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (*bad_input, InstantiationException) as err:
            if isinstance(err, InstantiationException):  # raised in a config-built object (e.g. a dataset)
                if not isinstance(err.__cause__, bad_input):
                    raise
                err = err.__cause__
            if in_sweep():
                raise err
            print(f"facelab: error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def resolve_checkpoint(path: str | None, last: Path | None = None) -> str | None:
    """A resume checkpoint path, checked to exist; `auto` is `last` if it exists (a requeued run resumes), else none."""
    if path in (None, "", "null"):
        return None
    if path == "auto":
        return str(last) if last is not None and last.is_file() else None
    if not Path(path).is_file():
        raise InputError(f"ckpt_path={path}: no such checkpoint file")
    return str(path)
