"""method=debias (Balancing Act): the guidance maths against closed forms (debias.md §2), the metrics, guidance on a
tiny 16 px model, h extraction, the extract → train → sample pipeline through the CLI, composition and bad inputs."""

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONF, compose, run_cli
from facelab.data.hspace import HSpaceDataset
from facelab.data.layouts import export
from facelab.data.synthetic import SyntheticFaces
from facelab.diffusion import Guidance, Schedule, State, ddim_invert, sample
from facelab.guidance.debias import HSpaceDebias, ImageDebias, Objective
from facelab.io.errors import InputError
from facelab.metrics.attributes import class_fractions, fairness_discrepancy, feature_frechet, frechet_distance
from facelab.models.classifier import AttributeClassifier, load_classifier
from facelab.models.hclassifier import HNet, save_hclassifier
from facelab.models.pretrained import load_denoiser, model_fingerprint
from facelab.sample import run_sample

GRID4 = [750, 500, 250, 0]  # sampler.steps=4, leading spacing
FAST = ["sampler.steps=4", "progress=false"]
T_C = 8.0


def random_hclf(denoiser, heads=None, times=GRID4, std=0.05, seed=0, kind="per_t") -> HNet:
    """A random h-classifier on the tiny model's h (16×8×8 after the mid block) with that model's fingerprint."""
    net = HNet(heads or {"Male": 2}, 1024, times, kind,
               meta={"model": "tiny", "fingerprint": model_fingerprint(denoiser), "where": "after",
                     "grid": list(times), "h_shape": [16, 8, 8]})
    with torch.no_grad():
        net.weight.normal_(0, std, generator=torch.Generator().manual_seed(seed))
    return net.requires_grad_(False)


@pytest.fixture(scope="module")
def denoiser(tiny_model_dir):
    return load_denoiser(str(tiny_model_dir))


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> Path:
    """Tiny (random) attribute classifiers in the export format: guide/ and eval/."""
    root = tmp_path_factory.mktemp("classifiers")
    for seed, name in ((0, "guide"), (1, "eval")):
        torch.manual_seed(seed)
        AttributeClassifier(["Male", "Smiling"], {"skin_tone": 3}, channels=(8, 16), image_size=16).export(root / name)
    return root


@pytest.fixture(scope="module")
def hclf_dir(denoiser, tmp_path_factory) -> Path:
    """A random h-classifier (Male, skin_tone) of the tiny model on the 4-step grid, exported."""
    return save_hclassifier(random_hclf(denoiser, {"Male": 2, "skin_tone": 3}),
                            tmp_path_factory.mktemp("hclf") / "hclf")


def linear_head(seed=0, dim=16) -> HNet:
    net = HNet({"Male": 2}, dim, [500])
    with torch.no_grad():
        net.weight.normal_(generator=torch.Generator().manual_seed(seed))
        net.bias.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return net.requires_grad_(False)


def gradient(objective: Objective, net: HNet, h: torch.Tensor) -> torch.Tensor:
    x = h.clone().requires_grad_(True)
    return torch.autograd.grad(objective(net.predict(x, 500, T_C)), x)[0]


# --- metrics ----------------------------------------------------------------------------------------------
def test_fairness_discrepancy_closed_forms():
    labels = torch.tensor([1] * 80 + [0] * 20)
    assert fairness_discrepancy([0.5, 0.5], labels) == pytest.approx(0.424, abs=5e-4)  # √(2·0.3²)
    assert fairness_discrepancy([0.2, 0.8], labels) == pytest.approx(0.0)
    assert class_fractions(torch.tensor([0, 2, 2, 2]), 3).tolist() == [0.25, 0.0, 0.75]
    assert fairness_discrepancy([1 / 3] * 3, torch.tensor([0, 1, 2])) == pytest.approx(0.0, abs=1e-12)


