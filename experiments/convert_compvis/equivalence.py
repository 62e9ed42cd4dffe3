"""Measured equivalence of the CompVis / Balancing Act converters against the original code (results.md).

Random weights; the original `ldm` from stable-diffusion-sdkit (.venv/refs, installed --no-deps). Max relative error
= max|a − b| / max|a| over the output. `--full` adds the release's full-width nets (codiff_512; ~1 min on 2 cores).

    .venv/bin/python experiments/convert_compvis/equivalence.py [--full]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / ".venv" / "refs"))

from ldm.models.autoencoder import AutoencoderKL  # noqa: E402
from ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402
from test_convert_compvis import (  # noqa: E402
    BERT_FIXTURE,
    CAPTION,
    TINY,
    TINY_DIFFUSER,
    TINY_UNET,
    TINY_VAE,
    codiff_state,
    fixture_weights,
    one_hot,
    perturbed,
    rel,
)

from facelab.convert import compvis, hclf  # noqa: E402
from facelab.models.hclassifier import HNet  # noqa: E402


def unet_error(params: dict, size: int, context: int, std: float) -> float:
    torch.manual_seed(0)
    ref = perturbed(UNetModel(**params), 0, std)
    unet = compvis.convert_unet(ref.state_dict(), params, "UNet")
    x, c, t = torch.randn(2, 3, size, size), torch.randn(2, 77, context), torch.tensor([5, 911])
    with torch.no_grad():
        return rel(ref(x, t, context=c), unet(x, t, encoder_hidden_states=c).sample)


def vae_errors(first_stage: dict, size: int, std: float) -> dict:
    torch.manual_seed(0)
    ref = perturbed(AutoencoderKL(ddconfig=first_stage["ddconfig"], lossconfig={"target": "torch.nn.Identity"},
                                  embed_dim=first_stage["embed_dim"]), 0, std)
    vae = compvis.convert_vae(ref.state_dict(), first_stage, 0.141)
    image = torch.rand(1, 3, size, size) * 2 - 1
    z = torch.randn(1, first_stage["embed_dim"], size // 2 ** (len(first_stage["ddconfig"]["ch_mult"]) - 1),
                    size // 2 ** (len(first_stage["ddconfig"]["ch_mult"]) - 1))
    with torch.no_grad():
        want, got = ref.encode(image), vae.encode(image).latent_dist
        return {"encode mean": rel(want.mean, got.mean), "encode std": rel(want.std, got.std),
                "decode": rel(ref.decode(z), vae.decode(z).sample)}


def bert_error() -> float:
    fixture = json.loads(BERT_FIXTURE.read_text())
    cfg = fixture["config"]
    weights = fixture_weights(fixture["shapes"])
    encoder = compvis.convert_text_encoder({k[len("cond_stage_model."):]: v for k, v in weights.items()},
                                           {"n_embed": cfg["dim"], "n_layer": cfg["depth"],
                                            "vocab_size": cfg["num_tokens"], "max_seq_len": cfg["max_seq_len"]})
    with torch.no_grad():
        return rel(torch.tensor(fixture["output"]), encoder.embed(torch.tensor(fixture["ids"])))


def hclf_error() -> float:
    gen = torch.Generator().manual_seed(0)
    state = {}
    for k in range(49):
        state[f"linears.{k}.weight"] = torch.randn(2, 32768, generator=gen) * 0.01
        state[f"linears.{k}.bias"] = torch.randn(2, generator=gen)
    weight, bias = hclf.heads(state, hclf.PRESETS["ba_gender"])
    net = HNet({"Male": 2}, 32768, hclf.head_times(hclf.PRESETS["ba_gender"], 49))
    net.load_state_dict({"weight": weight, "bias": bias})
    h = torch.randn(4, 512, 8, 8, generator=gen)
    return max(rel(F.linear(h.flatten(1), state[f"linears.{k}.weight"], state[f"linears.{k}.bias"]), net(h, t)["Male"])
               for k, t in enumerate(net.times))


def codiff_error() -> float:
    """A LatentDiffusionCompose state dict converted to a codiff folder: the mixed ε (reweight=learned) against the
    reference's rule (softmax over the original D_m logits, Σ I_m ε_m of the original UNets)."""
    import tempfile

    from facelab.diffusion.collab import Reweight
    from facelab.models.codiff import load_collaborative

    state, nets = codiff_state()
    with tempfile.TemporaryDirectory() as tmp:
        compvis.convert(state, Path(tmp), TINY, "codiff")
        collab = load_collaborative(tmp, reweight=Reweight("learned"))
        labels = torch.randint(0, 19, (8, 8), generator=torch.Generator().manual_seed(2))
        z, t = torch.randn(1, 3, 8, 8), torch.tensor([500])
        cond = [collab.models[0].condition([labels]), collab.models[1].condition([CAPTION])]
        (mask_unet, mask_diffuser, mask_cond), (text_unet, text_diffuser, _) = nets["mask"], nets["text"]
        c_mask = F.linear(one_hot(labels), mask_cond["linear.weight"], mask_cond["linear.bias"])[None]
        c_text = cond[1]["encoder_hidden_states"]
        with torch.no_grad():
            eps = [mask_unet(z, t, context=c_mask), text_unet(z, t, context=c_text)]
            weights = torch.cat([mask_diffuser(z, t, context=c_mask), text_diffuser(z, t, context=c_text)], 1).softmax(1)
            return rel(eps[0] * weights[:, :1] + eps[1] * weights[:, 1:], collab(z, t, cond))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="also the full-width codiff_512 nets")
    args = parser.parse_args()
    results = {"tiny LDM UNet (32 ch, 4 heads)": unet_error(TINY_UNET, 8, 32, 0.05),
               "tiny dynamic diffuser (32 heads, head dim 2)": unet_error(TINY_DIFFUSER, 8, 32, 0.5),
               **{f"tiny VAE {k}": v for k, v in vae_errors(TINY_VAE, 16, 0.02).items()},
               "BERTEmbedder vs the original's fixture": bert_error(),
               "tiny codiff checkpoint: mixed ε vs the reference rule": codiff_error(),
               "h-classifier (49 heads, 32768 → 2), worst head": hclf_error()}
    if args.full:
        preset = compvis.PRESETS["codiff_512"]
        results["codiff_512 LDM UNet (192 ch)"] = unet_error(preset["unet"], 64, 640, 0.01)
        results["codiff_512 dynamic diffuser (32 ch)"] = unet_error(preset["diffuser"], 64, 640, 0.01)
        results.update({f"codiff_512 VAE {k}": v for k, v in vae_errors(preset["first_stage"], 512, 0.005).items()})
    for name, value in results.items():
        print(f"| {name} | {value:.2e} |")


if __name__ == "__main__":
    main()
