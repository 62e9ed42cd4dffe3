"""Measure method=cyclediff (cyclediff.md §6) on the zoo models and synthetic faces; write results.json, results.md.

    python experiments/cyclediff/evaluate.py [--faces 200] [--timing-faces 16] [--quick] [--runs DIR]

Prerequisites: the zoo's cyclediff64 (`python experiments/zoo/train_zoo.py cyclediff64`), attr64 (guidance) and
attr64_eval (the held-out evaluator, which guidance never sees).
On --faces held-out synthetic faces (seed 0 from index 900000; the zoo models trained on indices < 20000), each with
the renderer's counterfactual of the same face with the attribute flipped:
  1. per attribute (--attributes, default the original's editable ones) and reconstruction, the fast default
     (method=cyclediff: DDIM(η = 1), --steps, from the edit-friendly inversion): flip rate of the target and preservation rate of the
     other attributes by the evaluator, PSNR/SSIM of the edit to the counterfactual against the input's own (the
     baseline: a good edit is closer to the counterfactual than the input is), PSNR/L1 of the reconstruction;
  2. the cycle loss: none (λ_cyc = 0) vs step-to-origin vs step-by-step, and step-to-origin at 10× the weight;
     same faces and noise;
  3. the start point: original (x_T := the image), sdedit, ddim_inversion, edit_friendly (η = 1);
  4. time per edit: DDPM on the 1000-step grid (--ddpm-steps) vs DDIM (--steps, η = 0), both from the DDIM inversion
     (the edit-friendly one inverts DDIM steps only), all else the default's, and the
     original's preset (method=cyclediff_reference: DDPM-1000 from the image itself as x_999, its λ), on the first
     --timing-faces faces and --timing-attributes, one batch each, measured side by side: seconds and network calls per edit (and per face
     for the inversion), the speed-up, and each run's flip/preservation/PSNR.
Targets (issue #7): DDIM edits at least as well as DDPM-1000 at ≥ 10× less time; the cycle loss
measurably improves preservation. Every cell is one ordinary facelab run (run_sample) under --runs (default
outputs/experiments/cyclediff/<time>); a finished cell with the same overrides is read back, not rerun.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import time
from pathlib import Path

import torch

from facelab.guidance.cyclediff import RECONSTRUCTION, REFERENCE_ATTRIBUTES, REFERENCE_EDITABLE, STARTS
from facelab.io.grids import save_grid
from facelab.io.images import read_image
from facelab.sample import run_cell
from facelab.sweeps import write_page

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CYCLES = ("none", "origin", "step")
SCORES = ("flip_rate", "preservation", "psnr", "ssim")


class Cells:
    """Runs cells as ordinary `method=cyclediff` (or a preset of it) runs in `root`; a finished cell (metrics.json)
    with the same overrides (cell.json) is read back."""

    def __init__(self, root: Path, common: list[str]):
        self.root, self.common = root, common

    def __call__(self, name: str, overrides: list[str], method: str = "cyclediff") -> dict:
        overrides = [f"method={method}", "progress=false", *self.common, *overrides]
        if not (self.root / name / "cell.json").is_file():
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(overrides[2 + len(self.common):])}", flush=True)
        return run_cell(self.root / name, overrides)


def mean_scores(metrics: dict) -> dict:
    """The mean of each score over the run's attribute edits (reconstruction left out)."""
    edits = [e for name, e in metrics["edits"].items() if name != RECONSTRUCTION]
    return {key: sum(e[key] for e in edits) / len(edits) for key in SCORES if all(key in e for e in edits)}


def term_means(run_dir: Path) -> dict:
    """Per edit, each guidance term's value averaged over the steps and batches of a run's losses.csv."""
    sums: dict = {}
    with (run_dir / "losses.csv").open(newline="") as file:
        for row in csv.DictReader(file):
            edit = sums.setdefault(row["edit"], {})
            for term in ("attribute", "cycle", "range"):
                if row.get(term):
                    edit.setdefault(term, []).append(float(row[term]))
    return {edit: {term: sum(v) / len(v) for term, v in terms.items()} for edit, terms in sums.items()}


