"""Measure method=codiff_edit on held-out synthetic faces against their ground-truth counterfactual renders.

    python experiments/codiff_edit/study.py [--faces 8] [--steps 25] [--runs outputs/codiff_edit_study] [--jobs 2]

Each preset is one `python -m facelab.sample method=codiff_edit ...` process (one thread, so that its time and peak
memory are its own), over the same --faces held-out faces (seed 0 from index 900000) and the same edits, each edit a
re-render of the face with one caption attribute changed (Smiling, No_Beard, Eyeglasses, Blond_Hair, Young) or one
mask region (Mouth_Slightly_Open, hair_shape; Eyeglasses changes the frame too):
  faithful   mode=imagic, stage2=full: the original's learning rates, --stage1 / --stage2 iterations
  lora       mode=imagic, stage2=lora: rank 4, --lora-lr, --lora-iter iterations
  invert     mode=invert: training-free DDIM inversion under the face's own conditions, resampled under the targets
  mask-only  the faithful pipeline with the mask model alone (its fine-tuned UNets reused from the faithful run)
  text-only  the same with the text model alone
Scores come from each run's metrics.json (held-out attr64_eval and parser64; α chosen by attr64): flip rate of the
changed attributes, PSNR/SSIM to the counterfactual (and the unedited input's, the baseline), layout mIoU against
the target mask, preservation of the other attributes, identity (features cosine to the input), time and network
calls per edit, peak memory. Writes results.json and results.md next to this file (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
EDITS = ["Smiling", "No_Beard", "Eyeglasses", "Blond_Hair", "Young", "Mouth_Slightly_Open", "hair_shape"]
PRESETS = ["faithful", "lora", "invert", "mask-only", "text-only"]


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--alphas", default="[0,0.5,1,1.5,2]")
    parser.add_argument("--stage1", type=int, default=100, help="stage1_num_iter (original 500)")
    parser.add_argument("--stage2", type=int, default=300, help="stage2_num_iter (original 1000)")
    parser.add_argument("--stage2-lr", type=float, default=1e-4, help="stage2_lr (original 1e-6)")
    parser.add_argument("--lora-iter", type=int, default=100)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--edits", default=",".join(EDITS))
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs" / "codiff_edit_study")
    parser.add_argument("--out", type=Path, default=HERE)
    return parser.parse_args(argv)


def overrides(args, preset: str) -> list[str]:
    common = ["method=codiff_edit", f"num_samples={args.faces}", f"sampler.steps={args.steps}", "progress=false",
              f"method.edit=[{args.edits}]", f"method.alpha_list={args.alphas}", f"method.cache={args.runs / 'cache'}",
              f"method.stage1_num_iter={args.stage1}", f"method.stage2_num_iter={args.stage2}",
              f"method.stage2_lr={args.stage2_lr}"]
    return common + {
        "faithful": ["mode=imagic"], "invert": ["mode=invert"],
        "lora": ["mode=imagic", "method.stage2=lora", f"method.lora.lr={args.lora_lr}",
                 f"method.lora.num_iter={args.lora_iter}"],
        "mask-only": ["mode=imagic", "method.modalities=[mask]"],
        "text-only": ["mode=imagic", "method.modalities=[text]"]}[preset]


def run(args, preset: str) -> dict:
    out = args.runs / preset
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FACELAB_ROOT": str(ROOT)}
    cmd = [sys.executable, "-m", "facelab.sample", *overrides(args, preset), f"hydra.run.dir={out}"]
    print(" ".join(cmd[1:]), flush=True)
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{preset} failed:\n{res.stderr[-3000:]}")
    return json.loads((out / "metrics.json").read_text())


def patched(args, preset: str, metrics: dict) -> dict:
    """A preset's edits re-run alone in <runs>/<preset>-<edit> (e.g. after a fix) replace its entries; the time and
    calls per edit keep the main run's stage 1-2 cost per face."""
    for folder in sorted(args.runs.glob(f"{preset}-*")):
        rerun = json.loads((folder / "metrics.json").read_text())
        for edit, entry in rerun["edits"].items():
            tuning = metrics["tuning"]
            entry["seconds_per_edit"] = entry["sampling_seconds_per_edit"] + tuning["seconds_per_face"]
            entry["network_calls_per_edit"] = entry["sampling_network_calls_per_edit"] + tuning["network_calls_per_face"]
            entry["rerun"] = str(folder.name)
            metrics["edits"][edit] = entry
    return metrics


def vae_baseline(run_dir: Path, edits: list[str]) -> dict:
    """PSNR to the counterfactual of the input's own VAE round trip, per edit: what an edit that changes nothing in
    the latent reaches (the input's PSNR is out of reach of any latent method whose reconstruction is below it)."""
    import torch

    from facelab.evaluators import SimilarityEvaluator
    from facelab.io.images import read_image
    from facelab.models.latent import load_latent_model

    model = load_latent_model("ldm_mask64")
    out = {}
    for edit in edits:
        truths = sorted((run_dir / "counterfactuals").glob(f"*_{edit}.png"))
        if not truths:
            continue
        faces = [p.name[:-len(f"_{edit}.png")] for p in truths]
        x = torch.stack([read_image(run_dir / "inputs" / f"{face}.png") for face in faces])
        with torch.no_grad():
            round_trip = model.decode(model.encode(x))
        out[edit] = SimilarityEvaluator().score(round_trip, torch.stack([read_image(p) for p in truths]))["psnr"]
    return out


