"""Measure method=fuzzy on synthetic faces with known damage; write results.json and results.md here.

    python experiments/fuzzy/evaluate.py [--model ddpm64] [--images 16] [--quick]

1. Correction (mode=zscore, self_degrade=true): anomaly-map AUROC against the true damage, PSNR/SSIM against
   the clean face inside/outside the damage for no correction, the fast default and the repaint preset, with
   network calls and wall time per image (same machine, same run).
2. Strength (mode=replace): PSNR(output, input) over mask_s at 25, 50 and 100 steps, for strength=per_time
   (should coincide across step counts) and per_step (should not).
Every cell is one ordinary facelab run (run_sample) whose run directory is kept under outputs/experiments/.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from facelab.methods.fuzzy_stats import compute_stats
from facelab.models.pretrained import zoo_names
from facelab.sample import run_sample
from facelab.utils import compose_config

HERE = Path(__file__).resolve().parent
MASK_S = [0.01, 0.03, 0.07, 0.15, 0.3]


def run(name: str, overrides: list[str], root: Path) -> dict:
    out = root / name
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(overrides)}", flush=True)
    return run_sample(compose_config("sample", ["method=fuzzy", "progress=false", *overrides], out))


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ddpm64")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="skip the repaint preset and the 100-step column")
    parser.add_argument("--stats", help="projection statistics (default: the zoo's, else computed over --stats-n)")
    parser.add_argument("--stats-n", type=int, default=256)
    args = parser.parse_args()
    root = HERE.parents[1] / "outputs" / "experiments" / "fuzzy" / time.strftime("%Y-%m-%d_%H-%M-%S")
    common = [f"model.pretrained={args.model}", f"num_samples={args.images}", f"batch_size={args.images}"]
    stats = args.stats
    if stats is None and args.model not in zoo_names():
        stats = compute_stats(compose_config("fuzzy_stats", [f"model.pretrained={args.model}", f"N={args.stats_n}",
                                                             "progress=false"], root / "stats"))
    if stats is not None:
        common.append(f"zscore_path={stats}")

    correction = {}
    samplers = {"fast default (DDIM η=1, 50 steps)": []}
    if not args.quick:
        samplers["repaint preset (250 steps, jumps 10×10)"] = ["sampler=repaint"]
    for label, extra in samplers.items():
        correction[label] = run(f"zscore_{len(correction)}", [*common, "mode=zscore", "self_degrade=true", *extra],
                                root)

    steps = [25, 50] if args.quick else [25, 50, 100]
    strength = {}
    for mode in ("per_time", "per_step"):
        for n in steps:
            strength[f"{mode}/{n}"] = {
                s: run(f"replace_{mode}_{n}_{s}", [*common, "mode=replace", f"mask_s={s}", f"sampler.steps={n}",
                                                   f"method.strength={mode}"], root)["psnr_to_input"]
                for s in MASK_S}
    results = {"model": args.model, "images": args.images, "correction": correction, "strength_psnr": strength,
               "runs": str(root)}
    (HERE / "results.json").write_text(json.dumps(results, indent=2))
    (HERE / "results.md").write_text(markdown(results))
    print(markdown(results))
    return results


def markdown(results: dict) -> str:
    rows = ["| run | AUROC of A | PSNR in, before → after | PSNR out, before → after | SSIM in, after | "
            "network calls / image | s / image |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, m in results["correction"].items():
        rows.append(f"| {label} | {m['auroc']:.3f} | {m['psnr_inside_before']:.2f} → {m['psnr_inside_after']:.2f} | "
                    f"{m['psnr_outside_before']:.2f} → {m['psnr_outside_after']:.2f} | {m['ssim_inside_after']:.3f} | "
                    f"{m['network_calls_per_image']} | {m['seconds_per_image']:.2f} |")
    head = "| strength / steps | " + " | ".join(f"mask_s={s}" for s in MASK_S) + " |"
    table = [head, "|---|" + "---:|" * len(MASK_S)]
    for key, psnrs in results["strength_psnr"].items():
        table.append(f"| {key} | " + " | ".join(f"{psnrs[s]:.2f}" for s in MASK_S) + " |")
    return (f"Model `{results['model']}`, {results['images']} synthetic test faces.\n\n" + "\n".join(rows)
            + "\n\nPSNR(output, input) in dB, replace mode:\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
