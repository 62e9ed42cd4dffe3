"""Checks of what a facelab file (directions, statistics, h-space shards) declares: each key present with the right
type, each tensor of the right shape and finite, so that a damaged or foreign file stops with one line naming it."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from facelab.io.errors import InputError

INT = (int,)
NUMBER = (int, float)


def parse_json(path: Path, key: str, text: str | None):
    """A metadata entry decoded from JSON."""
    if text is None:
        raise InputError(f"{path}: metadata entry {key!r} is missing; the file is damaged or not written by facelab")
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        raise InputError(f"{path}: metadata entry {key!r} is not valid JSON; the file is damaged") from None


def require(path: Path, meta: dict, key: str, types: tuple[type, ...], what: str = "") -> object:
    """meta[key], which must exist and be one of `types` (bool is not a number here)."""
    if not isinstance(meta, dict) or key not in meta:
        raise InputError(f"{path}: metadata has no {key!r}; the file is damaged or not written by facelab")
    value = meta[key]
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        expected = what or " or ".join(t.__name__ for t in types)
        raise InputError(f"{path}: metadata {key!r} is {value!r}; expected {expected}")
    return value


def int_list(path: Path, meta: dict, key: str) -> list[int]:
    """meta[key] as a non-empty list of integers."""
    value = require(path, meta, key, (list,), "a list of integers")
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise InputError(f"{path}: metadata {key!r} is {value!r}; expected a non-empty list of integers")
    return value


def tensor(path: Path, tensors: dict[str, Tensor], key: str, dims: int | None = None) -> Tensor:
    """tensors[key], floating point (integers as float32), of `dims` dimensions if given, every value finite."""
    if key not in tensors:
        raise InputError(f"{path}: holds no tensor {key!r}; the file is damaged or not written by facelab")
    x = tensors[key]
    if x.is_complex() or x.dtype == torch.bool:
        raise InputError(f"{path}: tensor {key!r} is {x.dtype}; expected real numbers")
    if dims is not None and x.dim() != dims:
        raise InputError(f"{path}: tensor {key!r} has shape {list(x.shape)}; expected {dims} dimensions")
    x = x if x.is_floating_point() else x.float()
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise InputError(f"{path}: tensor {key!r} has {bad} NaN or infinite values of {x.numel()}; the file is "
                         "damaged (recompute it)")
    return x