def test_frechet_closed_forms():
    x = torch.randn(400, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert feature_frechet(x, x) == pytest.approx(0.0, abs=1e-8)
    delta = torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    assert feature_frechet(x + delta, x) == pytest.approx(delta.square().sum().item(), rel=1e-8)  # ‖Δμ‖²
    a, b = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), torch.tensor([2.0, 0.5, 0.5], dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)  # diagonal covariances: Σ (σ₁ − σ₂)²
    assert frechet_distance(zero, a.square().diag(), zero, b.square().diag()) == pytest.approx(3.25)


# --- guidance maths (debias.md §2) ---------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["prob", "logprob"])
@pytest.mark.parametrize("c", [0, 1])
def test_sample_guidance_step_closed_forms(loss, c):
    """prob: the step is +κ·(u_i/T)·(w_c − w_¬c), u = p1(1 − p1); logprob: +κ·((1 − p_i[c])/T)·(w_c − w_¬c)."""
    net = linear_head()
    h = torch.randn(6, 16, generator=torch.Generator().manual_seed(2)) * 3
    p = net.predict(h, 500, T_C)["Male"]
    weight = net.weight[0]
    direction = weight[c] - weight[1 - c]
    factor = p[:, 1] * (1 - p[:, 1]) if loss == "prob" else 1 - p[:, c]
    step = (factor / T_C)[:, None] * direction
    objective = Objective({"Male": c}, net.heads, "sample", loss, scale=1.0)
    torch.testing.assert_close(-gradient(objective, net, h), step)
    term = HSpaceDebias(net, {"Male": c}, mode="sample", loss=loss, scale=2.0, temperature=T_C)
    torch.testing.assert_close(term.edit(h, 500, kappa=0.7) - h, 0.7 * 2.0 * step)
    if loss == "prob":  # the original's loss barely moves a confidently wrong sample; logprob moves it most
        wrong = p[:, c].argmin()
        assert factor[wrong] < (1 - p[wrong, c])


@pytest.mark.parametrize("per_sample", [False, True])
def test_chi2_distribution_gradient_closed_form(per_sample):
    """∂L/∂h_i = (2/N)·(p̄1 − r1)·(1/r0 + 1/r1)·(u_i/T)·Δw, times N with scale_per_sample."""
    net = linear_head(seed=3)
    h = torch.randn(5, 16, generator=torch.Generator().manual_seed(4)) * 3
    r0, r1 = 0.3, 0.7
    p = net.predict(h, 500, T_C)["Male"]
    u = p[:, 1] * (1 - p[:, 1])
    dw = net.weight[0, 1] - net.weight[0, 0]
    n = len(h)
    expected = (2 / n) * (p[:, 1].mean() - r1) * (1 / r0 + 1 / r1) * (u / T_C)[:, None] * dw
    objective = Objective({"Male": r1}, net.heads, "distribution", scale=1.0, scale_per_sample=per_sample)
    torch.testing.assert_close(gradient(objective, net, h), expected * (n if per_sample else 1))
    # every sample moves toward the under-represented class, the ambiguous ones most
    moves = -(gradient(objective, net, h) @ dw)
    assert torch.all((moves > 0) == (p[:, 1].mean() < r1))
    assert moves.abs().argmax() == u.argmax()


def test_kl_and_l2_take_zero_one_targets_chi2_refuses():
    net = linear_head()
    h = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    p1 = net.predict(h, 500, T_C)["Male"][:, 1].mean()
    kl = Objective({"Male": 1.0}, net.heads, "distribution", "kl", scale=1.0, scale_per_sample=False)
    l2 = Objective({"Male": 1.0}, net.heads, "distribution", "l2", scale=1.0, scale_per_sample=False)
    probs = net.predict(h, 500, T_C)
    torch.testing.assert_close(kl(probs), -p1.log())  # KL(r‖p̄) with r = [0, 1]
    torch.testing.assert_close(l2(probs), 2 * (1 - p1) ** 2)
    assert torch.isfinite(gradient(kl, net, h)).all()
    with pytest.raises(InputError, match="loss=kl or loss=l2"):
        Objective({"Male": 1.0}, net.heads, "distribution", "chi2")


