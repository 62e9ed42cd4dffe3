"""Checkpoint loading that never executes pickled code."""
from __future__ import annotations

import json
import pickle
import re
import struct
from pathlib import Path

import torch

from facelab.io.errors import InputError


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return False
        size = struct.unpack("<Q", head)[0]
        if not 2 <= size <= 100_000_000:
            return False
        try:
            return isinstance(json.loads(f.read(size)), dict)
        except ValueError:
            return False


def _reason(err: BaseException) -> str:
    """The one informative line of a torch.load error (its messages run to a page)."""
    text = str(err)
    unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsupported:
        return f"it needs code to load ({unsupported.group(1)}), which is never run"
    after = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if after:
        return after.group(1).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def load_checkpoint(path: str | Path) -> dict:
    """Load a torch/Lightning checkpoint with `weights_only=True`; anything that needs arbitrary code is refused.

    `weights_only=True` is passed explicitly, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 cannot turn it off. Empty,
    truncated, safetensors and other non-checkpoint files are refused with one line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: not a readable checkpoint (the file is empty)")
    if _is_safetensors(path):
        raise InputError(f"{path}: not a torch checkpoint (it is a safetensors file of plain tensors)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise InputError(f"{path}: refused to load, it is not a plain weights file ({_reason(err)})") from None
    except (RuntimeError, EOFError, KeyError, ValueError, IndexError, TypeError, AttributeError,
            struct.error, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a readable checkpoint, truncated or not a torch file ({_reason(err)})") from None