def timing(metrics: dict) -> dict:
    edits = metrics["edits"].values()
    per_edit = sum(e["seconds_per_edit"] for e in edits) / len(edits)
    return {"steps": metrics["steps"], "seconds_per_edit": per_edit,
            "start_seconds_per_face": metrics["start_seconds_per_face"],
            "seconds_per_edit_with_start": per_edit + metrics["start_seconds_per_face"] / len(edits),
            "network_calls": max(e["network_calls"] for e in edits), **mean_scores(metrics)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    editable = [REFERENCE_ATTRIBUTES[i] for i in REFERENCE_EDITABLE]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cyclediff64")
    parser.add_argument("--classifier", default="attr64", help="guidance classifier")
    parser.add_argument("--eval-classifier", default="attr64_eval", help="held-out scorer")
    parser.add_argument("--attributes", nargs="+", help=f"attributes to edit (default {' '.join(editable)}; --quick "
                                                        "Smiling Eyeglasses Male)")
    parser.add_argument("--faces", type=int, help="faces per cell (default 200; --quick 16)")
    parser.add_argument("--timing-faces", type=int, help="faces of the DDPM-1000 comparison (default 16; --quick 8)")
    parser.add_argument("--timing-attributes", nargs="+", help="edits of the DDPM-1000 comparison (default all of "
                                                               "--attributes; --quick Eyeglasses)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the fast default")
    parser.add_argument("--ddpm-steps", type=int, default=1000, help="steps of the original's DDPM preset")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="a first look: 16 faces, 3 attributes, 8 timing faces")
    parser.add_argument("--runs", type=Path, help="run folder (default outputs/experiments/cyclediff/<time>); finished "
                                                  "cells of an earlier invocation are reused")
    parser.add_argument("--out", type=Path, default=HERE, help="where results.json and results.md go")
    args = parser.parse_args(argv)
    args.attributes = args.attributes or (["Smiling", "Eyeglasses", "Male"] if args.quick else editable)
    args.faces = args.faces or (16 if args.quick else 200)
    args.timing_faces = args.timing_faces or (8 if args.quick else 16)
    args.timing_attributes = args.timing_attributes or (["Eyeglasses"] if args.quick else args.attributes)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    root = args.runs or ROOT / "outputs" / "experiments" / "cyclediff" / time.strftime("%Y-%m-%d_%H-%M-%S")
    cells = Cells(root, [f"model.pretrained={args.model}", f"method.classifier={args.classifier}",
                         f"method.eval_classifier={args.eval_classifier}", f"device={args.device}"])
    edits = f"attribute=[{','.join([*args.attributes, RECONSTRUCTION])}]"
    faces = [f"num_samples={args.faces}", f"batch_size={min(args.batch_size, args.faces)}", edits,
             f"sampler.steps={args.steps}"]
    default = cells("default", faces)
    cycles = {cycle: default if cycle == "origin" else cells(f"cycle_{cycle}", [*faces, f"method.cycle={cycle}"])
              for cycle in CYCLES}
    strong = default["weights"]["cycle"] * 10  # does a cycle term 10× the default's weight buy preservation?
    cycles["origin ×10"] = cells("cycle_origin_x10", [*faces, f"method.weights.cycle={strong:g}"])
    starts = {start: default if start == default["start"] else cells(f"start_{start}", [
        *faces, f"method.start={start}", f"sampler.eta={int(start == 'edit_friendly')}",
        *(["check_finite=false"] if start == "original" else [])]) for start in STARTS}  # the image as x_T diverges
    # timing: one batch of the same faces each, run side by side: DDPM on the 1000-step grid and DDIM, both from the
    # DDIM inversion (the edit-friendly one inverts DDIM steps only), and the original's preset (DDPM-1000 from the
    # image itself, its λ)
    few = [f"num_samples={args.timing_faces}", f"batch_size={args.timing_faces}",
           f"attribute=[{','.join(args.timing_attributes)}]"]
    ddpm = timing(cells("timing_ddpm", [*few, "method.start=ddim_inversion", "sampler=ddpm",
                                        f"sampler.steps={args.ddpm_steps}"]))
    ddim = timing(cells("timing_ddim", [*few, "method.start=ddim_inversion", f"sampler.steps={args.steps}",
                                        "sampler.eta=0"]))
    reference = timing(cells("timing_reference", [*few, f"sampler.steps={args.ddpm_steps}", "check_finite=false"],
                             method="cyclediff_reference"))
    results = {
        "model": args.model, "classifier": args.classifier, "eval_classifier": args.eval_classifier,
        "faces": args.faces, "steps": args.steps, "weights": default["weights"], "first_t": default["first_t"],
        "attributes": default["edits"], "decoded_psnr": default["decoded_psnr"],
        "cycles": {cycle: mean_scores(m) for cycle, m in cycles.items()},
        "terms": term_means(root / "default"),
        "starts": {start: {**mean_scores(m), "decoded_psnr": m["decoded_psnr"],
                           "reconstruction_psnr": m["edits"][RECONSTRUCTION]["psnr"]} for start, m in starts.items()},
        "timing": {"faces": args.timing_faces, "ddpm": ddpm, "ddim": ddim, "reference": reference,
                   "speedup": ddpm["seconds_per_edit_with_start"] / ddim["seconds_per_edit_with_start"]},
    }
    results["targets"] = {
        "ddim_10x_faster": results["timing"]["speedup"] >= 10,
        "ddim_edits_as_well": all(ddim.get(k, 0) >= ddpm.get(k, 0) for k in ("flip_rate", "preservation")),
        "cycle_improves_preservation": max(results["cycles"][c].get("preservation", 0) for c in ("origin", "step"))
        > results["cycles"]["none"].get("preservation", 0),  # at the default weight
    }
    args.out.mkdir(parents=True, exist_ok=True)
    figure(root / "default", args.attributes, args.out / "figures" / "edits.png")  # the edit-friendly start
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(args.out / "results.md", report(results))
    print(f"page: {write_page(root, title='facelab study: cyclediff')}")  # every cell side by side
    return results


