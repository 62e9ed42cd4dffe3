"""Attribute guidance for any unconditional denoiser: an attribute classifier's gradient pushes chosen attributes of
every sample toward given targets (classifier guidance on x̂0, conf/guidance/attribute.yaml).

At every reverse step t → s in the window (hook point 3, GradientGuidance's step), per image
    L = scale·Σ_a CE(r_a, p_a),   CE(r, p) = −Σ_c r_c·log p_c,
with p_a the class probabilities of head a of a clean classifier on x̂0 (decoded first when the model is a latent
model with `decode`; resized to the classifier's input) or of a noise-aware classifier on (x_t, t), and r_a the target
(a probability m of presence for a binary head: r = [1 − m, m], i.e. the BCE toward m; K probabilities for a
categorical head). Then ε' = ε + c·∇_{x_t} L with c the sampler's eps_scale. `through_model` (default: true for a
pixel-space denoiser) differentiates x̂0 through one more network call per step; false holds the loop's ε fixed (no
backpropagation through the network, one classifier forward and backward per step), the default for latent models,
whose collaborative sampler runs its networks without gradient. Measured on the zoo's ddpm64 with attr64 guiding and
the held-out attr64_eval scoring (8 faces, DDIM 20 steps, target 1): Smiling 0.41 → 0.90, Eyeglasses 0.09 → 0.54 at
scale 2 through the model; with ε held fixed the gradient of a clean classifier on the blurry early x̂0 is erratic
(Smiling 0.41 → 0.36 at scale 3, 0.09 at scale 3 in the window [0, 600]).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from facelab.diffusion import State
from facelab.guidance.base import Context, GradientGuidance
from facelab.guidance.debias import check_window, target_distributions
from facelab.io.errors import InputError
from facelab.io.images import resize_images
from facelab.models.classifier import AttributeNet, load_classifier


def log_probs(logit: Tensor) -> Tensor:
    """Log class probabilities [B, K] of one head's logits (a binary head's [B] logit l: log σ(∓l), as predict's)."""
    return torch.stack([-logit, logit], 1).div(2).log_softmax(1) if logit.dim() == 1 else logit.log_softmax(1)


class AttributeGuidance(GradientGuidance):
    """Classifier guidance toward attribute targets (module docstring).

    classifier: an AttributeNet or a source load_classifier takes (zoo name such as attr64, folder); target:
    {attribute: m in [0, 1] or K probabilities} (None entries are ignored; at least one is needed); scale: the
    loss weight; window: [t_low, t_high] in timesteps (null: every step); through_model: null (auto), true or false.
    `rows` records per step the batch-mean probability of each target's most likely class (what the guidance sees).
    """

    def __init__(self, classifier: AttributeNet | str = "attr64", target: Mapping | None = None, scale: float = 2.0,
                 window: Sequence[int] | None = None, through_model: bool | None = None):
        self.classifier = classifier if isinstance(classifier, AttributeNet) else load_classifier(classifier)
        if not any(value is not None for value in (target or {}).values()):
            raise InputError("guidance=[attribute] needs a target: e.g. target.Smiling=1 (the probability of presence "
                             "to push toward) or target.skin_tone=[0.2,0.3,0.5]")
        self.targets = target_distributions(target, self.classifier.heads, "distribution")
        self.scale, self.through_model = float(scale), None if through_model is None else bool(through_model)
        self.window = check_window(window, [0, 10 ** 9])
        self.rows: list[dict] = []

    def active(self, state: State) -> bool:
        return self.window[0] <= state.t <= self.window[1]

    def through(self, state: State) -> bool:
        if self.through_model is None:
            return getattr(state.model, "decode", None) is None
        return self.through_model

    def log_probs(self, ctx: Context) -> dict[str, Tensor]:
        net = self.classifier.to(ctx.x.device)
        if net.noise_aware:
            if getattr(ctx.state.model, "decode", None) is not None:
                raise InputError("guidance=[attribute]: a noise-aware classifier reads x_t as an image; this model "
                                 "samples latents: use a clean classifier (e.g. attr64)")
            logits = net(ctx.x, torch.full((len(ctx.x),), ctx.state.t, device=ctx.x.device))
        else:
            logits = net(resize_images(ctx.images, net.image_size))
        return {name: log_probs(logits[name]) for name in self.targets}

    def loss(self, ctx: Context) -> Tensor:
        logp = self.log_probs(ctx)
        self.rows.append({"t": ctx.state.t, **{name: float(logp[name][:, int(r.argmax())].detach().exp().mean())
                                               for name, r in self.targets.items()}})
        return self.scale * sum(-(lp * self.targets[name].to(lp)).sum(1) for name, lp in logp.items())
