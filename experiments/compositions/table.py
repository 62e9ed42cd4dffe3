"""Which method × guidance term × sampler combinations run: every cell is a tiny run on the zoo models, recorded as
`ok` or the one line it was refused with. Writes results.json and results.md here.

    python experiments/compositions/table.py

Plus the showcased compositions (each an ordinary run, its metrics kept): fuzzy correction with distribution
debiasing, a direction edit during fuzzy correction, and CycleDiff-style attribute guidance on Collaborative
Diffusion's latent denoiser through its decoder.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from facelab.io.errors import InputError
from facelab.sample import run_sample
from facelab.utils import compose_config

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))
from test_contracts import SAMPLER_STEPS, TINY  # noqa: E402  (the same tiny runs as the contract test)

BIASED = ["model.pretrained=ddpm64_biased"]  # the zoo's h-classifier reads this model's h
TERMS = {
    "record": [],
    "attribute": ["target.Smiling=1"],
    "debias": ["target.Male=0.5", "guidance.debias.head_lookup=nearest"],
    "debias_image": ["target.Male=0.5"],
    "hedit": [],  # + the direction file made first
    "fuzzy": [],
    "range": [],
    "cycle": [],
    "feature": [],
}


def cell(overrides: list[str]) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run_sample(compose_config("sample", [*overrides, "progress=false", "device=cpu"], Path(tmp) / "run"))
        except InputError as err:
            return f"refused: {err}"
        except Exception as err:  # noqa: BLE001 - an instantiation error wraps the one-line InputError
            cause = err.__cause__ if isinstance(err.__cause__, InputError) else err
            return f"refused: {str(cause).splitlines()[-1]}" if isinstance(cause, InputError) else f"ERROR {err!r}"
    return "ok"


def direction_file(folder: Path) -> Path:
    run_sample(compose_config("sample", ["method=directions", *TINY["directions"], "progress=false", "device=cpu"],
                              folder))
    return folder / "directions.safetensors"


def main() -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        hedit = direction_file(Path(tmp) / "pca")
        term_args = {**TERMS, "hedit": [f"guidance.hedit.file={hedit}", "sampler.steps=10"]}  # the file's grid
        terms = {method: {term: cell([f"method={method}", *TINY[method], f"guidance=[{term}]", *args,
                                      *(BIASED if term == "debias" and method in ("generate", "fuzzy") else [])])
                          for term, args in term_args.items()} for method in TINY}
        samplers = {method: {name: cell([f"method={method}", *TINY[method], f"sampler={name}", *steps])
                             for name, steps in SAMPLER_STEPS.items()} for method in TINY}
        showcases = {
            "fuzzy correction + distribution debiasing": [
                "method=fuzzy", "mode=replace", "num_samples=2", *BIASED, "guidance=[debias]", "target.Male=0.5",
                "guidance.debias.head_lookup=nearest"],
            "direction edit during fuzzy correction": [
                "method=fuzzy", "mode=replace", "num_samples=2", "guidance=[hedit]", f"guidance.hedit.file={hedit}",
                "sampler.steps=10"],
            "attribute guidance on Collaborative Diffusion (through the decoder)": [
                "method=codiff", "num_samples=1", "batch_size=1", "guidance=[attribute]", "target.Smiling=1"],
        }
        shown = {name: cell(args) for name, args in showcases.items()}
    results = {"terms": terms, "samplers": samplers, "showcases": {k: {"overrides": showcases[k], "status": v}
                                                                   for k, v in shown.items()}}
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    write_md(results)
    return results


def mark(status: str) -> str:
    return "✓" if status == "ok" else "✗" if status.startswith("refused") else "ERROR"


def write_md(results: dict) -> None:
    lines = ["# Compositions: method × guidance term and method × sampler", "",
             "`python experiments/compositions/table.py`: ✓ runs, ✗ refused with one line (below).", ""]
    for part in ("terms", "samplers"):
        table = results[part]
        cols = list(next(iter(table.values())))
        lines += [f"## method × {part[:-1]}", "", "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(mark(row[c]) for c in cols) + " |" for m, row in table.items()]
        lines.append("")
    lines += ["## Why a combination is refused", ""]
    seen = set()
    for part in ("terms", "samplers"):
        for m, row in results[part].items():
            for c, status in row.items():
                if status != "ok" and (m, c) not in seen:
                    seen.add((m, c))
                    lines.append(f"- {m} × {c}: {status}")
    lines += ["", "## Showcased compositions", ""]
    lines += [f"- {name}: `{' '.join(s['overrides'])}` → {s['status']}" for name, s in results["showcases"].items()]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
