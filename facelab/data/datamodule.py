"""Lightning data module over any face dataset that yields dicts (synthetic faces or a real layout)."""
from __future__ import annotations

from collections.abc import Mapping

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from facelab.io.errors import InputError


def collate_faces(samples: list[dict]) -> dict:
    """Batch sample dicts: tensors are stacked, numbers become tensors, strings and anything else stay lists."""
    batch = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], (bool, int, float)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


class ResumableSampler(DistributedSampler):
    """DistributedSampler (a shuffle seeded by seed and epoch, split over the ranks) whose next pass skips `start`."""

    start = 0

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        self.start = 0
        return iter(indices)


class ResumableLoader(DataLoader):
    """A training loader that Lightning checkpoints mid-epoch (it has `state_dict`/`load_state_dict`).

    Its state is the number of batches served in the current epoch; a resumed pass skips them, so together with
    Lightning's `set_epoch` a resumed run sees exactly the batches an uninterrupted one does.
    """

    served = 0

    def state_dict(self) -> dict:
        return {"served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.served = state["served"]

    def __iter__(self):
        self.served %= len(self)  # a full count means the last epoch ended: start the next one
        self.sampler.start = self.served * self.batch_size
        for batch in super().__iter__():
            self.served += 1
            yield batch


class FaceDataModule(pl.LightningDataModule):
    """Train/val loaders; without a `val_dataset`, `val_fraction` of `dataset` is held out by a seeded split.

    `dataset` and `val_dataset` are Datasets or Hydra configs with a ``_target_`` (built in `setup`). `batch_size`
    is the global batch: each of the trainer's `world_size` processes loads `batch_size / world_size` of it.
    `resolution` is conf/data's one size knob (`data.resolution=256`: the dataset's `size` and the models' image size
    follow it); the module keeps it as `self.resolution`, the dataset does the resizing.
    """

    def __init__(
        self,
        dataset: Dataset | Mapping,
        val_dataset: Dataset | Mapping | None = None,
        val_fraction: float = 0.05,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        resolution: int | None = None,
    ):
        super().__init__()
        self.resolution = resolution
        if not 0 <= val_fraction < 1:
            raise InputError(f"val_fraction={val_fraction}: must lie in [0, 1)")
        self.dataset_spec, self.val_dataset_spec = dataset, val_dataset
        self.val_fraction, self.seed = val_fraction, seed
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        world = self._world()[1]
        if self.batch_size % world:
            raise InputError(f"data.batch_size={self.batch_size} is the global batch: it must split evenly over the "
                             f"{world} processes (trainer.devices × trainer.num_nodes)")
        if self.train_set is not None:
            return
        rank_zero_info(f"data: global batch {self.batch_size} = {world} × {self.batch_size // world} per process")
        dataset = _build(self.dataset_spec)
        if self.val_dataset_spec is not None:
            self.train_set, self.val_set = dataset, _build(self.val_dataset_spec)
        elif self.val_fraction > 0:
            n_val = max(1, round(len(dataset) * self.val_fraction))
            if n_val >= len(dataset):
                raise InputError(f"val_fraction={self.val_fraction}: leaves no training data out of {len(dataset)}")
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed)).tolist()
            self.train_set, self.val_set = Subset(dataset, order[n_val:]), Subset(dataset, order[:n_val])
        else:
            self.train_set = dataset

    @property
    def attribute_names(self) -> list[str]:
        """The names of the columns of the batches' `attributes` (empty for datasets without attributes)."""
        dataset = self.train_set
        while isinstance(dataset, Subset):
            dataset = dataset.dataset
        return list(getattr(dataset, "attribute_names", []))

    def train_dataloader(self) -> DataLoader:
        rank, world = self._world()
        sampler = ResumableSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return ResumableLoader(self.train_set, sampler=sampler, **self._loader_args())

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else DataLoader(self.val_set, **self._loader_args())

    def _world(self) -> tuple[int, int]:
        """(global rank, world size) of this process; (0, 1) outside a trainer."""
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def _loader_args(self) -> dict:
        return dict(batch_size=self.batch_size // self._world()[1], num_workers=self.num_workers,
                    pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0, collate_fn=collate_faces)


def _build(spec: Dataset | Mapping) -> Dataset:
    return instantiate(spec) if isinstance(spec, Mapping) else spec
