"""Generators seeded by a key of integers, for losses whose noise must be a pure function of (seed, rank, step)."""
from __future__ import annotations

import numpy as np
import torch


def keyed_generator(device: torch.device | str, *key: int) -> torch.Generator:
    """A generator on `device` seeded by hashing the integer `key` (e.g. seed, rank, step): exact resume, no global RNG."""
    seed = np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(seed))
