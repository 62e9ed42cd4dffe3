"""method=fuzzy (FC-Diffusion): the blend's maths, the per-time strength, projection and statistics, end-to-end runs
and bad inputs, on a tiny 16 px UNet with a handful of steps."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from conftest import TINY_UNET, compose, run_cli
from facelab.data.layouts import export
from facelab.data.synthetic import SyntheticFaces
from facelab.diffusion import DDPM, Guidance, Schedule, sample
from facelab.diffusion.projection import RunningMoments, load_stats, project, read_stats, save_stats
from facelab.fuzzy_stats import compute_stats
from facelab.guidance.fuzzy import (
    FuzzyBlend,
    fuzzy_blend,
    gaussian_blur,
    log_retention,
    per_time_weight,
    reduce_mask,
)
from facelab.io.errors import InputError
from facelab.metrics.anomaly import auroc_ap, self_degrade
from facelab.models.pretrained import load_denoiser, model_fingerprint
from facelab.sample import run_sample

# Projection depths small enough for seconds on a CPU (one network call each with the default x̂0 projection).
DEPTHS = "zscore_set=[20,40]"
FAST = ["sampler.steps=3", "progress=false", "batch_size=4"]



@pytest.fixture(scope="module")
def stats_file(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stats")
    cfg = compose("fuzzy_stats", [f"model.pretrained={tiny_model_dir}", "N=4", "batch_size=4", DEPTHS,
                                  "progress=false"], out)
    return compute_stats(cfg)


def fuzzy_cfg(model: Path, out: Path, *overrides: str):
    return compose("sample", ["method=fuzzy", f"model.pretrained={model}", "num_samples=2", *FAST, *overrides], out)


def other_model(folder: Path, seed: int) -> Path:
    """A second tiny model: same architecture and schedule, other weights."""
    torch.manual_seed(seed)
    UNet2DModel(**TINY_UNET).save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    return folder


# --- the blend ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("renormalize", [True, False])
def test_blend_variance_renormalisation(renormalize):
    """x_t ~ q(x_t | y) blended with fractional m keeps mean √ᾱ·y and variance 1−ᾱ; fuzzy_off shrinks it."""
    gen = torch.Generator().manual_seed(0)
    n, abar = 200_000, 0.3
    m = torch.tensor([0.1, 0.5, 0.8], dtype=torch.float64)[:, None]
    y = torch.tensor([0.7, -0.4, 0.2], dtype=torch.float64)[:, None]
    x_t = abar ** 0.5 * y + (1 - abar) ** 0.5 * torch.randn(3, n, generator=gen, dtype=torch.float64)
    x = fuzzy_blend(x_t, y, m, abar, torch.randn(3, n, generator=gen, dtype=torch.float64), renormalize)
    expected = (1 - abar) * (torch.ones(3, dtype=torch.float64) if renormalize else m[:, 0] ** 2 + (1 - m[:, 0]) ** 2)
    torch.testing.assert_close(x.mean(1), abar ** 0.5 * y[:, 0], atol=5e-3, rtol=0)
    torch.testing.assert_close(x.var(1), expected, rtol=1.5e-2, atol=0)


def test_binary_mask_is_the_repaint_blend_exactly():
    gen = torch.Generator().manual_seed(1)
    x, y, z = (torch.randn(2, 3, 8, 8, generator=gen) for _ in range(3))
    m = (torch.rand(2, 1, 8, 8, generator=gen) < 0.5).float()
    abar = 0.42
    repaint = m * (y * abar ** 0.5 + z * (1 - abar) ** 0.5) + (1 - m) * x
    assert torch.equal(fuzzy_blend(x, y, m, abar, z), repaint)
    assert torch.equal(per_time_weight(m, 20.0), m)  # 0 and 1 are fixed points of the per-time conversion


def test_per_time_conversion():
    m = torch.tensor([0.0, 1e-3, 0.07, 0.3, 0.9, 1.0], dtype=torch.float64)
    torch.testing.assert_close(per_time_weight(m, 4), m)  # Δt = Δt_ref: as given
    for dt in (1, 5, 20, 40):
        w = per_time_weight(m, dt)
        assert w[0] == 0 and w[-1] == 1 and torch.all(w[1:-1] > 0) and torch.all(w[1:-1] < 1)
        # two half steps remove as much of the deviation as one full step
        torch.testing.assert_close(2 * log_retention(per_time_weight(m[1:-1], dt / 2)), log_retention(w[1:-1]))
    assert per_time_weight(torch.tensor([1e-3]), 16).item() == pytest.approx(2e-3, rel=1e-3)  # ≈ m·√(Δt/Δt_ref)
    assert torch.all(per_time_weight(m[1:-1], 20) > m[1:-1])  # bigger steps, stronger per step


class _Inputs(Guidance):
    def __init__(self):
        self.seen = []

    def before_model(self, state):
        self.seen.append(state.x.clone())


def test_blend_hook_skips_first_step_and_composites():
    schedule = Schedule()
    gen = torch.Generator().manual_seed(0)
    y, x_T = torch.rand(2, 3, 4, 4, generator=gen) * 2 - 1, torch.randn(2, 3, 4, 4, generator=gen)
    m = torch.ones(2, 1, 4, 4)
    m[0] = 0.5
    before, after = _Inputs(), _Inputs()
    out = sample(lambda x, t, c: torch.zeros_like(x), schedule, x_T, [999, 500, 0],
                 guidance=[before, FuzzyBlend(y, m, final_composite=True), after], generator=gen, sampler=DDPM(clip=False))
    assert torch.equal(before.seen[0], x_T) and torch.equal(after.seen[0], x_T)
    assert not torch.equal(before.seen[1], after.seen[1])
    assert torch.equal(out[1], y[1]) and not torch.equal(out[0], y[0])


# --- degradation, metrics, projection, statistics ---------------------------------------------------------
def test_self_degrade_is_seeded_rectangles():
    images = torch.rand(16, 3, 32, 32) * 0.5 + 0.5
    degraded, hit = self_degrade(images, torch.Generator().manual_seed(3))
    again, hit_again = self_degrade(images, torch.Generator().manual_seed(3))
    assert torch.equal(degraded, again) and torch.equal(hit, hit_again)
    assert torch.equal(degraded, torch.where(hit, torch.zeros_like(images), images))
    pixels = hit.any(1)
    assert 8 <= pixels.flatten(1).any(1).sum() < 16  # most images are hit, some (p = 1/8 + channel luck) not
    assert 0.01 < pixels.float().mean() < 0.4  # sides ≈ N(S/4, S/8)


def test_luminance_mask_reduce():
    m = torch.tensor([0.2, 0.4, 0.6])[None, :, None, None].expand(2, 3, 4, 4)
    assert reduce_mask(m, "per_channel") is m
    torch.testing.assert_close(reduce_mask(m, "luminance"), torch.full((2, 1, 4, 4), 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6))


def _opts(**changes):
    """method=fuzzy's zscore options as keep_map reads them."""
    base = dict(mode="zscore", mask_s=0.07, mask_reduce="per_channel", ood_lambda=0.3, ood_expon=2.0, lower_bound=1.0,
                upper_bound=6.0, sigma_floor=1e-6, projection_offset=True, projection_step=50, zscore_draws=1,
                anomaly_blur=0.0)
    return SimpleNamespace(**{**base, **changes})


