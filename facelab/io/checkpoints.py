"""Checkpoint loading that never executes pickled code."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from facelab.io.errors import InputError


def load_checkpoint(path: str | Path) -> dict:
    """Load a torch/Lightning checkpoint with `weights_only=True`; anything that needs arbitrary code is refused."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: refused to load, it is not a plain weights file ({first})") from None
    except (RuntimeError, EOFError) as err:
        raise InputError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
