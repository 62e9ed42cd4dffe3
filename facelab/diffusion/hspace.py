"""h-space access: capture or replace a diffusers UNet's bottleneck activation through forward hooks.

Locations: `after` = output of `unet.mid_block` (the paper h-space; 512×8×8 for the 256 px CelebA-HQ DDPM),
`before` = hidden states leaving the last down block (skip connections untouched), `middle` = inside the
second mid ResNet, the output of its norm2 (before SiLU → conv2).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

from torch import Tensor, nn

WHERE = ("after", "before", "middle")


def h_module(unet: nn.Module, where: str = "after") -> nn.Module:
    """The module whose output is h at `where`."""
    unet = getattr(unet, "unet", unet)  # accept a Denoiser
    if where == "after":
        return unet.mid_block
    if where == "before":
        return unet.down_blocks[-1]
    if where == "middle":
        return unet.mid_block.resnets[1].norm2
    raise ValueError(f"h-space location {where!r}; use one of {WHERE}")


@contextmanager
def hspace(unet: nn.Module, where: str = "after", capture: bool | list | None = None,
           edit: Callable[[Tensor], Tensor] | None = None, detach: bool = True):
    """Within the block, every UNet call records and/or edits h at `where`.

    capture: True (a new list) or a list to append h to, the un-edited value, detached unless
    `detach=False` (then gradients flow). edit: `fn(h) -> h_new` replaces h for the rest of the network.
    Yields the capture list (or None). The hook is removed on exit, also on exceptions.
    """
    store = capture if isinstance(capture, list) else ([] if capture else None)

    def hook(module, args, output):
        h, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, None)
        if store is not None:
            store.append(h.detach() if detach else h)
        if edit is None:
            return None
        h = edit(h)
        return h if rest is None else (h, *rest)

    handle = h_module(unet, where).register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()