def _phi(x):
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_gaussian_blur_is_the_normalised_separable_kernel():
    impulse = torch.zeros(1, 1, 15, 15, dtype=torch.float64)
    impulse[..., 7, 7] = 1
    sigma = 1.3  # radius round(3.9) = 4
    taps = np.exp(-np.arange(-4, 5) ** 2 / (2 * sigma ** 2))
    kernel = np.outer(taps, taps) / taps.sum() ** 2
    out = gaussian_blur(impulse, sigma)[0, 0].numpy()
    np.testing.assert_allclose(out[3:12, 3:12], kernel, atol=1e-12)
    assert out.sum() == pytest.approx(1) and np.abs(out).max() == pytest.approx(kernel.max())
    ramp = torch.linspace(0, 1, 12).expand(2, 3, 12, 12)  # replicated edges: constants stay, interior ramps stay
    torch.testing.assert_close(gaussian_blur(torch.full((2, 3, 5, 5), 0.7), 2.0), torch.full((2, 3, 5, 5), 0.7))
    torch.testing.assert_close(gaussian_blur(ramp, 1.0)[..., 4:8], ramp[..., 4:8])
    assert gaussian_blur(ramp, 0) is ramp


def _known_errors(fields):
    """A project_errors stand-in returning errors = μ + σ·z with z = fields(rows) [rows, D, C, H, W]."""
    mean, std = torch.full((2, 3, 4, 4), 100.0, dtype=torch.float64), torch.full((2, 3, 4, 4), 20.0, dtype=torch.float64)

    def fake(denoiser, y, depths, gen, offset, step):
        z = fields(len(y), gen)
        return y[:, None].expand(-1, len(depths), -1, -1, -1), (mean + std * z).float()
    return fake, (mean, std)


