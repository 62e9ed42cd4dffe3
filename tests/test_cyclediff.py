"""method=cyclediff: the attribute-conditional DDPM (zero init, label dropout, training, export and loading), the
guidance maths against hand-computed references (the DDPM posterior and one-step kernel of the step-by-step cycle, the
mean- and score-form updates, the original's attribute loss, an ideal denoiser for step-to-origin), the method end to
end on tiny random models (CLI and in-process), the measurement script, and one clear error per bad input."""

import csv
import importlib.util
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from hydra.utils import instantiate

from conftest import CONF, TINY_TRAIN, TINY_UNET, compose, run_cli
from facelab.diffusion import DDIM, DDPM, Schedule, State, sample
from facelab.diffusion.denoiser import Denoiser
from facelab.guidance.cyclediff import (
    RECONSTRUCTION,
    AttributeLoss,
    ClassifierFree,
    Context,
    CycleDiffGuidance,
    CycleStepByStep,
    CycleToOrigin,
    StepNoise,
    check_edit,
    classifier_free,
    parse_edits,
)
from facelab.io.errors import InputError
from facelab.io.images import save_image
from facelab.models.classifier import AttributeClassifier, AttributeNet, training_times
from facelab.models.components.attributes import attribute_unet
from facelab.models.ddpm import PixelDDPM
from facelab.models.pretrained import load_denoiser
from facelab.sample import run_sample
from facelab.train import run_train

ATTRS = ["Male", "Smiling", "Eyeglasses", "Young"]
SCHEDULE = Schedule()  # linear β 1e-4 … 0.02, T = 1000
BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
ABAR = torch.cumprod(1 - BETAS, 0)
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class LinearModel:
    """A differentiable stand-in ε-model: ε = 0.3·x + 0.2·mean(y) (depends on the attribute vector)."""

    def __call__(self, x, t, cond):
        return 0.3 * x + 0.2 * cond.mean(1).reshape(-1, 1, 1, 1)


class DeltaModel:
    """The ideal denoiser of a point mass at `src` under y_src (first entry 1) and at `tgt` otherwise: x̂0 = that
    point for every x_t."""

    def __init__(self, src, tgt):
        self.src, self.tgt = src, tgt

    def __call__(self, x, t, cond):
        a = SCHEDULE.alpha_bar(t)
        return (x - math.sqrt(a) * torch.where(cond[:, :1, None, None] > 0, self.src, self.tgt)) / math.sqrt(1 - a)


def state_at(x, t, s, model, cond, i=0, sampler=None):
    sampler = sampler or DDIM(clip=False)
    state = State(x=x, t=t, s=s, i=i, cond=cond, model=model, schedule=SCHEDULE, sampler=sampler)
    state.x_t = x
    return state


