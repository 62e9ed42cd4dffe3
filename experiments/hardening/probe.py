"""Hostile-input probe: run facelab's CLIs on bad values, damaged files and unsafe situations, as a user would, and
classify each outcome.

    .venv/bin/python experiments/hardening/probe.py [--out DIR] [--only SUBSTRING]

Outcome classes (issue 17): `one line` (exit 2, one `facelab: error:` line, no traceback), `correct` (a valid but
unusual input that runs and gives a sound result), `traceback`, `hang` (past the timeout), `silent` (exit 0 where a
refusal was due, or NaN in metrics), `overwrite` (a finished run's files changed). Writes results.md next to this
file (or under --out) with one row per case and the tally.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 300
TINY = ["sampler.steps=2", "num_samples=1", "batch_size=1", "device=cpu", "progress=false"]
DEBIAS = ["method=debias", "num_samples=2", "batch_size=2", "device=cpu", "progress=false", "method.real_faces.num=0"]


def cli(module: str, *args: str, timeout: int = TIMEOUT) -> tuple[int, str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    start = time.perf_counter()
    try:
        res = subprocess.run([sys.executable, "-m", f"facelab.{module}", *args], capture_output=True, text=True,
                             cwd=ROOT, env=env, timeout=timeout)
        return res.returncode, res.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired:
        return -1, "", time.perf_counter() - start


def hashes(folder: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- damaged files ---------------------------------------------------------------------------------------------------
def model_copy(work: Path, name: str, damage) -> Path:
    """A copy of the zoo's ddpm64 with `damage(weights_path)` applied."""
    folder = work / name
    shutil.copytree(ROOT / "facelab" / "zoo" / "ddpm64", folder)
    damage(next((folder / "unet").glob("*.safetensors")), folder)
    return folder


def nan_weight(path: Path, _folder) -> None:
    state = load_file(path)
    key = next(k for k in state if k.endswith("conv_out.bias"))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, path)


def wrong_architecture(_path, folder: Path) -> None:
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["block_out_channels"] = [c * 2 for c in config["block_out_channels"]]
    (folder / "unet" / "config.json").write_text(json.dumps(config))


