"""Debiasing guidance (Balancing Act, Parihar et al. 2024): steer attribute statistics with a classifier's gradient.

`HSpaceDebias` (hook point 2, inside the network call): at every grid time t in the window, the h-classifier's
class probabilities p_i = softmax(g_t(h_i)/T_c) give a loss L, and h takes `grad_steps` steps
    h ← h − κ_t·Σ_a scale_a·m_a·∇_h L_a,   κ_t = base·β_t^power·gain   (defaults 1.5, 0.05, 300),
before the decoder runs once on the edited h. Per attribute a with target r (a class distribution) or c (a class):
  distribution  L = D(p̄, r) with p̄ = (1/N)·Σ_i p_i: chi2 Σ_c (p̄_c − r_c)²/r_c (the original), kl KL(r‖p̄) (finite
                for 0/1 targets), l2 Σ_c (p̄_c − r_c)²; m_a = N with `scale_per_sample` (the original's scale 1500 at
                N = 100 is 15), else 1. `running_estimate=cumulative` uses p̄ = (n_prev·p̂_prev + Σ_i p_i)/(n_prev + N),
                p̂_prev the mean prediction before the edit at this t over the earlier batches of the run (where
                their trajectories were: the edited read does not persist, the next step reads h afresh; measured at
                N = 1 on 100 images: Male 0.51 at target 0.5, against 0.67 with the edited reads), m_a = n_prev + N;
  sample        L = −Σ_i log p_i[c] (logprob, the default) or −Σ_i p_i[c] (prob, the original, whose gradient vanishes
                for confidently wrong samples); m_a = 1.
mode=vanilla only observes (the predictions per t, for trajectory.csv). `asymmetric` (Asyrp) runs one more, unguided,
network call per guided step and uses its ε for the DDIM direction term (state.eps_direction).

`ImageDebias` (hook point 3): the image-space baseline ("universal guidance"): the same losses on an attribute
classifier's probabilities of x̂0(x_t, ε), differentiated w.r.t. x_t with ε held fixed (no backpropagation through
the U-Net), and ε ← ε + √(1−ᾱ_t)·Σ_a scale_a·m_a·∇_{x_t} L_a.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from facelab.diffusion import Guidance, State
from facelab.guidance.base import Context, GradientGuidance
from facelab.io.errors import InputError
from facelab.io.images import resize_images
from facelab.models.classifier import load_classifier
from facelab.models.hclassifier import LOOKUPS, HNet, load_hclassifier

MODES = ("vanilla", "sample", "distribution")
LOSSES = {"distribution": ("chi2", "kl", "l2"), "sample": ("logprob", "prob")}
DEFAULT_LOSS = {"distribution": "chi2", "sample": "logprob"}
# Softmax temperature by mode. Distribution guidance compares p̄ with the target, so p̄ must estimate the batch's class
# distribution: a temperature above 1 pulls it toward uniform, and a target between the true fraction and 1/K is then
# pushed the wrong way (measured: Male 0.85 → 0.92 at target 0.7 with the reference's 8). In sample mode it only
# softens each sample's step; the reference's 8 (and its scale 15) stay.
DEFAULT_TEMPERATURE = {"vanilla": 1.0, "distribution": 1.0, "sample": 8.0}
DEFAULT_TARGET = {"Male": 0.5}
RUNNING = ("none", "cumulative")
STEP_SCHEDULE = {"base": 1.5, "power": 0.05, "gain": 300.0}


def target_distributions(target: Mapping | None, heads: Mapping[str, int], mode: str) -> dict[str, Tensor]:
    """Validate per-attribute targets against the classifier's heads {name: K}; return float64 distributions [K].

    distribution mode: a number m ∈ [0, 1] (binary heads: the fraction of class 1, r = [1 − m, m]) or K
    probabilities summing to 1. sample (and vanilla) mode also take a class index c (r = onehot(c)).
    None entries are ignored; no target at all means DEFAULT_TARGET ({Male: 0.5}).
    """
    target = {name: value for name, value in (target or {}).items() if value is not None} or dict(DEFAULT_TARGET)
    result = {}
    for name, value in target.items():
        if name not in heads:
            raise InputError(f"target.{name}: unknown attribute; the classifier predicts {', '.join(heads)}")
        k = heads[name]
        if mode == "sample":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
                    or not 0 <= value < k:
                raise InputError(f"target.{name}={value}: mode=sample needs a class index in 0..{k - 1}")
            result[name] = F.one_hot(torch.tensor(int(value)), k).double()
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if k != 2:
                raise InputError(f"target.{name}={value}: {name} has {k} classes; give {k} probabilities")
            value = [1 - float(value), float(value)]
        try:
            r = torch.tensor([float(v) for v in (value if isinstance(value, (list, tuple)) else [value])],
                             dtype=torch.float64)
        except (TypeError, ValueError):
            raise InputError(f"target.{name}={value!r}: give a fraction in [0, 1] or {k} probabilities") from None
        if len(r) != k:
            raise InputError(f"target.{name}={list(value)}: {name} has {k} classes; give {k} probabilities")
        if (r < 0).any() or (r > 1).any() or not math.isclose(r.sum().item(), 1.0, abs_tol=1e-6):
            raise InputError(f"target.{name}={r.tolist()}: probabilities must lie in [0, 1] and sum to 1")
        result[name] = r
    return result


def distribution_loss(pbar: Tensor, r: Tensor, kind: str) -> Tensor:
    """D(p̄, r): chi2 = Σ (p̄ − r)²/r, kl = KL(r‖p̄) = Σ r·log(r/p̄), l2 = Σ (p̄ − r)²."""
    r = r.to(pbar)
    if kind == "chi2":
        return ((pbar - r) ** 2 / r).sum()
    if kind == "kl":
        return torch.xlogy(r, r).sum() - (r * pbar.clamp(min=1e-12).log()).sum()
    return ((pbar - r) ** 2).sum()


def sample_loss(probs: Tensor, c: int, kind: str) -> Tensor:
    """−Σ_i log p_i[c] (logprob) or −Σ_i p_i[c] (prob) over the batch."""
    p = probs[:, c]
    return -(p.clamp(min=1e-12).log().sum() if kind == "logprob" else p.sum())


class Objective:
    """The weighted sum of per-attribute guidance losses, Σ_a scale_a·m_a·L_a (see the module docstring)."""

    def __init__(self, target: Mapping | None, heads: Mapping[str, int], mode: str = "distribution",
                 loss: str | None = None, scale: float | Mapping[str, float] = 15.0, scale_per_sample: bool = True):
        if mode not in MODES:
            raise InputError(f"mode={mode!r}: use one of {', '.join(MODES)}")
        kind = "sample" if mode == "sample" else "distribution"
        self.loss = loss or DEFAULT_LOSS[kind]
        if self.loss not in LOSSES[kind]:
            raise InputError(f"loss={self.loss!r}: mode={mode} takes {', '.join(LOSSES[kind])}")
        self.mode, self.scale_per_sample = mode, scale_per_sample
        self.targets = target_distributions(target, heads, mode)
        if mode == "distribution" and self.loss == "chi2":  # (vanilla only observes: any target is fine)
            zero = [name for name, r in self.targets.items() if (r == 0).any()]
            if zero:
                raise InputError(f"target.{zero[0]}={self.targets[zero[0]].tolist()}: chi2 divides by the target, so "
                                 "0/1 targets need loss=kl or loss=l2")
        scales = scale if isinstance(scale, Mapping) else {name: scale for name in self.targets}
        unknown = [name for name in scales if name not in self.targets]
        if unknown or set(scales) != set(self.targets):
            raise InputError(f"scale={dict(scales)}: give one scale per targeted attribute {list(self.targets)}")
        self.scales = {name: float(value) for name, value in scales.items()}

    def __call__(self, probs: Mapping[str, Tensor], previous: Mapping[str, tuple[int, Tensor]] | None = None) -> Tensor:
        """The loss for class probabilities {attribute: [N, K]}; `previous` = {attribute: (n_prev, Σ p_prev)} for
        the running estimate."""
        total = 0.0
        for name, r in self.targets.items():
            p = probs[name]
            if self.mode == "sample":
                total = total + self.scales[name] * sample_loss(p, int(r.argmax()), self.loss)
                continue
            n_prev, sum_prev = previous[name] if previous and name in previous else (0, 0.0)
            count = n_prev + len(p)
            pbar = (sum_prev + p.sum(0)) / count
            weight = count if self.scale_per_sample else 1
            total = total + self.scales[name] * weight * distribution_loss(pbar, r, self.loss)
        return total


def check_window(window: Sequence[int] | None, times: Sequence[int]) -> tuple[int, int]:
    """The guided range [lo, hi] of timesteps: `window`, or by default the range of the classifier's times."""
    if window is None:
        return min(times), max(times)
    if len(window) != 2 or int(window[0]) > int(window[1]):
        raise InputError(f"window={list(window)}: give [t_low, t_high] in timesteps, t_low ≤ t_high")
    return int(window[0]), int(window[1])


