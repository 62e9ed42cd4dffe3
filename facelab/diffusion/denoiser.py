"""The ε-denoiser: one callable `eps = denoiser(x_t, t, cond)` around any diffusers UNet."""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .schedule import Schedule, Time


class Denoiser(nn.Module):
    """Wraps a diffusers `UNet2DModel` / `UNet2DConditionModel` and the `Schedule` it was trained with.

    `forward` returns ε whatever the prediction_type. When the network also predicts a variance
    (out channels = 2 × sample channels), the extra half v is split off and kept in `last_variance`
    (None otherwise), for `learned_range` DDPM steps. An attribute-conditional UNet
    (`facelab.models.components.attributes`) lists its `attributes`; its cond is the attribute vector [B, A],
    and no cond means the null label (all zeros, what label dropout trains).
    """

    def __init__(self, unet: nn.Module, schedule: Schedule):
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.last_variance: Tensor | None = None
        self._cross_attention = "encoder_hidden_states" in inspect.signature(unet.forward).parameters
        self.attributes: list[str] | None = getattr(getattr(unet, "class_embedding", None), "attributes", None)

    def forward(self, x_t: Tensor, t: Time, cond: Tensor | Mapping | None = None) -> Tensor:
        """ε for x_t at time t (int, 0-dim or per-sample [B] tensor).

        cond: a dict of extra UNet keyword arguments (encoder_hidden_states, encoder_attention_mask,
        class_labels, ...), or a tensor: encoder_hidden_states for a cross-attention UNet, else class_labels.
        """
        if cond is None and self.attributes is not None:
            cond = x_t.new_zeros(len(x_t), len(self.attributes))
        if cond is None:
            kwargs = {}
        elif isinstance(cond, Mapping):
            kwargs = dict(cond)
        else:
            kwargs = {"encoder_hidden_states" if self._cross_attention else "class_labels": cond}
        batch = x_t.shape[0]
        if isinstance(t, Tensor):
            t_in = t.to(x_t.device).expand(batch) if t.ndim == 0 else t.to(x_t.device)
        else:
            t_in = torch.full((batch,), int(t), dtype=torch.long, device=x_t.device)
        dtype = next(self.unet.parameters()).dtype
        out = self.unet(x_t.to(dtype), t_in, **kwargs, return_dict=False)[0].to(x_t.dtype)
        channels = x_t.shape[1]
        if out.shape[1] == 2 * channels:
            out, self.last_variance = out[:, :channels], out[:, channels:]
        else:
            self.last_variance = None
        return self.schedule.model_output_to_eps(out, x_t, t)
