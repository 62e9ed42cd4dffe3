"""Tensors from files: .pt/.pth (weights_only), .npy (no pickles) or .safetensors (one tensor)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor

from facelab.io.checkpoints import load_checkpoint
from facelab.io.errors import InputError


def read_tensor(path: str | Path, key: str) -> Tensor:
    """The one tensor a file holds, as float; `key` names the knob in the one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{key}={path}: no such file")
    try:
        if path.suffix == ".npy":
            x = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".safetensors":
            tensors = list(load_file(path).values())
            x = tensors[0] if len(tensors) == 1 else None
        else:
            x = load_checkpoint(path)
    except (OSError, ValueError) as err:  # InputError (a refused pickle) is a ValueError too: keep its message
        raise err if isinstance(err, InputError) else InputError(f"{key}={path}: unreadable ({err})") from None
    if not isinstance(x, Tensor):
        raise InputError(f"{key}={path}: expected one tensor")
    return x.float()


def read_latents(path: str | Path, num: int, shape: tuple[int, ...], key: str = "x_T") -> Tensor:
    """`num` fixed latents of `shape` from a file holding one [*shape] (shared by all) or [≥ num, *shape]."""
    path = Path(path)
    x = read_tensor(path, key)
    x = x.expand(num, *x.shape) if x.ndim == len(shape) else x
    if tuple(x.shape[1:]) != tuple(shape) or len(x) < num:
        dims = ", ".join(map(str, shape))
        raise InputError(f"{key}={path}: shape {list(x.shape)}; the model needs [{num}, {dims}] (or one [{dims}] for "
                         "all samples)")
    return x[:num]
