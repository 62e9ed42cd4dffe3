#!/usr/bin/env bash
# The zoo's pixel DDPMs as shipped, trained on one GPU (an H100; see each model's recipe.json):
#   bash experiments/zoo/train_zoo_gpu.sh
# ddpm64: the zoo recipe (conf/experiment/zoo_ddpm64.yaml) at batch 128 on a stream of fresh faces for a fixed
# wall time; then ddpm64_biased, fine-tuned from it with its own recipe unchanged, and the models' extras
# (projection statistics over 1000 faces, the h-classifier). Data loading renders faces on 14 CPU workers.
set -euo pipefail
cd "$(dirname "$0")/../.."
python experiments/zoo/train_zoo.py ddpm64 -- data.batch_size=128 data.dataset.length=500000 \
    data.dataset.cache=false data.num_workers=14 trainer.max_steps=100000 +trainer.max_time=00:00:05:30 \
    trainer.val_check_interval=500 callbacks.sample_grid.every_n_steps=1000
python experiments/zoo/train_zoo.py ddpm64_biased -- data.num_workers=8
