"""Measure method=debias (Balancing Act, debias.md §6) on the biased zoo DDPM; write results.json and results.md here.

    python experiments/debias/evaluate.py [--model ddpm64_biased] [--hclf MODEL_OR_FOLDER] [--samples 1000]
        [--seeds 3] [--batch-size 100] [--steps 50] [--scale S] [--quick] [--runs DIR]

Prerequisites: the zoo's attr64, attr64_eval and ddpm64_biased with its h-classifier facelab/zoo/ddpm64_biased/hclf
(`python experiments/zoo/train_zoo.py ddpm64_biased`, or `--extras ddpm64_biased` once the model is installed).

Every number comes from the held-out evaluation classifier (--eval-classifier, zoo attr64_eval), which neither
guidance nor the scale calibration sees. Per seed, every cell holds --samples images:
  0. calibration (once, on its own seed): distribution guidance at Male = --calibrate-target for each of
     --calibrate-scales, scored by the guidance classifier attr64; the smallest scale within ±0.05 is used for all
     distribution-guidance cells (--scale S skips this);
  1. vanilla, sample guidance, distribution guidance and the image-space baseline at Male = 0.5: the evaluator's
     Male fraction, the Fairness Discrepancy, the Fréchet distance in its features to real synthetic faces, the
     largest drift of the attributes that do not depend on Male from vanilla, seconds per image and the ratio to
     vanilla of the same seed, measured side by side in this invocation. Sample guidance and the image-space
     baseline (both push every image to one class) reach 0.5 by guiding half the images to each class;
  2. distribution guidance at Male = 0.3, 0.5, 0.7, and at a uniform skin_tone (3 classes);
  3. batch invariance: distribution guidance at N = --batches (scale_per_sample); N = 1 with and without the
     running estimate;
  4. the loss fix: sample guidance to the minority class Male = 0 with loss=prob and loss=logprob at the same scale,
     on vanilla's noise: the share of vanilla's wrong (and confidently wrong) images that flip.
Every cell is one ordinary facelab run (run_sample) kept under outputs/experiments/debias/<time>; `--runs DIR`
reuses the finished cells of an earlier invocation (their timings then come from that sitting).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor

from facelab.data.synthetic import ATTRIBUTES, DEFAULT_PRIORS, SyntheticFaces
from facelab.io.grids import save_grid
from facelab.io.images import read_image, resize_images
from facelab.metrics.attributes import class_fractions, fairness_discrepancy, feature_frechet
from facelab.models.classifier import AttributeNet, load_classifier
from facelab.models.hclassifier import find_hclassifier
from facelab.sample import run_cell
from facelab.utils import compose_config

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TARGETS = (0.3, 0.5, 0.7)
TOLERANCE = 0.05     # the goal: within ±0.05 of the target (issue 5)
CONFIDENT = 0.9      # a vanilla image is confidently wrong if the evaluator gives its class ≥ this
OTHER_HALF = 10_000  # seed offset of the class-1 half of two-class runs (noise unseen by the class-0 half)
UNIFORM3 = [1 / 3, 1 / 3, 1 - 2 / 3]
# Attributes the synthetic faces draw conditionally on a targeted one: they move with it by design, so they are left
# out of the collateral-drift check (debias.md §6.2).
COUPLED = {"Male": {a for a, p in DEFAULT_PRIORS.items() if isinstance(p, dict) and any(
    key.split("=")[0] == "Male" for key in p)}, "skin_tone": {"Pale_Skin"}}


class Cells:
    """Runs cells as ordinary `method=debias` runs in `root`; a finished cell (metrics.json) with the same overrides
    (cell.json) is read back, not rerun."""

    def __init__(self, root: Path, common: list[str]):
        self.root, self.common = root, common

    def __call__(self, name: str, overrides: list[str]) -> Path:
        overrides = ["method=debias", "progress=false", *self.common, *overrides]
        if not (self.root / name / "cell.json").is_file():
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(overrides[2 + len(self.common):])}", flush=True)
        run_cell(self.root / name, overrides)
        return self.root / name


class Scorer:
    """Scores the saved samples of one or more runs (pooled) with the evaluator: class fractions, FD per target,
    Fréchet distance to the real faces, seconds per image."""

    def __init__(self, evaluator: AttributeNet, reference: Tensor, batch_size: int):
        self.evaluator, self.reference, self.batch_size = evaluator, reference, batch_size
        self.device = next(evaluator.parameters()).device
        self.cache: dict[tuple[Path, ...], tuple[Tensor, dict[str, Tensor]]] = {}  # cells are scored more than once

    def labels(self, runs: list[Path]) -> dict[str, Tensor]:
        """The evaluator's labels {head: [M]} of the runs' images, from their labels.csv, pooled in order."""
        rows = []
        for run in runs:
            with open(run / "labels.csv", newline="") as file:
                rows += list(csv.DictReader(file))
        return {head: torch.tensor([int(row[f"eval_{head}"]) for row in rows]) for head in self.evaluator.heads}

    @torch.no_grad()
    def outputs(self, runs: list[Path]) -> tuple[Tensor, dict[str, Tensor]]:
        """(features [M, D], class probabilities {head: [M, K]}) of the runs' saved images, pooled in order."""
        if tuple(runs) in self.cache:
            return self.cache[tuple(runs)]
        paths = [path for run in runs for path in sorted((run / "samples").glob("*.png"))]
        features, probs = [], {}
        for first in range(0, len(paths), self.batch_size):
            x = torch.stack([read_image(p) for p in paths[first:first + self.batch_size]]).to(self.device)
            x = resize_images(x, self.evaluator.image_size)
            features.append(self.evaluator.features(x).cpu())
            for head, p in self.evaluator.predict(x).items():
                probs.setdefault(head, []).append(p.cpu())
        self.cache[tuple(runs)] = torch.cat(features), {head: torch.cat(p) for head, p in probs.items()}
        return self.cache[tuple(runs)]

    def __call__(self, runs: list[Path], targets: dict[str, list[float]]) -> dict:
        labels, metrics = self.labels(runs), [json.loads((run / "metrics.json").read_text()) for run in runs]
        features, _ = self.outputs(runs)
        n = sum(m["num_samples"] for m in metrics)
        adp = {name: sum(torch.tensor(m["attributes"][name]["hclf_fractions"]) * m["num_samples"] for m in metrics) / n
               for name in targets if all("hclf_fractions" in m["attributes"].get(name, {}) for m in metrics)}
        return {"num_samples": n, "runs": [run.name for run in runs],
                "fractions": {head: class_fractions(labels[head], k).tolist()
                              for head, k in self.evaluator.heads.items()},
                "fd": {name: fairness_discrepancy(r, labels[name]) for name, r in targets.items()},
                "hclf_fractions": {name: f.tolist() for name, f in adp.items()},
                "frechet": feature_frechet(features, self.reference),
                "seconds_per_image": sum(m["seconds"] for m in metrics) / n}


