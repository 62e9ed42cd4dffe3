"""A cache of UNets fine-tuned on one face (facelab.diffusion.tuning) with their stage-1 embedding, in safetensors.

One file per (face, modality, settings): <folder>/<face>.<modality>.<settings tag>.safetensors, written once. Its
metadata is its fingerprint (the face's sha256, the base model's fingerprint, the settings); a file of that name made
from another face or base model is refused with one line.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from facelab.io.errors import InputError
from facelab.runner import write_atomic

CACHE_FORMAT = "facelab.codiff_edit/1"


def face_hash(image: Tensor) -> str:
    """sha256 of the face as 8-bit pixels (what a saved PNG of it holds)."""
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).contiguous()
    return hashlib.sha256(repr(tuple(pixels.shape)).encode() + pixels.numpy().tobytes()).hexdigest()


def describe(value) -> str:
    """A short record of a condition value (a caption, else a label map's sha256)."""
    if isinstance(value, str):
        return value
    return "label map sha256 " + hashlib.sha256(value.cpu().numpy().tobytes()).hexdigest()[:12]


class TunedCache:
    """Fine-tuned UNets and their e_opt, one safetensors file per (face, modality, settings), written once.

    folder None keeps nothing; settings: what the tuning depends on besides the face and the base model (its seed
    too); base: modality -> the base model's fingerprint; key: the option named in errors."""

    def __init__(self, folder: str | None, settings: dict, base: dict[str, str], key: str = "method.cache"):
        self.folder = None if folder is None else Path(folder)
        self.settings, self.base, self.key = settings, base, key
        self.tag = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:10]

    def path(self, face: str, modality: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{face}.{modality}.{self.tag}.safetensors"

    def check(self, face: str, digest: str, modality: str) -> bool:
        """Whether a usable file exists; InputError (one line) if the file of that name is another face's or model's."""
        path = self.path(face, modality)
        if path is None or not path.is_file():
            return False
        try:
            with safe_open(str(path), "pt") as file:
                meta = file.metadata() or {}
        except Exception as err:  # a damaged or foreign file
            raise InputError(f"{self.key}: {path} is not a readable safetensors file ({type(err).__name__}); "
                             "delete it") from None
        for key, wanted, what in (("face_sha256", digest, "another face"),
                                  ("base_fingerprint", self.base[modality], "another base model")):
            if meta.get(key) != wanted:
                raise InputError(f"{self.key}: {path} was fine-tuned from {what} ({key} "
                                 f"{str(meta.get(key))[:12]} ≠ {wanted[:12]}); delete it or set {self.key} to "
                                 "another folder")
        return True

    def load(self, face: str, modality: str, device) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(e_opt, attention mask, the UNet's tuned weights) of a file that `check` passed."""
        stored = load_file(str(self.path(face, modality)))
        weights = {k[len("unet."):]: v for k, v in stored.items() if k.startswith("unet.")}
        return stored["e_opt"].to(device), stored["attention_mask"].to(device), weights

    def save(self, face: str, digest: str, modality: str, weights: dict[str, Tensor], e_opt: Tensor, e_init: Tensor,
             attention: Tensor, init) -> Path | None:
        """Write the file once (None when the cache keeps nothing); `init`: the condition stage 1 started from."""
        path = self.path(face, modality)
        if path is None:
            return None
        meta = {"format": CACHE_FORMAT, "face_sha256": digest, "base_fingerprint": self.base[modality],
                "modality": modality, "settings": json.dumps(self.settings, sort_keys=True),
                "stage1_init": describe(init)}
        tensors = {"e_opt": e_opt, "e_init": e_init, "attention_mask": attention,
                   **{f"unet.{k}": v for k, v in weights.items()}}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), overwrite=False)
