"""Direction files: safetensors with per-timestep unit vectors, their natural scales, and metadata.

Every discovery method (PCA, Jacobian, supervised, conditional) stores directions the same way:
  basis [K, T, *h]  unit vectors per direction k and grid step (t in `timesteps`, decreasing),
  scale [K, T]      the natural length per step (PCA: std along the PC; Jacobian: σ; supervised: ‖mean difference‖),
so that direction k at step t is Δh_t = scale[k, t]·basis[k, τ or t]. Extra tensors (baselines, explained
variance) ride along. The metadata records the model (source and weight fingerprint), the h location, the grid, η,
the method and its parameters, and is checked before a file is applied to another model, location or grid.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from torch import Tensor

from facelab.diffusion.schedule import SPACINGS
from facelab.io.errors import InputError
from facelab.io.metadata import int_list, parse_json, require, tensor

DISCOVERY_METHODS = ("pca", "jacobian", "supervised", "conditional")


@dataclass
class Directions:
    basis: Tensor
    scale: Tensor
    timesteps: list[int]
    meta: dict
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.basis.shape[0]

    def delta(self, index: int, t_idx: int = 0, global_at_idx: bool = False, window: int | None = None,
              apply_svals: bool = True) -> dict[int, Tensor]:
        """Δh_t per grid time for direction `index`: scale[k,t]·basis[k,t] (or basis[k,τ] at every t with
        `global_at_idx`, τ = t_idx); steps farther than `window` from τ are left out (unedited)."""
        if not 0 <= index < len(self):
            raise InputError(f"index={index}: the direction file has {len(self)} directions (0..{len(self) - 1})")
        if not 0 <= t_idx < len(self.timesteps):
            raise InputError(f"t_idx={t_idx}: the grid has {len(self.timesteps)} steps")
        deltas = {}
        for i, t in enumerate(self.timesteps):
            if window is not None and abs(i - t_idx) > window:
                continue
            vector = self.basis[index, t_idx if global_at_idx else i]
            deltas[t] = vector * (self.scale[index, i] if apply_svals else 1.0)
        return deltas

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        path = Path(path)
        if path.exists() and not overwrite:
            raise InputError(f"{path} exists; choose another name (directions are never overwritten)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"basis": self.basis, "scale": self.scale, **{f"extra.{k}": v for k, v in self.extras.items()}}
        meta = {"facelab": "directions", "timesteps": json.dumps(self.timesteps), "meta": json.dumps(self.meta)}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path, metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Directions:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"apply={path}: no such direction file")
        try:
            with safe_open(path, "pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as err:
            raise InputError(f"{path}: not a safetensors direction file ({err})") from None
        if header.get("facelab") != "directions":
            raise InputError(f"{path}: not a facelab direction file (written by method=directions discover=...)")
        timesteps = int_list(path, {"timesteps": parse_json(path, "timesteps", header.get("timesteps"))}, "timesteps")
        meta = require(path, {"meta": parse_json(path, "meta", header.get("meta"))}, "meta", (dict,), "a JSON object")
        for key, types in (("params", (dict,)), ("method", (str,)), ("h_space", (str,)), ("global_at_idx", (bool,)),
                           ("fingerprint", (str,))):
            if key in meta:
                require(path, meta, key, types)
        if meta.get("method", "pca") not in DISCOVERY_METHODS:
            raise InputError(f"{path}: unknown discovery method {meta['method']!r} (expected one of "
                             f"{', '.join(DISCOVERY_METHODS)}); the file is damaged")
        basis, scale = tensor(path, tensors, "basis").float(), tensor(path, tensors, "scale", dims=2).float()
        if basis.dim() < 3 or tuple(scale.shape) != tuple(basis.shape[:2]) or basis.shape[1] != len(timesteps):
            raise InputError(f"{path}: basis {list(basis.shape)}, scale {list(scale.shape)} and {len(timesteps)} "
                             "timesteps do not fit together (expected basis [K, T, *h], scale [K, T]); the file is "
                             "damaged")
        extras = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
        return cls(basis, scale, timesteps, meta, extras)

    def check(self, fingerprint: str, where: str, timesteps: list[int], path: str = "", schedule=None) -> None:
        """Refuse a file made for another model, h location or timestep grid (one clear error each; with the
        model's `schedule`, the fix names the grid's spacing too)."""
        m = self.meta
        if m.get("fingerprint") != fingerprint:
            raise InputError(f"{path}: directions were found on model {m.get('model')} ({m.get('fingerprint')}), "
                             f"not this one ({fingerprint}); rediscover them for this model")
        if m.get("h_space") != where:
            raise InputError(f"{path}: directions live at h_space={m.get('h_space')}, not {where}; "
                             f"set method.h_space={m.get('h_space')}")
        if list(timesteps) != list(self.timesteps):
            steps = len(self.timesteps)
            hint = next((f"sampler.steps={steps} sampler.spacing={spacing}" for spacing in SPACINGS if schedule
                         is not None and schedule.timesteps(steps, spacing=spacing).tolist() == self.timesteps),
                        f"sampler.steps={steps}")
            raise InputError(f"{path}: directions were found on the {steps}-step grid {self.timesteps}, not "
                             f"{list(timesteps)}; set {hint}")