def test_default_temperature_steps_a_calibrated_batch_toward_the_target():
    """A calibrated head reads Male 0.86 in a batch and the target is 0.7: the distribution step must lower P(male).
    The default temperature (1 in distribution mode) does; the reference's 8 pulls p̄ toward 0.5, below 0.7, and
    steps the wrong way. Sample guidance keeps the reference's 8."""
    net = HNet({"Male": 2}, 1, [500])
    with torch.no_grad():
        net.weight[0, :, 0] = torch.tensor([-1.0, 1.0])  # logit difference 2h
    h = torch.tensor([[1.5], [0.6]]).repeat(4, 1)  # P(male) 0.953 and 0.769: mean 0.861
    male = lambda x: net.predict(x, 500)["Male"][:, 1].mean().item()  # noqa: E731
    assert male(h) == pytest.approx(0.861, abs=1e-3)
    default = HSpaceDebias(net, {"Male": 0.7}, scale=1.0)
    assert default.temperature == 1.0 and male(default.edit(h, 500, kappa=0.1)) < male(h)
    assert male(HSpaceDebias(net, {"Male": 0.7}, scale=1.0, temperature=8.0).edit(h, 500, kappa=0.1)) > male(h)
    assert HSpaceDebias(net, {"Male": 1}, mode="sample").temperature == 8.0


def test_running_estimate_pools_earlier_batches():
    """p̄_eff = (n_prev·p̂_prev + Σ p_i)/(n_prev + N), gradient scaled by n_prev + N (scale_per_sample)."""
    net = linear_head()
    previous = net.predict(torch.randn(7, 16, generator=torch.Generator().manual_seed(6)), 500, T_C)["Male"]
    h = torch.randn(2, 16, generator=torch.Generator().manual_seed(7))
    objective = Objective({"Male": 0.5}, net.heads, "distribution", scale=1.0)
    pooled = objective({"Male": torch.cat([previous, net.predict(h, 500, T_C)["Male"]])})
    running = objective(net.predict(h, 500, T_C), {"Male": (7, previous.sum(0))})
    torch.testing.assert_close(running, pooled)
    # through the term: the second batch's step sees the first batch's predictions before its edit (where its
    # trajectory was; the next step reads h afresh, so the edited read is not where the image goes)
    term = HSpaceDebias(net, {"Male": 0.5}, running_estimate="cumulative", temperature=T_C, scale=1.0)
    term.edit(h[:1], 500, kappa=0.5)
    before = net.predict(h[:1], 500, T_C)["Male"]
    x = h[1:].clone().requires_grad_(True)
    expected = torch.autograd.grad(objective(net.predict(x, 500, T_C), {"Male": (1, before.sum(0).double())}), x)[0]
    torch.testing.assert_close(term.edit(h[1:], 500, kappa=0.5), h[1:] - 0.5 * expected)
    assert term.stats[500]["n"] == 2


def test_several_attributes_each_with_its_own_target_and_scale():
    net = HNet({"Male": 2, "skin_tone": 3}, 16, [500])
    with torch.no_grad():
        net.weight.normal_(generator=torch.Generator().manual_seed(8))
    net.requires_grad_(False)
    h = torch.randn(6, 16, generator=torch.Generator().manual_seed(9))
    both = Objective({"Male": 0.3, "skin_tone": [0.2, 0.3, 0.5]}, net.heads, scale={"Male": 1.0, "skin_tone": 2.0})
    male = Objective({"Male": 0.3}, net.heads, scale=1.0)
    skin = Objective({"skin_tone": [0.2, 0.3, 0.5]}, net.heads, scale=2.0)
    torch.testing.assert_close(gradient(both, net, h), gradient(male, net, h) + gradient(skin, net, h))


