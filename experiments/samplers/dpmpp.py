"""DPM-Solver++(2M) against each method's default sampler: network calls per image and the method's own score.

    python experiments/samplers/dpmpp.py [--images 8] [--parts generate debias cyclediff]

- generate: PSNR of each sampler's images to the converged probability-flow solution from the same x_T (DPM-Solver++
  at 250 steps), zoo ddpm64. DDIM runs on the same path (trailing grid from t = 999, x̂0 unclipped); the default
  (leading grid from t = 980, x̂0 clipped) starts elsewhere, so its images differ from that solution by design.
- debias (target Male = 0.5): the held-out evaluator's Male fraction and Fairness Discrepancy, zoo ddpm64_biased;
  DPM-Solver++ reads the h-classifier at the nearest trained time (method.head_lookup=nearest).
- cyclediff (Eyeglasses): flip rate and preservation under the held-out evaluator, and PSNR to the input.
Every cell is one ordinary facelab run (run_cell), kept under outputs/experiments/samplers/; results.json and
results.md are written here after every part.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from facelab.metrics.images import psnr
from facelab.sample import run_cell

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STEPS = [10, 15, 20, 25]


def images(run: Path) -> torch.Tensor:
    files = sorted((run / "samples").glob("*.png"))
    return torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1).float() / 127.5 - 1
                        for f in files])


def slug(name: str) -> str:
    return name.split(" (")[0].replace(" ", "_")


def cells(base: list[str]) -> dict[str, list[str]]:
    """The method's default sampler, and DPM-Solver++(2M) at each of STEPS."""
    return {"default": base, **{f"dpmpp_2m {n}": [*base, "sampler=dpmpp_2m", f"sampler.steps={n}"] for n in STEPS}}


def generate(runs: Path, n: int) -> list[dict]:
    base = ["method=generate", f"num_samples={n}", f"batch_size={n}", "progress=false"]
    run_cell(runs / "reference", [*base, "sampler=dpmpp_2m", "sampler.steps=250"])
    reference = images(runs / "reference")
    rows = []
    same_path = ["sampler.spacing=trailing", "sampler.clip=false"]
    ddim = {f"ddim {n} (same path)": [*base, *same_path, f"sampler.steps={n}"] for n in (*STEPS, 50, 250)}
    for name, overrides in {**cells(base), **ddim}.items():
        metrics = run_cell(runs / slug(name), overrides)
        rows.append({"cell": name, "calls": metrics["network_calls_per_image"],
                     "psnr_to_converged": float(psnr(images(runs / slug(name)), reference).mean()),
                     "seconds_per_image": metrics["seconds_per_image"]})
        print(rows[-1], flush=True)
    return rows


def debias(runs: Path, n: int) -> list[dict]:
    base = ["method=debias", "target.Male=0.5", f"num_samples={n}", f"batch_size={n}", "method.real_faces.num=0",
            "progress=false"]
    rows = []
    for name, overrides in cells(base).items():
        extra = ["method.head_lookup=nearest"] if name != "default" else []
        metrics = run_cell(runs / slug(name), [*overrides, *extra])
        rows.append({"cell": name, "calls": metrics["steps"], "male": metrics["attributes"]["Male"]["fractions"][1],
                     "fd": metrics["attributes"]["Male"]["fd"], "seconds_per_image": metrics["seconds_per_image"]})
        print(rows[-1], flush=True)
    return rows


def cyclediff(runs: Path, n: int) -> list[dict]:
    base = ["method=cyclediff", "attribute=Eyeglasses", f"num_samples={n}", f"batch_size={n}", "progress=false"]
    # calls: network calls of one edit run (the batch holds every face, so each face goes through all of them)
    rows = []
    for name, overrides in cells(base).items():
        metrics = run_cell(runs / slug(name), overrides)
        edit = metrics["edits"]["Eyeglasses"]
        rows.append({"cell": name, "steps": metrics["steps"], "calls": edit["network_calls"],
                     "flip_rate": edit["flip_rate"], "preservation": edit["preservation"],
                     "psnr_to_counterfactual": edit["psnr"],
                     "seconds_per_edit": edit["seconds_per_edit"]})
        print(rows[-1], flush=True)
    return rows


PARTS = {"generate": generate, "debias": debias, "cyclediff": cyclediff}


def write(results: dict) -> None:
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["# DPM-Solver++(2M) against each method's default sampler", "",
             "`python experiments/samplers/dpmpp.py` (CPU). Network calls are per image and sampling run.", ""]
    for part, result in results.items():
        rows = result["rows"]
        keys = [k for k in rows[0] if k != "cell"]
        lines += [f"## {part} ({result['images']} images)", "", "| sampler | " + " | ".join(keys) + " |",
                  "|---" * (len(keys) + 1) + "|"]
        lines += ["| " + r["cell"] + " | " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k])
                                                      for k in keys) + " |" for r in rows]
        lines.append("")
    (HERE / "results.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = json.loads((HERE / "results.json").read_text()) if (HERE / "results.json").is_file() else {}
    for part in args.parts:
        results[part] = {"images": args.images, "rows": PARTS[part](ROOT / "outputs" / "experiments" / "samplers" / f"{part}_{args.images}",
                                    args.images)}
        write(results)


if __name__ == "__main__":
    main()
