"""Seeded generators: by a key of integers, for losses whose noise must be a pure function of (seed, rank, step), and
by a seed and a stream number, one independent stream per purpose of a sampling run."""
from __future__ import annotations

import numpy as np
import torch


def keyed_generator(device: torch.device | str, *key: int) -> torch.Generator:
    """A generator on `device` seeded by hashing the integer `key` (e.g. seed, rank, step): exact resume, no global
    RNG."""
    seed = np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(seed))


def stream_generator(seed: int, device: torch.device | str, stream: int = 0) -> torch.Generator:
    """An independent generator per purpose (`stream`), so adding one random draw never shifts another."""
    return torch.Generator(device).manual_seed(int(seed) * 1000003 + stream)
