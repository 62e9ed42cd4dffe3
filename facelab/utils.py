"""Small helpers shared by the entry points."""
from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

from facelab.io.errors import InputError

log = logging.getLogger("facelab")


def entry_point(fn):
    """Turn bad-input errors raised inside an entry point into one clear line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (InputError, FileNotFoundError, FileExistsError) as err:
            print(f"facelab: error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def resolve_checkpoint(path: str | None) -> str | None:
    """A resume checkpoint path, checked to exist."""
    if path in (None, "", "null"):
        return None
    if not Path(path).is_file():
        raise InputError(f"ckpt_path={path}: no such checkpoint file")
    return str(path)
