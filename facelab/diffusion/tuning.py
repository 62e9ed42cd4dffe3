"""Fitting a conditional latent model to one image (Imagic, Kawar et al. 2023), as plain functions.

Stage 1 (`optimise_embedding`): the condition tokens that make the frozen UNet denoise the image's latent best.
Stage 2 (`tunable_copy` + `fine_tune`): a copy of the UNet trained on the latent under those tokens, whole (full)
or as a low-rank adapter on its attention projections (lora, peft); `tuned_weights` / `load_tuned` store and restore it.
`interpolate`: the conditions e = α·e_tgt + (1 − α)·e_from for a batch of α.
`model` is anything with `.unet` (a diffusers UNet2DConditionModel), `.schedule` and `.device` (a LatentModel).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

STAGE2 = ("full", "lora")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def eps_loss(unet, schedule, z0: Tensor, tokens: Tensor, attention: Tensor, generator: torch.Generator) -> Tensor:
    """ε-MSE of `unet` on the latent z0 at a random t under the condition tokens (batch 1, as the original)."""
    t = torch.randint(0, schedule.num_train_timesteps, (len(z0),), generator=generator, device=generator.device)
    noise = torch.randn(z0.shape, generator=generator, device=generator.device).to(z0)
    z_t = schedule.q_sample(z0, t.to(z0.device), noise)
    out = unet(z_t, t.to(z0.device), encoder_hidden_states=tokens, encoder_attention_mask=attention).sample
    return F.mse_loss(schedule.model_output_to_eps(out, z_t, t.to(z0.device)), noise)


def _fit(parameters: list, loss, lr: float, steps: int) -> None:
    """`steps` Adam steps on `loss()`."""
    optimiser = torch.optim.Adam(parameters, lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            value = loss()
            optimiser.zero_grad()
            value.backward()
            optimiser.step()


def optimise_embedding(model, z0: Tensor, e_init: Tensor, attention: Tensor, lr: float, steps: int,
                       generator: torch.Generator) -> Tensor:
    """Stage 1: e_opt, the condition tokens that make the frozen UNet denoise z0 best, from e_init."""
    e = e_init.clone().requires_grad_(True)
    _fit([e], lambda: eps_loss(model.unet, model.schedule, z0, e, attention, generator), lr, steps)
    return e.detach()


def add_lora(unet, rank: int) -> None:
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS))  # B = 0: starts as the base


def tunable_copy(model, stage2: str = "full", rank: int = 4, generator: torch.Generator | None = None):
    """The UNet stage 2 trains: a copy of the model's, whole (stage2=full) or with a LoRA adapter of `rank` (lora),
    whose A matrices are drawn from `generator` (peft would draw them from the global RNG: not reproducible)."""
    unet = copy.deepcopy(model.unet)
    if stage2 == "lora":
        add_lora(unet, rank)
        with torch.no_grad():
            for name, weight in unet.named_parameters():
                if "lora_A" in name:  # peft's own law, kaiming-uniform with a = √5: U(±1/√fan_in)
                    bound = weight[0].numel() ** -0.5
                    draw = torch.rand(weight.shape, generator=generator, device=generator.device if generator else None)
                    weight.copy_(draw.to(weight) * 2 * bound - bound)
    else:
        unet.requires_grad_(True)
    return unet


def fine_tune(unet, schedule, z0: Tensor, e_opt: Tensor, attention: Tensor, lr: float, steps: int,
              generator: torch.Generator):
    """Stage 2: train `unet` (tunable_copy) on z0 under e_opt; returns it frozen."""
    _fit([p for p in unet.parameters() if p.requires_grad],
         lambda: eps_loss(unet, schedule, z0, e_opt, attention, generator), lr, steps)
    return unet.requires_grad_(False).eval()


def tuned_weights(unet, stage2: str) -> dict:
    """What stage 2 changed: the whole state dict (full) or the adapter's (lora)."""
    if stage2 == "lora":
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(unet)
    return unet.state_dict()


def load_tuned(model, weights: dict, stage2: str, rank: int):
    """A frozen copy of model.unet with `weights` (tuned_weights) loaded."""
    unet = copy.deepcopy(model.unet)
    if stage2 == "lora":
        from peft.utils import set_peft_model_state_dict

        add_lora(unet, rank)
        set_peft_model_state_dict(unet, weights)
    else:
        unet.load_state_dict(weights)
    return unet.to(model.device).requires_grad_(False).eval()


def interpolate(alphas: Tensor, target: tuple[Tensor, Tensor], start: tuple[Tensor, Tensor]) -> dict:
    """The UNet conditions e = α·e_tgt + (1 − α)·e_from for each α (a batch of len(alphas)); target and start are
    (tokens [1, N, D], attention mask [1, N]); the mask is their union."""
    weights = alphas.view(-1, 1, 1)
    return {"encoder_hidden_states": weights * target[0] + (1 - weights) * start[0],
            "encoder_attention_mask": torch.maximum(target[1], start[1]).expand(len(alphas), -1)}


def encode_condition(model, value) -> tuple[Tensor, Tensor]:
    """(tokens [1, N, D], attention mask [1, N]) of one condition value by model.condition: e_tgt, e_init."""
    with torch.no_grad():
        cond = model.condition([value])
    return cond["encoder_hidden_states"], cond["encoder_attention_mask"]