def drift(cell: dict, vanilla: dict, targeted: list[str]) -> tuple[float, str]:
    """The largest |class fraction − vanilla's| over the heads that neither are targeted nor depend on a target."""
    skip = set(targeted).union(*(COUPLED.get(name, set()) for name in targeted))
    gaps = {head: max(abs(a - b) for a, b in zip(f, vanilla["fractions"][head]))
            for head, f in cell["fractions"].items() if head not in skip}
    head = max(gaps, key=gaps.get) if gaps else ""
    return (gaps[head], head) if gaps and gaps[head] > 0 else (0.0, "")


def flips(scorer: Scorer, vanilla: Path, guided: Path, c: int) -> dict:
    """Of vanilla's images whose evaluator label is not class c (and of those it is confident about), the share that
    the guided run on the same noise turns into class c; `guided` holds the first images of `vanilla`'s noise."""
    after = scorer.labels([guided])["Male"]
    before = scorer.labels([vanilla])["Male"][:len(after)]
    confidence = scorer.outputs([vanilla])[1]["Male"][:len(after)]
    wrong = before != c
    confident = wrong & (confidence[:, 1 - c] >= CONFIDENT)
    flipped = after == c
    return {"wrong": int(wrong.sum()), "flipped_of_wrong": (flipped & wrong).sum().item() / max(int(wrong.sum()), 1),
            "confidently_wrong": int(confident.sum()),
            "flipped_of_confidently_wrong": (flipped & confident).sum().item() / max(int(confident.sum()), 1),
            "lost_of_right": (~flipped & ~wrong).sum().item() / max(int((~wrong).sum()), 1)}


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def aggregate(per_seed: list[dict]) -> dict:
    """Mean and sd over seeds of every scalar of the per-seed records (fractions: per class)."""
    first = per_seed[0]
    out = {"fractions": {head: [statistics.fmean(r["fractions"][head][k] for r in per_seed) for k in range(len(f))]
                         for head, f in first["fractions"].items()}}
    for key in ("fd", "hclf_fractions"):
        out[key] = {name: (summary([r[key][name] for r in per_seed]) if key == "fd" else
                           [statistics.fmean(r[key][name][k] for r in per_seed) for k in range(len(v))])
                    for name, v in first[key].items()}
    for key in ("frechet", "seconds_per_image", "time_ratio", "drift"):
        if key in first:
            out[key] = summary([r[key] for r in per_seed])
    out["male"] = summary([r["fractions"]["Male"][1] for r in per_seed])
    out["num_samples"] = sum(r["num_samples"] for r in per_seed)
    out["per_seed"] = per_seed
    return out