def png16(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(path)  # uint16 -> mode I;16
    return path


def bomb(path: Path) -> Path:
    """A PNG header declaring 100000 × 100000 pixels (no data needed to trip a reader that trusts it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


def direction_file(path: Path, meta: dict | None, scale: float = 1.0) -> Path:
    tensors = {"basis": torch.nn.functional.normalize(torch.randn(1, 2, 8), dim=-1), "scale": torch.full((1, 2), scale)}
    header = {"facelab": "directions", "timesteps": json.dumps([999, 499])}
    if meta is not None:
        header["meta"] = json.dumps(meta)
    save_file(tensors, str(path), metadata=header)
    return path


class Malicious:
    def __reduce__(self):
        return (os.system, ("touch /tmp/facelab_probe_pwned",))


# --- the cases ---------------------------------------------------------------------------------------------------------
def cases(work: Path) -> list[tuple[str, str, str, list[str]]]:
    """(class, name, expectation 'refuse' | 'run', CLI arguments of facelab.sample)."""
    gt16, gtbomb = work / "gt16", work / "gtbomb"
    png16(gt16 / "a.png")
    bomb(gtbomb / "a.png")
    zero = model_copy(work, "zero", lambda p, f: p.write_bytes(b""))
    truncated = model_copy(work, "truncated", lambda p, f: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]))
    missing = model_copy(work, "missing", lambda p, f: p.unlink())
    nan = model_copy(work, "nan", nan_weight)
    wrong = model_copy(work, "wrong", wrong_architecture)
    no_meta = direction_file(work / "no_meta.safetensors", None)
    bad_json = work / "bad_json.safetensors"
    save_file({"basis": torch.zeros(1, 2, 8), "scale": torch.ones(1, 2)}, str(bad_json),
              metadata={"facelab": "directions", "timesteps": "[999, 49", "meta": "{}"})
    nan_scale = direction_file(work / "nan_scale.safetensors", {"h_space": "after"}, float("nan"))
    hclf = work / "hclf"
    hclf.mkdir()
    (hclf / "config.json").write_text("{not json")
    save_file({"w": torch.zeros(1)}, str(hclf / "model.safetensors"))
    nan_stats = work / "nan_stats.safetensors"
    save_file({"mean": torch.full((1, 3, 64, 64), float("nan")), "std": torch.ones(1, 3, 64, 64)}, str(nan_stats),
              metadata={k: json.dumps(v) for k, v in {"format": "facelab.fuzzy_stats/1", "depths": [300], "N": 4,
                                                        "model": "ddpm64", "model_sha256": "x", "resolution": 64,
                                                        "projection_offset": True, "projection_step": 50}.items()})
    pickle = work / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callbacks": Malicious()}, pickle)
    return [
        ("config value", "sampler.steps=0", "refuse", ["sampler.steps=0", *TINY[1:]]),
        ("config value", "sampler.steps=1001", "refuse", ["sampler.steps=1001", *TINY[1:]]),
        ("config value", "sampler.steps=abc", "refuse", ["sampler.steps=abc", *TINY[1:]]),
        ("config value", "sampler.eta=-1", "refuse", ["sampler.eta=-1", *TINY]),
        ("config value", "sampler.eta=3", "refuse", ["sampler.eta=3", *TINY]),
        ("config value", "num_samples=0", "refuse", [*TINY, "num_samples=0"]),
        ("config value", "batch_size=0", "refuse", [*TINY, "batch_size=0"]),
        ("config value", "seed beyond 64 bits", "refuse", [*TINY, "seed=99999999999999999999999"]),
        ("config value", "seed=-1", "refuse", [*TINY, "seed=-1"]),
        ("config value", "target.Male=abc", "refuse", ["method=debias", "target.Male=abc", *TINY]),
        ("config value", "target.Male=1.5", "refuse", ["method=debias", "target.Male=1.5", *TINY]),
        ("config value", "device=cuda:7 on a CPU machine", "refuse", [*TINY, "device=cuda:7"]),
        ("config value", "method.scale=inf (debias)", "refuse", [*DEBIAS, "method.scale=inf"]),
        ("config value", "method.scale=1e9 (debias)", "refuse", [*DEBIAS, "method.scale=1e9"]),
        ("config value", "mask_s=2 (fuzzy)", "refuse", ["method=fuzzy", "mask_s=2", *TINY]),
        ("config value", "mask_s=nan (fuzzy)", "refuse", ["method=fuzzy", "mask_s=nan", *TINY]),
        ("hydra", "unknown sampler", "refuse", ["sampler=nope", *TINY[1:]]),
        ("hydra", "unknown key", "refuse", ["nope=1", *TINY]),
        ("hydra", "parse error", "refuse", ["mask_s=[", *TINY]),
        ("hydra", "unknown guidance term", "refuse", ["guidance=[nope]", *TINY]),
        ("hydra", "unknown method", "refuse", ["method=nope", *TINY]),
        ("composition", "a term the method cannot take (codiff + fuzzy)", "refuse",
         ["method=codiff", "guidance=[fuzzy]", *TINY]),
        ("composition", "a grid the h-classifier has no heads for (debias + dpmpp_2m)", "refuse",
         [*DEBIAS, "sampler=dpmpp_2m", "sampler.steps=10"]),
        ("composition", "a sampler the term cannot run under (debias + repaint)", "refuse", [*DEBIAS, "sampler=repaint"]),
        ("model", "model.pretrained=nope", "refuse", [f"model.pretrained={work / 'nope'}", *TINY]),
        ("model", "zero-byte safetensors", "refuse", [f"model.pretrained={zero}", *TINY]),
        ("model", "truncated safetensors", "refuse", [f"model.pretrained={truncated}", *TINY]),
        ("model", "folder without weights", "refuse", [f"model.pretrained={missing}", *TINY]),
        ("model", "NaN weight", "refuse", [f"model.pretrained={nan}", *TINY]),
        ("model", "config of another architecture", "refuse", [f"model.pretrained={wrong}", *TINY]),
        ("model", "a pickle that would run code", "refuse", [f"model.pretrained={pickle}", *TINY]),
        ("model", "h-classifier with bad config JSON", "refuse", ["method=debias", f"method.hclf={hclf}", *TINY]),
        ("image", "16-bit PNG input (fuzzy)", "run", ["method=fuzzy", f"gt_path={gt16}", *TINY]),
        ("image", "decompression-bomb PNG header", "refuse", ["method=fuzzy", f"gt_path={gtbomb}", *TINY]),
        ("derived file", "direction file without metadata", "refuse",
         ["guidance=[hedit]", f"guidance.hedit.file={no_meta}", *TINY]),
        ("derived file", "direction file with bad JSON metadata", "refuse",
         ["guidance=[hedit]", f"guidance.hedit.file={bad_json}", *TINY]),
        ("derived file", "direction file with a NaN scale", "refuse",
         ["guidance=[hedit]", f"guidance.hedit.file={nan_scale}", *TINY]),
        ("derived file", "NaN statistics (fuzzy zscore)", "refuse",
         ["method=fuzzy", "mode=zscore", f"zscore_path={nan_stats}", "zscore_set=[300]", *TINY]),
        ("output", "output directory under a regular file", "refuse", [*TINY, f"hydra.run.dir={pickle / 'run'}"]),
        ("output", "impossible output directory", "refuse", [*TINY, "hydra.run.dir=/proc/facelab/run"]),
    ]


def classify(expect: str, rc: int, stderr: str, run_dir: Path | None) -> str:
    if rc == -1:
        return "hang"
    if "Traceback" in stderr:
        return "traceback"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if rc == 2 and lines and lines[-1].startswith("facelab: error:"):
        return "one line" if expect == "refuse" else "refused a valid input"
    if rc == 0:
        metrics = run_dir / "metrics.json" if run_dir else None
        if metrics and metrics.exists() and ("NaN" in metrics.read_text() or "Infinity" in metrics.read_text()):
            return "silent"
        return "correct" if expect == "run" else "silent"
    return f"exit {rc}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="facelab-probe-") as tmp:
        work = Path(tmp)
        for kind, name, expect, overrides in cases(work):
            if args.only not in name:
                continue
            run_dir = work / "runs" / f"{len(rows):02d}"
            has_dir = any(o.startswith("hydra.run.dir=") for o in overrides)
            rc, stderr, seconds = cli("sample", *overrides, *([] if has_dir else [f"hydra.run.dir={run_dir}"]))
            outcome = classify(expect, rc, stderr, None if has_dir else run_dir)
            last = (stderr.strip().splitlines() or [""])[-1][:160]
            rows.append((kind, name, outcome, f"{seconds:.0f}", last))
            print(f"{outcome:10s} {name}: {last}", flush=True)
        # a finished run, re-run into: same command, other seed, other method; and a convert of a malicious pickle
        finished = work / "runs" / "finished"
        rc, stderr, _ = cli("sample", *TINY, f"hydra.run.dir={finished}")
        before = hashes(finished)
        for name, extra in (("the same command", []), ("another seed", ["seed=7"]), ("another method", ["method=debias"])):
            rc, stderr, seconds = cli("sample", *TINY, *extra, f"hydra.run.dir={finished}")
            outcome = "overwrite" if hashes(finished) != before else classify("refuse", rc, stderr, None)
            rows.append(("finished run", f"re-run into a finished run: {name}", outcome, f"{seconds:.0f}",
                         (stderr.strip().splitlines() or [""])[-1][:160]))
            print(f"{outcome:10s} finished run, {name}", flush=True)
        Path("/tmp/facelab_probe_pwned").unlink(missing_ok=True)
        rc, stderr, seconds = cli("convert", str(work / "evil.ckpt"), str(work / "converted"))
        ran = Path("/tmp/facelab_probe_pwned").exists()
        outcome = "EXECUTED" if ran else classify("refuse", rc, stderr, None)
        rows.append(("model", "convert a pickle that would run code", outcome, f"{seconds:.0f}",
                     (stderr.strip().splitlines() or [""])[-1][:160]))
    tally = Counter(row[2] for row in rows)
    lines = ["# Hostile-input probe", "", f"`python experiments/hardening/probe.py`: {len(rows)} cases.", "",
             "| outcome | cases |", "|---|---:|", *(f"| {k} | {v} |" for k, v in tally.most_common()), "",
             "| class | case | outcome | s | last stderr line |", "|---|---|---|---:|---|",
             *(f"| {k} | {n} | {o} | {s} | `{last.replace('|', '/')}` |" for k, n, o, s, last in rows)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print(dict(tally))


if __name__ == "__main__":
    main()
