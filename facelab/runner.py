"""The runner: everything a method needs that is not the method itself.

A method is `run(cfg, runner) -> metrics`; the runner gives it the device, named random streams, batches with a
progress bar, the configured sampler and guidance terms, network-call counting, clocks, streaming image writes and the
gallery, and writes config.yaml before and metrics.json and index.html after the method.
"""
from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from facelab.diffusion import Sampler, sample
from facelab.diffusion.loop import WATCH
from facelab.io.errors import InputError
from facelab.io.gallery import Gallery
from facelab.io.grids import save_grid
from facelab.io.images import save_image
from facelab.models.components.seeding import keyed_generator, stream_generator

# Random streams by purpose, the one seeding scheme of sampling runs: stream k of seed s is a generator seeded with
# s·1000003 + k (models/components/seeding.py), so a new purpose (a new name here) never shifts another's draws; a
# keyed stream (runner.keyed_generator) also hashes a batch key, so a batch's draws do not depend on the batch size.
# Names are per method where methods differ in what they draw.
STREAMS = {
    "sampling": 0,      # x_T, then the sampler's per-step noise (generate, debias, fuzzy, hextract)
    "projection": 1,    # fuzzy: the projection's ancestral noise (fuzzy_stats too)
    "degradation": 2,   # fuzzy: self-degradation of the inputs
    "codiff.start": 0, "codiff.noise": 1, "codiff.reweight": 2,
    "directions.x_T": 0, "directions.noise": 1,
    "cyclediff.noise": 1, "cyclediff.start": 2, "cyclediff.term": 3,  # keyed by (seed, first face of the batch)
}
SEED_MULTIPLIER = 1000003


def stream_number(stream: str) -> int:
    if stream not in STREAMS:
        raise KeyError(f"unknown random stream {stream!r}; add it to facelab.runner.STREAMS")
    return STREAMS[stream]


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`, checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"device={name}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (device.index or 0) >= count:
            raise InputError(f"device={name}: this machine has {count} CUDA device(s); use device=auto or cpu")
    elif device.type != "cpu":
        raise InputError(f"device={name}: use auto, cpu, cuda or cuda:N")
    return device


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63 // SEED_MULTIPLIER:
        raise InputError(f"seed={seed!r}: use a whole number in [0, {2 ** 63 // SEED_MULTIPLIER})")
    return seed


class CallCounter:
    """Counts every forward of a network (a forward pre-hook), projections and extra guidance passes included:
    `count` forwards, `rows` the batch rows they evaluated (a forward on 4 images is 4 rows; rows / N is the calls
    per image even where forwards take a part of the batch, as fuzzy's projection does)."""

    def __init__(self, module: torch.nn.Module):
        self.count = self.rows = 0
        self._hook = module.register_forward_pre_hook(self._seen)

    def _seen(self, _module, args):
        self.count += 1
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
            self.rows += len(args[0])

    def remove(self) -> None:
        self._hook.remove()


class Runner:
    """One run of a method into `out` (None: nothing is written; a temporary folder holds what a method writes)."""

    def __init__(self, cfg: DictConfig, out: Path):
        self.cfg, self.out = cfg, Path(out)
        self.seed = check_seed(cfg.seed)
        self.device = resolve_device(str(cfg.get("device", "auto")))
        self.progress = bool(cfg.get("progress", True))
        self.gallery = Gallery(self.out, f"facelab {cfg.method.name}")
        self.seconds: dict[str, float] = {}
        self._counters: list[CallCounter] = []

    # --- randomness, batching, timing ------------------------------------------------------------------
    def generator(self, stream: str, device: torch.device | str | None = None) -> torch.Generator:
        """The run's generator of one named stream (STREAMS)."""
        return stream_generator(self.seed, device or self.device, stream_number(stream))

    def keyed_generator(self, stream: str, *key: int, device: torch.device | str | None = None) -> torch.Generator:
        """A generator of (seed, *key, stream): e.g. key = the first item of a batch."""
        return keyed_generator(device or self.device, self.seed, *key, stream_number(stream))

    def batches(self, total: int, batch_size: int | None = None, desc: str = "batches") -> Iterator[tuple[int, int]]:
        """(first index, size) of each batch of `total` items, with a progress bar."""
        size = int(batch_size or self.cfg.batch_size)
        if total < 1 or size < 1:
            raise InputError(f"num_samples={total}, batch_size={size}: both must be at least 1")
        for first in tqdm(range(0, total, size), desc=desc, disable=not self.progress):
            yield first, min(size, total - first)

    def clock(self) -> float:
        """perf_counter after the device's queued work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextmanager
    def timed(self, name: str):
        """Adds the block's seconds to `self.seconds[name]`."""
        start = self.clock()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + self.clock() - start

    def count_calls(self, module: torch.nn.Module) -> CallCounter:
        counter = CallCounter(module)
        self._counters.append(counter)
        return counter

    # --- the configured pieces ---------------------------------------------------------------------------
    def sampler(self) -> Sampler:
        return instantiate(self.cfg.sampler)

    def guidance(self) -> list:
        return [instantiate(term) for term in (self.cfg.get("guidance") or {}).values()]

    def sample(self, model, x_T: torch.Tensor, sampler: Sampler, guidance=(), generator=None, **kwargs):
        """The diffusion loop over the sampler's grid (model.schedule), with this run's progress setting."""
        return sample(model, model.schedule, x_T, sampler=sampler, guidance=guidance, generator=generator,
                      progress=self.progress, **kwargs)

    # --- outputs ---------------------------------------------------------------------------------------------
    def save_images(self, images: torch.Tensor, folder: str, first: int = 0,
                    names: Sequence[str] | None = None) -> list[Path]:
        """Write a batch as it finishes: folder/{first + i:05d}.png, or folder/{names[i]}.png; returns the paths."""
        stems = names if names is not None else [f"{first + i:05d}" for i in range(len(images))]
        return [save_image(image, self.out / folder / f"{stem}.png") for image, stem in zip(images, stems)]

    def grid(self, images: torch.Tensor, name: str, section: str, label: str, **kwargs) -> Path:
        path = save_grid(images, self.out / name, **kwargs)
        self.gallery.section(section).append([(label, path)])
        return path

    def write_csv(self, name: str, rows: Sequence[dict]) -> Path:
        """A new table `name` (e.g. losses.csv): columns = every key of the rows, in order of first appearance."""
        path = self.out / name
        with open(path, "x", newline="") as file:
            writer = csv.DictWriter(file, list(dict.fromkeys(key for row in rows for key in row)))
            writer.writeheader()
            writer.writerows(rows)
        return path

    def close(self) -> None:
        for counter in self._counters:
            counter.remove()
        self._counters.clear()


def run_method(cfg: DictConfig, out: Path) -> dict:
    """Run the configured method into `out`: config.yaml first, metrics.json and index.html after it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "metrics.json").exists():
        raise FileExistsError(f"{out} already holds a finished run; choose another hydra.run.dir")
    config_text = OmegaConf.to_yaml(cfg, resolve=True)
    (out / "config.yaml").write_text(config_text)
    runner = Runner(cfg, out)
    watching = WATCH.set(bool(cfg.get("check_finite", True)))
    try:
        metrics = instantiate({"_target_": cfg.method._target_, "_partial_": True})(cfg, runner)
    finally:
        WATCH.reset(watching)
        runner.close()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    runner.gallery.write(metrics, config_text)
    return metrics