def mean(entries: list[dict], key: str, weight: str = "faces") -> float | None:
    pairs = [(e[key], e[weight]) for e in entries if e.get(key) is not None]
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs) if pairs else None


def fmt(value, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def tables(args, results: dict) -> str:
    lines = [f"# method=codiff_edit on synthetic faces ({args.faces} held-out faces, DDIM-{args.steps})", "",
             f"Command: `python experiments/codiff_edit/study.py --faces {args.faces} --steps {args.steps} "
             f"--stage1 {args.stage1} --stage2 {args.stage2} --stage2-lr {args.stage2_lr} --lora-iter {args.lora_iter} --lora-lr {args.lora_lr}`"
             f" (α ∈ {args.alphas}, chosen per image by attr64; scored by attr64_eval and parser64).", "",
             "All edits pooled (each edit's faces weighted equally):", "",
             "| preset | faces×edits | flip rate (input) | PSNR to cf (input) | SSIM to cf (input) | mIoU vs target "
             "(input) | preservation | identity cos | mean α | s / edit (tuning s / face) | calls / edit | peak MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for preset, metrics in results.items():
        entries = list(metrics["edits"].values())
        n = sum(e["faces"] for e in entries)
        lines.append(
            f"| {preset} | {n} | {fmt(mean(entries, 'flip_rate'), '.2f')} ({fmt(mean(entries, 'flip_rate_input'), '.2f')})"
            f" | {fmt(mean(entries, 'psnr'), '.2f')} ({fmt(mean(entries, 'psnr_input'), '.2f')})"
            f" | {fmt(mean(entries, 'ssim'))} ({fmt(mean(entries, 'ssim_input'))})"
            f" | {fmt(mean(entries, 'miou'))} ({fmt(mean(entries, 'miou_input'))})"
            f" | {fmt(mean(entries, 'preservation'), '.2f')} | {fmt(mean(entries, 'identity_cosine'), '.2f')}"
            f" | {fmt(mean(entries, 'alpha_mean'), '.2f')}"
            f" | {fmt(mean(entries, 'seconds_per_edit'), '.1f')} ({metrics['tuning']['seconds_per_face']:.1f})"
            f" | {fmt(mean(entries, 'network_calls_per_edit'), '.0f')} | {metrics['peak_memory_mb']:.0f} |")
    lines += ["", "Per edit: flip rate / PSNR to the counterfactual (dB; the input's own in the header row) / mIoU vs the "
              "target mask:", "", "| preset | " + " | ".join(args.edits.split(",")) + " |",
              "|---|" + "---:|" * len(args.edits.split(","))]
    first = next(iter(results.values()))["edits"]
    vae = vae_baseline(args.runs / next(iter(results)), args.edits.split(","))
    lines.append("| VAE round trip of the input | " + " | ".join(
        f"– / {fmt(vae.get(e), '.1f')} / –" for e in args.edits.split(",")) + " |")
    lines.append("| input (no edit) | " + " | ".join(
        f"{fmt(first[e].get('flip_rate_input'), '.2f')} / {fmt(first[e].get('psnr_input'), '.1f')} / "
        f"{fmt(first[e].get('miou_input'), '.2f')} (n={first[e]['faces']})" if e in first else ""
        for e in args.edits.split(",")) + " |")
    for preset, metrics in results.items():
        cells = []
        for e in args.edits.split(","):
            entry = metrics["edits"].get(e)
            cells.append("" if entry is None else f"{fmt(entry.get('flip_rate'), '.2f')} / "
                         f"{fmt(entry.get('psnr'), '.1f')} / {fmt(entry.get('miou'), '.2f')}")
        lines.append(f"| {preset} | " + " | ".join(cells) + " |")
    lines += ["", "PSNR to the counterfactual (dB) per α, all edits pooled:", "",
              "| preset | " + " | ".join(f"α={a}" for a in first[next(iter(first))]["by_alpha_psnr"]) + " |",
              "|---|" + "---:|" * len(first[next(iter(first))]["by_alpha_psnr"])]
    for preset, metrics in results.items():
        entries = list(metrics["edits"].values())
        alphas = list(entries[0]["by_alpha_psnr"])
        lines.append(f"| {preset} | " + " | ".join(
            fmt(sum(e["by_alpha_psnr"][a] * e["faces"] for e in entries) / sum(e["faces"] for e in entries), ".2f")
            for a in alphas) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse(argv)
    args.runs.mkdir(parents=True, exist_ok=True)
    presets = args.presets.split(",")
    first = [p for p in presets if p in ("faithful", "invert")]
    later = [p for p in presets if p not in first]  # the uni-modal runs reuse the faithful run's fine-tuned UNets
    results = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        results.update(zip(first, pool.map(lambda p: run(args, p), first)))
        results.update(zip(later, pool.map(lambda p: run(args, p), later)))
    results = {p: patched(args, p, results[p]) for p in presets}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "runs": results}, indent=2))
    (args.out / "tables.md").write_text(tables(args, results))
    print(tables(args, results))


if __name__ == "__main__":
    main()
