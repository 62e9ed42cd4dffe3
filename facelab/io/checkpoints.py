"""Checkpoint loading that never executes pickled code."""
from __future__ import annotations

import json
import pickle
import re
import struct
from pathlib import Path

import torch

from facelab.io.errors import InputError


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return False
        size = struct.unpack("<Q", head)[0]
        if not 2 <= size <= 100_000_000:
            return False
        try:
            return isinstance(json.loads(f.read(size)), dict)
        except ValueError:
            return False


def _reason(err: BaseException) -> str:
    """The one informative line of a torch.load error (its messages run to a page)."""
    text = str(err)
    unsupported = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", text)
    if unsupported:
        return f"it needs code to load ({unsupported.group(1)}), which is never run"
    after = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if after:
        return after.group(1).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def load_checkpoint(path: str | Path) -> dict:
    """Load a torch/Lightning checkpoint with `weights_only=True`; anything that needs arbitrary code is refused.

    `weights_only=True` is passed explicitly, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 cannot turn it off. Empty,
    truncated, safetensors and other non-checkpoint files are refused with one line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: not a readable checkpoint (the file is empty)")
    if _is_safetensors(path):
        raise InputError(f"{path}: not a torch checkpoint (it is a safetensors file of plain tensors)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise InputError(f"{path}: refused to load, it is not a plain weights file ({_reason(err)})") from None
    except (RuntimeError, EOFError, KeyError, ValueError, IndexError, TypeError, AttributeError,
            struct.error, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a readable checkpoint, truncated or not a torch file ({_reason(err)})") from None


def write_model_index(folder: str | Path, pipeline: str | None = None, extra: dict | None = None) -> Path:
    """Write `folder`/model_index.json so diffusers' `DiffusionPipeline.from_pretrained(folder)` finds its parts.

    Every sub-folder with a diffusers config (config.json or scheduler_config.json whose `_class_name` is a diffusers
    class) becomes a component ["diffusers", class] (an attribute-conditional UNet: facelab's AttributeUNet2DModel);
    other sub-folders (facelab's own models) are left out; `extra` adds or replaces components. `pipeline` defaults
    to DDPMPipeline for a unet/ + scheduler/ folder, else DiffusionPipeline. An existing model_index.json is kept.
    """
    import diffusers

    folder = Path(folder)
    target = folder / "model_index.json"
    if target.is_file():
        return target
    components: dict[str, list] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        for name in ("config.json", "scheduler_config.json"):
            config = sub / name
            if config.is_file():
                class_name = json.loads(config.read_text()).get("_class_name")
                if name == "config.json" and json.loads(config.read_text()).get("attributes"):
                    components[sub.name] = ["facelab.models.pretrained", "AttributeUNet2DModel"]
                elif class_name and hasattr(diffusers, class_name):
                    components[sub.name] = ["diffusers", class_name]
                break
    components.update(extra or {})
    if pipeline is None:
        pipeline = "DDPMPipeline" if set(components) == {"unet", "scheduler"} else "DiffusionPipeline"
    index = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__, **components}
    target.write_text(json.dumps(index, indent=2) + "\n")
    return target
