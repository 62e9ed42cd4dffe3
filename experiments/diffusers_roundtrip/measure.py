"""diffusers' loading of facelab's latent zoo folders (facelab.pipelines) against facelab's own sampler: max |Δ| of
the images in [0, 1] from the same generator (results.md, results.json), and two deliberate faults that the check
must see (the pipeline's last DDIM step to ᾱ = 1 instead of ᾱ_0; guidance_scale 1.5 against facelab's cfg_scale 1).

    .venv/bin/python experiments/diffusers_roundtrip/measure.py      # ~1 min on 2 cores
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import test_roundtrip as rt  # noqa: E402

from facelab import pipelines  # noqa: E402
from facelab.diffusion.collab import CollaborativeDenoiser, Reweight  # noqa: E402
from facelab.models.latent import load_latent_model  # noqa: E402
from facelab.models.pretrained import ZOO_DIR  # noqa: E402


def main() -> None:
    mask, caption = rt.face_mask(64), rt.CAPTION
    rows = []
    for steps in (2, 20):
        rows += [
            {"folder": "ldm_mask64", "steps": steps, "batch": 2, "cfg_scale": 2.0,
             "max_abs_diff": rt.same_latent_images(ZOO_DIR / "ldm_mask64", mask, n=2, steps=steps, cfg_scale=2.0)},
            {"folder": "ldm_text64", "steps": steps, "batch": 1, "cfg_scale": 1.0,
             "max_abs_diff": rt.same_latent_images(ZOO_DIR / "ldm_text64", caption, steps=steps)},
            {"folder": "codiff64", "steps": steps, "batch": 1, "cfg_scale": 1.0,
             "max_abs_diff": rt.same_collaborative_images(ZOO_DIR / "codiff64", {"mask": mask, "text": caption},
                                                          steps=steps)},
        ]
    faults = {}
    right = pipelines.ldm_scheduler

    def to_one(config, steps):
        scheduler = right(config, steps)
        scheduler.final_alpha_cumprod = torch.tensor(1.0)
        return scheduler

    pipelines.ldm_scheduler = to_one
    faults["last step to alpha_bar = 1 (ldm_mask64, 2 steps)"] = rt.same_latent_images(ZOO_DIR / "ldm_mask64", mask)
    pipelines.ldm_scheduler = right
    pipe = pipelines.FacelabLatentPipeline.from_pretrained(ZOO_DIR / "ldm_mask64")
    collab = CollaborativeDenoiser([load_latent_model("ldm_mask64")], reweight=Reweight("average"))
    faults["guidance_scale 1.5 vs cfg_scale 1 (ldm_mask64, 2 steps)"] = float(
        (rt.pipeline_images(pipe, mask, 1, 2, guidance_scale=1.5) - rt.facelab_images(collab, [mask], 1, 2)).abs().max())
    out = Path(__file__).parent
    (out / "results.json").write_text(json.dumps({"rows": rows, "faults": faults}, indent=2) + "\n")
    lines = ["# diffusers round trip of the latent zoo folders", "",
             "`facelab.pipelines.<class>.from_pretrained(folder)` (diffusers' loader, diffusers' DDIMScheduler) against "
             "facelab's sampler (DDIM η = 1, LDM grid), same generator; max |Δ| of images in [0, 1]. "
             "Rerun: `.venv/bin/python experiments/diffusers_roundtrip/measure.py`.", "",
             "| folder | steps | batch | cfg scale | max abs diff |", "|---|---|---|---|---|"]
    lines += [f"| {r['folder']} | {r['steps']} | {r['batch']} | {r['cfg_scale']} | {r['max_abs_diff']:.1e} |"
              for r in rows]
    lines += ["", "Deliberate faults (the check must fail them):", ""]
    lines += [f"- {name}: {value:.3f}" for name, value in faults.items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
