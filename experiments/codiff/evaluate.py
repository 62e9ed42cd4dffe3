"""Measure Collaborative Diffusion (codiff.md §6) on the zoo models and synthetic faces; write results.json/.md and figures.

    python experiments/codiff/evaluate.py [--faces 200] [--steps 50] [--batch-size 50]

Condition pairs (label map, caption) come from --faces held-out synthetic faces (seed 0 from index 900000; the zoo's
VAE and latent models trained on indices < 20000). Every generator samples them from the same x_T and per-step noise
(DDIM η = 1 on the LDM grid, as `method=codiff`):
  mask-only (ldm_mask64), text-only (ldm_text64), codiff with the learned softmax, with the paper's reweighting
  (the `method=codiff` default), and a fixed 1/2-1/2 average of the two ε (the baseline for the learned weights).
Scores, by evaluators that no generator saw:
  mask consistency: pixel accuracy and mean IoU of parser64's parse of the output against the input label map;
  caption consistency: accuracy of attr64_eval on the attributes each caption states (facelab.metrics.captions);
  FD: Fréchet distance in attr64_eval's features against the real faces of the same conditions;
The real faces themselves give the ceiling of both consistencies. Also: the mean learned I_mask inside the face per
timestep (does the mask dominate at high t without the paper's forcing?), and the time of one codiff sampling vs the
two uni-modal samplings, measured side by side on the same batches.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from facelab.data.synthetic import SyntheticFaces
from facelab.diffusion import sample
from facelab.diffusion.collab import CollaborativeDenoiser, Reweight
from facelab.io.grids import save_grid
from facelab.io.images import colorize_mask
from facelab.metrics.attributes import feature_frechet
from facelab.metrics.captions import caption_consistency
from facelab.metrics.parsing import mask_consistency
from facelab.models.classifier import load_classifier
from facelab.models.codiff import ldm_timesteps, load_collaborative
from facelab.models.parser import load_parser

HERE = Path(__file__).resolve().parent
RUNS = {  # name -> (modalities used, reweighting)
    "mask-only": (["mask"], "average"),
    "text-only": (["text"], "average"),
    "codiff, learned": (["mask", "text"], "learned"),
    "codiff, paper (default)": (["mask", "text"], "paper"),
    "average of the two ε": (["mask", "text"], "average"),
}


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="codiff64")
    parser.add_argument("--parser", default="parser64")
    parser.add_argument("--classifier", default="attr64_eval")
    parser.add_argument("--faces", type=int, default=200)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE)
    return parser.parse_args(argv)


def generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1000003 + stream)


@torch.no_grad()
def generate(collab: CollaborativeDenoiser, conds: list[dict], n: int, grid: list[int], seed: int) -> tuple:
    """Images of one batch from the seed's x_T and noise (identical for every run), its seconds and the records."""
    shape = collab.models[0].latent_shape
    z = torch.randn(n, *shape, generator=generator(seed, 0))
    collab.records.clear()
    start = time.perf_counter()
    z0 = sample(collab, collab.schedule, z, grid, eta=1.0, generator=generator(seed, 1), cond=conds, final=0,
                clip=collab.schedule.clip_sample, progress=False)
    images = collab.decode(z0).clamp(-1, 1)
    return images, time.perf_counter() - start, list(collab.records)


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_grad_enabled(False)
    full = load_collaborative(args.model)
    by_modality = {model.modality: model for model in full.models}
    parser, classifier = load_parser(args.parser), load_classifier(args.classifier)
    faces = SyntheticFaces(64, length=args.faces, seed=0, start=900000)
    items = [faces[i] for i in range(args.faces)]
    real = torch.stack([item["image"] for item in items])
    masks = torch.stack([item["mask"] for item in items])
    captions = [item["caption"] for item in items]
    grid = ldm_timesteps(full.schedule, args.steps)

    runs = {}
    for name, (modalities, reweight) in RUNS.items():
        models = [by_modality[m] for m in modalities]
        collab = CollaborativeDenoiser(models, full.diffusers if len(models) > 1 else None, names=modalities,
                                       reweight=Reweight(reweight), generator=generator(args.seed, 2))
        collab.record = collab.diffusers is not None
        images, seconds, learned = [], 0.0, []
        for b, first in enumerate(range(0, args.faces, args.batch_size)):
            rows = slice(first, first + args.batch_size)
            values = {"mask": list(masks[rows]), "text": captions[rows]}
            conds = [model.condition(values[model.modality]) for model in models]
            batch, s, records = generate(collab, conds, len(values["text"]), grid, args.seed + b)
            images.append(batch)
            seconds += s
            if records and reweight == "learned":
                learned.append(torch.stack([r["learned"][:, 0] for r in records], 1))  # I_mask [B, steps, h, w]
        runs[name] = {"images": torch.cat(images), "seconds": seconds,
                      "learned": torch.cat(learned) if learned else None, "t": [int(r["t"][0]) for r in records]}
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {seconds:.1f} s", flush=True)

    results = {"faces": args.faces, "steps": args.steps, "eta": 1.0, "runs": {}}
    real_features = classifier.features(real)
    for name, run in {"real faces (ceiling)": {"images": real, "seconds": None}, **runs}.items():
        parsed = torch.cat([parser.parse(part) for part in run["images"].split(args.batch_size)])
        mask_scores = mask_consistency(parsed, masks)
        caption_scores = caption_consistency(classifier.predict(run["images"]), captions)
        results["runs"][name] = {
            "pixel_acc": mask_scores["pixel_acc"], "miou": mask_scores["miou"],
            "caption_acc": caption_scores["accuracy"], "caption_acc_per_attribute": caption_scores["per_attribute"],
            "fd": None if run["seconds"] is None else feature_frechet(classifier.features(run["images"]), real_features),
            "seconds_per_image": None if run["seconds"] is None else run["seconds"] / args.faces}
    separate = runs["mask-only"]["seconds"] + runs["text-only"]["seconds"]
    results["time_ratio_codiff_vs_two_unimodal"] = runs["codiff, learned"]["seconds"] / separate
    learned = runs["codiff, learned"]["learned"]  # [N, steps, h, w]
    h = learned.shape[-1]
    face = torch.nn.functional.interpolate((masks != 0).float()[:, None], size=(h, h), mode="area") > 0.5
    face_mean = (learned * face).sum((0, 2, 3)) / face.sum()  # over the face pixels of all samples, per step
    results["learned_mask_influence_in_face"] = {"t": runs["codiff, learned"]["t"],
                                                 "I_mask": [round(float(v), 4) for v in face_mean]}
    write(args, results, runs, masks, captions)


