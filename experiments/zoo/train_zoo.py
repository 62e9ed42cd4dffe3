"""Train the zoo models with facelab's own recipes and install them into facelab/zoo/<name>.

    python experiments/zoo/train_zoo.py [name ...] [-- extra hydra overrides]
    python experiments/zoo/train_zoo.py --extras [name ...]     # only (re)build an installed model's EXTRAS

Each model trains in the stable run directory outputs/zoo/<name>; rerunning resumes from its last.ckpt, so
training can be done in several sittings. Wall time is accumulated into the installed recipe.json. Then its
EXTRAS run in order, each in outputs/zoo/<name>/<module> (cleared first), e.g. for ddpm64_biased the h-classifier
that `method=debias` finds by default: h extraction, training, installed as facelab/zoo/ddpm64_biased/hclf.
"""
from __future__ import annotations

import csv
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
ZOO = {  # zoo name -> training experiment
    "ddpm64": "zoo_ddpm64",
    "attr64": "attr_clf",
    "attr64_eval": "attr_clf_eval",
    "ddpm64_biased": "zoo_ddpm64_biased",
    "cyclediff64": "cyclediff_ddpm",      # attribute-conditional, fine-tuned from ddpm64 (method=cyclediff)
    "attr64_noisy": "attr_clf_noisy",     # noise-aware guidance classifier for method=cyclediff
    "vae64": "vae",                       # method=codiff: the shared KL autoencoder (64 px -> 3x16x16 latents),
    "ldm_mask64": "ldm_mask",             # the mask- and text-conditioned latent DDPMs on it (frozen MiniLM text
    "ldm_text64": "ldm_text",             # encoder), then the dynamic diffusers mixing them;
    "codiff64": "codiff_mask_text",
    "parser64": "parser",                 # and the held-out face parser that scores mask consistency
}
# What else each zoo model ships, computed from the installed model, in order: (module, overrides, install), where
# install = (folder the run exports, its place in the zoo model's folder) or None (the run writes its output itself).
HSPACE = "outputs/zoo/ddpm64_biased/facelab.sample/hspace"  # the h extraction's shards (its run dir's hspace/)
EXTRAS = {
    "ddpm64": [("facelab.fuzzy_stats", ["model.pretrained=ddpm64", "N=1000", "batch_size=50", "overwrite=true",
                                        "out=facelab/zoo/ddpm64/fuzzy_stats.safetensors"], None)],
    # method=debias's h-classifier: h along 2000 of the biased model's own sampling trajectories (DDIM η = 1, 50 steps:
    # the debias sampler's grid; seed 1000, unseen by the debias evaluation's seeds 0-2, 100 and 10000+), labelled by
    # the guidance classifier attr64 (the evaluator attr64_eval stays unseen); then Male and skin_tone heads per
    # timestep fixed to the class means (experiments/debias/results_heads_*.md: free heads, or heads fitted on
    # inverted faces, move h along directions the decoder ignores and misread the generated distribution at high t).
    "ddpm64_biased": [
        ("facelab.sample", ["method=hextract", "method.source=trajectory", "method.classifier=attr64",
                            "model.pretrained=ddpm64_biased", "num_samples=2000", "batch_size=250", "seed=1000",
                            "progress=false", "method.attributes=[Male,skin_tone]"], None),
        ("facelab.train", ["+experiment=hclf_gender", "model.attributes=[Male,skin_tone]",
                           "model.direction=class_means", "model.lr=0.02", f"data.dataset.path={HSPACE}",
                           "trainer.enable_progress_bar=false"],
         ("hclf", "hclf")),
    ],
}


def last_logged(csv_paths: list[Path], keys: tuple[str, ...]) -> dict:
    """The last logged value of each key over a run's CSV logs, one per sitting, in order."""
    last = {}
    for path in csv_paths:
        with path.open() as f:
            for row in csv.DictReader(f):
                last.update({k: float(row[k]) for k in keys if row.get(k)})
    return last


def train(name: str, overrides: list[str], run_extras: bool = True) -> None:
    run_dir = ROOT / "outputs" / "zoo" / name
    last = run_dir / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, "-m", "facelab.train", f"+experiment={ZOO[name]}", f"hydra.run.dir={run_dir}",
           *( [f"ckpt_path={last}"] if last.exists() else []), *overrides]
    print(" ".join(cmd), flush=True)
    clock = run_dir / "wall_seconds.json"
    spent = json.loads(clock.read_text())["seconds"] if clock.exists() else 0.0
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    spent += time.time() - start
    clock.write_text(json.dumps({"seconds": spent}))

    target = ROOT / "facelab" / "zoo" / name
    shutil.rmtree(target, ignore_errors=True)
    exported = next(run_dir / d for d in ("diffusers", "classifier", "parser") if (run_dir / d).is_dir())
    shutil.copytree(exported, target)
    weights = sorted(target.rglob("*.safetensors"))
    for path in weights:
        store_half(path)
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    trained = ("unet.", "net.", "vae.", "encoder.", "diffusers.")
    params = sum(v.numel() for k, v in ckpt["state_dict"].items() if k.startswith(trained))
    recipe = {
        "experiment": ZOO[name], "overrides": overrides, "global_steps": ckpt["global_step"], "parameters": params,
        "weights_mb": round(sum(p.stat().st_size for p in weights) / 1e6, 1), "train_wall_seconds": round(spent),
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available() else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "final_metrics": last_logged(sorted((run_dir / "csv").glob("*/metrics.csv")),
                                     ("train/loss", "val/loss", "val/acc", "val/psnr", "val/pixel_acc", "val/miou")),
    }
    (target / "recipe.json").write_text(json.dumps(recipe, indent=2))
    print(json.dumps(recipe, indent=2))
    if run_extras:
        extras(name)


def store_half(weights: Path) -> None:
    """Rewrite a safetensors file in float16: half the size in git; the loaders read it back as float32."""
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(weights).items()}, weights,
              metadata={"format": "pt"})


def extras(name: str) -> None:
    """Run the EXTRAS of an installed zoo model in order, each in a fresh outputs/zoo/<name>/<module>."""
    for module, extra, install in EXTRAS.get(name, []):
        run_dir = ROOT / "outputs" / "zoo" / name / module
        shutil.rmtree(run_dir, ignore_errors=True)  # a rerun starts over: the model (and so its h) may have changed
        cmd = [sys.executable, "-m", module, *extra, f"hydra.run.dir={run_dir}"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        if install is not None:
            exported, target = run_dir / install[0], ROOT / "facelab" / "zoo" / name / install[1]
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(exported, target)
            store_half(target / "model.safetensors")


if __name__ == "__main__":
    args = sys.argv[1:]
    split = args.index("--") if "--" in args else len(args)
    names, overrides = args[:split] or list(ZOO), args[split + 1:]
    if names[:1] == ["--extras"]:
        for name in names[1:] or list(EXTRAS):
            extras(name)
    else:
        for name in names:
            train(name, overrides)