def test_step_schedule():
    """κ_t / scale = 1.5·β_t^0.05·300: β^0.05 is 0.63 at t = 0 and 0.82 at t = 999."""
    term = HSpaceDebias(linear_head(), {"Male": 0.5})
    state = State(x=torch.zeros(1), schedule=Schedule())
    assert term.kappa(state, 0) == pytest.approx(450 * 1e-4 ** 0.05) == pytest.approx(450 * 0.631, rel=1e-3)
    assert term.kappa(state, 999) == pytest.approx(450 * 0.02 ** 0.05) == pytest.approx(450 * 0.822, rel=1e-3)
    slow = HSpaceDebias(linear_head(), {"Male": 0.5}, step_schedule={"gain": 30.0})
    assert slow.kappa(state, 999) == pytest.approx(term.kappa(state, 999) / 10)


# --- guidance on a tiny model -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,target", [("distribution", 0.9), ("sample", 1)])
def test_guidance_moves_hclassifier_predictions_toward_the_target(mode, target, denoiser):
    net = random_hclf(denoiser)
    x_T = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    goal = 0.9 if mode == "distribution" else 1.0
    final = {}
    for kind in ("vanilla", mode):
        term = HSpaceDebias(net, {"Male": target}, mode=kind, scale=1e-3, temperature=T_C)
        sample(denoiser, denoiser.schedule, x_T, GRID4, guidance=[term], progress=False)
        rows = term.trajectory_rows()
        assert [row["t"] for row in rows] == GRID4
        if kind == "vanilla":
            assert all(row["dh_norm"] == 0 and row["Male_p1_after"] == row["Male_p1_before"] for row in rows)
        else:
            for row in rows:  # every step brings the batch's prediction closer to the target
                assert abs(row["Male_p1_after"] - goal) < abs(row["Male_p1_before"] - goal)
                assert 0 < row["dh_norm"] < row["h_norm"]
        final[kind] = term.last["Male"][:, 1]
    assert abs(final[mode].mean() - goal) < abs(final["vanilla"].mean() - goal)
    if mode == "sample":
        assert (final[mode] > final["vanilla"]).float().mean() >= 0.75


def test_heads_keyed_by_t_work_with_any_grid(denoiser):
    """A per-t classifier trained on the 4-step grid: 5 steps (800, 600, 400, 200, 0) need nearest lookup or a
    window on common times; a t-conditioned head reads any grid."""
    grid5 = [800, 600, 400, 200, 0]
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    exact = HSpaceDebias(random_hclf(denoiser), {"Male": 0.5}, scale=1e-3)
    with pytest.raises(InputError, match=r"no head for t=600.*\[750, 500, 250, 0\]"):
        exact.check(denoiser, grid5)
    for term, guided in ((HSpaceDebias(random_hclf(denoiser), {"Male": 0.5}, scale=1e-3, head_lookup="nearest"),
                          [600, 400, 200, 0]),  # 800 lies outside the trained range [0, 750]
                         (HSpaceDebias(random_hclf(denoiser), {"Male": 0.5}, scale=1e-3, window=[0, 0]), [0]),
                         (HSpaceDebias(random_hclf(denoiser, kind="conditioned"), {"Male": 0.5}, scale=1e-3),
                          [600, 400, 200, 0])):
        term.check(denoiser, grid5)
        sample(denoiser, denoiser.schedule, x_T, grid5, guidance=[term], progress=False)
        assert sorted(term.stats, reverse=True) == guided


class _Seen(Guidance):
    def __init__(self):
        self.steps = []

    def after_model(self, state):
        self.steps.append((state.x_t.clone(), state.eps.clone(), state.eps_direction))


