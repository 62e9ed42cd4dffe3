"""CompVis latent-diffusion checkpoints (Collaborative Diffusion's 512_*.ckpt) -> facelab folders, checked against the
ORIGINAL code where a package carries it.

- UNet (openaimodel + spatial transformer) and KL autoencoder: against `ldm` from stable-diffusion-sdkit (installed
  --no-deps in .venv/refs; test-only), random weights at small widths, ε / encode / decode to <= 1e-4 relative.
- Text conditioner (x-transformer BERTEmbedder): no package carries Collaborative Diffusion's x_transformer.py, so
  this is a FIXTURE test: tests/fixtures/compvis/bert_embedder_tiny.json holds the original's key names, shapes and
  embeddings for weights drawn by `fixture_weights` (written by experiments/convert_compvis/make_bert_fixture.py
  from the original source).
- Mask conditioner (SegMaskEncoder): key/shape fixture from the original source (ldm/modules/encoders/modules.py:
  `linear` = Linear(mask_embed_dim 1024, context_dim 640) over the [19, 1024] one-hot) and an output check against
  that Linear on the original's one-hot layout.
- The dynamic diffusers: the original UNets plus the reference's combination rule (ComposeUNet: softmax over the
  D_m logits, ε = Σ I_m ε_m), then `method=codiff` end to end on the converted folder.
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import ROOT, compose, run_cli
from facelab.convert import compvis, convert_file
from facelab.convert.__main__ import main as convert_main
from facelab.io.errors import InputError

REFS = ROOT / ".venv" / "refs"
BERT_FIXTURE = Path(__file__).parent / "fixtures" / "compvis" / "bert_embedder_tiny.json"

TINY_UNET = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[2],
                 num_res_blocks=1, channel_mult=[1, 2], num_heads=4, use_spatial_transformer=True, transformer_depth=1,
                 context_dim=32, legacy=False)
TINY_DIFFUSER = {**TINY_UNET, "out_channels": 1, "num_heads": 32}  # head dim 2, as the release's 32 heads on 64 ch
TINY_VAE = {"embed_dim": 3, "ddconfig": dict(double_z=True, z_channels=3, resolution=16, in_channels=3, out_ch=3,
                                             ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
                                             dropout=0.0)}
TINY = {"timesteps": 1000, "linear_start": 0.0015, "linear_end": 0.0195, "scale_factor": 0.5,
        "first_stage": TINY_VAE, "unet": TINY_UNET, "diffuser": TINY_DIFFUSER,
        "mask": {"mask_embed_dim": 64, "context_dim": 32},
        "text": {"n_embed": 32, "n_layer": 1, "vocab_size": 30522, "max_seq_len": 16}}
CAPTION = "This man is smiling."


def original():
    """The original CompVis classes (stable-diffusion-sdkit's `ldm`)."""
    if str(REFS) not in sys.path:
        sys.path.insert(0, str(REFS))
    pytest.importorskip("ldm")
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel, AutoencoderKL


def perturbed(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere (the original zero-initialises its output convs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return module.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def fixture_weights(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights for a key -> shape table: sorted keys, one generator; LayerNorm gains (1-D `*.0.weight`,
    `norm.weight`) around 1, everything else N(0, 0.2²)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        value = torch.randn(shapes[key], generator=gen) * 0.2
        if len(shapes[key]) == 1 and key.endswith((".0.weight", "norm.weight")):
            value = 1 + value / 2
        out[key] = value
    return out


def bert_shapes(dim: int, depth: int, vocab: int, seq: int, heads: int = 8, dim_head: int = 64) -> dict:
    """The original BERTEmbedder's key -> shape table (x-transformers TransformerWrapper(Encoder))."""
    inner, shapes = heads * dim_head, {"token_emb.weight": [vocab, dim], "pos_emb.emb.weight": [seq, dim]}
    for i in range(depth):
        a, f = f"attn_layers.layers.{2 * i}", f"attn_layers.layers.{2 * i + 1}"
        shapes.update({f"{a}.0.weight": [dim], f"{a}.0.bias": [dim], f"{a}.1.to_q.weight": [inner, dim],
                       f"{a}.1.to_k.weight": [inner, dim], f"{a}.1.to_v.weight": [inner, dim],
                       f"{a}.1.to_out.weight": [dim, inner], f"{a}.1.to_out.bias": [dim],
                       f"{f}.0.weight": [dim], f"{f}.0.bias": [dim], f"{f}.1.net.0.0.weight": [4 * dim, dim],
                       f"{f}.1.net.0.0.bias": [4 * dim], f"{f}.1.net.2.weight": [dim, 4 * dim],
                       f"{f}.1.net.2.bias": [dim]})
    shapes.update({"norm.weight": [dim], "norm.bias": [dim], "to_logits.weight": [vocab, dim],
                   "to_logits.bias": [vocab]})
    return {f"cond_stage_model.transformer.{k}": v for k, v in shapes.items()}


def one_hot(labels: torch.Tensor, classes: int = 19) -> torch.Tensor:
    """The original's mask input: [19, H·W] one-hot of a label map already at the encoder's size, row-major."""
    return F.one_hot(labels.reshape(-1), classes).T.float()


def tiny_nets(seed: int):
    """Original-code UNet, dynamic diffuser and autoencoder at tiny widths, random weights."""
    unet_cls, vae_cls = original()
    torch.manual_seed(seed)
    unet, diffuser = unet_cls(**TINY_UNET), unet_cls(**TINY_DIFFUSER)
    vae = vae_cls(ddconfig=TINY_VAE["ddconfig"], lossconfig={"target": "torch.nn.Identity"}, embed_dim=3)
    return perturbed(unet, seed), perturbed(diffuser, seed + 1, 0.5), perturbed(vae, seed + 2, 0.02)


def cond_state(modality: str, seed: int) -> dict[str, torch.Tensor]:
    """A conditioner's weights in the original key layout (cond_stage_model.*)."""
    if modality == "mask":
        gen = torch.Generator().manual_seed(seed)
        return {"cond_stage_model.linear.weight": torch.randn(32, 64, generator=gen) * 0.2,
                "cond_stage_model.linear.bias": torch.randn(32, generator=gen) * 0.2}
    return fixture_weights(bert_shapes(32, 1, 30522, 16), seed)


def prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


def compvis_yaml(modality: str) -> dict:
    """The original's own config layout (configs/512_{mask,text}.yaml) at the tiny sizes."""
    cond = ({"target": "ldm.modules.encoders.modules.SegMaskEncoder",
             "params": {"seg_mask_encoder_config": {"target": "ldm.modules.encoders.modules.PassSegMaskEncoder"},
                        **TINY["mask"]}} if modality == "mask" else
            {"target": "ldm.modules.encoders.modules.BERTEmbedder", "params": {"n_embed": 32, "n_layer": 1,
                                                                               "max_seq_len": 16}})
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "scale_factor": 0.5,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": TINY_UNET},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": TINY_VAE},
        "cond_stage_config": cond}}}


