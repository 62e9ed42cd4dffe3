"""The sampling loop, inversions and Denoiser: closed-form Gaussian data, diffusers reference loops, hook semantics."""

import json
import math
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel

from facelab.diffusion import (
    DDIM,
    DDPM,
    Denoiser,
    Guidance,
    Schedule,
    ddim_invert,
    edit_friendly_invert,
    repaint_timesteps,
    sample,
)

FIXTURE = Path(__file__).parent / "fixtures" / "ddpm-celebahq-256"
CONFIG = json.loads((FIXTURE / "scheduler" / "scheduler_config.json").read_text())
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))  # independent ᾱ of the reference config
MU = torch.tensor([0.3, -0.5, 0.1, 0.8], dtype=torch.float64)
VAR = torch.tensor([0.25, 0.04, 0.5, 0.1], dtype=torch.float64)


def abar(t):
    return 1.0 if t < 0 else float(ABAR[t])


class GaussianDenoiser:
    """The optimal ε for x0 ~ N(μ, diag σ²): ε* = √(1−ᾱ)(x − √ᾱ μ)/(ᾱσ² + 1 − ᾱ).

    Given the grid's next time `prev[t]`, it also predicts the exact reverse variance
    β̃ + c0²·Var(x0|x_t) as learned_range channels v = 2f − 1 (so DDPM steps are exact in law).
    """

    def __init__(self, prev=None):
        self.prev, self.last_variance, self.inputs = prev, None, []

    def __call__(self, x, t, cond=None):
        self.inputs.append(x.clone())
        a = abar(t)
        if self.prev is not None and self.prev[t] >= 0:
            b = abar(self.prev[t])
            beta = 1 - a / b
            small = beta * (1 - b) / (1 - a)
            c0 = b ** 0.5 * beta / (1 - a)
            optimal = small + c0 ** 2 * VAR * (1 - a) / (a * VAR + 1 - a)
            f = (optimal.log() - math.log(small)) / (math.log(beta) - math.log(small))
            self.last_variance = (2 * f - 1).expand_as(x)
        return (1 - a) ** 0.5 * (x - a ** 0.5 * MU) / (a * VAR + 1 - a)



@pytest.fixture(scope="module")
def schedule():
    return Schedule.from_config(FIXTURE)


def gaussian_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return MU + VAR.sqrt() * torch.randn(n, 4, generator=g, dtype=torch.float64), g


def assert_moments(out, n):
    """Mean within 4 standard errors, variance within 4 standard errors (√(2/n) relative)."""
    assert ((out.mean(0) - MU).abs() < 4 * (VAR / n).sqrt()).all(), out.mean(0) - MU
    assert ((out.var(0) / VAR - 1).abs() < 4 * math.sqrt(2 / n)).all(), out.var(0) / VAR


def prev_map(times):
    """t -> next lower time, for every reverse step of a (possibly jumping) sequence ending at -1."""
    return {t: s for t, s in pairwise(times) if s < t}


def test_ddim_inversion_round_trip_converges(schedule):
    x0, _ = gaussian_data(16, 0)
    errors = {}
    for steps in (200, 1000):
        grid = schedule.timesteps(steps)
        latents = ddim_invert(GaussianDenoiser(), schedule, x0, grid, progress=False).latents
        assert latents.shape == (steps, 16, 4)
        rec = sample(GaussianDenoiser(), schedule, latents[0], grid, progress=False)
        errors[steps] = (rec - x0).abs().max().item()
    assert errors[1000] < 0.01 and errors[1000] < errors[200] / 3  # first-order: exact as steps → ∞


def test_ddpm_sampling_reproduces_data_moments(schedule):
    n = 4000
    _, g = gaussian_data(0, 1)
    x_T = torch.randn(n, 4, generator=g, dtype=torch.float64)
    out = sample(GaussianDenoiser(), schedule, x_T, schedule.timesteps(1000), sampler=DDPM(clip=False), generator=g,
                 progress=False)
    assert_moments(out, n)


