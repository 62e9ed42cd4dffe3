"""The runner: everything a method needs that is not the method itself.

A method is `run(cfg, runner) -> metrics`; the runner gives it the device, named random streams, batches with a
progress bar, the configured sampler and guidance terms, network-call counting, clocks, streaming image writes and the
gallery, and writes config.yaml before and metrics.json and index.html after the method.
"""
from __future__ import annotations

import csv
import functools
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from facelab.diffusion import Sampler, sample
from facelab.diffusion.loop import WATCH, NonFiniteError
from facelab.io.errors import InputError
from facelab.io.gallery import Gallery
from facelab.io.grids import grid_columns, save_grid
from facelab.io.images import read_image, save_image
from facelab.models.components.seeding import keyed_generator, stream_generator
from facelab.utils import LOCK_NAME, RunDirRefused, claim_run_dir, release_run_dir

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
    "codiff_edit.start": 0, "codiff_edit.noise": 1, "codiff_edit.train": 2, "codiff_edit.reweight": 3,  # keyed by face
    "codiff_edit.region": 4,
}
SEED_MULTIPLIER = 1000003
RESUME_DIR = ".resume"  # <run dir>/.resume/<folder>/<first>.pt: the generators' states after a finished batch
# Settings that may differ when an unfinished run is completed (its config.yaml against the new command's).
RESUME_FREE = ("run_name", "progress")


def write_atomic(path: Path, write, overwrite: bool = True) -> Path:
    """`write(tmp)` into a temporary file next to `path`, then rename it to `path`: a crash never leaves a truncated
    `path`. `overwrite=False` refuses an existing `path` (FileExistsError), as save_image does."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # the suffix names the format for PIL
    try:
        write(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic and never replaces
            except FileExistsError:
                raise FileExistsError(f"{path}: already exists; not overwriting it") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


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
        self.resuming = False  # completing an unfinished run in `out` (run_method): its images may be rewritten
        self.kept = False  # batches(resume=...): whether the current batch's images were kept from an earlier try
        self.computed = 0  # batches(resume=...): the batches computed (not kept) so far
        self.batch: tuple[int, int] | None = None  # (first item, size) of the batch being made

    # --- randomness, batching, timing ------------------------------------------------------------------
    def generator(self, stream: str, device: torch.device | str | None = None) -> torch.Generator:
        """The run's generator of one named stream (STREAMS)."""
        return stream_generator(self.seed, device or self.device, stream_number(stream))

    def keyed_generator(self, stream: str, *key: int, device: torch.device | str | None = None) -> torch.Generator:
        """A generator of (seed, *key, stream): e.g. key = the first item of a batch."""
        return keyed_generator(device or self.device, self.seed, *key, stream_number(stream))

    def batches(self, total: int, batch_size: int | None = None, desc: str = "batches", resume: str | None = None,
                generators: Sequence[torch.Generator] = ()) -> Iterator[tuple[int, int]]:
        """(first index, size) of each batch of `total` items, with a progress bar.

        resume=FOLDER (images FOLDER/{index:05d}.png, one per item): after each batch the states of `generators` (all
        the batch drew from) are saved; when an interrupted run is completed, a batch whose images all exist and
        whose states were saved is `kept`: the generators jump to where that batch left them (the stream is the
        uninterrupted run's) and the method reads its images back (read_images) instead of computing them. The last
        batch is always computed, so that guidance terms end in the uninterrupted run's state (e.g. trajectories).
        """
        size = int(batch_size or self.cfg.batch_size)
        if total < 1 or size < 1:
            raise InputError(f"num_samples={total}, batch_size={size}: both must be at least 1")
        for first in tqdm(range(0, total, size), desc=desc, disable=not self.progress):
            n = min(size, total - first)
            state = self.out / RESUME_DIR / str(resume) / f"{first:05d}.pt"
            self.kept = bool(resume and self.resuming and first + n < total and state.is_file()
                             and all((self.out / resume / f"{first + i:05d}.png").is_file() for i in range(n)))
            if self.kept:
                for gen, saved in zip(generators, torch.load(state, weights_only=True)):
                    gen.set_state(saved)
            self.batch = (first, n)
            yield first, n
            if resume and not self.kept:
                self.computed += 1
                write_atomic(state, functools.partial(torch.save, [gen.get_state() for gen in generators]))
        self.kept, self.batch = False, None

    def read_images(self, folder: str, first: int, n: int) -> torch.Tensor:
        """Images folder/{first + i:05d}.png written earlier, [n, 3, H, W] in [-1, 1] (what save_images wrote: the
        8-bit values, so a grid of them is the grid of the computed images)."""
        return torch.stack([read_image(self.out / folder / f"{first + i:05d}.png") for i in range(n)])

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
        try:
            return sample(model, model.schedule, x_T, sampler=sampler, guidance=guidance, generator=generator,
                          progress=self.progress, **kwargs)
        except NonFiniteError as err:  # name the run's items, not rows of the batch
            if self.batch is None or not err.samples:
                raise
            first = self.batch[0]
            items = ", ".join(f"{first + row:05d}" for row in err.samples[:8])
            raise NonFiniteError(f"{err} (item(s) {items}{' ...' if len(err.samples) > 8 else ''}; the images of "
                                 "earlier batches are kept)", [first + row for row in err.samples]) from None

    # --- outputs ---------------------------------------------------------------------------------------------
    def save_images(self, images: torch.Tensor, folder: str, first: int = 0,
                    names: Sequence[str] | None = None) -> list[Path]:
        """Write a batch as it finishes: folder/{first + i:05d}.png, or folder/{names[i]}.png; returns the paths."""
        stems = names if names is not None else [f"{first + i:05d}" for i in range(len(images))]
        return [write_atomic(self.out / folder / f"{stem}.png", lambda tmp, image=image: save_image(image, tmp),
                             overwrite=self.resuming) for image, stem in zip(images, stems)]

    def grid(self, images: torch.Tensor, name: str, section: str, label: str, rows: Sequence | None = None,
             cols: Sequence | None = None, maps: dict | None = None, **kwargs) -> Path:
        """Save a grid (save_grid's **kwargs) and show it in the gallery's `section`, captioned `label`, with its row
        and column labels and map tiles (Gallery.add_grid)."""
        path = write_atomic(self.out / name, lambda tmp: save_grid(images, tmp, **kwargs))
        self.gallery.add_grid(section, path, label, len(images), images.shape[-2:],
                              grid_columns(len(images), kwargs.get("nrow")), kwargs.get("upscale", 1),
                              rows=rows, cols=cols, maps=maps)
        return path

    def write_csv(self, name: str, rows: Sequence[dict]) -> Path:
        """A new table `name` (e.g. losses.csv): columns = every key of the rows, in order of first appearance."""
        def write(tmp: Path) -> None:
            with open(tmp, "x", newline="") as file:
                writer = csv.DictWriter(file, list(dict.fromkeys(key for row in rows for key in row)))
                writer.writeheader()
                writer.writerows(rows)

        return write_atomic(self.out / name, write, overwrite=self.resuming)

    def close(self) -> None:
        for counter in self._counters:
            counter.remove()
        self._counters.clear()