# --- the parts, against the original code -------------------------------------------------------------------------
@pytest.mark.parametrize("params", [TINY_UNET, TINY_DIFFUSER,
                                    {**TINY_UNET, "channel_mult": [1, 2, 3], "attention_resolutions": [2, 4],
                                     "num_res_blocks": 2, "num_heads": -1, "num_head_channels": 16,
                                     "transformer_depth": 1}],
                         ids=["ldm", "dynamic_diffuser", "three_levels_head_channels"])
def test_unet_matches_original(params):
    unet_cls, _ = original()
    torch.manual_seed(0)
    ref = perturbed(unet_cls(**params), 0)
    unet = compvis.convert_unet(ref.state_dict(), params, "UNet")
    x, c = torch.randn(2, 3, 8, 8), torch.randn(2, 7, 32)
    t = torch.tensor([3, 777])
    with torch.no_grad():
        want, got = ref(x, t, context=c), unet(x, t, encoder_hidden_states=c).sample
    assert want.shape == got.shape and rel(want, got) <= 1e-4


def test_vae_matches_original():
    _, _, ref = tiny_nets(0)
    vae = compvis.convert_vae(ref.state_dict(), TINY_VAE, 0.5)
    image, z = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want, got = ref.encode(image), vae.encode(image).latent_dist
        assert rel(want.mean, got.mean) <= 1e-4 and rel(want.std, got.std) <= 1e-4
        assert rel(ref.decode(z), vae.decode(z).sample) <= 1e-4
    assert vae.config.scaling_factor == 0.5


