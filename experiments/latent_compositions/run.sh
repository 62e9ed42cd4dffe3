#!/usr/bin/env bash
# The latent compositions of issue 16 on the zoo's text latent model, measured (CPU: about 30 minutes on 2 cores).
#   1. h-space debiasing on ldm_text64: h along its own trajectories under a gender-neutral caption, labelled by attr64
#      (method=hextract), an h-classifier on them (+experiment=hclf_gender), then method=ldm + guidance=[debias]
#      target.Male=0.5 at several scales against the unguided run (same seed: the same starts and noise);
#   2. attribute guidance through the decoder: method=ldm + guidance=[attribute] target.Smiling=1 (attr64 guiding).
# Everything is scored by the held-out attr64_eval (+eval=[attributes]: fractions, Fréchet distance to 500 faces).
# Usage: bash experiments/latent_compositions/run.sh OUT_DIR        (results: experiments/latent_compositions/results.md)
set -euo pipefail
OUT=${1:?usage: run.sh OUT_DIR}
PY=${PY:-.venv/bin/python}
TEXT="This person has black hair."
COMMON=(model.pretrained=ldm_text64 "text=$TEXT" sampler.steps=10 progress=false)
N=${N:-64}
$PY -m facelab.sample method=hextract "${COMMON[@]}" method.source=trajectory method.classifier=attr64 \
    method.attributes=[Male] num_samples=160 batch_size=32 seed=1000 hydra.run.dir="$OUT/hextract"
$PY -m facelab.train +experiment=hclf_gender data.dataset.path="$OUT/hextract/hspace" data.batch_size=32 \
    trainer.max_steps=300 trainer.val_check_interval=50 trainer.accelerator=cpu logger=none \
    trainer.enable_progress_bar=false hydra.run.dir="$OUT/hclf"
EVAL=(method=ldm "${COMMON[@]}" num_samples="$N" batch_size=32 '+eval=[attributes]')
$PY -m facelab.sample "${EVAL[@]}" hydra.run.dir="$OUT/plain"
for SCALE in 1 5 20; do
  $PY -m facelab.sample "${EVAL[@]}" 'guidance=[debias]' guidance.debias.classifier="$OUT/hclf/hclf" target.Male=0.5 \
      guidance.debias.scale="$SCALE" hydra.run.dir="$OUT/debias_$SCALE"
done
for SCALE in 2 10; do
  $PY -m facelab.sample "${EVAL[@]}" 'guidance=[attribute]' target.Smiling=1 guidance.attribute.scale="$SCALE" \
      hydra.run.dir="$OUT/attribute_$SCALE"
done
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| run | Male | Smiling | Fréchet | network calls / image | s / image |\n|---|---|---|---|---|---|")
for run in ("plain", "debias_1", "debias_5", "debias_20", "attribute_2", "attribute_10"):
    m = json.loads((out / run / "metrics.json").read_text())
    scores = m["eval"]["attributes"]
    print(f"| {run} | {scores['fractions']['Male'][1]:.3f} | {scores['fractions']['Smiling'][1]:.3f} | "
          f"{scores['frechet']:.1f} | {m['network_calls_per_image']:.0f} | {m['seconds_per_image']:.2f} |")
PY
