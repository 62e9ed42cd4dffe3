"""Zoo v2 on one lent GPU in one short call (issue #21 item 2): every model trained against a wall-clock budget from
rendered shards, each copied back as soon as it is installed.

    python experiments/zoo/v2/recipe.py --budget 480 --out "$OUT"          # on the device (see README.md here)
    python experiments/zoo/v2/recipe.py --smoke --out /tmp/zoo_v2_smoke    # the same path on a CPU, in a few minutes

(--smoke installs into facelab/zoo like the real run: run it in a scratch copy, e.g. `git worktree add`.)

Each model trains with `python -m facelab.train +experiment=<its zoo experiment>` through experiments/zoo/train_zoo.py
(so it is installed into facelab/zoo/<name> exactly as `make zoo` installs it, weights in float16, with its
recipe.json and extras), here with: bf16 mixed precision, a large batch, the faces read from shards
(`data.dataset.shards`, rendered once per model by all cores: about 1 s for 20,000 faces on 16), Lightning's `trainer.max_time` set to the model's share of the
budget, and rare checkpoints and grids. Models that start from another (`init_from`) run after it. After each
model, facelab/zoo/<name> is packed into OUT/<name>.tar, so whatever finished comes back even if a later one fails
or the call runs out of time; `progress.json` in OUT says what ran and how long. Unpack here with
`tar -xf <name>.tar -C facelab/zoo`.

What the device allows decides the plan. Its image lacks diffusers, hydra-core and omegaconf: they travel as wheels
(`make device-wheels`, about 5 MiB in .whl/). The call carries the whole working tree, at most 64 MiB, of which the
zoo is 53 of 57 today. So:
- the sizes stay those of zoo v1 (wider models first need room, e.g. cyclediff64, trained with label dropout, is also
  an unconditional model and could replace ddpm64; files coming back are at most 16 MiB, 8 files);
- the latent models stay on the CPU recipe: ldm_text64 and codiff64 need the frozen MiniLM text encoder, an 88 MB
  package that cannot travel, and a v2 autoencoder (bigger latent) would orphan them.
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(HERE.parent))
import train_zoo  # noqa: E402  (experiments/zoo/train_zoo.py: training, installing and extras of one zoo model)

# (zoo name, share of the budget, extra overrides), in an order where init_from models already exist
PLAN = [
    ("ddpm64", 0.35, ["model.init_from=ddpm64", "model.warmup_steps=100"]),  # continues v1
    ("cyclediff64", 0.35, ["model.init_from=ddpm64"]),                       # from the v2 ddpm64, label dropout 0.1
    ("ddpm64_biased", 0.15, ["model.init_from=ddpm64"]),                     # then its h-classifier (extras)
    ("attr64_noisy", 0.15, []),
]


def overrides(name: str, seconds: float, out_shards: Path, batch: int, workers: int, smoke: bool) -> list[str]:
    minutes, secs = divmod(max(1, int(seconds)), 60)
    common = [f"+trainer.max_time=00:00:{minutes:02d}:{secs:02d}", "trainer.max_steps=1000000",  # DD:HH:MM:SS
              f"data.batch_size={batch}", f"data.num_workers={workers}", "data.dataset.cache=false",
              f"data.dataset.shards={out_shards / name}",
              "callbacks.model_checkpoint.every_n_train_steps=2000", "trainer.enable_progress_bar=false"]
    if name != "attr64_noisy":  # one grid at the end is enough (none on a CPU)
        common.append(f"callbacks.sample_grid.every_n_steps={0 if smoke else 1000000}")
    if smoke:
        common += ["data.dataset.length=64", "trainer.val_check_interval=4", "trainer.limit_val_batches=1",
                   "trainer.accelerator=cpu", "trainer.precision=32-true"]
    else:
        common += ["trainer.precision=bf16-mixed", "trainer.val_check_interval=500"]
    return common


def pack(name: str, out: Path) -> Path:
    tar = out / f"{name}.tar"
    with tarfile.open(tar.with_suffix(".tmp"), "w") as archive:
        archive.add(ROOT / "facelab" / "zoo" / name, arcname=name)
    tar.with_suffix(".tmp").rename(tar)
    return tar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=480, help="training seconds for all models together")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers per training run")
    parser.add_argument("--only", nargs="*", help="zoo names (default: the whole plan)")
    parser.add_argument("--smoke", action="store_true", help="CPU, 64 faces, a few seconds per model, no extras")
    args = parser.parse_args()
    if args.smoke:
        args.budget, args.batch, args.workers = min(args.budget, 80), 8, 0
    args.out.mkdir(parents=True, exist_ok=True)
    shards = ROOT / "outputs" / "zoo_v2_shards"
    log = {"budget_s": args.budget, "batch": args.batch, "models": {}}
    plan = [p for p in PLAN if not args.only or p[0] in args.only]
    for name, share, extra in plan:
        start = time.time()
        try:
            train_zoo.train(name, [*extra, *overrides(name, share * args.budget, shards, args.batch, args.workers,
                                                       args.smoke)], run_extras=not args.smoke)
            log["models"][name] = {"seconds": round(time.time() - start, 1), "tar": pack(name, args.out).name,
                                   "recipe": json.loads((ROOT / "facelab/zoo" / name / "recipe.json").read_text())}
        except Exception as err:  # noqa: BLE001  (report it and go on: the others still come back)
            log["models"][name] = {"seconds": round(time.time() - start, 1), "error": f"{type(err).__name__}: {err}"}
        (args.out / "progress.json").write_text(json.dumps(log, indent=1))
        print(json.dumps({name: log["models"][name].get("error", "ok")}), flush=True)


if __name__ == "__main__":
    main()
