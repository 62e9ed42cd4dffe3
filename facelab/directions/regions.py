"""Face regions for region-masked Jacobian directions: composite names, label maps from a face parser, binary masks."""
from __future__ import annotations

import torch
from torch import Tensor

from facelab.data.synthetic import SEG
from facelab.io.errors import InputError
from facelab.models.parser import ParserNet, load_parser

REGIONS = {  # composite face regions in CelebAMask-HQ classes
    "eye": ["l_eye", "r_eye"], "brow": ["l_brow", "r_brow"], "ear": ["l_ear", "r_ear"],
    "mouth": ["mouth", "u_lip", "l_lip"], "nose": ["nose"], "hair": ["hair"], "skin": ["skin"], "neck": ["neck"],
    "eyeglasses": ["eye_g"],
}


def region_classes(region: str | list[str] | None) -> list[int] | None:
    """The CelebAMask-HQ class indices of `region` (composite names or classes); None without a region."""
    if not region:
        return None
    classes = []
    for name in [region] if isinstance(region, str) else list(region):
        if name not in REGIONS and name not in SEG:
            raise InputError(f"region={name}: unknown; use one of {', '.join(REGIONS)} or a mask class "
                             f"({', '.join(SEG)})")
        classes += [SEG[c] for c in REGIONS.get(name, [name])]
    return classes


def region_parser(name: str | None, device) -> ParserNet:
    """The face parser `method.parser` that labels faces without label maps, checked to use CelebAMask-HQ classes."""
    if not name:
        raise InputError("region masks need label maps: set method.parser=parser64 (segments the face), or use "
                         "method.input=synthetic (ground truth) or input=images with mask_path=DIR")
    parser = load_parser(name, device)
    if unknown := [c for c in parser.classes if c not in SEG]:
        raise InputError(f"method.parser={name}: classes {unknown} are not CelebAMask-HQ classes")
    return parser


def parser_labels(parser: ParserNet, image: Tensor) -> Tensor:
    """The parser's labels [H, W] (CPU) of `image` [C, H, W], renumbered as the ground truth's (SEG); `parse` resizes
    to its own size and back."""
    numbering = torch.tensor([SEG[c] for c in parser.classes])
    return numbering[parser.parse(image[None].clamp(-1, 1))[0].cpu()]


def region_mask(labels: Tensor, classes: list[int], region, origin: str, name: str) -> Tensor:
    """The binary mask [1, H, W] of `classes` in a label map [H, W]; refused when empty (`region`, where the labels
    came from and the face's name go into the message)."""
    mask = torch.isin(labels.cpu(), torch.tensor(classes)).float()[None]
    if not mask.any():
        raise InputError(f"region={region}: {origin} finds no such pixels on {name}; choose another face (seed=...) "
                         "or region")
    return mask