@pytest.mark.parametrize("jumps", [False, True])
def test_respaced_and_repaint_learned_range_sampling(schedule, jumps):
    """Respaced 250-step DDPM, and RePaint's 10×10 jump schedule, with the exact learned variance."""
    n = 3000
    grid = schedule.timesteps(250, "respaced").tolist()
    times = repaint_timesteps(grid) if jumps else grid + [-1]
    _, g = gaussian_data(0, 2)
    x_T = torch.randn(n, 4, generator=g, dtype=torch.float64)
    model = GaussianDenoiser(prev_map(times))
    out = sample(model, schedule, x_T, times, sampler=DDPM(variance_type="learned_range", clip=False), generator=g,
                 progress=False)
    assert len(model.inputs) == (2410 if jumps else 250)
    assert_moments(out, n)


@pytest.mark.parametrize("eta", [1.0, 0.5, [1.0, 0.3, 0.7, 0.5] * 4 + [1.0, 0.5, 0.8, 0.0]])
def test_edit_friendly_inversion_replays_its_trajectory(schedule, eta):
    x0, g = gaussian_data(64, 3)
    grid = schedule.timesteps(20)
    inverter = GaussianDenoiser()
    x_T, noises = edit_friendly_invert(inverter, schedule, x0, grid, eta=eta, generator=g)
    assert noises.shape == (20, 64, 4) and not noises[-1].any()
    replay = GaussianDenoiser()
    out = sample(replay, schedule, x_T, grid, sampler=DDIM(eta=eta, clip=False), noises=noises, progress=False)
    # every network input (the grid latents x_t) is hit to float precision
    for seen, drawn in zip(replay.inputs, inverter.inputs, strict=True):
        assert torch.allclose(seen, drawn, atol=1e-12, rtol=0)
    # the drawn latents are independent q(x_t|x0) samples: normalised noise ≈ N(0, 1), uncorrelated in t
    eps = [(x - abar(t) ** 0.5 * x0) / (1 - abar(t)) ** 0.5 for x, t in zip(replay.inputs, grid.tolist(), strict=True)]
    if eta == 1.0:
        stacked = torch.stack(eps)
        assert abs(stacked.std().item() - 1) < 0.1
        assert abs(torch.corrcoef(torch.stack([stacked[:-1].flatten(), stacked[1:].flatten()]))[0, 1]) < 0.1
    # the last step (σ = 0) returns x̂0 of the last latent: x0 up to √((1−ᾱ_0)/ᾱ_0)·(ε̃ − ε̂)
    a = abar(0)
    x_last = replay.inputs[-1]
    x0_hat = (x_last - (1 - a) ** 0.5 * GaussianDenoiser()(x_last, 0)) / a ** 0.5
    assert torch.allclose(out, x0_hat, atol=1e-12)
    assert (out - x0).abs().max() < 0.1


# --- tiny diffusers UNets ------------------------------------------------------------------------------
def tiny_unet(out_channels=3, **kw):
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=out_channels, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8,
                       **kw).eval()


def reference_scheduler(cls, schedule, **overrides):
    sched = cls.from_config({**CONFIG, **overrides})
    sched.alphas_cumprod = schedule.alphas_cumprod.clone()  # the table itself is tested against diffusers
    return sched


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return tiny_unet()


def test_ddim_loop_matches_diffusers_loop(unet, schedule):
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, 16, 16, generator=g)
    noises = torch.randn(10, 2, 3, 16, 16, generator=g)
    ref = reference_scheduler(DDIMScheduler, schedule, clip_sample=True)
    ref.set_timesteps(10)
    x = x_T
    with torch.no_grad():
        for k, t in enumerate(ref.timesteps):
            x = ref.step(unet(x, t).sample, t, x, eta=1.0, variance_noise=noises[k]).prev_sample
    ours = sample(Denoiser(unet, schedule), schedule, x_T, schedule.timesteps(10), sampler=DDIM(eta=1.0, clip=True),
                  noises=noises, progress=False)
    assert torch.allclose(ours, x, atol=1e-5)