@pytest.mark.parametrize("asymmetric", [False, True])
def test_asymmetric_step_takes_the_direction_from_an_unguided_call(asymmetric, denoiser):
    term = HSpaceDebias(random_hclf(denoiser), {"Male": 0.9}, scale=1e-2, asymmetric=asymmetric)
    seen = _Seen()
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    sample(denoiser, denoiser.schedule, x_T, GRID4, guidance=[term, seen], progress=False)
    for (x_t, eps, direction), t in zip(seen.steps, GRID4):
        if not asymmetric:
            assert direction is None
            continue
        with torch.no_grad():
            torch.testing.assert_close(direction, denoiser(x_t, t))
        assert not torch.allclose(direction, eps)


def test_image_space_baseline_step(classifiers):
    """ε ← ε + √(1−ᾱ_t)·scale·∇_{x_t} L with x̂0(x_t, ε) and ε held fixed."""
    net = load_classifier(classifiers / "guide")
    term = ImageDebias(net, {"Male": 1}, mode="sample", loss="prob", scale=3.0, temperature=T_C)
    schedule, gen = Schedule(), torch.Generator().manual_seed(3)
    x_t, eps = torch.randn(2, 3, 16, 16, generator=gen), torch.randn(2, 3, 16, 16, generator=gen)
    state = State(x=x_t, x_t=x_t, t=400, schedule=schedule)
    state.eps = eps
    term.after_model(state)
    x = x_t.clone().requires_grad_(True)
    loss = -net.predict(schedule.pred_x0(x, 400, eps), temperature=T_C)["Male"][:, 1].sum()
    expected = eps + (1 - schedule.alpha_bar(400)) ** 0.5 * 3.0 * torch.autograd.grad(loss, x)[0]
    torch.testing.assert_close(state.eps, expected)


# --- h extraction -------------------------------------------------------------------------------------------
def test_extraction_from_synthetic_faces_is_the_inversion(tiny_model_dir, denoiser, tmp_path):
    out = tmp_path / "run"
    metrics = run_sample(compose("sample", ["method=hextract", f"model.pretrained={tiny_model_dir}", "num_samples=5",
                                            "batch_size=2", "method.shard_size=3", *FAST], out))
    assert metrics["num_images"] == 5 and metrics["shards"] == 2 and metrics["grid"] == GRID4
    dataset = HSpaceDataset(out / "hspace")
    meta = dataset.meta
    assert meta["fingerprint"] == model_fingerprint(denoiser) and meta["where"] == "after"
    assert meta["inversion_eta"] == 0.0 and meta["attributes"] == {"Male": 2, "skin_tone": 3}
    assert meta["h_shape"] == [16, 8, 8] and meta["label_source"].startswith("synthetic:seed=3")
    faces = SyntheticFaces(size=16, length=5, seed=3)
    image = faces[4]["image"][None]
    hs = ddim_invert(denoiser, denoiser.schedule, image, GRID4, capture_h="after", progress=False).hs
    torch.testing.assert_close(dataset[4]["h"].float(), hs[:, 0].flatten(1).half().float())
    truth = [int(faces[4]["attributes"][0]), faces[4]["skin_tone"]]
    assert dataset[4]["labels"].tolist() == truth and metrics["class_counts"]["Male"][0] + \
        metrics["class_counts"]["Male"][1] == 5


