#!/usr/bin/env bash
# ddpm64_biased as shipped, on one GPU (an H100; see its recipe.json):  bash experiments/zoo/train_zoo_gpu.sh
# Its recipe is unchanged from the CPU one (conf/experiment/zoo_ddpm64_biased.yaml: fine-tuned from the zoo's ddpm64);
# faces are rendered by 12 data-loading workers, then its extras run (h extraction, the h-classifier).
set -euo pipefail
cd "$(dirname "$0")/../.."
python experiments/zoo/train_zoo.py ddpm64_biased -- data.num_workers=12 trainer.enable_progress_bar=false
