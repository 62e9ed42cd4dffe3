"""Balancing Act's h-classifiers -> facelab h-classifier folders (format `hclf`; facelab.models.hclassifier).

The release (`gender.pt`, `race.pt`, `age.pt`, ...) is a plain state dict `linears.{k}.weight|bias`: 49 heads
Linear(32768 → 2) on the U-Net's mid-block output h (512×8×8 of the P2-weighting CelebA-HQ 256 ADM, flattened
C, H, W), head k for t = grid[k] on the original's 50-step grid int(linspace(0, 1, 50)·999) = [0, 20, 40, 61, …,
978, 999] (t = 999 has no head: the original guides t ∈ [0, 978]). They become one per_t HNet with those integer t
as keys, written as DEST/config.json + model.safetensors. That grid is facelab's `floored` spacing
(facelab.diffusion.schedule), so every head is used exactly (head_lookup=exact, the default) with
`method=debias method.hclf=DEST sampler.steps=50 sampler.spacing=floored`; the folder records it as meta["sampler"].

Config (a preset, or a YAML with the same keys): `attribute` (the head's name; class 1 is the original's `--male 1`
class), `h_shape`, `grid_steps` and `num_train_timesteps` (the grid above), or `times` (head k's t, explicitly),
`where` (the h location, facelab.diffusion.hspace) and `model` (what h was read from).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from facelab.diffusion.schedule import Schedule
from facelab.io.errors import InputError

_BA = {"h_shape": [512, 8, 8], "grid_steps": 50, "num_train_timesteps": 1000, "where": "after",
       "model": "p2_celebahq"}
PRESETS: dict[str, dict] = {
    "ba_gender": {**_BA, "attribute": "Male"},
    "ba_race": {**_BA, "attribute": "race"},
    "ba_age": {**_BA, "attribute": "age"},
    "ba_eyeglasses": {**_BA, "attribute": "Eyeglasses"},
}
KEY = re.compile(r"linears\.(\d+)\.(weight|bias)")


def detect(state: dict[str, torch.Tensor]) -> bool:
    """A state dict of nothing but `linears.{k}.weight|bias`."""
    return bool(state) and all(KEY.fullmatch(k) for k in state)


def original_grid(steps: int = 50, num_train_timesteps: int = 1000) -> list[int]:
    """The original's increasing grid int(linspace(0, 1, steps)·(T − 1)): facelab's `floored` spacing."""
    return Schedule(num_train_timesteps=num_train_timesteps).timesteps(steps, "floored").tolist()[::-1]


def head_times(config: dict, heads: int) -> list[int]:
    """t of head k: the config's `times`, or the original grid without its last point."""
    if config.get("times") is not None:
        times = [int(t) for t in config["times"]]
    else:
        times = original_grid(int(config.get("grid_steps", 50)), int(config.get("num_train_timesteps", 1000)))[:-1]
    if len(times) != heads:
        raise InputError(f"the checkpoint has {heads} heads (linears.0 … linears.{heads - 1}) but the config's grid "
                         f"has {len(times)} head times ({times[:3]} … {times[-1:]})")
    return times


def heads(state: dict[str, torch.Tensor], config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [n, K, D], bias [n, K]) of heads 0 … n−1, checked against the config's h_shape."""
    if not detect(state):
        other = next((k for k in state if not KEY.fullmatch(k)), None)
        raise InputError(f"not a Balancing Act h-classifier: key {other!r} is not linears.{{k}}.weight|bias")
    count = 1 + max(int(KEY.fullmatch(k).group(1)) for k in state)
    dim = math.prod(config.get("h_shape", _BA["h_shape"]))
    first = state.get("linears.0.weight")
    for k in range(count):
        for part in ("weight", "bias"):
            if f"linears.{k}.{part}" not in state:
                raise InputError(f"linears.{k}.{part} is missing (the heads must be linears.0 … linears.{count - 1})")
        for part, want in (("weight", [len(first), dim]), ("bias", [len(first)])):
            if list(state[f"linears.{k}.{part}"].shape) != want:
                raise InputError(f"linears.{k}.{part} is {list(state[f'linears.{k}.{part}'].shape)} in the file, the "
                                 f"config expects {want} (h_shape {config.get('h_shape', _BA['h_shape'])} flattened)")
    weight = torch.stack([state[f"linears.{k}.weight"] for k in range(count)]).float()
    bias = torch.stack([state[f"linears.{k}.bias"] for k in range(count)]).float()
    return weight, bias


def convert(state: dict[str, torch.Tensor], dest: Path, config: dict, fmt: str) -> None:
    """Write the HNet folder (config.json + model.safetensors) of a Balancing Act h-classifier into `dest`."""
    from facelab.models.hclassifier import HNet, save_hclassifier

    config = {**_BA, **config}
    weight, bias = heads(state, config)
    times = head_times(config, len(weight))
    attribute, classes, dim = str(config.get("attribute", "attribute")), weight.shape[1], weight.shape[2]
    steps, total = int(config["grid_steps"]), int(config["num_train_timesteps"])
    meta = {"model": config["model"], "where": config["where"], "h_shape": list(config["h_shape"]),
            "grid": sorted(original_grid(steps, total), reverse=True) if config.get("times") is None else
            sorted(times, reverse=True), "num_train_timesteps": total, "attributes": {attribute: int(classes)},
            "label_source": "Balancing Act release (converted)", "source": "balancing_act"}
    if config.get("times") is None:  # the sampler grid that reads every head exactly
        meta["sampler"] = {"steps": steps, "spacing": "floored"}
    net = HNet({attribute: int(classes)}, dim, times, "per_t", num_train_timesteps=total, meta=meta)
    net.load_state_dict({"weight": weight, "bias": bias})
    save_hclassifier(net, dest)
