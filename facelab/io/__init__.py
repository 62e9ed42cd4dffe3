"""Image, mask and keep-mask I/O with one clear error per bad input."""
from facelab.io.errors import InputError
from facelab.io.images import (
    CELEBAMASK_PALETTE,
    colorize_mask,
    read_image,
    read_keep_mask,
    read_mask,
    resize_mask,
    save_image,
    save_mask,
)

__all__ = [
    "CELEBAMASK_PALETTE",
    "InputError",
    "colorize_mask",
    "read_image",
    "read_keep_mask",
    "read_mask",
    "resize_mask",
    "save_image",
    "save_mask",
]
