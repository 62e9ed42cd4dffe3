"""Guidance terms on the latent methods (issue 16, item 3): h-space debiasing on a latent model's UNet (method=ldm +
guidance=[debias], with an h-classifier trained on that model's h by method=hextract → +experiment=hclf_gender), and
classifier guidance through the autoencoder (method=codiff / ldm + guidance=[attribute]); the terms these methods
cannot take are refused with one line. Tiny random latent models (16 px, latents 3×8×8)."""
import pytest
import torch
from test_codiff import TINY_DIFFUSER, tiny_latent_model, tiny_vae

from conftest import compose
from facelab.io.errors import InputError
from facelab.io.images import read_image
from facelab.models.classifier import load_classifier
from facelab.models.codiff import DynamicDiffusers
from facelab.sample import run_sample

BASE = ["num_samples=4", "batch_size=4", "sampler.steps=4", "progress=false", "device=cpu"]


@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    """Two tiny mask models on one VAE (A and B: different weights), a codiff export over A and a text model, and an
    h-classifier trained for a few steps on A's h (inverted synthetic faces, ground-truth Male)."""
    root = tmp_path_factory.mktemp("latent_compositions")
    vae = tiny_vae()
    found = {name: tiny_latent_model(modality, vae, seed).save(root / name)
             for name, modality, seed in (("a", "mask", 0), ("b", "mask", 2), ("text", "text", 1))}
    module = DynamicDiffusers({"mask": str(found["a"]), "text": str(found["text"])}, TINY_DIFFUSER)
    module.export(root / "codiff")
    found["codiff"] = root / "codiff"
    metrics = run_sample(compose("sample", ["method=hextract", f"model.pretrained={found['a']}", "num_samples=24",
                                            "batch_size=12", "sampler.steps=4", "method.attributes=[Male]",
                                            "method.shard_size=24", "progress=false", "device=cpu"], root / "hx"))
    found["hextract"] = metrics
    from facelab.train import run_train

    run_train(compose("train", ["+experiment=hclf_gender", f"data.dataset.path={root / 'hx' / 'hspace'}",
                                "data.batch_size=8", "data.val_fraction=0.25", "trainer.max_steps=10",
                                "trainer.val_check_interval=5", "trainer.accelerator=cpu", "logger=none",
                                "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"],
                      root / "hclf"))
    found["hclf"] = root / "hclf" / "hclf"
    return found


def samples(run) -> torch.Tensor:
    """A codiff / ldm run's x_0 images (samples/<mask>/<caption>/NNNNNN_x_0.png) as one tensor."""
    return torch.stack([read_image(path) for path in sorted(run.glob("samples/*/*/*_x_0.png"))])


def ldm(latent, *overrides, model="a"):
    return ["method=ldm", f"model.pretrained={latent[model]}", *BASE, *overrides]


def test_hextract_reads_a_latent_model_as_method_ldm_samples_it(latent):
    from facelab.data.hspace import HSpaceDataset
    from facelab.models.codiff import ldm_timesteps
    from facelab.models.latent import load_latent_model
    from facelab.models.pretrained import model_fingerprint

    model = load_latent_model(latent["a"])
    meta = HSpaceDataset(latent["a"].parent / "hx" / "hspace").meta
    assert meta["grid"] == ldm_timesteps(model.schedule, 4) == latent["hextract"]["grid"]  # method=ldm's grid
    assert meta["fingerprint"] == model_fingerprint(model.denoiser) and meta["resolution"] == 16
    assert meta["latent"] == {"modality": "mask", "condition": "the shipped default mask", "ldm_grid": True}
    assert latent["hextract"]["h_shape"] == [32, 4, 4]  # the UNet2DConditionModel mid-block output (8×8 latents, one downsampling)