def test_extraction_from_class_folders_and_trajectories(tiny_model_dir, classifiers, tmp_path):
    root = export(SyntheticFaces(size=16, length=6, seed=4), tmp_path / "data", ["class_folders"])
    out = tmp_path / "folders"
    metrics = run_sample(compose("sample", ["method=hextract", f"model.pretrained={tiny_model_dir}",
                                            "method.source=class_folders", f"method.root={root / 'Male'}",
                                            "batch_size=4", *FAST], out))
    dataset = HSpaceDataset(out / "hspace")
    folders = {p.stem: int(p.parent.name) for p in (root / "Male").glob("*/*.png")}
    assert metrics["num_images"] == 6 and dataset.meta["attributes"] == {"Male": 2}
    assert sorted(folders.values()) == sorted(int(dataset[i]["labels"][0]) for i in range(6))

    out = tmp_path / "trajectories"
    metrics = run_sample(compose("sample", ["method=hextract", f"model.pretrained={tiny_model_dir}",
                                            "method.source=trajectory", f"method.classifier={classifiers / 'guide'}",
                                            "method.attributes=[Male,Smiling]", "num_samples=3", *FAST], out))
    dataset = HSpaceDataset(out / "hspace")
    assert dataset.meta["source"] == "trajectory" and dataset.meta["eta"] == 1.0
    assert dataset.meta["label_source"] == f"classifier:{classifiers / 'guide'}" and len(dataset) == 3
    assert dataset[2]["h"].shape == (4, 1024)


def test_extraction_bad_inputs(tiny_model_dir, tmp_path):
    root = export(SyntheticFaces(size=16, length=4, seed=4), tmp_path / "data", ["class_folders"])
    (root / "Male" / "2").mkdir()
    base = ["method=hextract", f"model.pretrained={tiny_model_dir}", *FAST]
    with pytest.raises(InputError, match="Male/2: no images"):
        run_sample(compose("sample", [*base, "method.source=class_folders", f"method.root={root / 'Male'}"],
                           tmp_path / "a"))
    with pytest.raises(InputError, match="Laughing"):
        run_sample(compose("sample", [*base, "method.attributes=[Male,Laughing]"], tmp_path / "b"))
    with pytest.raises(InputError, match="decreasing grid"):
        run_sample(compose("sample", [*base, "sampler=repaint", "sampler.steps=4", "sampler.jump_length=1",
                                      "sampler.jump_n_sample=2"], tmp_path / "c"))


# --- end to end ---------------------------------------------------------------------------------------------
def read_csv(path: Path) -> list[dict]:
    with open(path) as file:
        return list(csv.DictReader(file))