def test_keep_map_averages_draws_and_depths_by_hand(monkeypatch):
    """z of image b, draw k, depth d is the constant 1 + b + 2k + 3d (draws are batched draw-major): by hand,
    ẑ = clamp((z − 1)/5, 0, 1), A = its mean over draws and depths, m = 0.3·(1 − A)²."""
    import facelab.guidance.fuzzy as fuzzy

    def fields(rows, gen):
        k, b = torch.arange(rows).div(2, rounding_mode="floor"), torch.arange(rows) % 2
        z = 1 + b + 2 * k
        return (z[:, None] + 3 * torch.arange(2)[None]).double()[..., None, None, None].expand(-1, -1, 3, 4, 4)

    fake, stats = _known_errors(fields)
    monkeypatch.setattr(fuzzy, "project_errors", fake)
    y = torch.zeros(2, 3, 4, 4)
    out = fuzzy.keep_map(_opts(zscore_draws=3), None, y, None, stats, [20, 40], torch.Generator())
    zhat = {b: [[min(max((1 + b + 2 * k + 3 * d - 1) / 5, 0), 1) for d in range(2)] for k in range(3)] for b in (0, 1)}
    for b in (0, 1):
        want_zhat = np.mean(zhat[b], axis=0)  # per depth, over draws
        np.testing.assert_allclose(out["errzscore"][b, :, 0, 0, 0].numpy(), want_zhat, rtol=1e-6)
        assert out["anomaly"][b].unique().item() == pytest.approx(np.mean(zhat[b]), rel=1e-6)
        assert out["m"][b].unique().item() == pytest.approx(0.3 * (1 - np.mean(zhat[b])) ** 2, rel=1e-6)
    assert out["projected"].shape == (2, 2, 3, 4, 4) and out["err"].shape == (2, 2, 3, 4, 4)
    torch.testing.assert_close(out["err"][:, :, 0, 0, 0].double(), 100 + 20 * torch.tensor([[3.0, 6], [4, 7]], dtype=torch.float64))