def real_faces(evaluator: AttributeNet, num: int, batch_size: int) -> tuple[Tensor, dict[str, float]]:
    """(evaluator features, evaluator accuracy per head) of `num` real synthetic faces: method=debias's real_faces
    (seed 1 from index 950000, unseen by every zoo model; default priors: Male 0.5, skin_tone [0.5, 0.3, 0.2])."""
    real = compose_config("sample", ["method=debias"], ROOT / "outputs" / "unused").method.real_faces
    faces = SyntheticFaces(size=evaluator.image_size, length=num, seed=real.seed, start=real.start,
                           priors=OmegaConf.to_container(real.priors, resolve=True))
    device = next(evaluator.parameters()).device
    features, correct = [], {head: 0 for head in evaluator.heads}
    with torch.no_grad():
        for first in range(0, num, batch_size):
            items = [faces[i] for i in range(first, min(first + batch_size, num))]
            x = torch.stack([item["image"] for item in items]).to(device)
            features.append(evaluator.features(x).cpu())
            for head, p in evaluator.predict(x).items():
                truth = torch.tensor([item["skin_tone"] if head == "skin_tone" else
                                      int(item["attributes"][ATTRIBUTES.index(head)]) for item in items])
                correct[head] += (p.argmax(1).cpu() == truth).sum().item()
    return torch.cat(features), {head: c / num for head, c in correct.items()}


def calibrate(cells: Cells, args: argparse.Namespace) -> dict:
    """Distribution guidance at --calibrate-target for each scale, scored by the guidance classifier (the evaluator
    stays unseen); the smallest scale within ±TOLERANCE, else the closest."""
    rows = []
    for scale in args.calibrate_scales:
        run = cells(f"calibrate_scale{scale:g}", [f"target.Male={args.calibrate_target}", f"method.scale={scale}",
                                                  f"num_samples={args.calibration_samples}",
                                                  f"batch_size={args.batch_size}",
                                                  f"seed={args.calibration_seed}",
                                                  f"method.eval_classifier={args.guidance_classifier}"])
        metrics = json.loads((run / "metrics.json").read_text())
        male = metrics["attributes"]["Male"]["fractions"][1]
        rows.append({"scale": scale, "male": male, "error": abs(male - args.calibrate_target),
                     "seconds_per_image": metrics["seconds_per_image"]})
    reached = [row for row in rows if row["error"] <= TOLERANCE]
    chosen = min(reached, key=lambda row: row["scale"]) if reached else min(rows, key=lambda row: row["error"])
    return {"target": args.calibrate_target, "scored_by": args.guidance_classifier, "seed": args.calibration_seed,
            "samples": args.calibration_samples, "rows": rows, "scale": chosen["scale"], "reached": bool(reached)}


