"""Measure method=codiff_edit on held-out synthetic faces against their ground-truth counterfactual renders.

    python experiments/codiff_edit/study.py [--faces 8] [--steps 25] [--runs outputs/codiff_edit_study] [--jobs 2]

Each preset is one `python -m facelab.sample method=codiff_edit ...` process (one thread, so that its time and peak
memory are its own), over the same --faces held-out faces (seed 0 from index 900000) and the same edits, each edit a
re-render of the face with one caption attribute changed (Smiling, No_Beard, Eyeglasses, Blond_Hair, Young) or one
mask region (Mouth_Slightly_Open, hair_shape; Eyeglasses changes the frame too):
  faithful   mode=imagic, stage2=full: the original's learning rates, --stage1 / --stage2 iterations
  lora       mode=imagic, stage2=lora: rank 4, --lora-lr, --lora-iter iterations
  invert     mode=invert: training-free DDIM inversion under the face's own conditions, resampled under the targets
             (method.blend=none: every pixel from the decoded edit; variants add method.blend=region)
  mask-only  the faithful pipeline with the mask model alone (its fine-tuned UNets reused from the faithful run)
  text-only  the same with the text model alone
--variant 'NAME=PRESET OVERRIDE ...' adds a preset: PRESET with Hydra overrides (replacing the same keys), e.g.
  --variant 'invert-blend=invert method.blend=region'   (the input kept outside the edit's region)
  --variant 'faithful-orig=faithful method.stage1_num_iter=500 method.stage2_num_iter=1000'
A blend=region run also scores its edits unblended (blend=none's images bit for bit, α chosen on them): the row
`<preset> (none)`.
Scores come from each run's metrics.json (held-out attr64_eval and parser64; α chosen by attr64): flip rate of the
changed attributes, PSNR/SSIM to the counterfactual (and the unedited input's, the baseline), layout mIoU against
the target mask, preservation of the other attributes, identity (features cosine to the input), time and network
calls per edit, peak memory. Writes results.json and results.md next to this file (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
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
    parser.add_argument("--variant", action="append", default=[], metavar="'NAME=PRESET OVERRIDE ...'",
                        help="another preset: PRESET with these overrides (name it in --presets)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--figure", default="", metavar="PRESET:FACE_EDIT,...",
                        help="figures/<preset>_edits.png: per FACE_EDIT the input, counterfactual, edit and region")
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs" / "codiff_edit_study")
    parser.add_argument("--out", type=Path, default=HERE)
    return parser.parse_args(argv)


def variants(args) -> dict:
    """{name: (base preset, [override, ...])} of the --variant flags."""
    found = {}
    for text in args.variant:
        head, *extra = text.split()
        name, _, base = head.partition("=")
        if base not in PRESETS:
            raise SystemExit(f"--variant {text!r}: the base preset must be one of {', '.join(PRESETS)}")
        found[name] = (base, extra)
    return found


def overrides(args, preset: str) -> list[str]:
    base, extra = variants(args).get(preset, (preset, []))
    replaced = {item.split("=", 1)[0] for item in extra}
    return [item for item in overrides_of(args, base) if item.split("=", 1)[0] not in replaced] + extra


def overrides_of(args, preset: str) -> list[str]:
    common = ["method=codiff_edit", f"num_samples={args.faces}", f"sampler.steps={args.steps}", "progress=false",
              f"method.edit=[{args.edits}]", f"method.alpha_list={args.alphas}", f"method.cache={args.runs / 'cache'}",
              f"method.stage1_num_iter={args.stage1}", f"method.stage2_num_iter={args.stage2}",
              f"method.stage2_lr={args.stage2_lr}"]
    return common + {
        "faithful": ["mode=imagic"], "invert": ["mode=invert", "method.blend=none"],
        "lora": ["mode=imagic", "method.stage2=lora", f"method.lora.lr={args.lora_lr}",
                 f"method.lora.num_iter={args.lora_iter}"],
        "mask-only": ["mode=imagic", "method.modalities=[mask]"],
        "text-only": ["mode=imagic", "method.modalities=[text]"]}[preset]


def run(args, preset: str) -> dict:
    out = args.runs / preset
    if (out / "metrics.json").is_file():
        cpu = out.parent / f"{preset}.cpu.json"
        return {**json.loads((out / "metrics.json").read_text()), **(json.loads(cpu.read_text()) if cpu.is_file() else {})}
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FACELAB_ROOT": str(ROOT)}
    cmd = [sys.executable, "-m", "facelab.sample", *overrides(args, preset), f"hydra.run.dir={out}"]
    print(" ".join(cmd[1:]), flush=True)
    with open(out.parent / f".{preset}.stderr", "w+") as err:
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)  # the child's own CPU time: what a shared machine's load leaves out
        err.seek(0)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"{preset} failed:\n{err.read()[-3000:]}")
    cpu = {"process_cpu_seconds": usage.ru_utime + usage.ru_stime}  # one thread: about its time on an idle core
    (out.parent / f"{preset}.cpu.json").write_text(json.dumps(cpu))
    return {**json.loads((out / "metrics.json").read_text()), **cpu}


def patched(args, preset: str, metrics: dict) -> dict:
    """A preset's edits re-run alone in <runs>/<preset>-<edit> (e.g. after a fix) replace its entries; the time and
    calls per edit keep the main run's stage 1-2 cost per face."""
    for folder in sorted(args.runs / f"{preset}-{edit}" for edit in EDITS if (args.runs / f"{preset}-{edit}").is_dir()):
        rerun = json.loads((folder / "metrics.json").read_text())
        for edit, entry in rerun["edits"].items():
            tuning = metrics["tuning"]
            entry["seconds_per_edit"] = entry["sampling_seconds_per_edit"] + tuning["seconds_per_face"]
            entry["network_calls_per_edit"] = entry["sampling_network_calls_per_edit"] + tuning["network_calls_per_face"]
            entry["rerun"] = str(folder.name)
            metrics["edits"][edit] = entry
    return metrics