def test_keep_map_ensemble_of_gaussian_noise_matches_the_closed_form(monkeypatch):
    """Pure N(0, 1) z-scores, K draws and D depths: ẑ = (clamp(z, L, U) − L)/(U − L) has the closed-form mean
    (LΦ(L) + φ(L) − φ(U) + U(1 − Φ(U)) − L)/(U − L) and variance, and A averages K·D independent ẑ."""
    import facelab.guidance.fuzzy as fuzzy

    L, U, K, D = 0.5, 2.0, 8, 2
    fake, stats = _known_errors(lambda rows, gen: torch.randn(rows, D, 3, 4, 4, generator=gen, dtype=torch.float64))
    monkeypatch.setattr(fuzzy, "project_errors", fake)
    y = torch.zeros(4000, 3, 4, 4)
    opts = _opts(lower_bound=L, upper_bound=U, zscore_draws=K)
    a = fuzzy.keep_map(opts, None, y, None, stats, [20, 40], torch.Generator().manual_seed(0))["anomaly"].double()
    clamp_mean = L * _cdf(L) + _phi(L) - _phi(U) + U * (1 - _cdf(U))
    clamp_sq = L ** 2 * _cdf(L) + (_cdf(U) - U * _phi(U)) - (_cdf(L) - L * _phi(L)) + U ** 2 * (1 - _cdf(U))
    mean, var = (clamp_mean - L) / (U - L), (clamp_sq - clamp_mean ** 2) / (U - L) ** 2
    assert a.mean().item() == pytest.approx(mean, abs=5 * math.sqrt(var / a.numel() / K / D))
    assert a.var().item() == pytest.approx(var / (K * D), rel=0.03)  # 192k samples: a few % of sampling error


def test_anomaly_blur_smooths_a_and_draws_multiply_the_projection(tiny_model_dir, stats_file, tmp_path):
    out = tmp_path / "run"
    metrics = run_sample(fuzzy_cfg(tiny_model_dir, out, "mode=zscore", "self_degrade=true", DEPTHS,
                                   f"zscore_path={stats_file}", "method.zscore_draws=2", "method.anomaly_blur=1.5"))
    assert metrics["projection_calls_per_image"] == 2 * (1 + 1)  # K = 2 draws of depths 20 and 40 (one x̂0 call each)
    maps = np.load(out / "maps" / "900000.npz")
    torch.testing.assert_close(torch.from_numpy(maps["A"]),
                               gaussian_blur(torch.from_numpy(maps["zhat"]).mean(0), 1.5), rtol=1e-5, atol=1e-6)
    for bad, message in (("method.zscore_draws=0", "zscore_draws=0: must be at least 1"),
                         ("method.anomaly_blur=-1", "anomaly_blur=-1: must be at least 0")):
        with pytest.raises(InputError, match=message):
            run_sample(fuzzy_cfg(tiny_model_dir, tmp_path / bad.split("=")[0], "mode=zscore", bad))


