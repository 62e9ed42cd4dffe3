"""Measure method=cyclediff's start point and classifier-free guidance (method.cfg_scale) side by side; write cfg.json
and the "Start point and classifier-free guidance" section of results.md (issue #21).

    python experiments/cyclediff/cfg.py [--faces 16] [--scales 1 2 3 5] [--runs DIR]
    python experiments/cyclediff/cfg.py --runs DIR --only cfg_edit_friendly_3   # one cell (parallel invocations)

Prerequisites as experiments/cyclediff/evaluate.py (the zoo's cyclediff64, trained with label dropout 0.1, so the
null label 0 gives ε(x, ∅); attr64 guiding; attr64_eval scoring). On the same --faces held-out synthetic faces, each
edited to every --attributes (one batch, DDIM --steps, the default weights and cycle):
  1. the start: ddim_inversion (η = 0) vs edit_friendly (η = 1), at cfg_scale 1;
  2. classifier-free guidance ε̃ = ε(x, ∅) + w·(ε(x, y) − ε(x, ∅)) at every --scales w from the better start (higher
     mean flip rate among starts with every attribute's preservation ≥ --min-preservation).
Per cell: flip rate, preservation (evaluator), PSNR/SSIM to the renderer's counterfactual per attribute and their
means, seconds per edit and per face for the start (inversion), network calls per edit, and the decoded start's PSNR.
  3. time: the same settings on --timing-faces faces editing --timing-attribute, run one after the other in one
     process (the cells above ran side by side on a shared machine, so their seconds are not comparable).
A scale "wins" when its mean flip rate beats w = 1 by ≥ --margin with every attribute's preservation ≥
--min-preservation. Every cell is one ordinary facelab run under --runs; finished cells are read back, not rerun.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STARTS = {"ddim_inversion": ["method.start=ddim_inversion", "sampler.eta=0"],
          "edit_friendly": ["method.start=edit_friendly", "sampler.eta=1"]}
SECTION = "## Start point and classifier-free guidance (cfg.py)"
_spec = importlib.util.spec_from_file_location("cyclediff_evaluate", HERE / "evaluate.py")
evaluate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate)


def summary(metrics: dict) -> dict:
    """A cell's means over its edits, per-attribute scores, time per edit and the decoded start's PSNR."""
    edits = metrics["edits"]
    return {**evaluate.mean_scores(metrics),
            "per_attribute": {name: {k: e.get(k) for k in evaluate.SCORES} for name, e in edits.items()},
            "seconds_per_edit": sum(e["seconds_per_edit"] for e in edits.values()) / len(edits),
            "start_seconds_per_face": metrics["start_seconds_per_face"],
            "network_calls": max(e["network_calls"] for e in edits.values()), "decoded_psnr": metrics["decoded_psnr"]}


def preserved(cell: dict, floor: float) -> bool:
    return all(a["preservation"] >= floor for a in cell["per_attribute"].values())


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cyclediff64")
    parser.add_argument("--classifier", default="attr64", help="guidance classifier")
    parser.add_argument("--eval-classifier", default="attr64_eval", help="held-out scorer")
    parser.add_argument("--attributes", nargs="+", default=["Smiling", "Eyeglasses", "Male"])
    parser.add_argument("--faces", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0], help="cfg_scale values")
    parser.add_argument("--min-preservation", type=float, default=0.9)
    parser.add_argument("--margin", type=float, default=0.1, help="flip-rate gain over w = 1 that counts as a win")
    parser.add_argument("--timing-faces", type=int, default=4)
    parser.add_argument("--timing-attribute", default="Eyeglasses")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs", type=Path, help="run folder (default outputs/experiments/cyclediff_cfg/<time>); "
                                                  "finished cells of an earlier invocation are reused")
    parser.add_argument("--out", type=Path, default=HERE, help="where cfg.json and results.md go")
    parser.add_argument("--only", nargs="+", help="run just these cells (start_NAME, cfg_START_W; --start names the "
                                                  "start of the cfg cells) and write no results")
    parser.add_argument("--start", choices=list(STARTS), help="with --only: the start of the cfg cells")
    return parser.parse_args(argv)


def cfg_cell(start: str, w: float) -> tuple[str, list[str]]:
    return f"cfg_{start}_{w:g}", [*STARTS[start], f"method.cfg_scale={w:g}"]


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    root = args.runs or ROOT / "outputs" / "experiments" / "cyclediff_cfg" / time.strftime("%Y-%m-%d_%H-%M-%S")
    common = [f"model.pretrained={args.model}", f"method.classifier={args.classifier}",
              f"method.eval_classifier={args.eval_classifier}", f"device={args.device}"]
    cells = evaluate.Cells(root, [*common, f"num_samples={args.faces}", f"batch_size={args.faces}",
                                  f"attribute=[{','.join(args.attributes)}]", f"sampler.steps={args.steps}"])
    if args.only:
        plan = {f"start_{name}": overrides for name, overrides in STARTS.items()}
        plan.update(cfg_cell(args.start or "edit_friendly", w) for w in args.scales if w != 1)
        unknown = set(args.only) - set(plan)
        if unknown:
            raise SystemExit(f"--only {' '.join(sorted(unknown))}: the cells are {', '.join(plan)}")
        return {name: cells(name, plan[name]) for name in args.only}
    starts = {name: summary(cells(f"start_{name}", overrides)) for name, overrides in STARTS.items()}
    usable = [name for name, cell in starts.items() if preserved(cell, args.min_preservation)] or list(starts)
    best = max(usable, key=lambda name: (starts[name]["flip_rate"], starts[name]["preservation"]))
    scales = {}
    for w in args.scales:
        scales[f"{w:g}"] = starts[best] if w == 1 else summary(cells(*cfg_cell(best, w)))
    timed = evaluate.Cells(root, [*common, f"num_samples={args.timing_faces}", f"batch_size={args.timing_faces}",
                                  f"attribute=[{args.timing_attribute}]", f"sampler.steps={args.steps}"])
    timing = {name: summary(timed(f"timing_{name}", overrides)) for name, overrides in STARTS.items()}
    for w in args.scales:
        if w != 1:
            name, overrides = cfg_cell(best, w)
            timing[f"{best} w = {w:g}"] = summary(timed(f"timing_{name}", overrides))
    base = scales.get("1")
    wins = {w: base is not None and w != "1" and preserved(cell, args.min_preservation)
            and cell["flip_rate"] >= base["flip_rate"] + args.margin for w, cell in scales.items()}
    results = {"model": args.model, "classifier": args.classifier, "eval_classifier": args.eval_classifier,
               "faces": args.faces, "steps": args.steps, "attributes": args.attributes, "starts": starts,
               "best_start": best, "cfg": scales, "wins": wins, "min_preservation": args.min_preservation,
               "margin": args.margin, "timing": {"faces": args.timing_faces, "attribute": args.timing_attribute,
                                                 "runs": timing}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cfg.json").write_text(json.dumps(results, indent=2))
    write_section(args.out / "results.md", report(results))
    return results


def write_section(path: Path, section: str) -> None:
    """Replace the section of results.md that starts with `section`'s heading line (up to the next "## " heading), or
    append it."""
    text = path.read_text() if path.is_file() else ""
    start = text.find(section.split("\n", 1)[0])
    if start < 0:
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    following = text.find("\n## ", start + 1)
    path.write_text(text[:start] + section + ("" if following < 0 else text[following:]))


def report(results: dict) -> str:
    scores, fmt = evaluate.SCORES, evaluate.fmt
    lines = [SECTION, "", f"{results['faces']} held-out faces, one batch, edits {', '.join(results['attributes'])}; "
             f"DDIM-{results['steps']}, default weights and cycle; `{results['eval_classifier']}` scores. Means over "
             "the edits; per attribute: flip / preservation. Seconds per face and edit on the run's device; the "
             "start (inversion) is per face, once for all edits.", "",
             "### Start (cfg_scale 1)", ""]
    header = ["run", *scores, *(f"{a} flip / pres." for a in results["attributes"]), "s / edit", "start s / face",
              "calls / edit", "decoded PSNR"]

    def row(name: str, cell: dict) -> list:
        per = cell["per_attribute"]
        return [name, *(cell.get(k) for k in scores),
                *(f"{fmt(per[a]['flip_rate'])} / {fmt(per[a]['preservation'])}" for a in results["attributes"]),
                cell["seconds_per_edit"], cell["start_seconds_per_face"], cell["network_calls"], cell["decoded_psnr"]]

    lines += evaluate.table(header, [row(name, cell) for name, cell in results["starts"].items()])
    lines += ["", f"Better start (flip rate, every attribute's preservation ≥ {results['min_preservation']}): "
              f"`{results['best_start']}`.", "", f"### Classifier-free guidance from `{results['best_start']}`", "",
              "ε̃ = ε(x, ∅) + w·(ε(x, y) − ε(x, ∅)) in the sampling loop's network call (also of the inversion and "
              "the decode), the null rows batched into the same forward; the guidance terms' own calls stay "
              "conditional.", ""]
    lines += evaluate.table(header, [row(f"w = {w}", cell) for w, cell in results["cfg"].items()])
    won = [w for w, ok in results["wins"].items() if ok]
    lines += ["", f"A win (flip ≥ w = 1's + {results['margin']}, every preservation ≥ {results['min_preservation']}): "
              f"{', '.join(f'w = {w}' for w in won) if won else 'none'}.", "", "### Time", "",
              f"{results['timing']['faces']} faces in one batch editing {results['timing']['attribute']}, the runs one "
              "after the other in one process: seconds per face and edit, and per face for the start (inversion).", ""]
    runs = results["timing"]["runs"]
    base = runs[results["best_start"]]["seconds_per_edit"]
    lines += evaluate.table(["run", "s / edit", f"× {results['best_start']} (w = 1)", "start s / face", "calls / edit"],
                            [[name, r["seconds_per_edit"], r["seconds_per_edit"] / base, r["start_seconds_per_face"],
                              r["network_calls"]] for name, r in runs.items()])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
