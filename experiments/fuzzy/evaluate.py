"""Measure method=fuzzy on synthetic faces with known damage; write results.json and results.md here.

    python experiments/fuzzy/evaluate.py [--model ddpm64] [--images 16] [--parts correction strength] [--quick]

1. correction (mode=zscore, self_degrade=true): anomaly-map AUROC against the true damage, PSNR/SSIM against the
   clean face inside/outside the damage and over the whole image, for no correction, the repaint preset and the
   fast default, with network calls and wall time per image (same machine, same run); then the fast default's
   ablation: its step count and ood_lambda one at a time (the evidence its defaults were chosen on).
2. strength (mode=replace): PSNR(output, input) over mask_s at 25, 50 and 100 steps, for strength=per_time
   (should coincide across step counts) and per_step (should not).
Parts not run keep their earlier results from results.json. Every cell is one ordinary facelab run (run_sample)
whose run directory is kept under outputs/experiments/fuzzy/<time>.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from facelab.fuzzy_stats import compute_stats
from facelab.io.grids import save_grid
from facelab.io.images import read_image
from facelab.models.pretrained import zoo_names
from facelab.sample import run_cell
from facelab.sweeps import write_page
from facelab.utils import compose_config

HERE = Path(__file__).resolve().parent
MASK_S = [0.01, 0.03, 0.07, 0.15, 0.3]
REPAINT = "repaint preset (250 steps, jumps 10×10)"
# the fast default's knobs, one at a time; and a short jump schedule at the same budget as 80 DDIM steps
ABLATION = {"steps 25": ["sampler.steps=25"], "steps 80": ["sampler.steps=80"], "ood_lambda 0.1": ["ood_lambda=0.1"],
            "ood_lambda 0.5": ["ood_lambda=0.5"],
            "short jumps (30 steps, jumps 5×3, per_time), ood_lambda 0.2": [
                "sampler=repaint", "sampler.steps=30", "sampler.jump_length=5", "sampler.jump_n_sample=3",
                "method.strength=per_time", "ood_lambda=0.2"]}


def run(name: str, overrides: list[str], root: Path) -> dict:
    """One `method=fuzzy` run in root/name (a finished one with the same overrides is read back)."""
    overrides = ["method=fuzzy", "progress=false", *overrides]
    if not (root / name / "cell.json").is_file():
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(overrides[2:])}", flush=True)
    return run_cell(root / name, overrides)


def correction(common: list[str], root: Path, quick: bool) -> dict:
    defaults = compose_config("sample", ["method=fuzzy"], root / "unused")
    fast = f"fast default (DDIM η={defaults.sampler.eta:g}, {defaults.sampler.steps} steps, ood_lambda " \
           f"{defaults.method.ood_lambda:g})"
    cells = {fast: []} if quick else {REPAINT: ["sampler=repaint", "ood_lambda=0.1"], fast: []}
    if not quick:
        cells.update({f"fast, {label}": extra for label, extra in ABLATION.items()})
    zscore = [*common, "mode=zscore", "self_degrade=true"]
    names = {label: "zscore_" + ("_".join(extra).replace("=", "").replace(".", "") or "default")
             for label, extra in cells.items()}
    ran = {label: run(names[label], [*zscore, *extra], root) for label, extra in sorted(
        cells.items(), key=lambda cell: cell[0] == REPAINT)}  # the slow repaint preset last
    results = {label: ran[label] for label in cells}
    if not quick:
        figure([root / names[REPAINT], root / names[fast]], HERE / "figures" / "correction.png")
    return results


def figure(runs: list[Path], path: Path, faces: int = 6) -> None:
    """Per face (rows): the clean face, the damaged input, then each run's output."""
    stems = sorted(p.name for p in (runs[0] / "clean").glob("*.png"))[:faces]
    folders = [runs[0] / "clean", runs[0] / "gt_image", *(run / "inpainted" for run in runs)]
    save_grid(torch.stack([read_image(folder / stem) for stem in stems for folder in folders]), path,
              nrow=len(folders), upscale=2)


