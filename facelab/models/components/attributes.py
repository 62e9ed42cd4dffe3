"""Attribute conditioning for a diffusers UNet2DModel: the attribute vector embedded and added to the time embedding.

`attribute_unet` builds a UNet2DModel with `class_embed_type="identity"` (diffusers adds `class_embedding(class_labels)`
to the time embedding) and installs an `AttributeEmbedding` as that class embedding, so `unet(x, t, class_labels=y)`
takes the attribute vector y directly and the model stays an ordinary UNet2DModel (h-space hooks, EMA, save_pretrained).
The attribute names are recorded in the UNet's config (`attributes`), which is how loaders recognise such a model.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from diffusers import UNet2DModel
from torch import Tensor, nn

from facelab.io.errors import InputError


class AttributeEmbedding(nn.Module):
    """y ∈ {−1, 0, 1}^A (−1 absent, 1 present, 0 unknown: the null label of label dropout) → Linear(A→D) → SiLU
    → Linear(D→D), as the original's Linear(20→512) → SiLU → Linear(512→512). The last layer starts at zero, so a
    fresh embedding leaves the UNet exactly as it was (fine-tuning an unconditional model starts at that model)."""

    def __init__(self, attributes: Sequence[str], dim: int):
        super().__init__()
        self.attributes = list(attributes)
        self.linear_1 = nn.Linear(len(self.attributes), dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear_2.weight)
        nn.init.zeros_(self.linear_2.bias)

    def forward(self, y: Tensor) -> Tensor:
        if y.ndim != 2 or y.shape[1] != len(self.attributes):
            raise InputError(f"attribute vector of shape {list(y.shape)}: the model takes [batch, "
                             f"{len(self.attributes)}] (one entry per attribute: {', '.join(self.attributes)})")
        return self.linear_2(self.act(self.linear_1(y.to(self.linear_1.weight.dtype))))


def attribute_unet(config: Mapping, attributes: Sequence[str] | None = None) -> UNet2DModel:
    """A UNet2DModel from a diffusers config (dict or config.json contents) conditioned on `attributes` (default: the
    config's own `attributes`), with a fresh, zero-output AttributeEmbedding."""
    config = dict(config)
    attributes = list(attributes or config.pop("attributes", None) or [])
    config.pop("attributes", None)
    if not attributes:
        raise InputError("an attribute-conditional UNet needs a non-empty list of attributes")
    unet = UNet2DModel.from_config({**config, "class_embed_type": "identity"})
    unet.class_embedding = AttributeEmbedding(attributes, unet.time_embedding.linear_2.out_features)
    unet.register_to_config(attributes=attributes)
    return unet