def test_bert_embedder_matches_the_original_fixture():
    """FIXTURE test (no package carries the original x-transformer): keys, shapes and embeddings of the original."""
    fixture = json.loads(BERT_FIXTURE.read_text())
    cfg = fixture["config"]
    assert bert_shapes(cfg["dim"], cfg["depth"], cfg["num_tokens"], cfg["max_seq_len"]) == fixture["shapes"]
    weights = fixture_weights(fixture["shapes"])
    params = {"n_embed": cfg["dim"], "n_layer": cfg["depth"], "vocab_size": cfg["num_tokens"],
              "max_seq_len": cfg["max_seq_len"]}
    encoder = compvis.convert_text_encoder({k[len("cond_stage_model."):]: v for k, v in weights.items()}, params)
    assert "to_logits.weight" not in "".join(encoder.state_dict())  # the unused logits layer is dropped
    with torch.no_grad():
        got = encoder.embed(torch.tensor(fixture["ids"]))
    assert rel(torch.tensor(fixture["output"]), got) <= 1e-4
    ids = torch.tensor(fixture["ids"][1:])  # its last 4 tokens are padding: masked, the rest encodes as if cut
    keep = torch.tensor([[1] * 6 + [0] * 4])
    with torch.no_grad():
        assert torch.allclose(encoder.embed(ids, keep)[:, :6], encoder.embed(ids[:, :6]), atol=1e-5)


def test_mask_encoder_matches_the_original_linear():
    """Key/shape fixture from the original source, then facelab's MaskEncoder against that Linear on the one-hot."""
    preset = compvis.PRESETS["codiff_512"]["mask"]
    full = {"linear.weight": torch.zeros(640, 1024), "linear.bias": torch.zeros(640)}  # SegMaskEncoder's only tensors
    assert compvis.convert_mask_encoder(full, preset).config == {"_class_name": "MaskEncoder", "num_classes": 19,
                                                                 "mask_size": 32, "dim": 640}
    state = {k[len("cond_stage_model."):]: v for k, v in cond_state("mask", 0).items()}
    encoder = compvis.convert_mask_encoder(state, TINY["mask"])
    labels = torch.randint(0, 19, (8, 8), generator=torch.Generator().manual_seed(0))
    tokens, mask = encoder([labels])
    want = F.linear(one_hot(labels), state["linear.weight"], state["linear.bias"])
    assert torch.allclose(tokens[0], want, atol=1e-6) and mask.all()


# --- whole files ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("modality", ["mask", "text"])
def test_ldm_checkpoint_converts_with_the_original_yaml(modality, tmp_path):
    """512_{mask,text}.ckpt's layout, the original's YAML as --config: the latent model gives the original UNet's ε,
    and `method=ldm` samples from the folder."""
    from facelab.models.latent import load_latent_model
    from facelab.sample import run_sample

    unet, _, vae = tiny_nets(0)
    cond = cond_state(modality, 3)
    state = {**prefixed("model.diffusion_model.", unet.state_dict()), **prefixed("first_stage_model.", vae.state_dict()),
             **cond}
    torch.save({"state_dict": state, "global_step": 7}, tmp_path / "ldm.ckpt")
    (tmp_path / "ldm.yaml").write_text(yaml.safe_dump(compvis_yaml(modality)))
    dest = convert_file(tmp_path / "ldm.ckpt", tmp_path / "out", config=tmp_path / "ldm.yaml")
    model = load_latent_model(dest)
    assert model.modality == modality and model.scale_factor == 0.5 and model.latent_shape == (3, 8, 8)
    z, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    if modality == "mask":
        values = list(torch.randint(0, 19, (2, 8, 8), generator=torch.Generator().manual_seed(1)))
        context = torch.stack([F.linear(one_hot(m), cond["cond_stage_model.linear.weight"],
                                        cond["cond_stage_model.linear.bias"]) for m in values])
    else:  # the converted BERTEmbedder (checked against the original's fixture): no pad mask, as the original
        values = [CAPTION, "A woman."]
        context, mask = model.encoder(values)
        assert context.shape == (2, 16, 32) and mask.all()
    with torch.no_grad():
        assert rel(unet(z, t, context=context), model.denoiser(z, t, model.condition(values))) <= 1e-4
    schedule = json.loads((dest / "scheduler" / "scheduler_config.json").read_text())
    assert (schedule["beta_schedule"], schedule["beta_start"], schedule["clip_sample"]) == ("scaled_linear", 0.0015,
                                                                                             False)
    assert (dest / "model_index.json").is_file() and json.loads((dest / "recipe.json").read_text())["format"] == "ldm"
    if modality == "text":
        metrics = run_sample(compose("sample", ["method=ldm", f"method.models.text={dest}", f"text={CAPTION}",
                                                "num_samples=1", "sampler.steps=2", "progress=false"], tmp_path / "run"))
        assert metrics["modalities"] == ["text"] and metrics["network_calls"] == 2


