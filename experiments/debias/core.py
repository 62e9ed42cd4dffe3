"""The core of the debias measurement at a size a CPU finishes: vanilla and distribution guidance at Male = 0.3, 0.5
and 0.7 on the biased zoo DDPM, per seed, scored by the held-out evaluator; writes results_core.md and .json here.

    python experiments/debias/core.py [--samples 200] [--seeds 1 2] [--scale 5] [--batch1 100] [--runs DIR]

--batch1 M adds N = 1 cells at Male = 0.5 on M images of seed 0, without and with the running estimate.

Seeds can run in parallel processes sharing --runs (each its own --out), and a last invocation with all the seeds
reads the finished cells back. evaluate.py is the full protocol (1000 images per cell, sample guidance, the
image-space baseline, skin tone, batch invariance, the loss fix, the scale calibration that chose 5); each cell here
is the same `method=debias` run as there.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from evaluate import HERE, ROOT, TARGETS, TOLERANCE, Cells


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--scale", type=float, default=5.0)
    parser.add_argument("--batch1", type=int, default=0, help="images of the N = 1 cells (0: none)")
    parser.add_argument("--runs", type=Path, help="run folder (finished cells are reused)")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    root = args.runs or ROOT / "outputs" / "experiments" / "debias_core" / time.strftime("%Y-%m-%d_%H-%M-%S")
    per_seed = []
    for seed in args.seeds:
        cells = Cells(root, ["model.pretrained=ddpm64_biased", "method.real_faces.num=0", f"seed={seed}",
                             f"num_samples={args.samples}", f"batch_size={args.batch_size}"])
        runs = {"vanilla": cells(f"vanilla_s{seed}", ["mode=vanilla", "method.hclf=null"])}
        for r in TARGETS:
            runs[r] = cells(f"distribution_m{r}_s{seed}", ["mode=distribution", f"method.scale={args.scale:g}",
                                                           f"target.Male={r}"])
        metrics = {key: json.loads((run / "metrics.json").read_text()) for key, run in runs.items()}
        per_seed.append({"seed": seed, "vanilla": metrics["vanilla"]["fractions"]["Male"][1],
                         "seconds_per_image": metrics["vanilla"]["seconds_per_image"],
                         "guided": {r: metrics[r]["fractions"]["Male"][1] for r in TARGETS},
                         "fd": {r: metrics[r]["attributes"]["Male"]["fd"] for r in TARGETS},
                         "time_ratio": {r: metrics[r]["seconds_per_image"] / metrics["vanilla"]["seconds_per_image"]
                                        for r in TARGETS}})
    rows = []
    for r in TARGETS:
        guided = [s["guided"][r] for s in per_seed]
        rows.append({"target": r, "vanilla": statistics.fmean(s["vanilla"] for s in per_seed),
                     "guided": statistics.fmean(guided), "per_seed": guided,
                     "worst_error": max(abs(g - r) for g in guided),
                     "fd": statistics.fmean(s["fd"][r] for s in per_seed),
                     "time_ratio": statistics.fmean(s["time_ratio"][r] for s in per_seed)})
    batch1 = {}
    if args.batch1:
        cells = Cells(root, ["model.pretrained=ddpm64_biased", "method.real_faces.num=0", "seed=0",
                             f"num_samples={args.batch1}", "batch_size=1"])
        for running in ("none", "cumulative"):
            run = cells(f"batch1_{running}_s0", ["mode=distribution", f"method.scale={args.scale:g}",
                                                 "target.Male=0.5", f"method.running_estimate={running}"])
            batch1[running] = json.loads((run / "metrics.json").read_text())["fractions"]["Male"][1]
    results = {"samples": args.samples, "seeds": args.seeds, "scale": args.scale, "rows": rows,
               "per_seed": per_seed, "batch1": batch1, "runs": str(root)}
    lines = [f"# Balancing Act, core cells: {args.samples} images × seeds {args.seeds}, distribution guidance at "
             f"scale {args.scale:g}", "", "Male fraction by the held-out `attr64_eval` on `ddpm64_biased` with its zoo "
             "h-classifier (DDIM η = 1, 50 steps, N = 100); FD = ‖target − fractions‖₂, mean over seeds.", "",
             "| target Male | vanilla | guided (mean) | per seed | worst error | all within ±0.05 | FD | "
             "time × vanilla |", "|---:|---:|---:|---|---:|:---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['target']} | {row['vanilla']:.3f} | {row['guided']:.3f} | "
                     f"{', '.join(f'{g:.3f}' for g in row['per_seed'])} | {row['worst_error']:.3f} | "
                     f"{'yes' if row['worst_error'] <= TOLERANCE else 'no'} | {row['fd']:.3f} | "
                     f"{row['time_ratio']:.2f} |")
    if batch1:
        lines += ["", f"N = 1 at Male = 0.5, {args.batch1} images of seed 0: running estimate none "
                      f"{batch1['none']:.3f}, cumulative {batch1['cumulative']:.3f}."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results_core.json").write_text(json.dumps(results, indent=2))
    (args.out / "results_core.md").write_text("\n".join(lines) + f"\n\nRuns: `{root}`.\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
