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
two uni-modal samplings: one batch each, interleaved, --timing-repeats times, medians (the machine may be shared).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from facelab.data.synthetic import SyntheticFaces
from facelab.diffusion import DDIM, sample
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
SALIENT = ("Male", "Smiling", "Young", "Eyeglasses", "No_Beard", "Black_Hair", "Blond_Hair", "skin_tone")
RUNS = {  # name -> (modalities used, reweighting, influence_every)
    "mask-only": (["mask"], "average", 1),
    "text-only": (["text"], "average", 1),
    "codiff, learned": (["mask", "text"], "learned", 1),
    "codiff, paper (default)": (["mask", "text"], "paper", 1),
    "average of the two ε": (["mask", "text"], "average", 1),
}


def every(k: int) -> str:
    return f"codiff, paper, diffusers every {k} steps"


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="codiff64")
    parser.add_argument("--parser", default="parser64")
    parser.add_argument("--classifier", default="attr64_eval")
    parser.add_argument("--faces", type=int, default=200)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--influence-every", type=int, nargs="*", default=[],
                        help="also the paper preset with the dynamic diffusers run every k steps (method.influence_every)")
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
    z0 = sample(collab, collab.schedule, z, grid, sampler=DDIM(eta=1.0), generator=generator(seed, 1), cond=conds,
                final=0, progress=False)
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

    specs = {**RUNS, **{every(k): (["mask", "text"], "paper", k) for k in args.influence_every}}

    def collaborative(name: str) -> CollaborativeDenoiser:
        modalities, reweight, k = specs[name]
        models = [by_modality[m] for m in modalities]
        collab = CollaborativeDenoiser(models, full.diffusers if len(models) > 1 else None, names=modalities,
                                       reweight=Reweight(reweight), generator=generator(args.seed, 2))
        collab.influence_every = k
        return collab

    runs = {}
    for name in specs:
        collab = collaborative(name)
        models = collab.models
        collab.record = collab.diffusers is not None
        images, learned = [], []
        for b, first in enumerate(range(0, args.faces, args.batch_size)):
            rows = slice(first, first + args.batch_size)
            values = {"mask": list(masks[rows]), "text": captions[rows]}
            conds = [model.condition(values[model.modality]) for model in models]
            batch, _, records = generate(collab, conds, len(values["text"]), grid, args.seed + b)
            images.append(batch)
            if records and specs[name][1] == "learned":
                learned.append(torch.stack([r["learned"][:, 0] for r in records], 1))  # I_mask [B, steps, h, w]
        runs[name] = {"images": torch.cat(images), "learned": torch.cat(learned) if learned else None,
                      "t": [int(r["t"][0]) for r in records]}
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)

    # time: one batch per generator, interleaved, repeated; calls and medians
    timed = ("mask-only", "text-only", "codiff, learned", "codiff, paper (default)",
             *(every(k) for k in args.influence_every))
    n = min(args.batch_size, args.faces)
    values = {"mask": list(masks[:n]), "text": captions[:n]}
    seconds = {name: [] for name in timed}
    calls = {}
    for _ in range(args.timing_repeats):
        for name in timed:
            collab = collaborative(name)
            conds = [model.condition(values[model.modality]) for model in collab.models]
            seconds[name].append(generate(collab, conds, n, grid, args.seed)[1])
            calls[name] = sum(collab.calls.values())
    median = {name: sorted(s)[len(s) // 2] for name, s in seconds.items()}

    results = {"faces": args.faces, "steps": args.steps, "eta": 1.0, "runs": {}}
    real_features = classifier.features(real)
    for name, run in {"real faces (ceiling)": {"images": real}, **runs}.items():
        parsed = torch.cat([parser.parse(part) for part in run["images"].split(args.batch_size)])
        mask_scores = mask_consistency(parsed, masks)
        caption_scores = caption_consistency(classifier.predict(run["images"]), captions)
        results["runs"][name] = {
            "pixel_acc": mask_scores["pixel_acc"], "miou": mask_scores["miou"],
            "caption_acc": caption_scores["accuracy"], "caption_acc_per_attribute": caption_scores["per_attribute"],
            "caption_acc_salient": sum(caption_scores["per_attribute"][a] for a in SALIENT) / len(SALIENT),
            "fd": None if run["images"] is real else feature_frechet(classifier.features(run["images"]), real_features)}
    results["timing"] = {"batch": n, "repeats": args.timing_repeats, "seconds": seconds, "median_seconds": median,
                         "network_calls": calls, "codiff_over_two_unimodal":
                         median["codiff, learned"] / (median["mask-only"] + median["text-only"]),
                         "over_two_unimodal": {name: median[name] / (median["mask-only"] + median["text-only"])
                                               for name in timed[2:]}}
    learned = runs["codiff, learned"]["learned"]  # [N, steps, h, w]
    h = learned.shape[-1]
    face = torch.nn.functional.interpolate((masks != 0).float()[:, None], size=(h, h), mode="area") > 0.5
    face_mean = (learned * face).sum((0, 2, 3)) / face.sum()  # over the face pixels of all samples, per step
    results["learned_mask_influence_in_face"] = {"t": runs["codiff, learned"]["t"],
                                                 "I_mask": [round(float(v), 4) for v in face_mean]}
    write(args, results, runs, masks, real)


def write(args, results: dict, runs: dict, masks: torch.Tensor, real: torch.Tensor) -> None:
    out = args.out
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"# Collaborative Diffusion on synthetic faces ({results['faces']} held-out condition pairs, DDIM-"
             f"{results['steps']}, η = 1)", "",
             "| generator | mask pixel acc | mask mIoU | caption acc (all stated) | caption acc (8 salient) | FD "
             "(attr64_eval features) |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in results["runs"].items():
        fd = "" if r["fd"] is None else f"{r['fd']:.2f}"
        lines.append(f"| {name} | {r['pixel_acc']:.3f} | {r['miou']:.3f} | {r['caption_acc']:.3f} | "
                     f"{r['caption_acc_salient']:.3f} | {fd} |")
    lines += ["", "Caption consistency per attribute (most captions state absences, e.g. no hat, which any face "
              "satisfies; these are the attributes a caption distinguishes):", "",
              "| generator | " + " | ".join(SALIENT) + " |", "|---|" + "---:|" * len(SALIENT)]
    for name, r in results["runs"].items():
        per = r["caption_acc_per_attribute"]
        lines.append(f"| {name} | " + " | ".join(f"{per[a]:.3f}" if a in per else "" for a in SALIENT) + " |")
    infl = results["learned_mask_influence_in_face"]
    pick = list(range(0, len(infl["t"]), max(1, len(infl["t"]) // 10)))
    timing = results["timing"]
    lines += ["", f"Time of one DDIM-{results['steps']} sampling of {timing['batch']} faces (median of "
              f"{timing['repeats']}, interleaved):", "", "| generator | network calls | seconds |", "|---|---:|---:|"]
    lines += [f"| {name} | {timing['network_calls'][name]} | {s:.1f} |" for name, s in timing["median_seconds"].items()]
    lines += ["", f"codiff / (mask-only + text-only): **{timing['codiff_over_two_unimodal']:.2f}**"]
    lines += [f"{name} / (mask-only + text-only): {ratio:.2f}" for name, ratio in timing["over_two_unimodal"].items()
              if name.startswith("codiff, paper, diffusers every")]
    lines += ["",
              "", "Mean learned I_mask inside the face (no reweighting):", "",
              "| t | " + " | ".join(str(infl["t"][i]) for i in pick) + " |",
              "|---|" + "---:|" * len(pick),
              "| I_mask | " + " | ".join(f"{infl['I_mask'][i]:.2f}" for i in pick) + " |", "",
              "Rerun: `python experiments/codiff/evaluate.py` (figures in experiments/codiff/figures)."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    # figure: 8 conditions; rows = the colour mask, the real face of that mask and caption, then each run
    n = min(8, len(masks))
    colour = torch.stack([torch.from_numpy(colorize_mask(m)) for m in masks[:n]]).permute(0, 3, 1, 2) / 127.5 - 1
    rows = [colour, real[:n], *[run["images"][:n] for run in runs.values()]]
    save_grid(torch.cat(rows), out / "figures" / "samples.png", nrow=n, upscale=2)
    learned = runs["codiff, learned"]["learned"]
    steps = torch.linspace(0, learned.shape[1] - 1, 10).round().long()
    maps = learned[:4, steps].flatten(0, 1)[:, None] * 2 - 1  # [4·10, 1, h, w]
    save_grid(maps.repeat(1, 3, 1, 1), out / "figures" / "influence.png", nrow=10, upscale=8)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