def test_ddpm_learned_range_loop_matches_diffusers_loop(schedule):
    torch.manual_seed(1)
    unet6 = tiny_unet(out_channels=6)
    grid = schedule.timesteps(10, "respaced").tolist()
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = reference_scheduler(DDPMScheduler, schedule, variance_type="learned_range", clip_sample=True)
    ref.set_timesteps(timesteps=grid)
    g, x = torch.Generator().manual_seed(7), x_T
    with torch.no_grad():
        for t in grid:
            x = ref.step(unet6(x, t).sample, t, x, generator=g).prev_sample
    ours = sample(Denoiser(unet6, schedule), schedule, x_T, grid, sampler=DDPM(variance_type="learned_range", clip=True),
                  generator=torch.Generator().manual_seed(7), progress=False)
    assert torch.allclose(ours, x, atol=1e-5)


class Recorder(Guidance):
    """Checks the hook order and that each hook's changes reach the next stage."""

    def __init__(self):
        self.calls = []

    def before_model(self, state):
        self.calls.append(("before_model", state.i, state.t, state.s))
        state.x = state.x * 0.5

    def after_model(self, state):
        self.calls.append(("after_model", state.i))
        state.extra["eps"] = state.eps
        state.x0 = state.x0.clamp(-0.1, 0.1)  # eps must follow

    def after_update(self, state):
        self.calls.append(("after_update", state.i))


class Counter:  # a plain object with a single hook
    def __init__(self):
        self.n = 0

    def after_update(self, state):
        self.n += 1


def test_hook_order_and_state(schedule):
    seen = []

    def model(x, t, cond):
        seen.append((x.clone(), t, cond))
        return torch.full_like(x, 0.3)

    recorder, counter, states = Recorder(), Counter(), []
    x_T = torch.ones(1, 2)
    out = sample(model, schedule, x_T, [900, 500], guidance=[recorder, counter], cond="c", progress=False,
                 callback=lambda st: states.append((st.t, st.s, st.x.clone(), st.eps.clone())))
    assert [c[0] for c in recorder.calls] == ["before_model", "after_model", "after_update"] * 2
    assert recorder.calls[0][1:] == (0, 900, 500) and recorder.calls[3][1:] == (1, 500, -1)
    assert counter.n == 2 and [s[:2] for s in states] == [(900, 500), (500, -1)]
    assert torch.equal(seen[0][0], x_T * 0.5) and seen[0][1:] == (900, "c")  # before_model's x went in
    # the update used the clamped x̂0 and the ε consistent with it
    a, b = abar(900), abar(500)
    x_t = x_T * 0.5
    x0 = ((x_t - (1 - a) ** 0.5 * 0.3) / a ** 0.5).clamp(-0.1, 0.1)
    eps = (x_t - a ** 0.5 * x0) / (1 - a) ** 0.5
    assert torch.allclose(states[0][3], eps.float(), atol=1e-5)
    assert torch.allclose(states[0][2], (b ** 0.5 * x0 + (1 - b) ** 0.5 * eps).float(), atol=1e-5)
    assert torch.allclose(out, states[1][2])


class Asymmetric(Guidance):
    def after_model(self, state):
        state.eps_direction = state.eps
        state.eps = state.eps + 0.2


def test_asymmetric_step_in_loop(schedule):
    def model(x, t, cond):
        return torch.full_like(x, 0.3)

    x_T = torch.ones(1, 2, dtype=torch.float64)
    out = sample(model, schedule, x_T, [700, 300], guidance=[Asymmetric()], final=300, progress=False)
    a, b = abar(700), abar(300)
    expected = b ** 0.5 * (x_T - (1 - a) ** 0.5 * 0.5) / a ** 0.5 + (1 - b) ** 0.5 * 0.3
    assert torch.allclose(out, expected, atol=1e-12)
    with pytest.raises(ValueError, match="asymmetric"):
        sample(model, schedule, x_T, [700], guidance=[Asymmetric()], sampler=DDPM(), progress=False)


class HShift(Guidance):
    def __init__(self, delta, where="after"):
        self.delta, self.h_where, self.seen = delta, where, []

    def h_edit(self, state):
        self.seen.append(state.t)
        return lambda h: h + self.delta


class HGradient(Guidance):
    """An h-gradient step computed with autograd inside the no-grad loop."""

    def h_edit(self, state):
        def step(h):
            with torch.enable_grad():
                h = h.detach().requires_grad_()
                (grad,) = torch.autograd.grad((h ** 2).sum(), h)
            return h.detach() - 0.1 * grad
        return step