# --- the conditional DDPM ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory) -> dict:
    """A tiny attribute-conditional model (a trained-looking, non-zero embedding), a guidance and an evaluation
    classifier on its attributes, a noise-aware guidance classifier and one on other attributes."""
    root = tmp_path_factory.mktemp("cyclediff")
    torch.manual_seed(0)
    unet = attribute_unet(TINY_UNET, ATTRS)
    with torch.no_grad():
        unet.class_embedding.linear_2.weight.normal_(0, 0.05)
    unet.save_pretrained(root / "model" / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(root / "model" / "scheduler")
    scheduler = {"num_train_timesteps": 1000, "beta_schedule": "linear"}
    for seed, name, kwargs in ((0, "guide", {}), (1, "eval", {}), (2, "noisy", {"noise_aware": True,
                                                                               "scheduler": scheduler})):
        torch.manual_seed(seed)
        AttributeClassifier(ATTRS, {"skin_tone": 3}, channels=(8, 16), image_size=16, **kwargs).export(root / name)
    AttributeClassifier(["Male", "Bangs"], channels=(8, 16), image_size=16).export(root / "other")
    return {"root": root, "model": str(root / "model"), "guide": str(root / "guide"), "eval": str(root / "eval"),
            "noisy": str(root / "noisy"), "other": str(root / "other"), "plain": str(tiny_model_dir)}


def test_fresh_embedding_starts_at_the_unconditional_model(tiny_model_dir):
    model = PixelDDPM(unet=TINY_UNET, scheduler={"num_train_timesteps": 1000}, init_from=str(tiny_model_dir),
                      attributes=ATTRS)
    base, conditional = load_denoiser(str(tiny_model_dir)), model.denoiser()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([5, 500, 990])
    y = torch.tensor([[1.0, -1, 1, -1], [-1, -1, 1, 1], [0, 0, 0, 0]])
    torch.testing.assert_close(conditional(x, t, y), base(x, t))
    torch.testing.assert_close(conditional(x, t), base(x, t))  # no cond: the null label
    assert conditional.attributes == ATTRS and model.unet.config.class_embed_type == "identity"
    with torch.no_grad():
        model.ema.module.class_embedding.linear_2.weight.normal_()
    assert not torch.allclose(conditional(x, t, y), base(x, t))  # the embedding does reach the network
    with pytest.raises(InputError, match=r"takes \[batch, 4\]"):
        conditional(x, t, y[:, :3])


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_label_dropout_replaces_whole_rows_by_the_null_label(dropout):
    model = PixelDDPM(unet=TINY_UNET, scheduler={"num_train_timesteps": 1000}, attributes=["Smiling", "Male"],
                      label_dropout=dropout)
    model.columns = [2, 0]  # what setup finds for data columns [Male, Young, Smiling]
    labels = (torch.rand(4000, 3, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    y = model.condition({"attributes": labels}, torch.Generator().manual_seed(1))
    dropped = (y == 0).all(1)
    torch.testing.assert_close(y[~dropped], labels[~dropped][:, [2, 0]] * 2 - 1)
    assert (y[dropped] == 0).all() and ((y == 0).any(1) == dropped).all()  # never a partial row
    assert abs(dropped.float().mean().item() - dropout) < 0.03


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_embedding_learns_at_its_own_rate(scale):
    """Adam's first step moves every weight by ≈ its learning rate: the embedding's is lr × embedding_lr_scale."""
    model = PixelDDPM(unet=TINY_UNET, scheduler={"num_train_timesteps": 1000}, attributes=ATTRS, lr=1e-3,
                      warmup_steps=1, embedding_lr_scale=scale)
    opt = model.configure_optimizers()["optimizer"]
    embedding, conv = model.unet.class_embedding.linear_1.weight, model.unet.conv_in.weight
    before = embedding.detach().clone(), conv.detach().clone()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([[1.0, -1, 1, -1]] * 4)
    model.unet.class_embedding.linear_2.weight.data.normal_()  # so that the first layer gets a gradient
    model.unet(x, torch.tensor([10, 200, 500, 900]), class_labels=y).sample.pow(2).mean().backward()
    opt.step()
    moved = [(after.detach() - b).abs().max().item() for after, b in zip((embedding, conv), before)]
    assert moved[0] == pytest.approx(1e-3 * scale, rel=0.01) and moved[1] == pytest.approx(1e-3, rel=0.01)


def test_train_export_and_load_the_conditional_model(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    cfg = compose("train", ["+experiment=cyclediff_ddpm", "trainer.max_steps=2", *TINY_TRAIN,
                            f"model.init_from={tiny_model_dir}", "model.attributes=[Smiling,Male]"], out)
    run_train(cfg)
    exported, from_ckpt = load_denoiser(str(out / "diffusers")), load_denoiser(str(out / "checkpoints" / "last.ckpt"))
    assert exported.attributes == from_ckpt.attributes == ["Smiling", "Male"]
    assert json.loads((out / "diffusers" / "unet" / "config.json").read_text())["attributes"] == ["Smiling", "Male"]
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 700]), torch.tensor([[1.0, -1], [-1, 1]])
    torch.testing.assert_close(exported(x, t, y), from_ckpt(x, t, y))
    assert (out / "samples" / "step_000002.png").is_file()  # the sample grid runs under the null label
    bad = compose("train", ["+experiment=cyclediff_ddpm", "trainer.max_steps=1", *TINY_TRAIN,
                            f"model.init_from={tiny_model_dir}", "model.attributes=[Smiling,Laughing]"], tmp_path / "b")
    with pytest.raises(InputError, match=r"\['Laughing'\] are not in the data's attributes"):
        run_train(bad)


def test_experiments_compose(tmp_path):
    ddpm = compose("train", ["+experiment=cyclediff_ddpm"], tmp_path)
    assert ddpm.model.init_from == "ddpm64" and ddpm.model.label_dropout == 0.1 and len(ddpm.model.attributes) == 17
    noisy = compose("train", ["+experiment=attr_clf_noisy"], tmp_path)
    assert noisy.model.noise_aware and noisy.model.scheduler.beta_end == 0.02
    reference = compose("sample", ["method=cyclediff_reference"], tmp_path)
    assert (instantiate(reference.sampler).name, reference.sampler.steps, reference.sampler.clip) == ("ddpm", 1000, False)
    assert reference.method.start == "original" and reference.method.weights.cycle == 1000
    default = compose("sample", ["method=cyclediff"], tmp_path)
    sampler = instantiate(default.sampler)
    assert (sampler.name, sampler.steps, sampler.eta, default.method.start, default.method.cfg_scale) == (
        "ddim", 50, 1, "auto", 1)  # auto: the edit-friendly inversion under DDIM(η = 1)


# --- guidance maths ------------------------------------------------------------------------------------------
def posterior_mean(x, t, eps):
    """The DDPM posterior mean in ε form: (x_t − β_t/√(1−ᾱ_t)·ε)/√α_t."""
    return (x - BETAS[t] / (1 - ABAR[t]).sqrt() * eps) / (1 - BETAS[t]).sqrt()


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("t", [600, 0])
def test_step_by_step_cycle_is_the_one_step_kernel_with_shared_noise(variance, t):
    model, x_t, x_src = LinearModel(), rand(2, 3, 4, 4, seed=1), rand(2, 3, 4, 4, seed=2)
    y_src, y_tgt = torch.ones(2, 3, dtype=torch.float64), -torch.ones(2, 3, dtype=torch.float64)
    z = rand(2, 3, 4, 4, seed=3)
    ddpm = DDPM(variance_type=variance, clip=False)
    term = CycleStepByStep(x_src, y_src, noises=[None, z], generator=torch.Generator().manual_seed(4))
    loss = term(Context(state_at(x_t, t, t - 1, model, y_tgt, i=1, sampler=ddpm), x_t))
    # by hand: x_{t−1} = μ(x_t, y_tgt) + σ z; x̃_t = √(1−β_t)·x_{t−1} + √β_t·ξ; back with the same z
    draws = torch.Generator().manual_seed(4)
    eps_target = torch.randn(x_src.shape, generator=draws, dtype=torch.float64)
    xi = torch.randn(x_src.shape, generator=draws, dtype=torch.float64)
    small = BETAS[t] * (1 - ABAR[t - 1]) / (1 - ABAR[t]) if t > 0 else 0.0
    sigma = (BETAS[t] if variance == "fixed_large" else small) ** 0.5 if t > 0 else 0.0
    x_prev = posterior_mean(x_t, t, model(x_t, t, y_tgt)) + sigma * z
    x_noisy = (1 - BETAS[t]).sqrt() * x_prev + BETAS[t].sqrt() * xi
    x_back = posterior_mean(x_noisy, t, model(x_noisy, t, y_src)) + sigma * z
    target = ABAR[t - 1].sqrt() * x_src + (1 - ABAR[t - 1]).sqrt() * eps_target if t > 0 else x_src
    torch.testing.assert_close(loss, (x_back - target).pow(2).flatten(1).mean(1))
    # the source's own trajectory replaces q_sample(x_src, t − 1) when given
    path = [None, rand(2, 3, 4, 4, seed=5)]
    term = CycleStepByStep(x_src, y_src, [None, z], path, torch.Generator().manual_seed(4))
    with_path = term(Context(state_at(x_t, t, t - 1, model, y_tgt, i=1, sampler=ddpm), x_t))
    torch.testing.assert_close(with_path, (x_back - (path[1] if t > 0 else x_src)).pow(2).flatten(1).mean(1))


def test_step_reference_renoises_as_if_clean_and_wraps_at_zero():
    """The original's version: x̃ = q_sample(x_{t−1}, t−1), target q_sample(x_src, t−1), t − 1 = −1 read as 999."""
    model, x_t, x_src = LinearModel(), rand(1, 3, 4, 4, seed=1), rand(1, 3, 4, 4, seed=2)
    y_src, y_tgt = torch.ones(1, 2, dtype=torch.float64), -torch.ones(1, 2, dtype=torch.float64)
    for t, s_ref in ((300, 299), (0, 999)):
        term = CycleStepByStep(x_src, y_src, generator=torch.Generator().manual_seed(7), reference=True)
        loss = term(Context(state_at(x_t, t, t - 1, model, y_tgt, sampler=DDPM(variance_type="fixed_large", clip=False)),
                            x_t))
        draws = torch.Generator().manual_seed(7)
        n = [torch.randn(x_src.shape, generator=draws, dtype=torch.float64) for _ in range(5)]  # n[0]: unused target ε
        sigma = BETAS[t].sqrt() if t > 0 else 0.0
        x_prev = posterior_mean(x_t, t, model(x_t, t, y_tgt)) + sigma * n[1]
        x_noisy = ABAR[s_ref].sqrt() * x_prev + (1 - ABAR[s_ref]).sqrt() * n[2]
        x_back = posterior_mean(x_noisy, t, model(x_noisy, t, y_src)) + sigma * n[3]
        target = ABAR[s_ref].sqrt() * x_src + (1 - ABAR[s_ref]).sqrt() * n[4]
        torch.testing.assert_close(loss, (x_back - target).pow(2).flatten(1).mean(1))


def test_step_to_origin_vanishes_for_the_ideal_source_denoiser():
    """With the ideal denoiser of a point mass at x_src under y_src, x_rec = x_src whatever x_in and the noise: the
    loss is 0; with the mass at x_src + 0.1 it is 0.01. x_in blends x̂0 and x_t by fac = √(1−ᾱ_t)."""
    x_src, x_tgt, x_t = rand(2, 3, 4, 4, seed=1), rand(2, 3, 4, 4, seed=2), rand(2, 3, 4, 4, seed=3)
    y_src, y_tgt = torch.ones(2, 2, dtype=torch.float64), -torch.ones(2, 2, dtype=torch.float64)
    for offset, expected in ((0.0, 0.0), (0.1, 0.01)):
        ctx = Context(state_at(x_t, 400, 399, DeltaModel(x_src + offset, x_tgt), y_tgt), x_t)
        loss = CycleToOrigin(x_src, y_src, torch.Generator().manual_seed(0))(ctx)
        torch.testing.assert_close(loss, torch.full((2,), expected, dtype=torch.float64))
    fac = math.sqrt(1 - SCHEDULE.alpha_bar(400))
    torch.testing.assert_close(ctx.x_in, fac * x_tgt + (1 - fac) * x_t)


class Linear:
    """A loss term with a known gradient: L = Σ w·x_t, so ∇L = w."""

    def __init__(self, w):
        self.w = w

    def __call__(self, ctx):
        return (ctx.x * self.w).flatten(1).sum(1)


@pytest.mark.parametrize("form", ["ddpm_large", "ddpm_small", "ddim"])
def test_guidance_update_is_the_mean_or_score_form(form):
    """DDPM: μ' = μ_θ + Σ_t·g (Σ_t = β_t or β̃_t); DDIM: ε' = ε − √(1−ᾱ_t)·g; g = −λ·∇L."""
    model, x_t, w, z = LinearModel(), rand(2, 3, 4, 4, seed=1), rand(1, 3, 4, 4, seed=2), rand(2, 3, 4, 4, seed=3)
    y, t, s, weight = torch.ones(2, 2, dtype=torch.float64), 700, 699, 0.3
    sampler = DDIM(clip=False) if form == "ddim" else DDPM(variance_type=form.replace("ddpm_", "fixed_"), clip=False)
    guidance = CycleDiffGuidance({"linear": (weight, Linear(w))})
    out = sample(model, SCHEDULE, x_t, [t], final=s, guidance=[guidance], sampler=sampler, noises=[z], cond=y,
                 progress=False)
    g = -weight * w
    eps = model(x_t, t, y)
    if form == "ddim":
        eps = eps - (1 - ABAR[t]).sqrt() * g
        x0 = (x_t - (1 - ABAR[t]).sqrt() * eps) / ABAR[t].sqrt()
        expected = ABAR[s].sqrt() * x0 + (1 - ABAR[s]).sqrt() * eps
    else:
        var = BETAS[t] if form == "ddpm_large" else BETAS[t] * (1 - ABAR[s]) / (1 - ABAR[t])
        expected = posterior_mean(x_t, t, eps) + var * g + var.sqrt() * z
    torch.testing.assert_close(out, expected)
    assert guidance.rows == [{"t": t, "linear": pytest.approx(float((x_t * w).flatten(1).sum(1).mean()))}]


def test_gradient_normalisation_gives_each_term_unit_rms():
    model, x_t, y = LinearModel(), rand(2, 3, 4, 4, seed=1), torch.ones(2, 2, dtype=torch.float64)
    w = rand(1, 3, 4, 4, seed=2)
    state = state_at(x_t, 500, 480, model, y)
    state.eps = model(x_t, 500, y)
    eps = state.eps.clone()
    CycleDiffGuidance({"a": (2.0, Linear(w)), "b": (1.0, Linear(5 * w))}, grad_norm=True).after_model(state)
    unit = w / w.pow(2).mean().sqrt()
    torch.testing.assert_close(state.eps, eps + (1 - ABAR[500]).sqrt() * 3.0 * unit)


@pytest.mark.parametrize("noise_aware", [False, True])
def test_attribute_loss_is_the_originals_on_flipped_attributes(noise_aware):
    """The original: att_num·BCE_mean(m⊙p + (1−m)⊙y_tgt, y_tgt); ours: Σ_a m_a·BCE(p_a, y_tgt_a) per image."""
    torch.manual_seed(0)
    net = AttributeNet(["Bangs", *ATTRS], channels=(8, 16), image_size=16, noise_aware=noise_aware).eval()
    x_t, x_in = torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16)
    y_tgt = torch.tensor([[1.0, -1, 1, -1], [-1, 1, 1, -1], [1, 1, -1, -1]])
    mask = torch.tensor([[0.0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    ctx = SimpleNamespace(x=x_t, x_in=x_in, state=SimpleNamespace(t=300))
    loss = AttributeLoss(net, ATTRS, y_tgt, mask)(ctx)
    logits = net(x_t, torch.full((3,), 300)) if noise_aware else net(x_in)
    p, y = torch.sigmoid(torch.stack([logits[a] for a in ATTRS], 1)), (y_tgt > 0).float()
    for b in range(3):
        reference = len(ATTRS) * torch.nn.functional.binary_cross_entropy(mask[b] * p[b] + (1 - mask[b]) * y[b], y[b])
        torch.testing.assert_close(loss[b], reference, atol=1e-5, rtol=1e-5)
    assert loss[2] == 0  # nothing flipped: no attribute gradient


@pytest.mark.parametrize("scale", [0.0, 2.5])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_classifier_free_step_is_the_ddim_update_by_hand(scale, eta):
    """One guided DDIM(η) step under ClassifierFree equals ε̃ = ε_∅ + w(ε_y − ε_∅) from direct UNet calls (null label
    0), minus the score-form guidance √(1−ᾱ_t)·g, put through the DDIM update by hand; the guidance terms see the plain
    conditional ε_y (its `model`); w = 1 is the denoiser itself."""
    torch.manual_seed(0)
    unet = attribute_unet(TINY_UNET, ATTRS).double().eval()
    with torch.no_grad():
        unet.class_embedding.linear_2.weight.normal_(0, 0.5)
    denoiser = Denoiser(unet, SCHEDULE)
    x_t, z, w, t, s = rand(3, 3, 16, 16, seed=1), rand(3, 3, 16, 16, seed=2), rand(1, 3, 16, 16, seed=3), 600, 560
    y = torch.tensor([[1.0, -1, 1, -1], [-1, -1, 1, 1], [1, 1, -1, 1]], dtype=torch.float64)
    with torch.no_grad():
        steps = torch.full((3,), t)
        eps_y = unet(x_t, steps, class_labels=y).sample
        eps_null = unet(x_t, steps, class_labels=torch.zeros_like(y)).sample
        seen = []
        guidance = CycleDiffGuidance({"linear": (0.3, Linear(w)),
                                      "seen": (1.0, lambda ctx: seen.append(ctx.eps.detach()) or 0 * ctx.x.sum())},
                                     model=denoiser)
        out = sample(ClassifierFree(denoiser, scale), SCHEDULE, x_t, [t], final=s, cond=y, noises=[z], guidance=[guidance],
                     sampler=DDIM(eta=eta, clip=False), progress=False)
    assert (eps_y - eps_null).abs().max() > 1e-2  # the labels matter
    torch.testing.assert_close(seen[0], eps_y)
    eps = eps_null + scale * (eps_y - eps_null) + (1 - ABAR[t]).sqrt() * 0.3 * w
    x0 = (x_t - (1 - ABAR[t]).sqrt() * eps) / ABAR[t].sqrt()
    sigma = eta * ((1 - ABAR[s]) / (1 - ABAR[t]) * (1 - ABAR[t] / ABAR[s])).sqrt()
    expected = ABAR[s].sqrt() * x0 + (1 - ABAR[s] - sigma ** 2).sqrt() * eps + sigma * z
    torch.testing.assert_close(out, expected)
    assert classifier_free(denoiser, 1.0) is denoiser and classifier_free(denoiser, scale).scale == scale


def test_auto_start_is_edit_friendly_under_stochastic_ddim():
    """method.start=auto: the edit-friendly inversion where the sampler is DDIM with η > 0, else the DDIM inversion."""
    weights, networks = {"perceptual": 0.0, "identity": 0.0}, {"perceptual": None, "identity": None}
    for sampler, start in ((DDIM(eta=1.0), "edit_friendly"), (DDIM(eta=[0.0, 0.5]), "edit_friendly"),
                           (DDIM(eta=0.0), "ddim_inversion"), (DDPM(), "ddim_inversion")):
        assert check_edit(sampler, "auto", "origin", "fixed_large", weights, networks)[1] == start
    assert check_edit(DDIM(eta=1.0), "sdedit", "origin", "fixed_large", weights, networks)[1] == "sdedit"


def test_noise_aware_training_times_weight_low_t():
    """t_power 1 is today's uniform randint draw; p > 1 gives P(t < s) = (s/T)^(1/p); p ≤ 0 is refused."""
    uniform = training_times(64, 1000, 1.0, "cpu", torch.Generator().manual_seed(3))
    assert torch.equal(uniform, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)))
    t = training_times(200_000, 1000, 3.0, "cpu", torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 999 and t.dtype == torch.long
    for s in (10, 100, 500):
        assert abs(float((t < s).float().mean()) - (s / 1000) ** (1 / 3)) < 0.005
    with pytest.raises(InputError, match="model.t_power=0"):
        AttributeClassifier(ATTRS, noise_aware=True, scheduler={"num_train_timesteps": 1000}, t_power=0)


def test_step_noise_is_a_pure_function_of_key_and_step():
    a, b = StepNoise((2, 3, 4, 4), 5, (0, 7), "cpu"), StepNoise((2, 3, 4, 4), 5, (0, 7), "cpu")
    torch.testing.assert_close(a[3], b[3])
    assert not torch.allclose(a[3], a[2]) and not torch.allclose(a[3], StepNoise((2, 3, 4, 4), 5, (1, 7), "cpu")[3])
    assert len(a) == 5


def test_parse_edits():
    attrs = ["Male", "Smiling", "Eyeglasses", "Young", "Black_Hair"]
    assert parse_edits("Smiling", attrs) == {"Smiling": ["Smiling"]}
    assert parse_edits([15, 11, "Smiling+Eyeglasses", 20], attrs) == {
        "Smiling": ["Smiling"], "Male": ["Male"], "Smiling+Eyeglasses": ["Smiling", "Eyeglasses"], RECONSTRUCTION: []}
    assert parse_edits(None, attrs) == {"Eyeglasses": ["Eyeglasses"], "Male": ["Male"], "Smiling": ["Smiling"],
                                        "Young": ["Young"], RECONSTRUCTION: []}  # the original's table, as far as known
    assert parse_edits(5, attrs) == {"Black_Hair": ["Black_Hair"]}
    for bad, message in (("Laughing", "attribute=Laughing: not an attribute"), (0, r"Goatee \(index 0 of the"),
                         (21, "attribute=21"), ("reconstruction+Male", "cannot be combined")):
        with pytest.raises(InputError, match=message):
            parse_edits(bad, attrs)


# --- the method --------------------------------------------------------------------------------------------
def common(tiny) -> list[str]:
    return [f"model.pretrained={tiny['model']}", f"method.classifier={tiny['guide']}",
            f"method.eval_classifier={tiny['eval']}", "progress=false", "method.t0=999", "sampler.steps=3"]


def test_cli_edits_with_every_output(tiny, tmp_path):
    run = tmp_path / "run"
    result = run_cli("sample", "method=cyclediff", *common(tiny), "attribute=[Smiling,11,Smiling+Eyeglasses,20]",
                     "num_samples=3", "batch_size=2", "method.cycle=step", "method.start=edit_friendly",
                     "sampler.eta=1", "method.previews=2", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["edits"]) == ["Smiling", "Male", "Smiling+Eyeglasses", RECONSTRUCTION]
    assert metrics["source_attributes"] == "labels" and metrics["classifier_input"] == "clean_blend"
    smiling, rec = metrics["edits"]["Smiling"], metrics["edits"][RECONSTRUCTION]
    assert smiling["network_calls"] == 9  # 3 steps × (the loop's call, ε with gradient, the cycle's call)
    assert smiling["ground_truths"] == 3 and {"flip_rate", "preservation", "psnr", "ssim", "psnr_input",
                                              "flip_rate_input", "preservation_input"} <= set(smiling)
    assert set(smiling["preserved"]) == {"Male", "Eyeglasses", "Young"}
    assert {"psnr", "l1", "preservation"} <= set(rec) and "flip_rate" not in rec
    names = [f"face90000{i}" for i in range(3)]
    for name in names:
        for edit in metrics["edits"]:
            assert (run / "edits" / f"{name}_{edit}.png").is_file()
            assert (run / "previews" / f"{name}_{edit}.png").is_file()
        assert (run / "inputs" / f"{name}.png").is_file() and (run / "decoded" / f"{name}.png").is_file()
        assert (run / "counterfactuals" / f"{name}_Smiling.png").is_file()
    assert (run / "grid.png").is_file() and (run / "counterfactuals.png").is_file() and (run / "index.html").is_file()
    with open(run / "losses.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 * 4 * 3 and set(rows[0]) == {"edit", "first_face", "step", "t", "attribute", "range", "cycle"}
    assert rows[-1]["edit"] == RECONSTRUCTION and rows[-1]["attribute"] == ""  # nothing flipped, no attribute term


@pytest.mark.parametrize("overrides", [
    ["method=cyclediff_reference", "method.cycle=step_reference", "sampler.steps=3",   # DDPM, x_T := the image;
     "check_finite=false"],                                                             # diverges on the tiny model
    ["method.start=sdedit", "method.t0=600", "method.cycle=none", "method.classifier={noisy}"],
    ["method.start=ddim_inversion", "method.cycle=step", "method.grad_norm=true",
     "method.weights.perceptual=1", "method.networks.perceptual={guide}", "method.weights.identity=1",
     "method.networks.identity={noisy}"],
])
def test_starts_samplers_cycles_and_feature_terms(tiny, tmp_path, overrides):
    overrides = [o.format(**tiny) for o in overrides]
    metrics = run_sample(compose("sample", ["method=cyclediff", *common(tiny), "attribute=[Smiling,reconstruction]",
                                            "num_samples=2", "batch_size=2", *overrides], tmp_path / "run"))
    for entry in metrics["edits"].values():
        assert all(math.isfinite(v) for v in entry.values() if isinstance(v, float))
    noise_aware = f"method.classifier={tiny['noisy']}" in overrides
    assert metrics["classifier_input"] == ("noise_aware" if noise_aware else "clean_blend")
    if "method=cyclediff_reference" in overrides:
        assert (metrics["sampler"], metrics["start"], metrics["first_t"]) == ("ddpm", "original", 999)
    rows = list(csv.DictReader(open(tmp_path / "run" / "losses.csv")))
    expected = {"attribute", "range"} | ({"cycle"} if "method.cycle=none" not in overrides else set())
    expected |= {"perceptual", "identity"} if "method.weights.identity=1" in overrides else set()
    assert expected <= set(rows[0])


def test_cfg_scale_one_is_the_plain_run_and_other_scales_guide(tiny, tmp_path):
    """method.cfg_scale=1 gives the images of the default run; 3 changes the edits at the same number of network calls
    (the null rows share the loop's)."""
    runs = {}
    for name, extra in (("default", []), ("one", ["method.cfg_scale=1"]), ("three", ["method.cfg_scale=3"])):
        metrics = run_sample(compose("sample", ["method=cyclediff", *common(tiny), "attribute=[Smiling]",
                                                "num_samples=2", "batch_size=2", *extra], tmp_path / name))
        images = {p.name: p.read_bytes() for p in sorted((tmp_path / name / "edits").iterdir())}
        runs[name] = (metrics, images)
    assert runs["one"][1] == runs["default"][1] and len(runs["default"][1]) == 2
    assert all(runs["three"][1][k] != v for k, v in runs["default"][1].items())
    assert [runs[k][0]["cfg_scale"] for k in runs] == [1.0, 1, 3]
    assert runs["three"][0]["edits"]["Smiling"]["network_calls"] == runs["default"][0]["edits"]["Smiling"][
        "network_calls"]


def test_image_inputs_with_labels_or_predicted(tiny, tmp_path):
    faces = tmp_path / "faces"
    for i in range(2):
        save_image(torch.rand(3, 16, 16) * 2 - 1, faces / f"{i:05d}.png")
    (tmp_path / "attrs.txt").write_text("2\nMale Smiling Eyeglasses Young Bangs\n00000.png 1 -1 -1 1 1\n"
                                        "00001.png -1 1 -1 -1 -1\n")
    for k, (labels, source) in enumerate(((tmp_path / "attrs.txt", "labels"), ("[1,0,0,1]", "labels"),
                                          ("null", "predicted"))):
        out = tmp_path / f"run{k}"
        metrics = run_sample(compose("sample", ["method=cyclediff", *common(tiny), "attribute=Smiling",
                                                "method.input=images", f"gt_path={faces}", f"method.labels={labels}"],
                                     out))
        assert metrics["source_attributes"] == source and metrics["faces"] == 2
        assert "ground_truths" not in metrics["edits"]["Smiling"] and "flip_rate" in metrics["edits"]["Smiling"]
        assert sorted(p.name for p in (out / "edits").iterdir()) == ["00000_Smiling.png", "00001_Smiling.png"]


def test_a_composed_source_gives_the_faces(tiny, tmp_path):
    faces = tmp_path / "faces"
    for i in range(3):
        save_image(torch.rand(3, 24, 24) * 2 - 1, faces / f"img{i}.png")
    (tmp_path / "attrs.txt").write_text("3\nMale Smiling Eyeglasses Young\nimg0.png 1 -1 -1 1\nimg1.png -1 1 -1 -1\n"
                                        "img2.png 1 1 1 -1\n")
    source = ["+source=images", f"source.path={faces}", "source.resize=bicubic", "source.count=2",
              f"source.attributes={tmp_path / 'attrs.txt'}"]
    out = tmp_path / "images"
    metrics = run_sample(compose("sample", ["method=cyclediff", *common(tiny), "attribute=Smiling", *source], out))
    assert metrics["faces"] == 2 and metrics["source_attributes"] == "labels"
    assert sorted(p.name for p in (out / "edits").iterdir()) == ["img0_Smiling.png", "img1_Smiling.png"]
    out = tmp_path / "synthetic"
    metrics = run_sample(compose("sample", ["method=cyclediff", *common(tiny), "attribute=Smiling", "+source=synthetic",
                                            "source.count=1", "source.start=900005"], out))
    assert metrics["edits"]["Smiling"]["ground_truths"] == 1 and (out / "edits" / "face900005_Smiling.png").is_file()
    with pytest.raises(InputError, match="this source gives none"):
        run_sample(compose("sample", ["method=cyclediff", *common(tiny), "+source=seeds"], tmp_path / "seeds"))


def test_the_evaluator_is_held_out_by_weights_too(tiny, tmp_path):
    """A copy of a guidance network under another name is refused as the evaluator: of the guidance classifier, or of
    a feature network."""
    shutil.copytree(tiny["guide"], tmp_path / "copy")
    for overrides in ([], [f"method.classifier={tiny['noisy']}", "method.weights.identity=1",
                           f"method.networks.identity={tiny['guide']}"]):
        cfg = compose("sample", ["method=cyclediff", *common(tiny), "attribute=Smiling",
                                 f"method.eval_classifier={tmp_path / 'copy'}", *overrides], tmp_path / "run")
        with pytest.raises(InputError, match=r"is also a guidance classifier \(.* has the same weights\)"):
            run_sample(cfg)


def bad_inputs(tiny, tmp_path):
    save_image(torch.zeros(3, 32, 32), tmp_path / "big" / "a.png")
    return [
        (["attribute=Laughing"], "attribute=Laughing: not an attribute of the model"),
        (["attribute=0"], r"Goatee \(index 0"),
        (["method.input=images", f"gt_path={tmp_path / 'big'}"], "32x32 px, the model needs 16x16"),
        (["method.input=images", f"gt_path={CONF.parent / 'tests' / 'fixtures'}"], r"gt_path=.*: no images \("),
        (["method.input=images"], "gt_path: not set"),
        ([f"method.classifier={tiny['other']}"], "has no binary head for Smiling, Eyeglasses, Young"),
        ([f"model.pretrained={tiny['plain']}"], "is not attribute-conditional"),
        (["method.start=edit_friendly", "sampler=ddpm"], "use sampler=ddim"),
        ([f"method.eval_classifier={tiny['guide']}"], "also a guidance classifier"),
        (["method.weights.identity=5"], "needs method.networks.identity"),
        (["method.cycle=both"], "method.cycle=both: use one of origin, step, step_reference, none"),
        (["method.start=edit_friendly", "sampler.eta=0"], "with η > 0"),
        (["method.cfg_scale=-1"], r"method.cfg_scale=-1: give a number ≥ 0"),
        (["method.cfg_scale=2", "guidance=[hedit]"], r"guidance=\[hedit\]: method=cyclediff with method.cfg_scale"),
    ]


def test_bad_inputs_are_one_clear_error_each(tiny, tmp_path):
    faces = tmp_path / "faces"
    save_image(torch.zeros(3, 16, 16), faces / "a.png")
    cases = bad_inputs(tiny, tmp_path) + [
        (["method.input=images", f"gt_path={faces}", "method.labels=[1,0,1]"], r"method.labels=\[1, 0, 1\]: give 4"),
    ]
    for overrides, message in cases:
        cfg = compose("sample", ["method=cyclediff", *common(tiny), "attribute=Smiling", *overrides], tmp_path / "run")
        with pytest.raises(InputError, match=message):
            run_sample(cfg)
    result = run_cli("sample", "method=cyclediff", *common(tiny), "attribute=Laughing",
                     f"hydra.run.dir={tmp_path / 'cli'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "Laughing" in result.stderr


# --- the measurement script --------------------------------------------------------------------------------------
def test_evaluate_tiny(tiny, tmp_path):
    spec = importlib.util.spec_from_file_location("cyclediff_evaluate", EXPERIMENTS / "cyclediff" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--model", tiny["model"], "--classifier", tiny["guide"], "--eval-classifier", tiny["eval"],
            "--faces", "2", "--timing-faces", "1", "--batch-size", "2", "--steps", "2", "--ddpm-steps", "4",
            "--attributes", "Smiling", "Male", "--device", "cpu", "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path)]
    results = script.main(argv)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    assert set(results["attributes"]) == {"Smiling", "Male", RECONSTRUCTION}
    assert set(results["cycles"]) == {"none", "origin", "step", "origin ×10"} and set(results["starts"]) == {
        "original", "sdedit", "ddim_inversion", "edit_friendly"}
    terms = results["terms"]  # from the default run's losses.csv: reconstruction has no attribute term
    assert set(terms) == {"Smiling", "Male", RECONSTRUCTION} and "attribute" not in terms[RECONSTRUCTION]
    assert all(terms[e]["cycle"] > 0 and terms[e]["attribute"] > 0 for e in ("Smiling", "Male"))
    timing = results["timing"]
    # 3 calls per step: DDPM on 4 respaced steps, of which 333 and 0 are ≤ t0 = 500; DDIM 500, 0; the original's
    # preset all 4 steps from the image itself
    assert [timing[k]["network_calls"] for k in ("ddpm", "ddim", "reference")] == [6, 6, 12]
    assert timing["speedup"] > 0
    text = (tmp_path / "results.md").read_text()
    for heading in ("## Per attribute", "## Cycle loss", "## Start point", "## DDPM-1000 vs DDIM", "## Targets"):
        assert heading in text
    assert script.main(argv) == results  # finished runs are read back, not rerun


def test_cfg_study_tiny(tiny, tmp_path):
    spec = importlib.util.spec_from_file_location("cyclediff_cfg", EXPERIMENTS / "cyclediff" / "cfg.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--model", tiny["model"], "--classifier", tiny["guide"], "--eval-classifier", tiny["eval"], "--faces", "2",
            "--steps", "2", "--scales", "1", "2", "--attributes", "Smiling", "Male", "--timing-faces", "1",
            "--timing-attribute", "Smiling", "--device", "cpu", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path)]
    (tmp_path / "results.md").write_text("# earlier\n")
    results = script.main(argv)
    assert json.loads((tmp_path / "cfg.json").read_text()) == json.loads(json.dumps(results))
    assert set(results["starts"]) == {"ddim_inversion", "edit_friendly"} and set(results["cfg"]) == {"1", "2"}
    assert results["cfg"]["1"] == results["starts"][results["best_start"]]  # w = 1 is the start's own cell
    two = json.loads((tmp_path / "runs" / f"cfg_{results['best_start']}_2" / "metrics.json").read_text())
    assert two["cfg_scale"] == 2 and set(results["cfg"]["2"]["per_attribute"]) == {"Smiling", "Male"}
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("# earlier\n") and text.count(script.SECTION) == 1 and "| w = 2 |" in text
    assert list(results["timing"]["runs"]) == ["ddim_inversion", "edit_friendly", f"{results['best_start']} w = 2"]
    assert script.main(argv) == results and (tmp_path / "results.md").read_text() == text  # read back, replaced
