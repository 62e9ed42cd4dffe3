"""Schedule maths against diffusers' own schedulers and independent closed forms."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from facelab.diffusion import Schedule, repaint_schedule, repaint_timesteps, step_pairs

FIXTURE = Path(__file__).parent / "fixtures" / "ddpm-celebahq-256"
CONFIG = json.loads((FIXTURE / "scheduler" / "scheduler_config.json").read_text())
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)).tolist()  # independent float64 ᾱ of the reference config



@pytest.fixture(scope="module")
def schedule():
    return Schedule.from_config(FIXTURE)


def reference(cls, schedule, **overrides):
    """A diffusers scheduler from the same config, sharing our float64 ᾱ table (tested separately)."""
    sched = cls.from_config({**CONFIG, **overrides})
    sched.alphas_cumprod = schedule.alphas_cumprod.clone()
    return sched


def tensors(seed, shape=(2, 3, 8, 8), n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def test_from_config_sources(tmp_path, schedule):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(CONFIG))
    for source in (CONFIG, FIXTURE / "scheduler" / "scheduler_config.json", tmp_path):
        assert torch.equal(Schedule.from_config(source).alphas_cumprod, schedule.alphas_cumprod)
    assert schedule.alphas_cumprod.dtype == torch.float64
    assert schedule.config["clip_sample"] is True and schedule.variance_type == "fixed_small"
    again = DDPMScheduler.from_config(schedule.to_config())
    assert torch.allclose(again.alphas_cumprod.double(), schedule.alphas_cumprod, rtol=1e-5)
    with pytest.raises(ValueError, match="beta_schedule"):
        Schedule({"beta_schedule": "nope"})
    with pytest.raises(FileNotFoundError):
        Schedule.from_config(tmp_path / "missing")


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(beta_schedule):
    cfg = {**CONFIG, "beta_schedule": beta_schedule, "beta_start": 0.00085, "beta_end": 0.012}
    ours = Schedule(cfg).alphas_cumprod
    theirs = DDPMScheduler.from_config(cfg).alphas_cumprod.double()
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=0)  # diffusers accumulates in float32
    if beta_schedule == "linear":
        assert np.allclose(Schedule(CONFIG).alphas_cumprod.numpy(), np.array(ABAR), rtol=1e-12)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 10, 50, 250, 1000])
def test_timesteps_match_ddim_set_timesteps(schedule, spacing, steps):
    ref = DDIMScheduler.from_config({**CONFIG, "timestep_spacing": spacing, "steps_offset": 1})
    ref.set_timesteps(steps)
    offset = {"offset": 1} if spacing == "leading" else {}
    assert torch.equal(schedule.timesteps(steps, spacing, **offset), ref.timesteps)


def test_respaced_grid_is_guided_diffusions(schedule):
    for steps in (10, 25, 50, 100, 250):
        stride, idx, kept = 999 / (steps - 1), 0.0, []
        for _ in range(steps):  # guided-diffusion space_timesteps, one section
            kept.append(round(idx))
            idx += stride
        assert schedule.timesteps(steps, "respaced").tolist() == kept[::-1]
    grid = schedule.timesteps(250, "respaced")
    assert grid[0] == 999 and grid[-1] == 0 and len(set(grid.tolist())) == 250
    assert sorted(grid.tolist())[:4] == [0, 4, 8, 12]


@pytest.mark.parametrize("T", [1000, 500])
def test_floored_grid_is_asyrp_and_balancing_acts(T):
    """`floored` is the Asyrp / Balancing Act grid, their own expression (diffusion_latent.py, t_0 = T − 1)."""
    schedule = Schedule(num_train_timesteps=T)
    for steps in (2, 7, 10, 20, 49, 50, 100, 250, T):
        seq = np.linspace(0, 1, steps) * (T - 1)
        original = [int(s + 1e-6) for s in list(seq)]  # increasing, ending at T − 1
        assert schedule.timesteps(steps, "floored").tolist() == original[::-1], steps
    grid50 = Schedule().timesteps(50, "floored").tolist()
    assert grid50[:2] == [999, 978] and grid50[-4:] == [61, 40, 20, 0]  # the release's get_timetstep array
    assert Schedule().timesteps(50, "respaced").tolist()[-3] == 41  # respaced rounds: the heads would not match
    assert Schedule().timesteps(1, "floored").tolist() == [999]


def test_q_sample_matches_add_noise(schedule):
    x0, noise, _ = tensors(0)
    ref = reference(DDPMScheduler, schedule)
    t = torch.tensor([0, 999])
    assert torch.allclose(schedule.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), atol=1e-5)
    for ti in (0, 500, 999):
        assert torch.allclose(schedule.q_sample(x0, ti, noise), ref.add_noise(x0, noise, torch.tensor([ti])), atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("steps,spacing", [(10, "leading"), (50, "leading"), (10, "trailing")])
def test_ddim_step_matches_diffusers(schedule, eta, clip, steps, spacing):
    ref = reference(DDIMScheduler, schedule, clip_sample=clip, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    grid = schedule.timesteps(steps, spacing).tolist()
    assert grid == ref.timesteps.tolist()
    for k in (0, 1, len(grid) // 2, len(grid) - 1):
        t, s = grid[k], (grid + [-1])[k + 1]
        x, eps, z = tensors(k)
        ours = schedule.ddim_step(x, t, s, eps, eta=eta, noise=z, clip=clip)
        theirs = ref.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        assert torch.allclose(ours, theirs, atol=1e-5), (t, s)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("respaced", [False, True])
def test_ddpm_step_matches_diffusers(schedule, variance_type, clip, respaced):
    ref = reference(DDPMScheduler, schedule, variance_type=variance_type, clip_sample=clip)
    grid = schedule.timesteps(250, "respaced").tolist() if respaced else list(range(999, -1, -1))
    if respaced:
        ref.set_timesteps(timesteps=grid)
    for k in (0, 3, 100, len(grid) - 2, len(grid) - 1):
        t, s = grid[k], (grid + [-1])[k + 1]
        x, eps, v = tensors(k)
        v = v.clamp(-1, 1)
        output = torch.cat([eps, v], 1) if variance_type == "learned_range" else eps
        theirs = ref.step(output, t, x, generator=torch.Generator().manual_seed(k)).prev_sample
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(k))
        ours = schedule.ddpm_step(x, t, s, eps, noise=z, variance_type=variance_type, clip=clip, v=v)
        assert torch.allclose(ours, theirs, atol=1e-5), (t, s)


def test_ddim_eta1_is_respaced_ddpm(schedule):
    """DDIM(η=1) on any grid equals the fixed_small ancestral step (diffusers DDPM with custom timesteps)."""
    grid = schedule.timesteps(25, "respaced").tolist()
    ref = reference(DDPMScheduler, schedule, clip_sample=False)
    ref.set_timesteps(timesteps=grid)
    for k in (0, 5, 23):
        x, eps, z = tensors(k)
        theirs = ref.step(eps, grid[k], x, generator=torch.Generator().manual_seed(1)).prev_sample
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(schedule.ddim_step(x, grid[k], grid[k + 1], eps, eta=1.0, noise=z), theirs, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_model_output_to_eps(prediction_type):
    schedule = Schedule({**CONFIG, "prediction_type": prediction_type})
    ref = reference(DDIMScheduler, schedule, prediction_type=prediction_type, clip_sample=False)
    ref.set_timesteps(10)
    x, out, _ = tensors(3)
    for t in (900, 400, 0):
        eps = schedule.model_output_to_eps(out, x, t)
        x0_ref = ref.step(out, t, x).pred_original_sample
        assert torch.allclose(schedule.pred_x0(x, t, eps), x0_ref, atol=1e-4)


def test_conversions_and_minus_one(schedule):
    x0, eps, _ = tensors(4)
    for t in (0, 300, 999):
        x_t = schedule.q_sample(x0, t, eps)
        assert torch.allclose(schedule.pred_x0(x_t, t, eps), x0, atol=1e-3)
        assert torch.allclose(schedule.pred_eps(x_t, t, x0), eps, atol=1e-3)
    assert schedule.alpha_bar(-1) == 1.0 and torch.equal(schedule.pred_x0(x0, -1, eps), x0)
    with pytest.raises(IndexError):
        schedule.alpha_bar(1000)


def test_per_sample_times_equal_scalar_times(schedule):
    x, eps, z = tensors(5)
    t, s = torch.tensor([999, 40]), torch.tensor([899, -1])
    for name, kwargs in [("ddim_step", {"eta": 0.5}), ("ddpm_step", {"variance_type": "fixed_large"})]:
        step = getattr(schedule, name)
        batched = step(x, t, s, eps, noise=z, **kwargs)
        for b in range(2):
            single = step(x[b:b + 1], int(t[b]), int(s[b]), eps[b:b + 1], noise=z[b:b + 1], **kwargs)
            assert torch.allclose(batched[b:b + 1], single, atol=1e-6), name
    assert torch.allclose(schedule.q_sample(x, torch.tensor(7), eps), schedule.q_sample(x, 7, eps))


def test_asymmetric_and_inverse_ddim(schedule):
    x, eps_p, eps_d = tensors(6)
    t, s = 600, 400
    a, b = ABAR[t], ABAR[s]
    x0 = (x - (1 - a) ** 0.5 * eps_p) / a ** 0.5
    expected = b ** 0.5 * x0 + (1 - b) ** 0.5 * eps_d
    assert torch.allclose(schedule.ddim_step(x, t, s, eps_p, eps_direction=eps_d), expected, atol=1e-5)
    up = schedule.ddim_step(x, s, t, eps_p)  # inversion: same formula with s > t
    assert torch.allclose(up, ABAR[t] ** 0.5 * (x - (1 - b) ** 0.5 * eps_p) / b ** 0.5 + (1 - a) ** 0.5 * eps_p,
                          atol=1e-5)
    with pytest.raises(ValueError):
        schedule.ddim_step(x, s, t, eps_p, eta=1.0)


def test_forward_step_is_the_one_step_kernel(schedule):
    x, z, _ = tensors(7)
    betas = np.linspace(1e-4, 0.02, 1000).tolist()
    assert torch.allclose(schedule.forward_step(x, 10, 11, z),
                          (1 - betas[11]) ** 0.5 * x + betas[11] ** 0.5 * z, atol=1e-6)
    r = ABAR[8] / ABAR[4]  # consecutive respaced steps use the respaced β
    assert torch.allclose(schedule.forward_step(x, 4, 8, z), r ** 0.5 * x + (1 - r) ** 0.5 * z, atol=1e-6)
    assert torch.allclose(schedule.forward_step(x, -1, 0, z), schedule.q_sample(x, 0, z))


def test_repaint_schedule():
    assert repaint_schedule(5, 2, 2) == [4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, -1]
    times = repaint_schedule(250, 10, 10)
    pairs = step_pairs(times)
    assert times[0] == 249 and times[-1] == -1
    assert all(abs(t - s) == 1 for t, s, _ in pairs)
    assert sum(reverse for *_, reverse in pairs) == 2410
    assert sum(not reverse for *_, reverse in pairs) == 2160
    grid = Schedule(CONFIG).timesteps(250, "respaced")
    mapped = repaint_timesteps(grid)
    assert mapped[:2] == [999, 995] and mapped[-2:] == [0, -1] and len(mapped) == len(times)