def test_ldm_debias_edits_the_latent_unets_h(latent, tmp_path):
    """Same seed: observing (mode=vanilla) leaves method=ldm's images as they are; distribution guidance moves the
    h-classifier's p̄ toward the target at every step (the edit inside the UNet2DConditionModel's call) and so changes
    the images. (On random tiny weights the h-classifier barely reads the faces: the final fractions are measured on
    the zoo's ldm_text64, experiments/latent_compositions.)"""
    hclf = [f"guidance.debias.classifier={latent['hclf']}", "target.Male=0.9", "guidance.debias.scale=0.02"]
    runs = {"plain": ldm(latent), "vanilla": ldm(latent, "guidance=[debias]", *hclf, "guidance.debias.mode=vanilla"),
            "guided": ldm(latent, "guidance=[debias]", *hclf)}
    metrics = {name: run_sample(compose("sample", overrides, tmp_path / name)) for name, overrides in runs.items()}
    images = {name: samples(tmp_path / name) for name in runs}
    assert torch.equal(images["plain"], images["vanilla"]) and not torch.equal(images["plain"], images["guided"])
    observed, guided = metrics["vanilla"]["guidance"]["debias"], metrics["guided"]["guidance"]["debias"]
    assert [row["t"] for row in guided] == latent["hextract"]["grid"]  # one edit per step, on the h-classifier's grid
    assert guided[0]["Male_p1_before"] == observed[0]["Male_p1_before"]  # the same start
    for row in guided:
        assert row["Male_p1_after"] > row["Male_p1_before"] + 0.1 and row["dh_norm"] > 0
    assert all(row["dh_norm"] == 0 for row in observed) and "guidance" not in metrics["plain"]
    assert metrics["guided"]["network_calls"] == metrics["plain"]["network_calls"] == 4  # the edit costs no call


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_an_h_classifier_of_another_model_and_the_terms_latent_methods_cannot_take_are_refused(latent, tmp_path):
    debias = ["guidance=[debias]", f"guidance.debias.classifier={latent['hclf']}", "target.Male=0.5"]
    with pytest.raises(InputError, match="trained on h of model .*a'?, not of this model") as err:
        run_sample(compose("sample", ldm(latent, *debias, model="b"), tmp_path / "other"))
    one_line(err)
    refused = {
        "codiff": (["method=codiff", f"model.pretrained={latent['codiff']}", *BASE, *debias],
                   "guidance=\\[debias\\]: method=codiff cannot take this term: its denoiser mixes several latent "
                   "UNets' ε, so there is no single h-space"),
        "cfg": (ldm(latent, *debias, "cfg_scale=2"), "guidance=\\[debias\\] with cfg_scale=2.0: .*null-condition rows"),
        "hedit": (ldm(latent, "guidance=[hedit]", "guidance.hedit.file=x"), "method=ldm cannot take this term: "
                  "direction files come from method=directions"),
        "fuzzy": (ldm(latent, "guidance=[fuzzy]"), "method=ldm cannot take this term: it samples latents"),
        "record": (ldm(latent, "guidance=[record]"), "method=ldm cannot take this term: it writes no trajectory"),
    }
    for name, (overrides, message) in refused.items():
        with pytest.raises(InputError, match=message) as err:
            run_sample(compose("sample", overrides, tmp_path / name))
        one_line(err)
        assert not (tmp_path / name / "metrics.json").exists()


def test_attribute_guidance_differentiates_through_the_decoder(latent):
    """One step of guidance=[attribute] on the collaborative denoiser equals the hand-written gradient: ε held fixed,
    x̂0 = (z − √(1−ᾱ)ε)/√ᾱ, decoded by the VAE, classified, ε' = ε + √(1−ᾱ)·∇_z scale·(−log σ(logit))."""
    from facelab.diffusion import DDIM, State
    from facelab.guidance.attribute import AttributeGuidance
    from facelab.models.classifier import AttributeNet
    from facelab.models.codiff import load_collaborative

    collab = load_collaborative(latent["codiff"])
    torch.manual_seed(0)
    net = AttributeNet(["Smiling"], channels=(8, 16), image_size=16).eval()
    term = AttributeGuidance(net, target={"Smiling": 1}, scale=3.0)
    z, t, s = torch.randn(2, 3, 8, 8), 501, 251
    cond = collab.conditions([torch.zeros(16, 16, dtype=torch.long), "A face."], 2)
    state = State(x=z, t=t, s=s, cond=cond, model=collab, schedule=collab.schedule, sampler=DDIM(eta=0.0))
    state.x_t, state.eps = z, collab(z, t, cond)
    eps = state.eps.clone()
    calls = collab.calls["models"]
    term.after_model(state)
    assert collab.calls["models"] == calls  # no network call: the latent denoiser runs without gradient

    a = collab.schedule.alpha_bar(t)
    leaf = z.clone().requires_grad_(True)
    x0 = (leaf - (1 - a) ** 0.5 * eps) / a ** 0.5
    image = collab.models[0].vae.decode(x0 / collab.models[0].scale_factor).sample.clamp(-1, 1)
    loss = -3.0 * torch.nn.functional.logsigmoid(net(image)["Smiling"]).sum()
    grad, = torch.autograd.grad(loss, leaf)
    assert grad.abs().max() > 0
    torch.testing.assert_close(state.eps, eps + (1 - a) ** 0.5 * grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["codiff", "ldm"])
def test_attribute_guidance_on_the_latent_denoisers(latent, method, tmp_path):
    """method=codiff / ldm + guidance=[attribute]: the guiding classifier (attr64, reading the decoded x̂0 resized to
    64 px) is recorded at every step, and its mean probability of Smiling on the final images falls (target 0) below the
    unguided run's with the same seed."""
    from facelab.io.images import resize_images

    model = ["method=codiff", f"model.pretrained={latent['codiff']}", "text=A smiling face."] if method == "codiff" else \
        ["method=ldm", f"model.pretrained={latent['a']}"]
    guided = ["guidance=[attribute]", "target.Smiling=0", "guidance.attribute.scale=30"]
    metrics = {name: run_sample(compose("sample", [*model, *BASE, *extra], tmp_path / name))
               for name, extra in (("plain", []), ("guided", guided))}
    rows = metrics["guided"]["guidance"]["attribute"]
    assert len(rows) == 4 and all(0 <= row["Smiling"] <= 1 for row in rows)
    attr64 = load_classifier("attr64")
    smiling = {name: float(attr64.predict(resize_images(samples(tmp_path / name), 64))["Smiling"][:, 1].mean())
               for name in metrics}
    assert smiling["guided"] < smiling["plain"] - 0.3
