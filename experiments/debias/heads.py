"""Free h-classifier heads against heads fixed to the class means (`model.direction=class_means`): where each points,
and how far distribution guidance with each moves the faces. Writes results_heads.md / .json here.

    python experiments/debias/heads.py HSPACE --heads free=ddpm64_biased means=DIR [--targets 0.3 0.7]
        [--scales 0.3 1 3 10 30] [--samples 500] [--temperature T] [--name NAME] [--runs RUNS]

HSPACE: the shards both heads were trained on (train_zoo.py's outputs/zoo/ddpm64_biased/facelab.sample/hspace).
1. Per head, the cosine at every t of its Male direction (w_male − w_female) with μ_male − μ_female of h in HSPACE;
2. distribution guidance on `ddpm64_biased` at each target Male fraction and scale, --samples images of seed 100
   (the main protocol's seeds are 0..2): the held-out evaluator's Male fraction, the head's own final read and the
   mean edit ‖Δh‖/‖h‖. A diagnosis, not the headline: evaluate.py calibrates its scale with the guidance classifier.
Writes results_heads_NAME.md / .json. The committed ones ran at --temperature 8 (then the default): inverted = the
free and class-mean heads on h of inverted faces (the zoo's recipe before), trajectory = heads on h of the model's own
trajectories labelled by attr64 (`method=hextract method.source=trajectory`, the zoo's recipe now).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch.nn.functional as F

from alignment import class_means
from evaluate import HERE, ROOT, TOLERANCE, Cells, hclf_accuracy
from facelab.models.hclassifier import load_hclassifier


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hspace", type=Path, help="the shards the heads were trained on")
    parser.add_argument("--heads", nargs="+", required=True, help="NAME=SOURCE (an hclf folder or zoo model)")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.7])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.3, 1, 3, 10, 30])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--temperature", type=float, help="guidance temperature (default: the method's)")
    parser.add_argument("--name", default="scan", help="results_heads_NAME.md / .json")
    parser.add_argument("--runs", type=Path, help="run folder (finished cells are reused)")
    args = parser.parse_args(argv)
    heads = dict(item.split("=", 1) for item in args.heads)
    root = args.runs or ROOT / "outputs" / "experiments" / "debias_heads" / time.strftime("%Y-%m-%d_%H-%M-%S")
    grid = load_hclassifier(next(iter(heads.values()))).times
    female, male, faces = class_means(args.hspace, grid)
    cosine = {}
    for name, source in heads.items():
        net = load_hclassifier(source)
        weight = net.stored_heads()[0]
        cosine[name] = F.cosine_similarity(weight[:, 1] - weight[:, 0], male - female, dim=1).tolist()
    cells = Cells(root, ["model.pretrained=ddpm64_biased", "method.real_faces.num=0", "seed=100",
                         f"num_samples={args.samples}", f"batch_size={args.batch_size}"])
    vanilla = json.loads((cells("vanilla", ["mode=vanilla", "method.hclf=null"]) / "metrics.json").read_text())
    rows = []
    for name, source in heads.items():
        for target in args.targets:
            for scale in args.scales:
                run = cells(f"{name}_m{target:g}_s{scale:g}", [
                    "mode=distribution", f"method.hclf={source}", f"target.Male={target}", f"method.scale={scale:g}",
                    *([f"method.temperature={args.temperature:g}"] if args.temperature else [])])
                m = json.loads((run / "metrics.json").read_text())
                rows.append({"head": name, "target": target, "scale": scale, "male": m["fractions"]["Male"][1],
                             "hclf_read": m["attributes"]["Male"]["hclf_fractions"][1],
                             "dh_over_h": m["dh_norm_mean"] / m["h_norm_mean"],
                             "time_ratio": m["seconds_per_image"] / vanilla["seconds_per_image"]})
    results = {"faces": faces, "grid": grid, "heads": heads, "cosine": cosine, "samples": args.samples,
               "temperature": args.temperature,
               "vanilla_male": vanilla["fractions"]["Male"][1],
               "accuracy": {name: hclf_accuracy(source) for name, source in heads.items()}, "rows": rows,
               "runs": str(root)}
    (HERE / f"results_heads_{args.name}.json").write_text(json.dumps(results, indent=2))
    (HERE / f"results_heads_{args.name}.md").write_text(markdown(results))
    print(markdown(results))
    return results


def markdown(res: dict) -> str:
    every = range(0, len(res["grid"]), 7)
    lines = ["# Free heads against class-mean heads", "",
             f"Cosine of each head's Male direction with μ_male − μ_female of h over the {res['faces']} faces both "
             "were trained on:", "",
             "| head | mean val. accuracy (Male) | mean cos | " + " | ".join(f"t={res['grid'][i]}" for i in every)
             + " |", "|---|---:|---:|" + "---:|" * len(every)]
    for name, cos in res["cosine"].items():
        accuracy = res["accuracy"][name].get("Male")
        lines.append(f"| {name} | {'' if accuracy is None else f'{accuracy:.3f}'} | {statistics.fmean(cos):.2f} | "
                     + " | ".join(f"{cos[i]:.2f}" for i in every) + " |")
    temperature = res.get("temperature") or "the method's default"
    lines += ["", f"Distribution guidance on `ddpm64_biased` (temperature {temperature}), {res['samples']} images "
                  f"(seed 100), Male fraction by the held-out `attr64_eval` (vanilla {res['vanilla_male']:.3f}):", "",
              "| head | target | scale | Male fraction | within ±0.05 | head's final read | mean ‖Δh‖/‖h‖ | "
              "time × vanilla |", "|---|---:|---:|---:|:---:|---:|---:|---:|"]
    for r in res["rows"]:
        hit = "yes" if abs(r["male"] - r["target"]) <= TOLERANCE else ""
        lines.append(f"| {r['head']} | {r['target']:g} | {r['scale']:g} | {r['male']:.3f} | {hit} | "
                     f"{r['hclf_read']:.3f} | {r['dh_over_h']:.2f} | {r['time_ratio']:.2f} |")
    return "\n".join(lines) + f"\n\nRuns: `{res['runs']}`.\n"


if __name__ == "__main__":
    main()
