"""method=fuzzy's files, named as the reference's: per input `name`, each picture as {folder}/{name}.png (clean,
degradation_mask, gt_image, mask_used, gt_masked, mask_nolambda, inpainted), the projections as
{projected,err,errzscore}/{name}_{depth:04d}.png and the float results as maps/{name}.npz; with their gallery rows.
"""
from __future__ import annotations

import numpy as np
from torch import Tensor

# maps/{name}.npz keys of the per-image float results (plus m_applied_dt{Δt}: the per-step weight of a step Δt)
NPZ_KEYS = {"m": "m", "anomaly": "A", "errzscore": "zhat", "err": "err", "degradation": "degradation"}


class FuzzyOutputs:
    """Writes a run's batches through its runner (Runner.save_images, its gallery sections `images` and, with
    projection depths, `projections`) and collects the overview grid's tiles: per input (clean,) input, keep map
    (1 − A with depths), output."""

    def __init__(self, runner, depths: list[int]):
        self.runner, self.depths = runner, depths
        self.rows = {"images": runner.gallery.section("images"),
                     "projections": runner.gallery.section("projections") if depths else None}
        self.grid: list[Tensor] = []

    def write(self, names: list[str], batch: dict[str, Tensor]) -> None:
        """One batch (CPU tensors by the method's keys: clean, gt_image, m, inpainted, and the optional degradation,
        anomaly, projected, err, errzscore, m_applied_dt*)."""
        runner, depths = self.runner, self.depths
        m, y = batch["m"], batch["gt_image"]
        pictures = {"clean": batch["clean"], "degradation_mask": batch["degradation"].float() * 2 - 1} \
            if "degradation" in batch else {}
        pictures.update(gt_image=y, mask_used=m * 2 - 1, gt_masked=m * (y + 1) - 1)
        if depths:
            pictures["mask_nolambda"] = (1 - batch["anomaly"]) * 2 - 1
        pictures["inpainted"] = batch["inpainted"]
        paths = {folder: runner.save_images(images, folder, names=names) for folder, images in pictures.items()}
        self.rows["images"] += [[(folder, paths[folder][i]) for folder in pictures] for i in range(len(names))]
        shown = [key for key in ("clean", "gt_image", "mask_nolambda" if depths else "mask_used", "inpainted")
                 if key in pictures]
        if depths:
            stems = [f"{name}_{d:04d}" for name in names for d in depths]
            projections = {"projected": batch["projected"], "err": batch["err"] / 65025 * 2 - 1,
                           "errzscore": batch["errzscore"] * 2 - 1}
            written = {folder: runner.save_images(images.flatten(0, 1), folder, names=stems)
                       for folder, images in projections.items()}
            self.rows["projections"] += [[(f"{folder} {d}", written[folder][i * len(depths) + k])
                                          for k, d in enumerate(depths) for folder in projections]
                                         for i in range(len(names))]
        (runner.out / "maps").mkdir(exist_ok=True)
        for i, name in enumerate(names):
            with open(runner.out / "maps" / f"{name}.npz", "xb") as file:
                np.savez_compressed(file, depths=np.asarray(depths, dtype=np.int64),
                                    **{NPZ_KEYS.get(key, key): value[i].numpy() for key, value in batch.items()
                                       if key in NPZ_KEYS or key.startswith("m_applied")})
        self.grid += [pictures[key][i].expand_as(y[i]) for i in range(len(names)) for key in shown]
