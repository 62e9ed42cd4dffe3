"""Small helpers shared by the entry points."""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from facelab.io.errors import InputError

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR / "conf"  # the Hydra configs ship inside the package; the repository's conf/ links here
ROOT = PACKAGE_DIR.parent  # the repository root in a source checkout (site-packages in an installed package)


def _alias(key: str, default=None, *, _root_):
    """`${alias:mask_s,0.07}` in a method config: the top-level key of that name (the original flags), else default."""
    value = OmegaConf.select(_root_, key, default=None)
    return default if value is None else value


# Registered here, by the module every entry point and compose_config import (not only by facelab/__init__.py, which
# Python skips when the working directory holds a facelab/ folder without one, e.g. a FACELAB_ROOT with facelab/zoo).
OmegaConf.register_new_resolver("alias", _alias, replace=True)


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


# --- run directories: one facelab process at a time, never into a finished run ---------------------------------------
LOCK_NAME = ".facelab.lock"
_HELD: dict[Path, int] = {}  # run directories this process holds: their lock file's descriptor


class RunDirRefused(FileExistsError):
    """A run directory that holds a finished run, a running one, or an unfinished run of other settings."""


def claim_run_dir(out: str | Path, overrides: list[str] | None = None) -> bool:
    """Take `out` for this process (True), or find it already held by this process (False); refuse a finished run
    (metrics.json), one another live process holds, and (given the command's `overrides`) an unfinished run of other
    overrides (its .hydra/overrides.yaml) with `RunDirRefused`, changing no file of it.

    The lock is an flock on `out/.facelab.lock`, which holds the holder's pid and host for the message: the kernel
    drops it when the holder dies however it dies, so a stale lock of a dead pid (SIGKILL, power loss) is taken over
    and a recycled pid is never mistaken for a live holder. A lock file this call created is removed when it refuses.
    """
    import atexit
    import fcntl
    import os
    import socket

    out = Path(os.path.abspath(out))
    if out in _HELD:
        return False
    lock = out / LOCK_NAME
    while True:
        try:
            out.mkdir(parents=True, exist_ok=True)
            created = not lock.exists()
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunDirRefused(f"{out}: cannot write there ({err.strerror}: {err.filename}); choose another "
                                "hydra.run.dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").split()
            os.close(fd)
            who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
            raise RunDirRefused(f"{out} is in use by a running facelab process ({who}); wait for it or choose "
                                "another hydra.run.dir") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file while we opened it: lock the new one
    try:
        refusal = _refusal(out, overrides)
    except BaseException:
        _drop(out, fd, created)
        raise
    if refusal:
        _drop(out, fd, created)
        raise RunDirRefused(refusal)
    earlier = os.pread(fd, 200, 0).decode(errors="replace").split()
    if earlier and earlier[0] != str(os.getpid()):
        print(f"facelab: taking over the stale lock of pid {earlier[0]} (no longer running) in {out}", file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    _HELD[out] = fd
    if len(_HELD) == 1:
        atexit.register(_release_all)
    return True


def release_run_dir(out: str | Path) -> None:
    """Give up a run directory `claim_run_dir` took (its lock file is removed)."""
    import os

    out = Path(os.path.abspath(out))
    if out in _HELD:
        _drop(out, _HELD.pop(out), True)


def _drop(out: Path, fd: int, remove: bool) -> None:
    import os

    if remove:  # unlinked while locked: a process that opened the old file sees another inode and retries
        Path(out / LOCK_NAME).unlink(missing_ok=True)
    os.close(fd)


def _release_all() -> None:
    for out in list(_HELD):
        release_run_dir(out)


def _refusal(out: Path, overrides: list[str] | None) -> str | None:
    if (out / "metrics.json").exists():
        return f"{out} already holds a finished run; choose another hydra.run.dir"
    earlier_file = out / ".hydra" / "overrides.yaml"
    if overrides is not None and earlier_file.is_file():
        from omegaconf import OmegaConf

        earlier = [str(o) for o in OmegaConf.load(earlier_file)]
        if sorted(earlier) != sorted(str(o) for o in overrides):
            return (f"{out} holds an unfinished run of other settings ({' '.join(earlier) or 'no overrides'}); rerun "
                    "that command to complete it, or choose another hydra.run.dir")
    return None


class RunDirGuard(Callback):
    """Claims a single run's directory (claim_run_dir) in `on_run_start`, before Hydra writes .hydra/*.yaml and the
    job's log there: a refused run leaves every file of the directory as it was."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            claim_run_dir(Path(str(config.hydra.run.dir)), [str(o) for o in config.hydra.overrides.task])
        except RunDirRefused as err:  # Hydra turns a callback's exceptions into warnings and goes on: exit here
            print(f"facelab: error: {err}", file=sys.stderr)
            sys.exit(2)


def one_line(err: BaseException) -> str:
    """An error and its cause as one line."""
    text = " ".join(str(err).split("Config search path:")[0].split()) or type(err).__name__
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        text += f" ({str(cause).strip().splitlines()[0].strip()})"
    return text


def typed_options(cls, node):
    """A dataclass of a method's options from its config node (cfg.method), resolved; extra keys are ignored."""
    from dataclasses import fields

    from omegaconf import OmegaConf

    values = OmegaConf.to_container(node, resolve=True)
    return cls(**{field.name: values[field.name] for field in fields(cls)})
