"""Lightning data module over any face dataset that yields dicts (synthetic faces or a real layout)."""
from __future__ import annotations

from collections.abc import Mapping

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset, Subset

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


class FaceDataModule(pl.LightningDataModule):
    """Train/val loaders; without a `val_dataset`, `val_fraction` of `dataset` is held out by a seeded split.

    `dataset` and `val_dataset` are Datasets or Hydra configs with a ``_target_`` (built in `setup`).
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
    ):
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise InputError(f"val_fraction={val_fraction}: must lie in [0, 1)")
        self.dataset_spec, self.val_dataset_spec = dataset, val_dataset
        self.val_fraction, self.seed = val_fraction, seed
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
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

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, shuffle=False)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_faces,
        )


def _build(spec: Dataset | Mapping) -> Dataset:
    return instantiate(spec) if isinstance(spec, Mapping) else spec
