"""Collaborative Diffusion's combination rule (Huang et al., CVPR 2023), for any number M of modalities.

M frozen conditional latent models ε_m(z_t, t, c_m) share one latent space and one noise schedule. A small
"dynamic diffuser" D_m per modality maps (z_t, t, c_m) to a logit map ℓ_m [B, 1, h, w]; a per-pixel softmax over the
modalities gives the influence functions I_m, and the combined prediction is ε̂ = Σ_m w_m ⊙ ε_m with w = I
(training, `reweight="learned"`) or w = an explicit inference reweighting of I (`Reweight`). `CollaborativeDenoiser`
is that ε̂ as one `eps = model(z_t, t, cond)` callable for `facelab.diffusion.sample`, and the training loss of the
dynamic diffusers (facelab.models.codiff) calls the same module.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from facelab.io.errors import InputError
from facelab.io.images import resize_mask

REWEIGHTS = ("learned", "paper", "average")
DECAYS = ("cosine_decay", "linear_decay", "none")
SPATIAL_MODALITIES = frozenset({"mask", "sketch"})  # the paper preset scales these; the others take the remainder


def influence(logits: Sequence[Tensor]) -> Tensor:
    """The influence functions I [B, M, 1, h, w]: a softmax over the M logit maps ℓ_m [B, 1, h, w] at each pixel."""
    return torch.stack(list(logits), 1).softmax(1)


def mix(eps: Sequence[Tensor], weights: Tensor) -> Tensor:
    """Σ_m w_m ⊙ ε_m for ε_m [B, C, h, w] and weights [B, M, 1, h, w] (broadcast over the C channels)."""
    return (torch.stack(list(eps), 1) * weights).sum(1)


def decay(t: Tensor, kind: str, num_train_timesteps: int = 1000) -> Tensor:
    """s(t) per sample ([B] float): cosine_decay (cos((1 − t/T)·π) + 1)/2, linear_decay t/T, or none (1)."""
    u = t.double() / num_train_timesteps
    if kind == "cosine_decay":
        return ((torch.cos((1 - u) * math.pi) + 1) / 2).float()
    if kind == "linear_decay":
        return u.float()
    return torch.ones_like(u, dtype=torch.float32)


@dataclass(frozen=True)
class Reweight:
    """How the learned influence I [B, M, 1, h, w] becomes the weights that mix the ε_m at sampling time.

    - learned: w = I (what the dynamic diffusers were trained with).
    - average: w = 1/M everywhere (the baseline for the learned weights; the dynamic diffusers are not run).
    - paper:   the reference's sampler-time reweighting, per sample t. The spatial modalities S (mask, sketch) get
               a·s(t)·I_j, the others the remainder 1 − s(t)·Σ_S I_j (shared in proportion to their I when there is
               more than one), then w is renormalised to sum to 1. For a mask m and a text: w_mask = 2sm/(1 + sm)
               with a = 2. Optionally `softmax_twice`: w ← softmax(boost_factor·w). With probability 1 − manual_prob
               per call (drawn from the caller's generator) the call keeps w = I.
    """

    mode: str = "learned"
    seg_mask_scale_factor: float = 2.0
    seg_mask_schedule: str = "cosine_decay"
    softmax_twice: bool = False
    boost_factor: float = 1.0
    manual_prob: float = 1.0

    def __post_init__(self):
        if self.mode not in REWEIGHTS:
            raise InputError(f"method.collab.reweight={self.mode}: use one of {', '.join(REWEIGHTS)}")
        if self.seg_mask_schedule not in DECAYS:
            raise InputError(f"method.collab.seg_mask_schedule={self.seg_mask_schedule}: use one of "
                             f"{', '.join(DECAYS)}")
        if self.seg_mask_scale_factor <= 0:
            raise InputError(f"method.collab.seg_mask_scale_factor={self.seg_mask_scale_factor}: must be positive")
        if not 0 <= self.manual_prob <= 1:
            raise InputError(f"method.collab.manual_prob={self.manual_prob}: must lie in [0, 1]")

    @classmethod
    def from_options(cls, options: Mapping) -> Reweight:
        """From a config mapping with `reweight` (the mode) and any of the other fields (a null schedule is none)."""
        options = dict(options)
        options["mode"] = options.pop("reweight", cls.mode)
        if options.get("seg_mask_schedule", "none") is None:
            options["seg_mask_schedule"] = "none"
        unknown = set(options) - set(cls.__dataclass_fields__)
        if unknown:
            raise InputError(f"collab: unknown option(s) {', '.join(sorted(unknown))}")
        return cls(**options)

    def options(self) -> dict:
        """The inverse of from_options (what codiff.json and metrics.json record)."""
        options = asdict(self)
        return {"reweight": options.pop("mode"), **options}

    def check(self, spatial: Sequence[bool]) -> None:
        """The paper preset needs a non-spatial modality to take the remainder."""
        if self.mode == "paper" and all(spatial):
            raise InputError("method.collab.reweight=paper gives the remainder to a non-spatial modality (text), and "
                             "these models have none; use method.collab.reweight=learned or average")

    def __call__(self, learned: Tensor, t: Tensor, spatial: Sequence[bool], num_train_timesteps: int = 1000,
                 generator: torch.Generator | None = None) -> Tensor:
        """The weights [B, M, 1, h, w] for learned I [B, M, 1, h, w] at per-sample times t [B]."""
        if self.mode == "learned":
            return learned
        if self.mode == "average":
            return torch.full_like(learned, 1 / learned.shape[1])
        if self.manual_prob < 1:
            if generator is None:
                raise ValueError("method.collab.manual_prob < 1 draws from a generator; pass one")
            if torch.rand((), generator=generator, device=generator.device) >= self.manual_prob:
                return learned
        s = decay(t, self.seg_mask_schedule, num_train_timesteps).to(learned).view(-1, 1, 1, 1, 1)
        is_spatial = torch.tensor(spatial, dtype=learned.dtype, device=learned.device).view(1, -1, 1, 1, 1)
        scaled = s * learned * is_spatial                                        # s·I_j on S, 0 elsewhere
        remainder = 1 - scaled.sum(1, keepdim=True)                              # 1 − s·Σ_S I_j
        others = learned * (1 - is_spatial)
        share = others / others.sum(1, keepdim=True).clamp_min(torch.finfo(learned.dtype).tiny)
        weights = self.seg_mask_scale_factor * scaled + remainder * share
        weights = weights / weights.sum(1, keepdim=True)
        if self.softmax_twice:
            weights = (self.boost_factor * weights).softmax(1)
        return weights


@dataclass
class Influence:
    """The learned I and the effective weights at every step of sampling runs: [N, steps, M, h, w] each, at the
    network's times t."""

    t: list[int]
    learned: Tensor
    weights: Tensor

    @classmethod
    def cat(cls, parts: Sequence[Influence]) -> Influence:
        """The runs of several batches (the same steps) as one."""
        return cls(parts[0].t, torch.cat([p.learned for p in parts]), torch.cat([p.weights for p in parts]))

    def means(self, names: Sequence[str], mask: Tensor | None = None) -> dict:
        """Mean learned I and effective weight per modality and step, over the samples and the face region (label map
        `mask` ≠ 0 at latent resolution) when a mask is given, else over all pixels."""
        h, w = self.learned.shape[-2:]
        region = torch.ones(h, w, dtype=torch.bool)
        if mask is not None and (resize_mask(mask, (h, w)) != 0).any():
            region = resize_mask(mask, (h, w)) != 0
        means = {kind: getattr(self, kind)[..., region].mean((0, -1)) for kind in ("learned", "weights")}  # [steps, M]
        return {"t": self.t, "region": "face" if not region.all() else "all",
                **{kind: {name: [round(float(v), 4) for v in m[:, j]] for j, name in enumerate(names)}
                   for kind, m in means.items()}}

    def tiles(self, sample: int = 0, columns: int = 10) -> tuple[Tensor, list[int]]:
        """One sample's maps at up to `columns` evenly spaced steps, rows = learned I then weights of each modality:
        [rows · columns, 1, h, w] in [-1, 1], and the t of each column."""
        steps = torch.linspace(0, len(self.t) - 1, min(columns, len(self.t))).round().long()
        rows = [getattr(self, kind)[sample, steps, j] for kind in ("learned", "weights")
                for j in range(self.learned.shape[2])]
        return torch.cat(rows)[:, None] * 2 - 1, [self.t[i] for i in steps]


def _cat_conditions(*conds: Mapping) -> dict:
    """Concatenate condition dicts (UNet keyword tensors) along the batch."""
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


class CollaborativeDenoiser(nn.Module):
    """ε̂(z_t, t, cond) = Σ_m w_m ⊙ ε_m(z_t, t, c_m) over M frozen latent models; cond = [c_1, …, c_M].

    models: objects with `modality`, `denoiser` (a facelab Denoiser), `condition(values, batch_size)` and `decode`
    (facelab.models.latent.LatentModel). diffusers: the M dynamic diffusers (UNet2DConditionModel with one output
    channel, cross-attending to c_m), or None for fixed weights 1/M before reweighting (the average baseline, or M = 1:
    plain uni-modal sampling). cfg_scale: per-modality classifier-free guidance ε_∅ + w(ε_m − ε_∅) before mixing, one
    number or {name: number}; a scale ≠ 1 appends the null rows to the same forward of that modality's UNet.

    Per call it runs one forward per UNet for the whole batch: M uni-modal UNets (frozen, no gradient) and, unless
    reweight=average, the M dynamic diffusers. `influence_every = k > 1` runs the diffusers only at every k-th call
    of a sampling run and reuses their last I in between (a call at a higher t than the last computed I, or with
    another batch size, starts afresh: a new run or a RePaint jump). `calls` counts those forwards ("models",
    "diffusers"); with `record = True` every call appends {"t", "learned", "weights"} ([B, M, h, w] on the CPU) to
    `records` (`take_influence` stacks them per sampling run). `generator` feeds Reweight.manual_prob.
    """

    def __init__(self, models: Sequence[nn.Module], diffusers: Sequence[nn.Module] | None = None, *,
                 names: Sequence[str] | None = None, reweight: Reweight | None = None,
                 cfg_scale: float | Mapping[str, float] = 1.0, generator: torch.Generator | None = None):
        super().__init__()
        if diffusers is not None and len(diffusers) != len(models):
            raise ValueError(f"{len(models)} models but {len(diffusers)} dynamic diffusers")
        self.models = nn.ModuleList(models)
        self.diffusers = None if diffusers is None else nn.ModuleList(diffusers)
        self.names = list(names or [m.modality for m in models])
        self.spatial = [m.modality in SPATIAL_MODALITIES for m in models]
        self.reweight = reweight or Reweight()
        self.reweight.check(self.spatial)
        scales = cfg_scale if isinstance(cfg_scale, Mapping) else dict.fromkeys(self.names, cfg_scale)
        unknown = set(scales) - set(self.names)
        if unknown:
            raise InputError(f"cfg_scale names {', '.join(sorted(unknown))}; the modalities are "
                             f"{', '.join(self.names)}")
        self.cfg_scales = [float(scales.get(name, 1.0)) for name in self.names]
        self.generator = generator
        self.record = False
        self.records: list[dict] = []
        self.calls: Counter = Counter()
        self.influence_every = 1
        self._last: tuple[Tensor, Tensor, int] | None = None  # (I, its t, calls left to reuse it)
        self._null: dict[int, dict] = {}

    @property
    def schedule(self):
        return self.models[0].denoiser.schedule

    def take_influence(self) -> Influence | None:
        """The records since the last take (one sampling run) as an Influence, clearing them; None without records."""
        if not self.records:
            return None
        taken = Influence([int(r["t"][0]) for r in self.records], *(torch.stack([r[kind] for r in self.records], 1)
                                                                    for kind in ("learned", "weights")))
        self.records.clear()
        return taken

    def decode(self, z: Tensor) -> Tensor:
        return self.models[0].decode(z)

    @torch.no_grad()
    def conditions(self, values: Sequence, batch_size: int) -> list[dict]:
        """[c_1, …, c_M] for one condition value per modality (a label map, a caption, or None: the null condition),
        encoded once and repeated over the batch."""
        return [{key: tensor.expand(batch_size, *tensor.shape[1:]) for key, tensor in
                 model.condition(None if value is None else [value], batch_size=1).items()}
                for model, value in zip(self.models, values)]

    def null_condition(self, m: int, batch_size: int, device: torch.device) -> dict:
        """Modality m's null condition (encoded once, cached) repeated over the batch."""
        if m not in self._null:
            with torch.no_grad():
                self._null[m] = self.models[m].condition(None, batch_size=1)
        return {key: x.to(device).expand(batch_size, *x.shape[1:]) for key, x in self._null[m].items()}

    def model_eps(self, m: int, z_t: Tensor, t: Tensor, cond: Mapping) -> Tensor:
        """ε_m, with classifier-free guidance when its scale is not 1 (null rows in the same forward)."""
        denoiser, scale = self.models[m].denoiser, self.cfg_scales[m]
        self.calls["models"] += 1
        with torch.no_grad():
            if scale == 1:
                return denoiser(z_t, t, cond)
            null = self.null_condition(m, len(z_t), z_t.device)
            eps, eps_null = denoiser(torch.cat([z_t, z_t]), torch.cat([t, t]), _cat_conditions(cond, null)).chunk(2)
            return eps_null + scale * (eps - eps_null)

    def learned_influence(self, z_t: Tensor, t: Tensor, cond: Sequence[Mapping]) -> Tensor:
        """I [B, M, 1, h, w] from the dynamic diffusers (1/M without them or with reweight=average)."""
        if self.diffusers is None or self.reweight.mode == "average":
            return z_t.new_full((len(z_t), len(self.models), 1, *z_t.shape[2:]), 1 / len(self.models))
        self.calls["diffusers"] += len(self.diffusers)
        dtype = next(self.diffusers.parameters()).dtype
        return influence([d(z_t.to(dtype), t, **c, return_dict=False)[0].to(z_t.dtype)
                          for d, c in zip(self.diffusers, cond)])

    def reused_influence(self, z_t: Tensor, t: Tensor, cond: Sequence[Mapping]) -> Tensor:
        """learned_influence, recomputed every `influence_every` calls of a run and reused in between."""
        if self.influence_every > 1 and self._last is not None:
            last, last_t, left = self._last
            if left > 0 and last.shape[0] == len(z_t) and bool((t <= last_t).all()):
                self._last = (last, last_t, left - 1)
                return last
        learned = self.learned_influence(z_t, t, cond)
        self._last = (learned, t, self.influence_every - 1) if self.influence_every > 1 else None
        return learned

    def forward(self, z_t: Tensor, t: int | Tensor, cond: Sequence[Mapping]) -> Tensor:
        if len(cond) != len(self.models):
            raise ValueError(f"cond holds {len(cond)} conditions for {len(self.models)} modalities")
        t = torch.as_tensor(t, device=z_t.device).long().expand(len(z_t))
        eps = [self.model_eps(m, z_t, t, c) for m, c in enumerate(cond)]
        learned = self.reused_influence(z_t, t, cond)
        weights = self.reweight(learned, t, self.spatial, self.schedule.num_train_timesteps, self.generator)
        if self.record:
            self.records.append({"t": t.cpu(), "learned": learned[:, :, 0].detach().cpu(),
                                 "weights": weights[:, :, 0].detach().cpu()})
        return mix(eps, weights)