def hclf_accuracy(source: str) -> dict[str, float]:
    """The h-classifier's mean validation accuracy over timesteps, per attribute (from its export)."""
    path = find_hclassifier(source)
    if path is None or path.suffix == ".ckpt":
        return {}
    accuracy = json.loads((path / "config.json").read_text()).get("accuracy", {})
    return {name: statistics.fmean(row.values()) for name, row in accuracy.items() if row}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ddpm64_biased")
    parser.add_argument("--hclf", help="h-classifier (default: the model's, e.g. facelab/zoo/ddpm64_biased/hclf)")
    parser.add_argument("--eval-classifier", default="attr64_eval", help="held-out scorer")
    parser.add_argument("--guidance-classifier", default="attr64", help="image-space baseline and calibration")
    parser.add_argument("--samples", type=int, help="images per cell and seed (default 1000; --quick 200)")
    parser.add_argument("--seeds", type=int, help="seeds 0..n-1 (default 3; --quick 1)")
    parser.add_argument("--batch-size", type=int, default=100, help="N of the main cells (the reference's 100)")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps (the h-classifier's grid)")
    parser.add_argument("--scale", type=float, help="distribution-guidance scale (default: calibrated)")
    parser.add_argument("--calibrate-scales", type=float, nargs="+", default=[0.1, 0.3, 1, 3, 10],
                        help="tried in increasing order")
    parser.add_argument("--calibrate-target", type=float, default=0.5)
    parser.add_argument("--calibration-samples", type=int, help="images per calibration cell (default 500; --quick "
                                                                "200)")
    parser.add_argument("--calibration-seed", type=int, default=100)
    parser.add_argument("--sample-scale", type=float, default=15.0, help="sample guidance (the reference's 15)")
    parser.add_argument("--image-scale", type=float, default=20.0, help="image-space baseline (universal_scale)")
    parser.add_argument("--batches", type=int, nargs="+", default=[10, 50, 100], help="N of the invariance check")
    parser.add_argument("--batch1-samples", type=int, help="images per N = 1 cell (default: --samples)")
    parser.add_argument("--invariance-seeds", type=int, help="seeds of the batch-invariance cells (default: all)")
    parser.add_argument("--real-faces", type=int, help="real faces of the Fréchet distance (default: --samples)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="a first look: 200 images, 1 seed")
    parser.add_argument("--runs", type=Path, help="run folder (default outputs/experiments/debias/<time>); finished "
                                                  "cells in it are reused")
    parser.add_argument("--out", type=Path, default=HERE, help="where results.json and results.md go")
    args = parser.parse_args(argv)
    args.samples = args.samples or (200 if args.quick else 1000)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.calibration_samples = args.calibration_samples or (200 if args.quick else 500)
    args.real_faces = args.real_faces or args.samples
    args.batch1_samples = args.batch1_samples or args.samples
    args.invariance_seeds = args.seeds if args.invariance_seeds is None else args.invariance_seeds
    if args.invariance_seeds < 1:
        parser.error("--invariance-seeds must be at least 1")
    args.calibrate_scales = sorted(args.calibrate_scales)
    if args.samples % (2 * args.batch_size):
        parser.error(f"--samples {args.samples} must be a multiple of 2 × --batch-size {args.batch_size}: the "
                     "two-class runs hold half the images each, batch for batch on vanilla's noise")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    root = args.runs or ROOT / "outputs" / "experiments" / "debias" / time.strftime("%Y-%m-%d_%H-%M-%S")
    common = [f"model.pretrained={args.model}", f"method.eval_classifier={args.eval_classifier}",
              f"method.guidance_classifier={args.guidance_classifier}", f"sampler.steps={args.steps}",
              f"device={args.device}", "method.real_faces.num=0",  # the Fréchet distance is computed here, pooled
              *([f"method.hclf={args.hclf}"] if args.hclf else [])]
    cells = Cells(root, common)
    m, n, half = args.samples, args.batch_size, args.samples // 2
    evaluator = load_classifier(args.eval_classifier, "cuda" if args.device == "auto" and torch.cuda.is_available()
                                else "cpu" if args.device == "auto" else args.device)
    reference, eval_accuracy = real_faces(evaluator, args.real_faces, n)
    scorer = Scorer(evaluator, reference, n)
    calibration = None if args.scale is not None else calibrate(cells, args)  # also warms the device up
    scale = args.scale if args.scale is not None else calibration["scale"]
    male = lambda r: {"Male": [1 - r, r]}  # noqa: E731
    dist = ["mode=distribution", f"method.scale={scale}"]
    sample = ["mode=sample", f"method.scale={args.sample_scale}"]
    image = ["mode=sample", "method.universal_guidance=true", f"method.universal_scale={args.image_scale}"]

    rows: dict[str, list[dict]] = {}
    loss_fix: dict[str, list[dict]] = {"logprob": [], "prob": []}
    for seed in range(args.seeds):
        base = [f"seed={seed}", f"num_samples={m}", f"batch_size={n}"]
        halves = [f"seed={seed}", f"num_samples={half}", f"batch_size={n}"]
        other = [f"seed={seed + OTHER_HALF}", f"num_samples={half}", f"batch_size={n}"]
        runs = {  # key: (runs pooled, targets of FD); vanilla first, so that timings sit side by side
            "vanilla": ([cells(f"vanilla_s{seed}", [*base, "mode=vanilla", "method.hclf=null"])], male(0.5)),
            "distribution": ([cells(f"distribution_m0.5_s{seed}", [*base, *dist, "target.Male=0.5"])], male(0.5)),
            "sample": ([cells(f"sample_c0_s{seed}", [*halves, *sample, "target.Male=0", "method.loss=logprob"]),
                        cells(f"sample_c1_s{seed}", [*other, *sample, "target.Male=1", "method.loss=logprob"])],
                       male(0.5)),
            "image": ([cells(f"image_c0_s{seed}", [*halves, *image, "target.Male=0"]),
                       cells(f"image_c1_s{seed}", [*other, *image, "target.Male=1"])], male(0.5)),
        }
        for r in TARGETS:
            if r != 0.5:
                runs[f"target_{r}"] = ([cells(f"distribution_m{r}_s{seed}", [*base, *dist, f"target.Male={r}"])],
                                       male(r))
        runs["target_0.5"] = runs["distribution"]
        runs["skin_vanilla"] = (runs["vanilla"][0], {"skin_tone": UNIFORM3})
        runs["skin"] = ([cells(f"skin_uniform_s{seed}", [*base, *dist, f"target.skin_tone={UNIFORM3}"])],
                        {"skin_tone": UNIFORM3})
        for running in ("none", "cumulative") if seed < args.invariance_seeds else ():
            runs[f"N1_{running}"] = ([cells(f"batch1_{running}_s{seed}", [
                f"seed={seed}", f"num_samples={args.batch1_samples}", "batch_size=1", *dist, "target.Male=0.5",
                f"method.running_estimate={running}"])], male(0.5))
        for b in args.batches if seed < args.invariance_seeds else ():
            runs[f"N{b}"] = runs["distribution"] if b == n else runs["N1_none"] if b == 1 else (
                [cells(f"batch{b}_s{seed}", [f"seed={seed}", f"num_samples={m}", f"batch_size={b}", *dist,
                                             "target.Male=0.5"])], male(0.5))
        prob = cells(f"sample_prob_c0_s{seed}", [*halves, *sample, "target.Male=0", "method.loss=prob"])

        scores = {key: scorer(paths, targets) for key, (paths, targets) in runs.items()}
        vanilla = scores["vanilla"]
        for key, score in scores.items():
            score["time_ratio"] = score["seconds_per_image"] / vanilla["seconds_per_image"]
            score["drift"], score["drift_head"] = drift(score, vanilla, list(runs[key][1]))
            rows.setdefault(key, []).append(score)
        sample_c0 = runs["sample"][0][0]
        for loss, guided in (("logprob", sample_c0), ("prob", prob)):
            record = flips(scorer, runs["vanilla"][0][0], guided, 0)
            record["male"] = scorer.labels([guided])["Male"].float().mean().item()
            loss_fix[loss].append(record)
        results = {  # written after every seed: an interrupted run keeps the seeds it finished
            "model": args.model, "hclf": args.hclf or args.model, "eval_classifier": args.eval_classifier,
            "eval_accuracy": eval_accuracy, "hclf_accuracy": hclf_accuracy(args.hclf or args.model),
            "guidance_classifier": args.guidance_classifier, "samples": m, "seeds": seed + 1, "batch_size": n,
            "steps": args.steps, "real_faces": args.real_faces, "scale": scale, "calibration": calibration,
            "sample_scale": args.sample_scale, "image_scale": args.image_scale, "batches": args.batches,
            "batch1_samples": args.batch1_samples, "invariance_seeds": min(args.invariance_seeds, seed + 1),
            "fd_floor": 0.564 / m ** 0.5, "device": str(next(evaluator.parameters()).device) if args.device == "auto"
            else args.device, "cells": {key: aggregate(v) for key, v in rows.items()},
            "loss_fix": {loss: {key: summary([r[key] for r in v]) for key in v[0]} for loss, v in loss_fix.items()},
            "runs": str(root)}
        args.out.mkdir(parents=True, exist_ok=True)
        figure(root, args.out / "figures" / "debias.png")
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        (args.out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return results


def figure(root: Path, path: Path, per_row: int = 8) -> None:
    """Vanilla (top rows) and distribution guidance at Male = 0.5 (bottom rows) on the same noise: seed 0's first
    two rows of images each."""
    runs = (root / "vanilla_s0", root / "distribution_m0.5_s0")
    images = [read_image(p) for run in runs for p in sorted((run / "samples").glob("*.png"))[:2 * per_row]]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(torch.stack(images), path, nrow=per_row, upscale=2)


def pm(stat: dict, digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def markdown(res: dict) -> str:
    cells, vanilla_male = res["cells"], res["cells"]["vanilla"]["male"]["mean"]
    cal = res["calibration"]
    lines = [f"# Balancing Act on `{res['model']}`: {res['samples']} images × {res['seeds']} seeds per cell",
             "",
             f"Scored by the held-out `{res['eval_classifier']}` (accuracy on the real faces: Male "
             f"{res['eval_accuracy']['Male']:.3f}, skin_tone {res['eval_accuracy']['skin_tone']:.3f}); h-classifier "
             f"`{res['hclf']}` (mean validation accuracy over t: "
             + (", ".join(f"{a} {v:.3f}" for a, v in res["hclf_accuracy"].items()) or "unknown") + "). "
             f"DDIM η = 1, {res['steps']} steps, N = {res['batch_size']}, device {res['device']}. Mean ± sd over "
             f"seeds; FD's sampling floor at a balanced binary target is ≈ {res['fd_floor']:.3f}. Fréchet: in the "
             "evaluator's "
             f"features, saved (8-bit) samples against {res['real_faces']} real synthetic faces (Male 0.5, skin_tone "
             "[0.5, 0.3, 0.2]). "
             "Drift: the largest change from vanilla of the attributes that neither are targeted nor depend on a "
             "target in the faces' priors.",
             "",
             f"Distribution guidance: chi2, scale {res['scale']:g} per sample"
             + (f" (calibrated: the smallest of {[r['scale'] for r in cal['rows']]} within ±{TOLERANCE} of "
                f"Male = {cal['target']} by `{cal['scored_by']}` on seed {cal['seed']}"
                + ("" if cal["reached"] else "; none reached it, the closest is used") + ")" if cal else " (given)")
             + f". Sample guidance: logprob, scale {res['sample_scale']:g}. Image-space baseline: "
             f"`{res['guidance_classifier']}` on x̂0, logprob, scale {res['image_scale']:g}. Both of these push "
             "each image to one class: half the images are guided to each.",
             "", "## Debiasing at Male = 0.5", "",
             "| mode | Male fraction | FD | Fréchet | drift (attribute) | s / image | × vanilla |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key, label in (("vanilla", "vanilla"), ("sample", "sample guidance"), ("distribution", "distribution guidance"),
                       ("image", "image-space baseline")):
        c = cells[key]
        lines.append(f"| {label} | {pm(c['male'])} | {pm(c['fd']['Male'])} | {pm(c['frechet'], 2)} | "
                     f"{pm(c['drift'])} ({c['per_seed'][0]['drift_head'] or '-'}) | {pm(c['seconds_per_image'])} | "
                     f"{pm(c['time_ratio'], 2)} |")
    lines += ["", "## Targets (distribution guidance)", "",
              f"Vanilla: Male {vanilla_male:.3f}.", "",
              "| target Male | achieved | error | within ±0.05 | FD | h-classifier's own final read |",
              "|---:|---:|---:|:---:|---:|---:|"]
    for r in TARGETS:
        c = cells[f"target_{r}"]
        error = abs(c["male"]["mean"] - r)
        adp = c["hclf_fractions"].get("Male")
        lines.append(f"| {r} | {pm(c['male'])} | {error:.3f} | {'yes' if error <= TOLERANCE else 'no'} | "
                     f"{pm(c['fd']['Male'])} | {f'{adp[1]:.3f}' if adp else '-'} |")
    lines += ["", "## Three classes: skin_tone → uniform", "",
              "| mode | skin_tone fractions (light, medium, dark) | FD | Male fraction | Fréchet | "
              "drift (attribute) |",
              "|---|---:|---:|---:|---:|---:|"]
    for key, label in (("skin_vanilla", "vanilla"), ("skin", "distribution guidance")):
        c = cells[key]
        lines.append(f"| {label} | {', '.join(f'{v:.3f}' for v in c['fractions']['skin_tone'])} | "
                     f"{pm(c['fd']['skin_tone'])} | {pm(c['male'])} | {pm(c['frechet'], 2)} | {pm(c['drift'])} "
                     f"({c['per_seed'][0]['drift_head'] or '-'}) |")
    lines += ["", "## Batch invariance (scale_per_sample) and the running estimate, target Male = 0.5", "",
              f"Seeds 0..{res['invariance_seeds'] - 1}; N = 1 cells: {res['batch1_samples']} images per seed.", "",
              "| N | running estimate | Male fraction | FD | s / image |", "|---:|---|---:|---:|---:|"]
    for key, b, running in [*((f"N{b}", b, "none") for b in res["batches"] if b != 1), ("N1_none", 1, "none"),
                            ("N1_cumulative", 1, "cumulative")]:
        c = cells[key]
        lines.append(f"| {b} | {running} | {pm(c['male'])} | {pm(c['fd']['Male'])} | {pm(c['seconds_per_image'])} |")
    lines += ["", f"## Loss fix: sample guidance to Male = 0 (the minority) at scale {res['sample_scale']:g}, on "
                  "vanilla's noise", "",
              f"| loss | flipped of vanilla's wrong | flipped of the confidently wrong (p ≥ {CONFIDENT}) | "
              "right turned wrong | Male fraction |", "|---|---:|---:|---:|---:|"]
    for loss, r in res["loss_fix"].items():
        lines.append(f"| {loss} | {pm(r['flipped_of_wrong'])} (of {r['wrong']['mean']:.0f}) | "
                     f"{pm(r['flipped_of_confidently_wrong'])} (of {r['confidently_wrong']['mean']:.0f}) | "
                     f"{pm(r['lost_of_right'])} | {pm(r['male'])} |")
    if cal:
        lines += ["", f"## Scale calibration: distribution guidance at Male = {cal['target']}, {cal['samples']} "
                      f"images, scored by `{cal['scored_by']}`", "",
                  "| scale | Male fraction | error | s / image | |", "|---:|---:|---:|---:|---|"]
        for row in cal["rows"]:
            lines.append(f"| {row['scale']:g} | {row['male']:.3f} | {row['error']:.3f} | "
                         f"{row['seconds_per_image']:.3f} | {'chosen' if row['scale'] == cal['scale'] else ''} |")
    hit = all(abs(cells[f"target_{r}"]["male"]["mean"] - r) <= TOLERANCE for r in TARGETS)
    ratio = cells["distribution"]["time_ratio"]["mean"]
    lines += ["", f"Goal (issue 5): distribution guidance within ±{TOLERANCE} of every target: "
                  f"{'yes' if hit else 'no'}; vanilla off by {abs(vanilla_male - 0.5):.3f} at 0.5 (≥ 0.25 wanted); "
                  f"wall time {ratio:.2f}× vanilla (≤ 1.2 wanted). Runs: `{res['runs']}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