def test_auroc_is_exact_with_ties():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.4, 0.4, 0.05])
    labels = torch.tensor([0, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()
    assert auroc_ap(scores, labels)[0] == pytest.approx(pairs.mean().item())
    assert auroc_ap(scores, torch.zeros_like(labels)) == (None, None)


def test_running_moments_match_float64_reference():
    data = torch.randn(37, 3, 4, 4, dtype=torch.float64) * 50 + 1000
    moments = RunningMoments()
    for chunk in data.split([5, 16, 1, 15]):
        moments.update(chunk)
    var, mean = torch.var_mean(data, 0, correction=0)
    assert moments.n == 37
    torch.testing.assert_close(moments.mean, mean)
    torch.testing.assert_close(moments.std, var.sqrt())


class _Recorder(torch.nn.Module):
    """A denoiser stand-in (predicts ε = 0) recording the time and input of every call."""

    def __init__(self):
        super().__init__()
        self.schedule, self.last_variance, self.calls = Schedule(), None, []

    def forward(self, x, t, cond=None):
        self.calls.append((t, x.clone()))
        return torch.zeros_like(x)


@pytest.mark.parametrize("offset", [True, False])
def test_projection_is_one_batched_pass_with_shared_noise(offset):
    recorder, gen = _Recorder(), torch.Generator().manual_seed(0)
    y, eps = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4)
    projected = project(recorder, y, [20, 40], eps, gen, offset=offset, step=10)
    assert projected.shape == (2, 2, 3, 4, 4) and projected.abs().max() <= 1
    top = 39 if offset else 40
    assert [(t, len(x)) for t, x in recorder.calls] == [(top, 2), (top - 10, 2), (top - 20, 4), (top - 30, 4)] + (
        [] if offset else [(0, 4)])
    # rows are image-major (image 0: depths 20, 40); depth 20 rows are untouched until their first call
    first_20, first_40 = recorder.calls[2][1][[0, 2]], recorder.calls[0][1]
    abar = recorder.schedule.alphas_cumprod.float()
    for depth, x in ((20, first_20), (40, first_40)):
        torch.testing.assert_close((x - abar[depth].sqrt() * y) / (1 - abar[depth]).sqrt(), eps)


def test_stats_round_trip_and_metadata_checks(stats_file, tiny_model_dir, tmp_path):
    tiny = model_fingerprint(load_denoiser(str(tiny_model_dir)))
    tensors, meta = read_stats(stats_file)
    assert meta["depths"] == [20, 40] and meta["N"] == 4 and meta["resolution"] == 16
    assert meta["projection_step"] == 1000 and meta["projection_offset"] is True and meta["faces"]["start"] == 0
    mean, std, _ = load_stats(stats_file.parent, tiny, 16, "tiny", [40], True, 1000)
    assert mean.shape == std.shape == (1, 3, 16, 16) and mean.dtype == torch.float64
    assert torch.equal(mean[0], tensors["mean"][1]) and torch.all(std > 0)

    with pytest.raises(InputError, match="no statistics for depth"):
        load_stats(stats_file, tiny, 16, "tiny", [30], True, 1000)
    with pytest.raises(InputError, match="projection convention"):
        load_stats(stats_file, tiny, 16, "tiny", [20], True, 1)
    with pytest.raises(InputError, match="zscore_N=1000"):
        load_stats(stats_file, tiny, 16, "tiny", [20], True, 1000, N=1000)
    with pytest.raises(InputError, match="computed for model .* not for model.pretrained=other"):
        load_stats(stats_file, model_fingerprint(load_denoiser(str(other_model(tmp_path / "other", 1)))), 16, "other",
                   [20], True, 1000)
    moments = RunningMoments()
    moments.update(torch.rand(2, 1, 3, 32, 32))
    wrong_size = save_stats(tmp_path / "s32.safetensors", moments, [20], {**meta, "resolution": 32})
    with pytest.raises(InputError, match="32 px"):
        load_stats(wrong_size, tiny, 16, "tiny", [20], True, 1000)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not a safetensors"):
        load_stats(tmp_path / "junk.safetensors", tiny, 16, "tiny", [20], True, 1000)
    before = stats_file.read_bytes()
    with pytest.raises(FileExistsError):
        compute_stats(compose("fuzzy_stats", [f"model.pretrained={tiny_model_dir}", "N=4", f"out={stats_file}"],
                              tmp_path))
    assert stats_file.read_bytes() == before


# --- end to end -------------------------------------------------------------------------------------------
def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_replace_mode_on_default_synthetic_faces(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    metrics = run_sample(fuzzy_cfg(tiny_model_dir, out, "mask_s=0.07"))
    assert metrics["mode"] == "replace" and metrics["strength"] == "per_time" and metrics["num_images"] == 2
    assert metrics["network_calls_per_image"] == 3 and metrics["mean_m"] == pytest.approx(0.07)
    names = sorted(p.name for p in (out / "inpainted").iterdir())
    assert names == ["900000.png", "900001.png"]  # held-out synthetic test faces
    for folder in ("gt_image", "mask_used", "gt_masked"):
        assert sorted(p.name for p in (out / folder).iterdir()) == names
    assert np.all(_png(out / "mask_used" / names[0]) == 18)  # round(0.07·255)
    gt, masked = _png(out / "gt_image" / names[0]).astype(float), _png(out / "gt_masked" / names[0]).astype(float)
    assert np.abs(masked - 0.07 * gt).max() <= 1.01  # a truthful m·image, not black where y < 0
    maps = np.load(out / "maps" / "900000.npz")
    assert maps["m"].shape == (3, 16, 16)
    # the 3-step leading grid 666, 333, 0 blends at Δt = 333 and, before the last call, Δt = 1
    assert sorted(k for k in maps.files if k.startswith("m_applied")) == ["m_applied_dt1", "m_applied_dt333"]
    assert maps["m_applied_dt333"].max() > 0.4 > 0.07 > maps["m_applied_dt1"].max()
    html = (out / "index.html").read_text()
    assert "inpainted/900000.png" in html and "gt_masked/900001.png" in html


def test_modulate_mode_with_image_and_mask_folders(tiny_model_dir, tmp_path):
    root = export(SyntheticFaces(size=16, length=2, seed=5), tmp_path / "data", ["image_mask"])
    mask = _png(root / "masks" / "000000.png").copy()
    mask[:4] = 128  # a fuzzy (grey) band
    Image.fromarray(mask).save(root / "masks" / "000000.png")
    out = tmp_path / "run"
    metrics = run_sample(fuzzy_cfg(tiny_model_dir, out, "mode=modulate", "mask_s=0.5", f"gt_path={root / 'images'}",
                                   f"mask_path={root / 'masks'}", "sampler=repaint", "sampler.steps=4",
                                   "sampler.jump_length=1", "sampler.jump_n_sample=2"))
    assert metrics["strength"] == "per_step" and metrics["network_calls_per_image"] == 7
    used = _png(out / "mask_used" / "000000.png").astype(int)
    keep = _png(root / "masks" / "000000.png").astype(int)
    assert np.abs(used - keep[..., None] * 0.5).max() <= 1  # m = mask·mask_s (greyscale mask, RGB m), grey kept
    assert sorted(p.name for p in (out / "inpainted").iterdir()) == ["000000.png", "000001.png"]
    assert list(np.load(out / "maps" / "000001.npz")["m_applied_dt1"].shape) == [3, 16, 16]


def test_composed_source_gives_the_inputs(tiny_model_dir, folders, tmp_path):
    """+source=NAME replaces gt_path / method.faces: its count, names and keep-masks."""
    out = tmp_path / "run"
    metrics = run_sample(fuzzy_cfg(tiny_model_dir, out, "mode=mask", "+source=synthetic", "source.count=3",
                                   "source.start=900005"))
    assert metrics["num_images"] == 3
    assert sorted(p.stem for p in (out / "inpainted").iterdir()) == [f"face{900005 + i}" for i in range(3)]
    out = tmp_path / "images"
    run_sample(fuzzy_cfg(tiny_model_dir, out, "+source=image_masks", f"source.path={folders / 'images'}",
                         f"source.keep_masks={folders / 'masks'}", "mode=mask"))
    used = _png(out / "mask_used" / "000001.png").astype(int)
    assert np.abs(used - _png(folders / "masks" / "000001.png").astype(int)[..., None]).max() <= 1  # m = the mask


def test_zscore_self_degrade_cli_writes_every_output(tiny_model_dir, stats_file, tmp_path):
    out = tmp_path / "run"
    res = run_cli("sample", "method=fuzzy", f"model.pretrained={tiny_model_dir}", "mode=zscore", "self_degrade=true",
                  "num_samples=3", *FAST, DEPTHS, f"zscore_path={stats_file}", "seed=1", f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-2000:]
    names = ["900000", "900001", "900002"]
    for folder in ("inpainted", "gt_image", "gt_masked", "mask_used", "mask_nolambda", "degradation_mask", "clean"):
        assert sorted(p.stem for p in (out / folder).iterdir()) == names, folder
    for folder in ("projected", "err", "errzscore"):
        assert sorted(p.stem for p in (out / folder).iterdir()) == sorted(f"{n}_{d:04d}" for n in names
                                                                          for d in (20, 40)), folder
    maps = np.load(out / "maps" / "900000.npz")
    assert {"A", "zhat", "err", "m", "degradation"} <= set(maps.files) and list(maps["depths"]) == [20, 40]
    assert maps["zhat"].shape == (2, 3, 16, 16) and 0 <= maps["A"].min() and maps["A"].max() <= 1
    assert maps["m"].max() <= 0.3 + 1e-6  # ood_lambda·(1 − A)², the default ood_lambda 0.3
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["auroc"] <= 1 and set(metrics["auroc_depth"]) == {"20", "40"}
    for key in ("psnr_inside_before", "psnr_inside_after", "psnr_outside_before", "psnr_outside_after"):
        assert isinstance(metrics[key], float)
    assert metrics["network_calls_per_image"] == 3 + 1 + 1  # 3 steps; depths 20 and 40, one x̂0 call each
    assert "errzscore/900002_0040.png" in (out / "index.html").read_text() and (out / "grid.png").is_file()


# --- bad input --------------------------------------------------------------------------------------------
@pytest.fixture
def folders(tmp_path) -> Path:
    return export(SyntheticFaces(size=16, length=2, seed=5), tmp_path / "data", ["image_mask"])


@pytest.mark.parametrize("case", ["missing_mask", "mask_size", "not_an_image", "mask_s", "mode", "depth",
                                  "stats_of_other_model", "test_faces_in_stats", "no_mask_path", "no_gt_folder",
                                  "source_and_gt_path", "source_without_masks"])
def test_bad_input_is_one_clear_error(case, folders, tiny_model_dir, stats_file, tmp_path):
    images, masks = folders / "images", folders / "masks"
    model = tiny_model_dir
    overrides = ["mode=modulate", f"gt_path={images}", f"mask_path={masks}"]
    if case == "missing_mask":
        (masks / "000001.png").unlink()
        message = "no mask for 1 image"
    elif case == "mask_size":
        Image.new("RGB", (8, 8), "white").save(masks / "000001.png")
        message = "mask is 8x8 but image 000001.png is 16x16"
    elif case == "not_an_image":
        (images / "000002.png").write_text("hello")
        (masks / "000002.png").write_text("hello")
        message = "not an image"
    elif case == "mask_s":
        overrides.append("mask_s=1.5")
        message = r"mask_s=1.5: must lie in \[0, 1\]"
    elif case == "mode":
        overrides.append("mode=get_zscor")
        message = "mode='get_zscor'"
    elif case == "depth":
        overrides = ["mode=zscore", "zscore_set=[300,1000]", f"zscore_path={stats_file}"]
        message = r"depths must be distinct integers in \[1, 999\]"
    elif case == "stats_of_other_model":
        model = other_model(tmp_path / "other", 2)
        overrides = ["mode=zscore", DEPTHS, f"zscore_path={stats_file}"]
        message = "statistics were computed for model"
    elif case == "test_faces_in_stats":
        overrides = ["mode=zscore", DEPTHS, f"zscore_path={stats_file}", "method.faces.start=2"]
        message = "^method.faces.start=2: .* overlap the 4 statistics faces .*choose another method.faces.start"
    elif case == "no_gt_folder":  # the default source's errors name this method's knobs
        overrides = [f"gt_path={tmp_path / 'nowhere'}"]
        message = "^gt_path=.*nowhere: no such folder"
    elif case == "source_and_gt_path":
        overrides = [f"gt_path={images}", "+source=synthetic"]
        message = "and \\+source both give the inputs"
    elif case == "source_without_masks":
        overrides = ["mode=mask", "+source=images", f"source.path={images}"]
        message = "mode=mask needs keep-masks: compose \\+source=image_masks"
    else:
        overrides = ["mode=mask", f"gt_path={images}"]
        message = "mode=mask needs mask_path"
    out = tmp_path / "run"
    (out / "inpainted").mkdir(parents=True)
    (out / "inpainted" / "000000.png").write_bytes(b"earlier result")
    with pytest.raises(InputError, match=message):
        run_sample(fuzzy_cfg(model, out, *overrides))
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "inpainted"]
    assert (out / "inpainted" / "000000.png").read_bytes() == b"earlier result"