def test_h_edit_in_loop(unet, schedule):
    denoiser = Denoiser(unet, schedule)
    x_T = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    grid = schedule.timesteps(3)
    base = sample(denoiser, schedule, x_T, grid, progress=False)
    identity = HShift(0.0)
    assert torch.equal(sample(denoiser, schedule, x_T, grid, guidance=[identity], progress=False), base)
    assert identity.seen == grid.tolist()
    for term in (HShift(1.0), HShift(1.0, "before"), HShift(1.0, "middle"), HGradient()):
        assert not torch.allclose(sample(denoiser, schedule, x_T, grid, guidance=[term], progress=False), base)
    assert all(not m._forward_hooks for m in unet.modules())


def test_gradients_inside_guidance(unet, schedule):
    denoiser = Denoiser(unet, schedule)

    class XGrad(Guidance):
        def after_model(self, state):
            with torch.enable_grad():
                x = state.x_t.detach().requires_grad_()
                (grad,) = torch.autograd.grad(state.model(x, state.t).square().sum(), x)
            state.eps = state.eps - 0.01 * grad
            state.extra["grad_norm"] = grad.norm().item()

    term = XGrad()
    state_extra = []
    sample(denoiser, schedule, torch.randn(1, 3, 16, 16), [500], guidance=[term], progress=False,
           callback=lambda st: state_extra.append(st.extra["grad_norm"]))
    assert state_extra[0] > 0


def test_randomness_only_from_generator(unet, schedule):
    denoiser = Denoiser(unet, schedule)
    x_T = torch.zeros(1, 3, 16, 16)
    rng = torch.get_rng_state()
    runs = [sample(denoiser, schedule, x_T, schedule.timesteps(3), sampler=sampler,
                   generator=torch.Generator().manual_seed(5), progress=False)
            for sampler in (DDIM(eta=1.0), DDIM(eta=1.0), DDPM())]
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(runs[0], runs[1])
    noises = [torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    fixed = [sample(denoiser, schedule, x_T, schedule.timesteps(3), sampler=DDIM(eta=1.0), noises=noises,
                    generator=torch.Generator().manual_seed(seed), progress=False) for seed in (1, 2)]
    assert torch.equal(fixed[0], fixed[1])


def test_ddim_invert_captures_h(unet, schedule):
    denoiser = Denoiser(unet, schedule)
    x0 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    inv = ddim_invert(denoiser, schedule, x0, schedule.timesteps(4), capture_h="after", progress=False)
    assert inv.latents.shape == (4, 2, 3, 16, 16) and inv.hs.shape == (4, 2, 32, 8, 8)
    assert all(not m._forward_hooks for m in unet.modules())


def test_denoiser_conversions(schedule):
    torch.manual_seed(2)
    unet6 = tiny_unet(out_channels=6)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        raw = unet6(x, torch.tensor([10, 10])).sample
        eps_int = Denoiser(unet6, schedule)(x, 10)
        denoiser = Denoiser(unet6, schedule)
        eps_tensor = denoiser(x, torch.tensor(10))
    assert torch.equal(eps_int, raw[:, :3]) and torch.equal(eps_tensor, eps_int)
    assert torch.equal(denoiser.last_variance, raw[:, 3:])
    v_schedule = Schedule({**CONFIG, "prediction_type": "v_prediction"})
    with torch.no_grad():
        eps_v = Denoiser(unet6, v_schedule)(x, torch.tensor([10, 10]))
    a = abar(10)
    assert torch.allclose(eps_v, a ** 0.5 * raw[:, :3] + (1 - a) ** 0.5 * x, atol=1e-5)


def test_denoiser_conditional_unet(schedule):
    torch.manual_seed(3)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                norm_num_groups=8, attention_head_dim=8).eval()
    denoiser = Denoiser(unet, schedule)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        ref = unet(x, 50, encoder_hidden_states=text).sample
        assert torch.allclose(denoiser(x, 50, text), ref)
        masked = denoiser(x, 50, {"encoder_hidden_states": text, "encoder_attention_mask": mask})
        assert torch.allclose(masked[1], ref[1], atol=1e-6) and not torch.allclose(masked[0], ref[0])