def _outputs(out: Path) -> list[Path]:
    """What a run wrote into `out`, but its bookkeeping (config, Hydra's record and log, lock, resume states)."""
    bookkeeping = {"config.yaml", ".hydra", LOCK_NAME, RESUME_DIR}
    return [p for p in out.iterdir() if p.name not in bookkeeping and p.suffix != ".log"]


def run_method(cfg: DictConfig, out: Path) -> dict:
    """Run the configured method into `out`: config.yaml first, index.html and then metrics.json (the mark of a
    finished run) after it; every file goes temp file -> rename.

    `out` is claimed first (facelab.utils.claim_run_dir: never a finished run, nor one another process runs). An
    unfinished run in `out` (its config.yaml, no metrics.json) is completed if it had the same settings (but
    RESUME_FREE): methods that batch with `runner.batches(resume=...)` (generate) keep its finished batches.
    """
    out = Path(out)
    claimed = claim_run_dir(out)
    try:
        config_text = OmegaConf.to_yaml(cfg, resolve=True)
        resuming = (out / "config.yaml").is_file()
        if resuming:
            earlier, now = OmegaConf.load(out / "config.yaml"), OmegaConf.create(config_text)
            for key in RESUME_FREE:
                earlier.pop(key, None)
                now.pop(key, None)
            if earlier != now:
                raise RunDirRefused(f"{out} holds an unfinished run of other settings (its config.yaml); complete "
                                    "it with its own command or choose another hydra.run.dir")
        if resuming:  # temporary files of a try killed mid-write (we hold the directory: nobody else writes them)
            for tmp in out.rglob(".*.tmp*"):
                tmp.unlink(missing_ok=True)
        write_text_atomic(out / "config.yaml", config_text)
        runner = Runner(cfg, out)
        runner.resuming = resuming
        watching = WATCH.set(bool(cfg.get("check_finite", True)))
        try:
            metrics = instantiate({"_target_": cfg.method._target_, "_partial_": True})(cfg, runner)
        except BaseException:
            if not resuming and not _outputs(out):  # refused before it made anything: leave no unfinished run
                (out / "config.yaml").unlink(missing_ok=True)
            raise
        finally:
            WATCH.reset(watching)
            runner.close()
        runner.gallery.write(metrics, config_text)  # before metrics.json: a run with metrics.json is complete
        write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
        shutil.rmtree(out / RESUME_DIR, ignore_errors=True)
        return metrics
    finally:
        if claimed:
            release_run_dir(out)