def test_extract_train_sample_through_the_cli(tiny_model_dir, classifiers, tmp_path):
    shards = tmp_path / "hspace"
    run_sample(compose("sample", ["method=hextract", f"model.pretrained={tiny_model_dir}", "num_samples=8",
                                  "batch_size=4", f"method.out={shards}", *FAST], tmp_path / "extract"))
    train = tmp_path / "train"
    result = run_cli("train", "+experiment=hclf_gender", f"data.dataset.path={shards}", "data.batch_size=2",
                     "data.val_fraction=0.25", "trainer.max_steps=4", "trainer.val_check_interval=2",
                     "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
                     "trainer.enable_model_summary=false", f"hydra.run.dir={train}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    accuracy = read_csv(train / "hclf" / "hclf_accuracy.csv")
    assert [int(row["t"]) for row in accuracy] == sorted(GRID4) and set(accuracy[0]) == {"t", "Male"}

    out = tmp_path / "sample"
    result = run_cli("sample", "method=debias", "target.Male=0.5", f"model.pretrained={tiny_model_dir}",
                     f"method.hclf={train / 'hclf'}", f"method.eval_classifier={classifiers / 'eval'}",
                     "num_samples=4", "batch_size=2", "method.real_faces.num=4", "sampler.steps=4",
                     "progress=false", f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    male = metrics["attributes"]["Male"]
    assert metrics["mode"] == "distribution" and male["target"] == [0.5, 0.5] and metrics["guided_steps"] == 4
    labels = read_csv(out / "labels.csv")
    assert [row["file"] for row in labels] == [f"samples/{b:04d}_{i:03d}.png" for b in range(2) for i in range(2)]
    eval_male = torch.tensor([int(row["eval_Male"]) for row in labels])
    assert male["fractions"] == class_fractions(eval_male, 2).tolist()
    assert male["fd"] == pytest.approx(fairness_discrepancy([0.5, 0.5], eval_male))
    assert set(metrics["fractions"]) == {"Male", "Smiling", "skin_tone"} and math.isfinite(metrics["frechet"])
    assert {"hclf_Male", "eval_Smiling", "eval_skin_tone"} <= set(labels[0])
    assert [int(row["t"]) for row in read_csv(out / "trajectory.csv")] == GRID4
    assert all((out / row["file"]).is_file() for row in labels) and (out / "grid.png").is_file()


@pytest.mark.parametrize("mode", ["vanilla", "sample", "universal", "knobs"])
def test_other_modes_and_knobs(mode, tiny_model_dir, hclf_dir, classifiers, tmp_path):
    overrides = {"vanilla": ["mode=vanilla", f"method.hclf={tmp_path / 'none'}"],
                 "sample": ["mode=sample", "target.Male=1", "target.skin_tone=2", "method.loss=prob",
                            "method.scale={Male: 0.5, skin_tone: 1.0}"],
                 "universal": ["mode=sample", "target.Male=1", "method.universal_guidance=true",
                               f"method.guidance_classifier={classifiers / 'guide'}"],
                 "knobs": ["target.Male=0", "target.skin_tone=[0.2,0.3,0.5]", "method.loss=kl", "method.window=[0,500]",
                           "method.running_estimate=cumulative", "method.asymmetric=true", "method.grad_steps=2",
                           "method.step_schedule.gain=30", "batch_size=1"]}[mode]
    out = tmp_path / "run"
    metrics = run_sample(compose("sample", ["method=debias", f"model.pretrained={tiny_model_dir}",
                                            f"method.hclf={hclf_dir}", f"method.eval_classifier={classifiers / 'eval'}",
                                            "num_samples=2", "batch_size=2", "method.real_faces.num=0", *FAST,
                                            *overrides], out))
    assert metrics["num_samples"] == 2 and "frechet" not in metrics
    if mode == "vanilla":  # no h-classifier needed: no trajectory, FD against the default target {Male: 0.5}
        assert metrics["target"] == {"Male": [0.5, 0.5]} and not (out / "trajectory.csv").exists()
    elif mode == "knobs":
        assert metrics["target"] == {"Male": [1.0, 0.0], "skin_tone": [0.2, 0.3, 0.5]}
        assert [int(row["t"]) for row in read_csv(out / "trajectory.csv")] == [500, 250, 0]
        assert [row["file"] for row in read_csv(out / "labels.csv")] == ["samples/0000_000.png", "samples/0001_000.png"]
    else:
        assert metrics["target"]["Male"] == [0.0, 1.0]
    if mode == "sample":
        assert metrics["target"]["skin_tone"] == [0.0, 0.0, 1.0] and metrics["attributes"]["skin_tone"]["fd"] >= 0


def test_composes_with_fuzzy(tiny_model_dir, hclf_dir, tmp_path):
    base = ["method=fuzzy", f"model.pretrained={tiny_model_dir}", "num_samples=2", "batch_size=2", *FAST]
    plain = run_sample(compose("sample", base, tmp_path / "plain"))
    guided = run_sample(compose("sample", [*base, "guidance=[debias]", f"guidance.debias.classifier={hclf_dir}",
                                           "target.Male=0.9", "guidance.debias.scale=0.01"], tmp_path / "guided"))
    assert plain["num_images"] == guided["num_images"] == 2
    a, b = ((tmp_path / run / "inpainted" / "900000.png").read_bytes() for run in ("plain", "guided"))
    assert a != b


def test_guidance_config_mirrors_the_method_knobs():
    method = yaml.safe_load((CONF / "method" / "debias.yaml").read_text())
    term = yaml.safe_load((CONF / "guidance" / "debias.yaml").read_text())["debias"]
    shared = set(method) & set(term) - {"_target_", "mode"}  # the method's mode is the top-level `mode` alias
    assert shared >= {"loss", "scale", "scale_per_sample", "running_estimate", "temperature", "window",
                      "step_schedule", "grad_steps", "head_lookup", "asymmetric"}
    assert {key: method[key] for key in shared} == {key: term[key] for key in shared}


# --- bad input ----------------------------------------------------------------------------------------------
BAD = {
    "not_summing_to_one": (["target.skin_tone=[0.5,0.3,0.3]"], "sum to 1"),
    "outside_unit_interval": (["target.Male=1.5"], r"must lie in \[0, 1\]"),
    "unknown_attribute": (["target.Smiling=0.5"], "target.Smiling: unknown attribute"),
    "unknown_name": (["+target.Laughing=0.5"], "target.Laughing: unknown attribute"),
    "wrong_class_count": (["target.skin_tone=0.5"], "skin_tone has 3 classes"),
    "sample_needs_a_class": (["mode=sample", "target.Male=0.5"], "class index"),
    "chi2_zero_target": (["target.Male=1"], "loss=kl or loss=l2"),
    "other_grid": (["sampler.steps=5"], "no head for t=600"),
    "mode": (["mode=fair"], "mode='fair'"),
    "no_hclf": (["method.hclf=/nonexistent/hclf"], "h-classifier /nonexistent/hclf: not found"),
    "asymmetric_ddpm": (["method.asymmetric=true", "sampler=ddpm", "sampler.steps=4"], "needs sampler=ddim"),
    "frechet_of_one": (["num_samples=1", "method.real_faces.num=4"], "Fréchet distance needs at least 2"),
}


@pytest.mark.parametrize("case", [*BAD, "other_model"])
def test_bad_input_is_one_clear_error(case, tiny_model_dir, hclf_dir, classifiers, denoiser, tmp_path):
    hclf = hclf_dir
    if case == "other_model":
        torch.manual_seed(5)
        other = random_hclf(denoiser)
        other.meta["fingerprint"] = "0" * 64
        hclf = save_hclassifier(other, tmp_path / "other")
        overrides, message = [], "trained on h of model 'tiny', not of this model"
    else:
        overrides, message = BAD[case]
    out = tmp_path / "run"
    with pytest.raises(InputError, match=message):
        run_sample(compose("sample", ["method=debias", f"model.pretrained={tiny_model_dir}", f"method.hclf={hclf}",
                                      f"method.eval_classifier={classifiers / 'eval'}", "num_samples=2", *FAST,
                                      *overrides], out))
    assert list(out.iterdir()) == []  # refused before it made anything: no unfinished run left


def test_the_evaluator_is_held_out_from_guidance(tiny_model_dir, classifiers, tmp_path):
    """Universal guidance by the evaluation classifier, or by a copy of it under another name, is refused up front."""
    shutil.copytree(classifiers / "eval", tmp_path / "copy")
    for guide in (classifiers / "eval", tmp_path / "copy"):
        out = tmp_path / f"run_{guide.name}"
        with pytest.raises(InputError, match="is also a guidance classifier.*guidance must not see the evaluator"):
            run_sample(compose("sample", ["method=debias", f"model.pretrained={tiny_model_dir}", "mode=sample",
                                          "target.Male=1", "method.universal_guidance=true",
                                          f"method.guidance_classifier={guide}",
                                          f"method.eval_classifier={classifiers / 'eval'}", "num_samples=2", *FAST],
                               out))
        assert list(out.iterdir()) == []  # refused before it made anything: no unfinished run left


def test_bad_target_from_the_cli(tiny_model_dir, hclf_dir, tmp_path):
    result = run_cli("sample", "method=debias", "target.Male=1.5", f"model.pretrained={tiny_model_dir}",
                     f"method.hclf={hclf_dir}", "method.eval_classifier=null", f"hydra.run.dir={tmp_path / 'r'}",
                     cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "facelab: error: target.Male=[-0.5, 1.5]: probabilities must lie in [0, 1] and sum to 1")