class HSpaceDebias(Guidance):
    """h-classifier guidance inside the network call (see the module docstring).

    classifier: an HNet or anything `load_hclassifier` takes. After a run, `trajectory_rows()` gives the mean
    predictions per t (before and after the edit) and ‖Δh‖; `last` holds the guided (post-edit) probabilities of the
    latest batch at the lowest guided t, the final ADP prediction.
    """

    needs = ("h_space",)

    def __init__(self, classifier: HNet | str | None, target: Mapping | None = None, mode: str = "distribution",
                 loss: str | None = None, scale: float | Mapping[str, float] = 15.0, scale_per_sample: bool = True,
                 running_estimate: str = "none", temperature: float | None = None, window: Sequence[int] | None = None,
                 step_schedule: Mapping | None = None, grad_steps: int = 1, head_lookup: str = "exact",
                 asymmetric: bool = False):
        if classifier is None:  # e.g. method=ldm without model.pretrained (the default is the model's hclf/)
            raise InputError("guidance=[debias] needs an h-classifier trained on this model's h: "
                             "guidance.debias.classifier=PATH (method=hextract model.pretrained=MODEL, then "
                             "python -m facelab.train +experiment=hclf_gender data.dataset.path=<its shards>)")
        self.net = classifier if isinstance(classifier, HNet) else load_hclassifier(classifier)
        self.source = getattr(self.net, "source", "h-classifier")
        self.objective = Objective(target, self.net.heads, mode, loss, scale, scale_per_sample)
        if running_estimate not in RUNNING:
            raise InputError(f"running_estimate={running_estimate!r}: use one of {', '.join(RUNNING)}")
        if head_lookup not in LOOKUPS:
            raise InputError(f"head_lookup={head_lookup!r}: use one of {', '.join(LOOKUPS)}")
        temperature = DEFAULT_TEMPERATURE.get(mode, 1.0) if temperature is None else temperature
        if grad_steps < 1 or temperature <= 0:
            raise InputError(f"grad_steps={grad_steps}, temperature={temperature}: need grad_steps ≥ 1 and "
                             "temperature > 0")
        unknown = set(step_schedule or {}) - set(STEP_SCHEDULE)
        if unknown:
            raise InputError(f"step_schedule keys {sorted(unknown)}: use {', '.join(STEP_SCHEDULE)}")
        self.step_schedule = {**STEP_SCHEDULE, **dict(step_schedule or {})}
        self.mode, self.running, self.temperature = mode, running_estimate, float(temperature)
        self.grad_steps, self.head_lookup, self.asymmetric = int(grad_steps), head_lookup, bool(asymmetric)
        self.window = check_window(window, self.net.times)
        self.h_where = self.net.meta.get("where", "after")
        self.checked: object | None = None  # the model checked against the classifier's metadata
        self.stats: dict[int, dict] = {}
        self.last: dict[str, Tensor] = {}
        self._edited = False

    # --- checks ---------------------------------------------------------------------------------------------
    def check(self, model, timesteps: Sequence[int] | None = None) -> None:
        """The classifier must read this model's h (same weights: fingerprint) and have a head for every grid time
        in the window (exact lookup)."""
        from facelab.models.pretrained import model_fingerprint

        meta = self.net.meta
        if hasattr(model, "unet") and hasattr(model, "schedule") and meta.get("fingerprint") \
                and model_fingerprint(model) != meta["fingerprint"]:
            raise InputError(f"h-classifier {self.source} was trained on h of model {meta.get('model')!r}, not of "
                             "this model (different weights); extract h from this model (method=hextract) and train "
                             "a new one")
        for t in timesteps or []:
            self.head_time(int(t))
        self.checked = model

    def head_time(self, t: int) -> int | None:
        """The head time used at grid time t, or None outside the window; an untrained t inside it is an error."""
        if not self.window[0] <= t <= self.window[1]:
            return None
        key = self.net.head_time(t, self.head_lookup)
        if key is None:
            raise InputError(f"h-classifier {self.source} has no head for t={t}: it was trained on the grid "
                             f"{self.net.times}; sample on that grid (a converted Balancing Act classifier: "
                             "sampler.spacing=floored sampler.steps=50), use head_lookup=nearest, or restrict window")
        return key

    def kappa(self, state: State, t: int) -> float:
        """κ_t / scale = base·β_t^power·gain."""
        s = self.step_schedule
        return s["base"] * float(state.schedule.betas[t]) ** s["power"] * s["gain"]

    # --- hooks ------------------------------------------------------------------------------------------------
    def h_edit(self, state: State) -> Callable[[Tensor], Tensor] | None:
        if self.checked is not state.model:
            self.check(state.model)
        self._edited = False
        key = self.head_time(state.t)
        if key is None:
            return None
        kappa = self.kappa(state, state.t)
        return lambda h: self.edit(h, state.t, kappa, key)

    def edit(self, h: Tensor, t: int, kappa: float, key: int | None = None) -> Tensor:
        """h at grid time t after the guidance steps with the head of time `key` (default t); records the predictions
        before and after (per grid time t, also the running estimate's record)."""
        key = t if key is None else key
        if h[0].numel() != self.net.dim:
            raise InputError(f"h-classifier {self.source} reads h of {self.net.dim} values at {self.h_where!r}; "
                             f"this model's h has {h[0].numel()} ({list(h.shape[1:])})")
        net = self.net.to(h.device)
        stats = self.stats.setdefault(t, {"n": 0, "before": {}, "after": {}, "dh": 0.0, "h": 0.0})
        running = self.running == "cumulative"
        previous = {a: (stats["n"], stats["before"][a]) for a in stats["after"]} if running else None
        x = h.detach().float()
        before = None
        for _ in range(self.grad_steps if self.mode != "vanilla" else 0):
            with torch.enable_grad():
                x = x.requires_grad_(True)
                probs = self._probs(net, x, key)
                before = before or {a: p.detach() for a, p in probs.items()}
                grad, = torch.autograd.grad(self.objective(probs, previous), x)
            x = (x - kappa * grad).detach()
        logits = net(x, key)
        after = {name: (logits[name] / self.temperature).softmax(-1) for name in self.objective.targets}
        before = before or after
        self.last = {name: logits[name].softmax(-1) for name in after}
        for name in after:
            for kind, probs in (("before", before), ("after", after)):
                stats[kind][name] = stats[kind].get(name, 0.0) + probs[name].sum(0).double()
        stats["n"] += len(x)  # the sums stay on the device: no synchronisation per step
        stats["dh"] += (x - h.float()).flatten(1).norm(dim=1).sum()
        stats["h"] += h.float().flatten(1).norm(dim=1).sum()
        self._edited = self.mode != "vanilla"
        return x.to(h.dtype)

    def _probs(self, net: HNet, x: Tensor, key: int) -> dict[str, Tensor]:
        probs = net.predict(x, key, self.temperature)
        return {name: probs[name] for name in self.objective.targets}

    def after_model(self, state: State) -> None:
        if self.asymmetric and self._edited:  # Asyrp: the direction term from the unguided ε
            state.eps_direction = state.model(state.x_t, state.t, state.cond)

    # --- records ----------------------------------------------------------------------------------------------
    def trajectory_rows(self) -> list[dict]:
        """Per guided t (decreasing): mean p̄ per attribute and class before and after the edit, mean ‖Δh‖ and ‖h‖."""
        rows = []
        for t in sorted(self.stats, reverse=True):
            stats = self.stats[t]
            row = {"t": t}
            for kind in ("before", "after"):
                for name, total in stats[kind].items():
                    row.update({f"{name}_p{c}_{kind}": v for c, v in enumerate((total / stats["n"]).tolist())})
            row["dh_norm"], row["h_norm"] = float(stats["dh"]) / stats["n"], float(stats["h"]) / stats["n"]
            rows.append(row)
        return rows