def strength(common: list[str], root: Path, quick: bool) -> dict:
    rows = {}
    for mode in ("per_time", "per_step"):
        for n in [25, 50] if quick else [25, 50, 100]:
            rows[f"{mode}/{n}"] = {
                str(s): run(f"replace_{mode}_{n}_{s}", [*common, "mode=replace", f"mask_s={s}", f"sampler.steps={n}",
                                                   f"method.strength={mode}"], root)["psnr_to_input"]
                for s in MASK_S}
    return rows


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ddpm64")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--parts", nargs="+", choices=["correction", "strength"], default=["correction", "strength"])
    parser.add_argument("--quick", action="store_true", help="only the fast default; no 100-step column")
    parser.add_argument("--stats", help="projection statistics (default: the zoo's, else computed over --stats-n)")
    parser.add_argument("--stats-n", type=int, default=256)
    parser.add_argument("--runs", type=Path, help="run folder (default outputs/experiments/fuzzy/<time>); finished "
                                                  "cells in it with the same settings are reused")
    args = parser.parse_args()
    root = args.runs or HERE.parents[1] / "outputs" / "experiments" / "fuzzy" / time.strftime("%Y-%m-%d_%H-%M-%S")
    common = [f"model.pretrained={args.model}", f"num_samples={args.images}", f"batch_size={args.images}"]
    stats = args.stats
    if stats is None and args.model not in zoo_names():
        stats = compute_stats(compose_config("fuzzy_stats", [f"model.pretrained={args.model}", f"N={args.stats_n}",
                                                             "progress=false"], root / "stats"))
    if stats is not None:
        common.append(f"zscore_path={stats}")

    earlier = HERE / "results.json"
    results = json.loads(earlier.read_text()) if earlier.is_file() else {}
    for part in args.parts:
        results[part] = {"model": args.model, "images": args.images, "runs": str(root),
                         "cells": {"correction": correction, "strength": strength}[part](common, root, args.quick)}
    earlier.write_text(json.dumps(results, indent=2))
    (HERE / "results.md").write_text(markdown(results))
    print(markdown(results))
    print(f"page: {write_page(root, title='facelab study: fuzzy')}")  # every cell side by side
    return results


def markdown(results: dict) -> str:
    lines = []
    if "correction" in results:
        part = results["correction"]
        cells = part["cells"]
        first = next(iter(cells.values()))
        lines += [f"Correction: model `{part['model']}`, {part['images']} synthetic test faces with seeded damage; "
                  "PSNR (dB) and SSIM against the clean face.", "",
                  "| run | AUROC of A | PSNR inside | PSNR outside | PSNR whole | SSIM inside | network calls / image "
                  "| s / image |", "|---|---:|---:|---:|---:|---:|---:|---:|",
                  f"| no correction | | {first['psnr_inside_before']:.2f} | {first['psnr_outside_before']:.2f} | "
                  f"{first['psnr_all_before']:.2f} | {first['ssim_inside_before']:.3f} | 0 | |"]
        for label, m in cells.items():
            lines.append(f"| {label} | {m['auroc']:.3f} | {m['psnr_inside_after']:.2f} | "
                         f"{m['psnr_outside_after']:.2f} | {m['psnr_all_after']:.2f} | {m['ssim_inside_after']:.3f} | "
                         f"{m['network_calls_per_image']} | {m['seconds_per_image']:.2f} |")
        lines.append("")
    if "strength" in results:
        part = results["strength"]
        lines += [f"Strength: model `{part['model']}`, {part['images']} synthetic test faces; PSNR(output, input) in "
                  "dB, replace mode:", "", "| strength / steps | " + " | ".join(f"mask_s={s}" for s in MASK_S) + " |",
                  "|---|" + "---:|" * len(MASK_S)]
        for key, psnrs in part["cells"].items():
            lines.append(f"| {key} | " + " | ".join(f"{psnrs[str(s)]:.2f}" for s in MASK_S) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