def with_unblended(results: dict) -> dict:
    """A blend=region run also scores its edits unblended (blend=none's images, bit for bit): shown as the row
    `<preset> (none)` before it."""
    out = {}
    for preset, metrics in results.items():
        if all("unblended" in entry for entry in metrics["edits"].values()):
            out[f"{preset} (none)"] = {**metrics, "edits": {e: v["unblended"] for e, v in metrics["edits"].items()}}
        out[preset] = metrics
    return out


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


def figure(args, spec: str) -> None:
    """One row per FACE_EDIT of a run: input, counterfactual, the edit at the chosen α, its paste region (if any)."""
    from PIL import Image

    preset, names = spec.split(":")
    run_dir, rows = args.runs / preset, []
    for name in names.split(","):
        face = name.split("_")[0]
        paths = [run_dir / "inputs" / f"{face}.png", *(run_dir / d / f"{name}.png" for d in
                                                         ("counterfactuals", "edits", "regions"))]
        rows.append([Image.open(q).convert("RGB") for q in paths if q.is_file()])
    size = rows[0][0].size[0] * 2
    sheet = Image.new("RGB", (size * max(map(len, rows)), size * len(rows)))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet.paste(image.resize((size, size), Image.NEAREST), (c * size, r * size))
    (args.out / "figures").mkdir(parents=True, exist_ok=True)
    sheet.save(args.out / "figures" / f"{preset}_edits.png")


def mean(entries: list[dict], key: str, weight: str = "faces") -> float | None:
    pairs = [(e[key], e[weight]) for e in entries if e.get(key) is not None]
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs) if pairs else None


def fmt(value, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def tables(args, results: dict) -> str:
    lines = [f"# method=codiff_edit on synthetic faces ({args.faces} held-out faces, DDIM-{args.steps})", "",
             f"Command: `python experiments/codiff_edit/study.py --faces {args.faces} --steps {args.steps} "
             f"--stage1 {args.stage1} --stage2 {args.stage2} --stage2-lr {args.stage2_lr} --lora-iter {args.lora_iter} --lora-lr {args.lora_lr}"
             + "".join(f" --variant {shlex.quote(v)}" for v in args.variant) + f" --presets {args.presets}`"
             f" (α ∈ {args.alphas}, chosen per image by attr64; scored by attr64_eval and parser64).", "",
             "All edits pooled (each edit's faces weighted equally):", "",
             "| preset | faces×edits | flip rate (input) | PSNR to cf (input) | SSIM to cf (input) | mIoU vs target "
             "(input) | preservation | identity cos | mean α | s / edit (tuning s / face) | calls / edit | peak MB | process "
             "CPU s / edit |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
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
            f" | {fmt(mean(entries, 'network_calls_per_edit'), '.0f')} | {metrics['peak_memory_mb']:.0f}"
            f" | {fmt(metrics.get('process_cpu_seconds') and metrics['process_cpu_seconds'] / n, '.1f')} |")
    lines += ["", "Per edit: flip rate / PSNR to the counterfactual (dB; the input's own in the header row) / mIoU vs the "
              "target mask:", "", "| preset | " + " | ".join(args.edits.split(",")) + " |",
              "|---|" + "---:|" * len(args.edits.split(","))]
    first = next(iter(results.values()))["edits"]
    vae = vae_baseline(args.runs / next(p for p in results if (args.runs / p).is_dir()), args.edits.split(","))
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
    lines += ["", "Per edit: SSIM to the counterfactual (the input's own in the header row) / preservation / blend=region's "
              "paste area (fraction of the pixels; the chosen α's); edits whose PSNR to the counterfactual is above the "
              "input's:", "", "| preset | " + " | ".join(args.edits.split(",")) + " | PSNR above the input's |",
              "|---|" + "---:|" * (len(args.edits.split(",")) + 1)]
    lines.append("| input (no edit) | " + " | ".join(
        f"{fmt(first[e].get('ssim_input'))} / – / –" if e in first else "" for e in args.edits.split(",")) + " | |")
    for preset, metrics in results.items():
        cells, above = [], []
        for e in args.edits.split(","):
            entry = metrics["edits"].get(e)
            cells.append("" if entry is None else f"{fmt(entry.get('ssim'))} / {fmt(entry.get('preservation'), '.2f')}"
                         f" / {fmt(entry.get('region_area'), '.2f') or '–'}")
            if entry is not None and entry.get("psnr") is not None and entry["psnr"] > entry["psnr_input"]:
                above.append(e)
        lines.append(f"| {preset} | " + " | ".join(cells) + f" | {len(above)} ({', '.join(above)}) |")
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
    bases = {p: variants(args).get(p, (p, []))[0] for p in presets}
    first = [p for p in presets if bases[p] in ("faithful", "invert")]
    later = [p for p in presets if p not in first]  # the uni-modal runs reuse the faithful run's fine-tuned UNets
    results = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        results.update(zip(first, pool.map(lambda p: run(args, p), first)))
        results.update(zip(later, pool.map(lambda p: run(args, p), later)))
    results = with_unblended({p: patched(args, p, results[p]) for p in presets})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "runs": results}, indent=2))
    (args.out / "tables.md").write_text(tables(args, results))
    if args.figure:
        figure(args, args.figure)
    print(tables(args, results))


if __name__ == "__main__":
    main()
