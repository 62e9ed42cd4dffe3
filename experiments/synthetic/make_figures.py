"""Figures of the synthetic faces for the README: a 64 px grid, label maps, counterfactuals, render speed.

    python experiments/synthetic/make_figures.py
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from facelab.data.synthetic import SyntheticFaces
from facelab.io.grids import save_grid
from facelab.io.images import colorize_mask

HERE = Path(__file__).resolve().parent


def main() -> dict:
    ds = SyntheticFaces(size=64, length=32, seed=0)
    start = time.perf_counter()
    items = [ds[i] for i in range(32)]
    per_face = (time.perf_counter() - start) / 32
    save_grid(torch.stack([it["image"] for it in items]), HERE / "faces_64.png", nrow=8, upscale=2)
    masks = torch.stack([torch.from_numpy(colorize_mask(it["mask"])).permute(2, 0, 1).float() / 127.5 - 1
                         for it in items[:8]])
    save_grid(torch.cat([torch.stack([it["image"] for it in items[:8]]), masks]), HERE / "masks_64.png",
              nrow=8, upscale=2)

    edits = [{}, {"Smiling": 1}, {"Eyeglasses": 1}, {"Bangs": 1}, {"Blond_Hair": 1}, {"Young": 0},
             {"Mouth_Slightly_Open": 1}, {"Wearing_Lipstick": 1}]
    big = SyntheticFaces(size=128, length=64, seed=0)
    rows = [i for i in range(64) if not any(big.face(i).attributes[a] for a in ("Smiling", "Eyeglasses", "Bangs"))
            and big.face(i).attributes["Young"]][:4]
    cells = [big.counterfactual(i, **e)["image"] for i in rows for e in edits]
    save_grid(torch.stack(cells), HERE / "counterfactuals_128.png", nrow=len(edits))
    stats = {"render_ms_per_face_64px": round(per_face * 1000, 1),
             "counterfactual_columns": ["original", *[", ".join(f"{k}={v}" for k, v in e.items()) for e in edits[1:]]]}
    (HERE / "figures.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats, indent=2))
    return stats


if __name__ == "__main__":
    main()