def write(args, results: dict, runs: dict, masks: torch.Tensor, captions: list[str]) -> None:
    out = args.out
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"# Collaborative Diffusion on synthetic faces ({results['faces']} held-out condition pairs, DDIM-"
             f"{results['steps']}, η = 1)", "",
             "| generator | mask pixel acc | mask mIoU | caption acc | FD (attr64_eval features) | s / image |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in results["runs"].items():
        fd = "" if r["fd"] is None else f"{r['fd']:.2f}"
        sec = "" if r["seconds_per_image"] is None else f"{r['seconds_per_image']:.3f}"
        lines.append(f"| {name} | {r['pixel_acc']:.3f} | {r['miou']:.3f} | {r['caption_acc']:.3f} | {fd} | {sec} |")
    infl = results["learned_mask_influence_in_face"]
    pick = list(range(0, len(infl["t"]), max(1, len(infl["t"]) // 10)))
    lines += ["", f"codiff sampling time / (mask-only + text-only): **{results['time_ratio_codiff_vs_two_unimodal']:.2f}**",
              "", "Mean learned I_mask inside the face (no reweighting):", "",
              "| t | " + " | ".join(str(infl["t"][i]) for i in pick) + " |",
              "|---|" + "---:|" * len(pick),
              "| I_mask | " + " | ".join(f"{infl['I_mask'][i]:.2f}" for i in pick) + " |", "",
              "Rerun: `python experiments/codiff/evaluate.py` (figures in experiments/codiff/figures)."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    # figure: rows = colour mask, real face, then each run; 8 conditions
    n = min(8, len(masks))
    colour = torch.from_numpy(colorize_mask(torch.cat(list(masks[:n]), 1))).permute(2, 0, 1).float() / 127.5 - 1
    colour = torch.stack(colour.chunk(n, 1))
    rows = [colour, *[run["images"][:n] for run in runs.values()]]
    save_grid(torch.cat(rows), out / "figures" / "samples.png", nrow=n, upscale=2)
    learned = runs["codiff, learned"]["learned"]
    steps = torch.linspace(0, learned.shape[1] - 1, 10).round().long()
    maps = learned[:4, steps].flatten(0, 1)[:, None] * 2 - 1  # [4·10, 1, h, w]
    save_grid(maps.repeat(1, 3, 1, 1), out / "figures" / "influence.png", nrow=10, upscale=8)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