def write_report(path: Path, text: str) -> None:
    """results.md = this report, then the sections other scripts of this folder keep there (from the first heading
    "## ... (NAME.py)" on, e.g. cfg.py's)."""
    old = path.read_text() if path.is_file() else ""
    other = re.search(r"^## .*\(\w+\.py\)$", old, re.M)
    path.write_text(text + ("\n" + old[other.start():] if other else ""))


def figure(run_dir: Path, attributes: list[str], path: Path, faces: int = 6) -> None:
    """Rows = faces; columns = input, then per attribute its edit next to the renderer's counterfactual."""
    names = sorted(p.stem for p in (run_dir / "inputs").glob("*.png"))[:faces]
    cells = [read_image(run_dir / folder / f"{name}{suffix}.png") for name in names
             for folder, suffix in [("inputs", "")] + [(kind, f"_{a}") for a in attributes
                                                          for kind in ("edits", "counterfactuals")]]
    save_grid(torch.stack(cells), path, nrow=1 + 2 * len(attributes), upscale=2)


def fmt(value) -> str:
    if not isinstance(value, float):
        return "–" if value is None else str(value)
    return f"{value:.3f}" if value == 0 or abs(value) >= 0.1 else f"{value:.2e}"


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(fmt(v) for v in row) + " |" for row in rows)]


def report(results: dict) -> str:
    t = results["timing"]
    lines = [f"# CycleDiff on `{results['model']}`: {results['faces']} held-out synthetic faces", "",
             f"Guidance classifier `{results['classifier']}`, scored by the held-out `{results['eval_classifier']}`; "
             f"DDIM-{results['steps']} from t = {results['first_t']}, weights {results['weights']}.", "",
             "## Per attribute", "",
             "Flip rate of the target and preservation of the other attributes (evaluator); PSNR/SSIM to the "
             "renderer's counterfactual, and the input's own (baseline). Reconstruction: PSNR/SSIM to the input.", ""]
    lines += table(["edit", "flip", "flip (input)", "preservation", "preservation (input)", "PSNR", "PSNR (input)",
                    "SSIM", "SSIM (input)"],
                   [[name, e.get("flip_rate"), e.get("flip_rate_input"), e.get("preservation"),
                     e.get("preservation_input"), e.get("psnr"), e.get("psnr_input"), e.get("ssim"),
                     e.get("ssim_input")] for name, e in results["attributes"].items()])
    lines += ["", "## Cycle loss", "", "Means over the attribute edits; same faces and noise.", ""]
    lines += table(["cycle", *SCORES], [[c, *(s.get(k) for k in SCORES)] for c, s in results["cycles"].items()])
    lines += ["", "Each guidance term's mean over the steps of the default run: the cycle term of an edit against that "
              "of `reconstruction`, which flips nothing.", ""]
    lines += table(["edit", "attribute", "cycle", "range"],
                   [[name, *(terms.get(k) for k in ("attribute", "cycle", "range"))]
                    for name, terms in results["terms"].items()])
    lines += ["", "## Start point", ""]
    lines += table(["start", *SCORES, "decoded PSNR", "reconstruction PSNR"],
                   [[name, *(s.get(k) for k in SCORES), s["decoded_psnr"], s["reconstruction_psnr"]]
                    for name, s in results["starts"].items()])
    lines += ["", "## DDPM-1000 vs DDIM", "", f"{t['faces']} faces in one batch, run side by side. DDPM and DDIM "
              "(η = 0) from the DDIM inversion, the default's t0 and λ (DDPM: mean-form guidance, on the 1000-step grid); "
              "the original's preset: DDPM-1000 from the image itself as x_999 with its λ. Speed-up: DDPM / DDIM, start "
              "(inversion) included.", ""]
    lines += table(["run", "steps", "network calls / edit", "s / edit", "inversion s / face", "s / edit (with start)",
                    *SCORES], [[name, r["steps"], r["network_calls"], r["seconds_per_edit"],
                                r["start_seconds_per_face"], r["seconds_per_edit_with_start"],
                                *(r.get(k) for k in SCORES)] for name, r in (("DDPM", t["ddpm"]),
                                                                              ("DDIM", t["ddim"]),
                                                                              ("original's preset", t["reference"]))])
    lines += ["", f"Speed-up: {t['speedup']:.1f}×.", "", "## Targets", ""]
    lines += [f"- {name}: {'yes' if ok else 'no'}" for name, ok in results["targets"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