def test_lone_autoencoder_and_bad_presets(tmp_path, capsys):
    _, _, vae = tiny_nets(0)
    state = {**vae.state_dict(), "loss.logvar": torch.zeros(())}  # 512_vae.ckpt: the bare model, with its loss
    torch.save({"state_dict": state}, tmp_path / "vae.ckpt")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    dest = convert_file(tmp_path / "vae.ckpt", tmp_path / "vae", config=tmp_path / "tiny.yaml")
    from facelab.models.vae import load_vae

    assert load_vae(dest).config.scaling_factor == 0.5
    # the release's preset on a file of other widths: one line naming the first mismatched keys and shapes
    assert convert_main([str(tmp_path / "vae.ckpt"), str(tmp_path / "bad"), "--config", "codiff_512"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not (tmp_path / "bad").exists()
    assert "encoder.conv_in.weight is [32, 3, 3, 3] in the file, the config expects [128, 3, 3, 3]" in err
    unet, _, _ = tiny_nets(0)
    wide = {**TINY_UNET, "model_channels": 64}
    with pytest.raises(InputError, match=r"model\.diffusion_model\.input_blocks\.0\.0\.weight is \[32, 3, 3, 3\] in "
                                         r"the file, the config expects \[64, 3, 3, 3\]"):
        compvis.convert_unet(unet.state_dict(), wide, "UNet (model.diffusion_model)")
    with pytest.raises(InputError, match="no settings for the checkpoint's UNet"):
        compvis.convert({**prefixed("model.diffusion_model.", unet.state_dict()),
                         **prefixed("first_stage_model.", vae.state_dict()), **cond_state("mask", 0)},
                        tmp_path / "x", {k: v for k, v in TINY.items() if k != "unet"}, "ldm")


def codiff_state(seed: int = 0):
    """A LatentDiffusionCompose state dict (512_codiff_mask_text.ckpt's layout, each shared module under both of its
    names) and the original nets it holds."""
    nets = {}
    state = {}
    for i, (modality, short) in enumerate((("mask", "seg_mask"), ("text", "text"))):
        unet, diffuser, vae = tiny_nets(seed + 10 * i)
        if i == 0:
            first = vae
        cond = {k[len("cond_stage_model."):]: v for k, v in cond_state(modality, seed + i).items()}
        nets[modality] = (unet, diffuser, cond)
        for prefix in (f"{short}_ldm.model.diffusion_model.", f"model.{short}_unet.diffusion_model."):
            state.update(prefixed(prefix, unet.state_dict()))
        state.update(prefixed(f"model.{short}_confidence_predictor.diffusion_model.", diffuser.state_dict()))
        for prefix in (f"{short}_ldm.cond_stage_model.", f"cond_stage_model.{short}_cond_stage_model."):
            state.update(prefixed(prefix, cond))
        state.update(prefixed(f"{short}_ldm.first_stage_model.", first.state_dict()))
    state.update(prefixed("first_stage_model.", first.state_dict()))
    return state, nets


def test_codiff_checkpoint_converts_and_runs_end_to_end(tmp_path):
    """512_codiff_mask_text.ckpt's layout -> one folder: the mixed ε equals the reference's combination of the
    original nets, and `python -m facelab.sample method=codiff` runs on it."""
    from facelab.diffusion.collab import Reweight
    from facelab.io.images import save_mask
    from facelab.models.codiff import load_collaborative

    state, nets = codiff_state()
    torch.save({"state_dict": state, "callbacks": {}}, tmp_path / "codiff.ckpt")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    dest = convert_file(tmp_path / "codiff.ckpt", tmp_path / "converted", config=tmp_path / "tiny.yaml")
    assert {p.name for p in dest.iterdir()} >= {"codiff.json", "diffusers_mask", "diffusers_text", "ldm_mask",
                                                "ldm_text", "recipe.json", "model_index.json"}
    assert json.loads((dest / "recipe.json").read_text())["schedule"]["beta_end"] == 0.0195
    collab = load_collaborative(dest, reweight=Reweight("learned"))
    labels = torch.randint(0, 19, (8, 8), generator=torch.Generator().manual_seed(2))
    z, t = torch.randn(1, 3, 8, 8), torch.tensor([500])
    cond = [collab.models[0].condition([labels]), collab.models[1].condition([CAPTION])]
    mask_unet, mask_diffuser, mask_cond = nets["mask"]
    text_unet, text_diffuser, _ = nets["text"]
    c_mask = F.linear(one_hot(labels), mask_cond["linear.weight"], mask_cond["linear.bias"])[None]
    c_text = cond[1]["encoder_hidden_states"]  # the converted BERTEmbedder (checked against its fixture above)
    with torch.no_grad():
        eps = [mask_unet(z, t, context=c_mask), text_unet(z, t, context=c_text)]
        influence = torch.cat([mask_diffuser(z, t, context=c_mask), text_diffuser(z, t, context=c_text)], 1).softmax(1)
        want = eps[0] * influence[:, :1] + eps[1] * influence[:, 1:]
        assert influence.std() > 0.01  # the dynamic diffusers do mix
        assert rel(want, collab(z, t, cond)) <= 1e-4

    save_mask(torch.nn.functional.interpolate(labels[None, None].float(), size=16).long()[0, 0], tmp_path / "m.png",
              style="palette")
    res = run_cli("sample", "method=codiff", f"model.pretrained={dest}", f"mask={tmp_path / 'm.png'}",
                  f"text='{CAPTION}'", "num_samples=1", "sampler.steps=2", "progress=false",
                  f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["modalities"] == ["mask", "text"] and metrics["network_calls"] == 2 * 4
    assert len(list((tmp_path / "run").rglob("*_x_0.png"))) == 1


# --- full width (the release's configs) --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name, part", [("codiff_512", "unet"), ("codiff_512", "diffuser"), ("codiff_512", "vae"),
                                        ("codiff_256", "vae")])
def test_full_width_matches_original(name, part):
    """The release presets' nets at full width, random weights, against the original code."""
    unet_cls, vae_cls = original()
    preset = compvis.PRESETS[name]
    torch.manual_seed(0)
    if part == "vae":
        ref = perturbed(vae_cls(ddconfig=preset["first_stage"]["ddconfig"], lossconfig={"target": "torch.nn.Identity"},
                                embed_dim=3), 0, 0.005)
        vae = compvis.convert_vae(ref.state_dict(), preset["first_stage"], preset["scale_factor"])
        size = preset["first_stage"]["ddconfig"]["resolution"]
        image, z = torch.rand(1, 3, size, size) * 2 - 1, torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert rel(ref.encode(image).mean, vae.encode(image).latent_dist.mean) <= 1e-4
            assert rel(ref.decode(z), vae.decode(z).sample) <= 1e-4
        return
    params = preset[part]
    ref = perturbed(unet_cls(**params), 0, 0.01)
    unet = compvis.convert_unet(ref.state_dict(), params, part)
    x, c, t = torch.randn(1, 3, 64, 64), torch.randn(1, 77, 640), torch.tensor([421])
    with torch.no_grad():
        assert rel(ref(x, t, context=c), unet(x, t, encoder_hidden_states=c).sample) <= 1e-4
    assert math.prod(unet.conv_out.weight.shape[:1]) == params["out_channels"]