class ImageDebias(GradientGuidance):
    """The image-space baseline: attribute-classifier guidance on x̂0 at hook point 3 (see the module docstring), with
    ε held fixed (GradientGuidance without a network call; a latent model's x̂0 is decoded first).

    classifier: an AttributeNet or a source `facelab.models.classifier.load_classifier` takes (zoo name, folder);
    window: [t_low, t_high] or all t. The factor is √(1−ᾱ_t) whatever the sampler (the baseline's score form).
    """

    through_model = False

    def __init__(self, classifier, target: Mapping | None = None, mode: str = "sample", loss: str | None = None,
                 scale: float | Mapping[str, float] = 15.0, scale_per_sample: bool = True,
                 temperature: float | None = None, window: Sequence[int] | None = None):
        if mode == "vanilla":
            raise InputError("the image-space baseline guides: use mode=sample or mode=distribution")
        if isinstance(classifier, (str, Path)):
            classifier = load_classifier(classifier)
        self.classifier = classifier
        self.temperature = float(DEFAULT_TEMPERATURE.get(mode, 1.0) if temperature is None else temperature)
        self.objective = Objective(target, classifier.heads, mode, loss, scale, scale_per_sample)
        self.window = check_window(window, [0, 10 ** 9])

    def active(self, state: State) -> bool:
        return self.window[0] <= state.t <= self.window[1]

    def eps_scale(self, state: State) -> float:
        return (1 - state.schedule.alpha_bar(state.t)) ** 0.5

    def loss(self, ctx: Context) -> Tensor:
        net = self.classifier.to(ctx.x.device)
        return self.objective(net.predict(resize_images(ctx.images, net.image_size), temperature=self.temperature))
