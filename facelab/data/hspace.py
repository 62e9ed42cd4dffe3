"""h-space shards: the files method=hextract writes and the h-classifier trains on (data=hspace).

A folder of `shard_NNNNN.safetensors` files, each with `h` [n, T_grid, C, H, W] (rows in grid order, i.e. decreasing
t) and `labels` [n, A] int64, and metadata (json values): `meta` = format (FORMAT), model id and weight fingerprint,
h location and shape, the grid, source, η, sampler, label source, attributes {name: K}, class names; `names` = the
images' names. `ShardWriter` writes them, `HSpaceDataset` reads a folder lazily.
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import Dataset

from facelab.io.errors import InputError

FORMAT = "facelab.hspace/1"


class ShardWriter:
    """Buffers rows and writes `shard_NNNNN.safetensors` files of `shard_size` rows (the last may be shorter)."""

    def __init__(self, folder: Path, meta: dict, shard_size: int, dtype: torch.dtype):
        if shard_size < 1:
            raise InputError(f"method.shard_size={shard_size}: must be at least 1")
        self.folder, self.meta, self.shard_size, self.dtype = Path(folder), meta, shard_size, dtype
        self.h: list[Tensor] = []
        self.rows: list[Tensor] = []
        self.names: list[str] = []
        self.all_labels: list[Tensor] = []
        self.paths: list[Path] = []
        self.count, self.h_shape = 0, None

    def add(self, h: Tensor, labels: Tensor, names: list[str]) -> None:
        if h.shape[1] != len(self.meta["grid"]):
            raise RuntimeError(f"captured {h.shape[1]} h per image for a grid of {len(self.meta['grid'])}")
        self.h_shape = list(h.shape[2:])
        self.h += list(h.to("cpu", self.dtype))
        self.rows += list(labels.cpu().long())
        self.names += names
        while len(self.h) >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        h, labels, names = torch.stack(self.h[:n]), torch.stack(self.rows[:n]), self.names[:n]
        del self.h[:n], self.rows[:n], self.names[:n]
        path = self.folder / f"shard_{len(self.paths):05d}.safetensors"
        self.folder.mkdir(parents=True, exist_ok=True)
        if path.exists():
            raise FileExistsError(f"{path}: already exists; not overwriting it")
        meta = {**self.meta, "h_shape": self.h_shape}
        save_file({"h": h.contiguous(), "labels": labels.contiguous()}, str(path),
                  metadata={"meta": json.dumps(meta), "names": json.dumps(names)})
        self.paths.append(path)
        self.all_labels.append(labels)
        self.count += n

    def close(self) -> list[Path]:
        if self.h:
            self._flush(len(self.h))
        if not self.paths:
            raise InputError("no images to extract h from (num_samples=0?)")
        return self.paths

    @property
    def labels(self) -> Tensor:
        return torch.cat(self.all_labels)


# --- reading ---------------------------------------------------------------------------------------------
def shard_paths(path: str | Path) -> list[Path]:
    """The shards of an h-space folder (or the one file given)."""
    path = Path(path)
    shards = [path] if path.is_file() else sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not shards:
        raise InputError(f"{path}: no h-space shards (*.safetensors); extract them first, e.g. `python -m "
                         f"facelab.sample method=hextract model.pretrained=<model> method.out={path}`")
    return shards


def read_shard_meta(path: Path) -> tuple[dict, int]:
    """(metadata without names, number of rows) of one shard, with a clear error for a foreign file."""
    try:
        with safe_open(str(path), "pt") as file:
            meta = json.loads((file.metadata() or {}).get("meta", "{}"))
            shapes = {key: file.get_slice(key).get_shape() for key in ("h", "labels") if key in file.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f"{path}: not a safetensors file ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{path}: not a facelab h-space shard (format "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    h, labels = shapes.get("h"), shapes.get("labels")
    if h is None or labels is None or len(h) < 2 or len(labels) != 2 or h[0] != labels[0]:
        raise InputError(f"{path}: h {h} and labels {labels} do not fit (expected h [N, T, ...] and labels [N, A]); "
                         "the shard is damaged")
    return meta, h[0]


class HSpaceDataset(Dataset):
    """The rows of a folder of h-space shards: {"h": [T_grid, D] (stored dtype), "labels": [A] int64, "index"}.

    `meta` is the shards' common metadata (they must agree on everything). The folder is scanned on first use (so
    that a missing folder is a plain InputError of the training run, not a config instantiation error) and files are
    opened lazily, per process.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._files: dict[int, object] = {}

    @cached_property
    def _shards(self) -> tuple[list[Path], dict, list[tuple[int, int]]]:
        """(shard paths, common metadata, (shard, row) of every item)."""
        paths, common, rows = shard_paths(self.path), None, []
        for k, shard in enumerate(paths):
            meta, n = read_shard_meta(shard)
            if common is not None and meta != common:
                differ = sorted(key for key in set(meta) | set(common) if meta.get(key) != common.get(key))
                raise InputError(f"{shard}: its metadata ({', '.join(differ)}) differs from {paths[0].name}'s; "
                                 "a folder holds the shards of one extraction")
            common = meta
            rows += [(k, row) for row in range(n)]
        return paths, common, rows

    @property
    def paths(self) -> list[Path]:
        return self._shards[0]

    @property
    def meta(self) -> dict:
        return self._shards[1]

    def __len__(self) -> int:
        return len(self._shards[2])

    def __getitem__(self, i: int) -> dict:
        k, row = self._shards[2][i]
        if k not in self._files:
            self._files[k] = safe_open(str(self.paths[k]), "pt")
        file = self._files[k]
        h = file.get_slice("h")[row:row + 1][0]
        return {"h": h.reshape(len(h), -1), "labels": file.get_slice("labels")[row:row + 1][0], "index": i}

    def __getstate__(self) -> dict:  # open files do not travel to loader workers
        return {**self.__dict__, "_files": {}}
