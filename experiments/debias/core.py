"""The core of the debias measurement at a size a CPU finishes: vanilla and distribution guidance at Male = 0.3, 0.5
and 0.7 on the biased zoo DDPM, scored by the held-out evaluator; writes results_core.md and results_core.json here.

    python experiments/debias/core.py [--samples 200] [--seed 0] [--scale 1] [--runs DIR]
        [--scan 0.1 0.3 1 3 6 12 --scan-samples 20]

--scan first runs distribution guidance at Male = 0.3 for each scale on --scan-samples images (seed 100): the
evaluator's Male fraction, the h-classifier's own read of the batch before and after the last step's edit, and the
edit's size ‖Δh‖/‖h‖ averaged over the steps: how far the scale moves h, and whether the image follows.

evaluate.py is the full protocol (1000 images × 3 seeds, sample guidance, the image-space baseline, skin tone, batch
invariance, the loss fix): it needs a GPU. Each cell here is the same `method=debias` run as there.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from evaluate import HERE, ROOT, TARGETS, TOLERANCE, Cells


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--scan", type=float, nargs="*", default=[], help="scales of the scan (none: no scan)")
    parser.add_argument("--scan-samples", type=int, default=20)
    parser.add_argument("--runs", type=Path, help="run folder (finished cells are reused)")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    root = args.runs or ROOT / "outputs" / "experiments" / "debias_core" / time.strftime("%Y-%m-%d_%H-%M-%S")
    cells = Cells(root, ["model.pretrained=ddpm64_biased", "method.real_faces.num=0", f"seed={args.seed}",
                         f"num_samples={args.samples}", f"batch_size={args.batch_size}"])
    scan = [scan_row(Cells(root, ["model.pretrained=ddpm64_biased", "method.real_faces.num=0", "seed=100",
                                  f"num_samples={args.scan_samples}", f"batch_size={args.scan_samples}"]), scale)
            for scale in args.scan]
    runs = {"vanilla": cells("vanilla", ["mode=vanilla", "method.hclf=null"])}
    for r in TARGETS:
        runs[r] = cells(f"distribution_m{r}", ["mode=distribution", f"method.scale={args.scale:g}",
                                               f"target.Male={r}"])
    metrics = {key: json.loads((run / "metrics.json").read_text()) for key, run in runs.items()}
    vanilla = metrics["vanilla"]
    rows = []
    for r in TARGETS:
        male = metrics[r]["fractions"]["Male"][1]
        rows.append({"target": r, "vanilla": vanilla["fractions"]["Male"][1], "guided": male,
                     "error": abs(male - r), "fd_vanilla": 2 ** 0.5 * abs(vanilla["fractions"]["Male"][1] - r),
                     "fd_guided": metrics[r]["attributes"]["Male"]["fd"],
                     "hclf_read": metrics[r]["attributes"]["Male"]["hclf_fractions"][1],
                     "dh_over_h": metrics[r]["dh_norm_mean"] / metrics[r]["h_norm_mean"],
                     "time_ratio": metrics[r]["seconds_per_image"] / vanilla["seconds_per_image"]})
    results = {"samples": args.samples, "seed": args.seed, "scale": args.scale, "rows": rows, "scan": scan,
               "runs": str(root)}
    lines = [f"# Balancing Act, core cells: {args.samples} images, seed {args.seed}, distribution guidance at scale "
             f"{args.scale:g}", "", "Male fraction by the held-out `attr64_eval` on `ddpm64_biased` (DDIM η = 1, 50 "
             "steps, N = 100); FD = ‖target − fractions‖₂.", "",
             "| target Male | vanilla | guided | error | within ±0.05 | FD vanilla → guided | h-classifier's final read "
             "| mean ‖Δh‖ / ‖h‖ | time × vanilla |", "|---:|---:|---:|---:|:---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['target']} | {row['vanilla']:.3f} | {row['guided']:.3f} | {row['error']:.3f} | "
                     f"{'yes' if row['error'] <= TOLERANCE else 'no'} | {row['fd_vanilla']:.3f} → "
                     f"{row['fd_guided']:.3f} | {row['hclf_read']:.3f} | {row['dh_over_h']:.2f} | "
                     f"{row['time_ratio']:.2f} |")
    if scan:
        lines += ["", f"Scale scan: target Male = 0.3, {args.scan_samples} images (seed 100).", "",
                  "| scale | evaluator's Male fraction | h-classifier's read at the last step, before → after the edit "
                  "| mean ‖Δh‖ / ‖h‖ |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['scale']:g} | {r['male']:.2f} | {r['before']:.3f} → {r['after']:.3f} | {r['dh_over_h']:.2f} |"
                  for r in scan]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results_core.json").write_text(json.dumps(results, indent=2))
    (args.out / "results_core.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


def scan_row(cells: Cells, scale: float) -> dict:
    run = cells(f"scan_scale{scale:g}", ["mode=distribution", f"method.scale={scale:g}", "target.Male=0.3"])
    metrics = json.loads((run / "metrics.json").read_text())
    with open(run / "trajectory.csv", newline="") as file:
        last = list(csv.DictReader(file))[-1]
    return {"scale": scale, "male": metrics["attributes"]["Male"]["fractions"][1],
            "before": float(last["Male_p1_before"]), "after": float(last["Male_p1_after"]),
            "dh_over_h": metrics["dh_norm_mean"] / metrics["h_norm_mean"]}


if __name__ == "__main__":
    main()
