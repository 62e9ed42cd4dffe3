"""The Python API, for notebooks: the CLI's runs as one call.

    import facelab
    result = facelab.run("fuzzy", mask_s=0.07, num_samples=4, sampler="dpmpp_2m", steps=20)
    result.images        # [N, 3, H, W] in [-1, 1]: the method's main outputs
    result.pil()         # the same as PIL images
    result.metrics       # metrics.json as a dict
    result.maps          # per-image float maps (e.g. fuzzy's m and anomaly maps) by name

Inside `with facelab.keep_models():` each model is loaded once and reused by every later run (a sweep in a loop).

Keyword options are the CLI's overrides (`key=value`); dotted keys go in `overrides=[...]` or as
`**{"method.strength": "per_step"}`; `steps` and `eta` are short for `sampler.steps` and `sampler.eta`. Files are
written only when `out` is given (a new folder); otherwise the run happens in a temporary folder that is read back
into memory and removed.
"""
from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SHORTHANDS = {"steps": "sampler.steps", "eta": "sampler.eta"}
MAIN_OUTPUTS = ("samples", "inpainted", "edits")  # the first of these folders a run wrote holds its main images


@dataclass
class Result:
    images: torch.Tensor                 # [N, 3, H, W] in [-1, 1]
    metrics: dict
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)   # the images' paths relative to the run folder
    folder: Path | None = None           # the run folder (None: nothing was kept)

    def pil(self) -> list[Image.Image]:
        pixels = ((self.images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(p) for p in pixels]


def hydra_value(value) -> str:
    """A Python value as a Hydra override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        text = str(value)
        plain = text and all(c.isalnum() or c in "._/-:+" for c in text)
        return text if plain else "'" + text.replace("'", "\\'") + "'"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Sequence):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    raise TypeError(f"{value!r}: not a config value (use str, number, bool, None, list or dict)")


def to_overrides(method: str, options: Mapping, overrides: Sequence[str] = ()) -> list[str]:
    found = [f"method={method}"]
    for key, value in options.items():
        found.append(f"{SHORTHANDS.get(key, key)}={hydra_value(value)}")
    return [*found, *overrides]


def read_run(folder: Path, metrics: dict) -> Result:
    """The main images, maps and metrics of a finished run folder."""
    main = next((folder / name for name in MAIN_OUTPUTS if (folder / name).is_dir()), None)
    files = sorted(main.rglob("*.png")) if main is not None else []
    files = [f for f in files if f.name.endswith("_x_0.png")] or files  # codiff / ldm: the samples, not the mask
    images = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                          for f in files]).float() / 127.5 - 1 if files else torch.empty(0, 3, 0, 0)
    maps = {}
    for path in sorted((folder / "maps").glob("*.npz")) if (folder / "maps").is_dir() else []:
        with np.load(path) as data:
            maps.update({f"{path.stem}/{key}": data[key] for key in data.files})
    return Result(images, metrics, maps, [str(f.relative_to(folder)) for f in files])


def run(method: str, out: str | Path | None = None, overrides: Sequence[str] = (), **options) -> Result:
    """Run `method` as `python -m facelab.sample method=METHOD key=value ...` would; see the module docstring."""
    from facelab.sample import run_sample
    from facelab.utils import compose_config

    args = to_overrides(method, options, overrides)
    if out is not None:
        folder = Path(out)
        result = read_run(folder, run_sample(compose_config("sample", args, folder)))
        result.folder = folder
        return result
    with tempfile.TemporaryDirectory(prefix="facelab-") as tmp:
        folder = Path(tmp) / "run"
        return read_run(folder, run_sample(compose_config("sample", args, folder)))
