"""Synthetic faces rendered once into shards on disk, then read memory-mapped (data at the speed training eats it).

`SyntheticFaces(..., shards=DIR)` (conf: `data.dataset.shards=DIR`) renders its faces into DIR on first use, split
over `workers` processes, and from then on reads them: the items equal the rendered ones exactly (tested). A shard
holds `SHARD_SIZE` consecutive faces as uint8 .npy arrays (image [n, H, W, 3], labels [n, H, W], attributes
[n, A], skin tone [n]) and their captions (JSON). DIR/faces.json records what was rendered (seed, start, length,
size, priors, renderer version, shard size); a folder holding other faces is refused, naming the first difference.
Shards are written to temporary names and renamed into place, so an interrupted run leaves only whole shards and the
next run renders the rest.
"""
from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from facelab.io.errors import InputError

SHARD_SIZE = 1024
ARRAYS = ("image", "label", "attributes", "skin_tone")


def describe(faces) -> dict:
    """What a SyntheticFaces renders (its shards must have been made from exactly this)."""
    from facelab.data.synthetic import RENDERER_VERSION

    return {"seed": faces.seed, "start": faces.start, "length": faces.length, "size": faces.size,
            "priors": _plain(faces.priors), "renderer_version": RENDERER_VERSION}


def _plain(value):
    """Priors as JSON values (Hydra passes nested configs)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


class Shards:
    """The shards of one SyntheticFaces in `folder`, rendered by `workers` processes where missing."""

    def __init__(self, faces, folder: str | Path, workers: int | None = None, progress: bool = True,
                 shard_size: int = SHARD_SIZE):
        self.folder, self.shard_size = Path(folder), shard_size
        self.count = -(-faces.length // shard_size)
        self._check_or_claim({**describe(faces), "shard_size": shard_size})
        missing = [i for i in range(self.count) if not self._path(i, "captions", ".json").is_file()]
        if missing:
            _render(faces, self.folder, shard_size, missing, workers, progress)
        self._open: dict[int, dict] = {}

    def _check_or_claim(self, wanted: dict) -> None:
        meta = self.folder / "faces.json"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not meta.is_file():
                tmp = meta.with_name(f".faces.json.{os.getpid()}")
                tmp.write_text(json.dumps(wanted, indent=1, sort_keys=True))
                os.replace(tmp, meta)
            found = json.loads(meta.read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"shards={self.folder}: cannot use it ({type(err).__name__}: {err})") from None
        diff = next((k for k in wanted if found.get(k) != wanted[k]), None) if isinstance(found, dict) else "faces"
        if diff:
            raise InputError(f"shards={self.folder} holds other faces ({diff}={found.get(diff)!r}, these have "
                             f"{wanted[diff]!r}): use another folder for these faces")

    def _path(self, shard: int, name: str, suffix: str = ".npy") -> Path:
        return self.folder / f"{shard:05d}.{name}{suffix}"

    def record(self, index: int) -> tuple:
        """(rgb [H, W, 3] uint8, labels [H, W] int64, attributes list, skin tone, caption) of face `index`."""
        shard, row = divmod(index, self.shard_size)
        if shard not in self._open:
            arrays = {name: np.load(self._path(shard, name), mmap_mode="r") for name in ARRAYS}
            arrays["captions"] = json.loads(self._path(shard, "captions", ".json").read_text())
            self._open[shard] = arrays
        a = self._open[shard]
        return (np.array(a["image"][row]), a["label"][row].astype(np.int64), a["attributes"][row].tolist(),
                int(a["skin_tone"][row]), a["captions"][row])

    def __getstate__(self) -> dict:  # DataLoader workers map the files themselves
        return {**self.__dict__, "_open": {}}


def _render(faces, folder: Path, shard_size: int, shards: list[int], workers: int | None, progress: bool) -> None:
    workers = max(1, min(len(shards), workers or os.cpu_count() or 1))
    jobs = [(faces, folder, shard_size, shard) for shard in shards]
    bar = tqdm(total=len(shards), desc=f"rendering {faces.length} faces into {folder}", disable=not progress)
    if workers == 1:
        for job in jobs:
            _render_shard(job)
            bar.update()
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_shard, jobs):
                bar.update()
    bar.close()


def _render_shard(job) -> None:
    from facelab.data.synthetic import ATTRIBUTES, caption, render

    faces, folder, size, shard = job
    indices = range(shard * size, min((shard + 1) * size, faces.length))
    columns = {name: [] for name in (*ARRAYS, "captions")}
    for index in indices:
        face = faces.face(index)
        rgb, label = render(face, faces.size)
        for name, value in zip(columns, (rgb, label.astype(np.uint8), [face.attributes[a] for a in ATTRIBUTES],
                                         face.skin_tone, caption(face))):
            columns[name].append(value)
    tag = f".tmp{os.getpid()}"
    written = []
    for name in ARRAYS:
        path = folder / f"{shard:05d}.{name}{tag}.npy"
        np.save(path, np.asarray(columns[name], np.uint8))
        written.append((path, folder / f"{shard:05d}.{name}.npy"))
    path = folder / f"{shard:05d}.captions{tag}.json"
    path.write_text(json.dumps(columns["captions"]))
    written.append((path, folder / f"{shard:05d}.captions.json"))  # last: its presence marks a whole shard
    for tmp, final in written:
        os.replace(tmp, final)
