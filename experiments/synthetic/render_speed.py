"""Single-core render speed of the synthetic faces (faces per CPU second, one thread): the v1 renderer
(whole-canvas, as at commit 1276bd15) against today's windowed one, side by side on the same faces, and a check
that their images and label maps are identical; and items read back from shards (facelab.data.shards: rendered once,
then memory-mapped), checked equal to the rendered items.

    python experiments/synthetic/render_speed.py [--faces 200] [--repeats 3]

Writes render_speed.json next to this file. Needs the git history (the v1 module is read with `git show`).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from facelab.data import synthetic

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
V1_COMMIT = "1276bd15caa8b76d30b42090e86a177b127bc29a"  # last commit of the whole-canvas renderer


def load_v1():
    source = subprocess.run(["git", "show", f"{V1_COMMIT}:facelab/data/synthetic.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "synthetic_v1.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("synthetic_v1", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["synthetic_v1"] = module  # dataclasses needs the module registered
    spec.loader.exec_module(module)
    return module


def best_rates(fns, items, repeats: int) -> list[float]:
    """Items per CPU second of each function (process time: a shared machine's load does not count), best of
    `repeats` passes; the functions take turns within each repeat."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.process_time()
            for item in items:
                fn(item)
            best[i] = min(best[i], time.process_time() - start)
    return [len(items) / b for b in best]


def same_item(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    args = parser.parse_args()
    torch.set_num_threads(1)
    v1 = load_v1()
    rows = []
    for size in args.sizes:
        n = max(10, args.faces * 64 // max(size, 64))  # fewer faces at large sizes
        new_ds, old_ds = (m.SyntheticFaces(size=size, length=n, seed=0) for m in (synthetic, v1))
        faces = [new_ds.face(i) for i in range(n)]
        identical = all(
            all(np.array_equal(a, b) for a, b in zip(synthetic.render(f, size), v1.render(f, size))) for f in faces)
        old, new = best_rates([lambda f, s=size: v1.render(f, s), lambda f, s=size: synthetic.render(f, s)], faces,
                              args.repeats)
        old_item, new_item = best_rates([old_ds.__getitem__, new_ds.__getitem__], range(n), args.repeats)
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            shard_ds = synthetic.SyntheticFaces(size=size, length=n, seed=0, shards=folder, workers=1)
            write_s = time.perf_counter() - start
            equal = all(same_item(shard_ds[i], new_ds[i]) for i in range(n))
            shard_item = best_rates([shard_ds.__getitem__], range(n), args.repeats)[0]
        rows.append({"size": size, "faces": n, "identical": identical,
                     "render_v1_faces_per_s": round(old, 1), "render_faces_per_s": round(new, 1),
                     "render_speedup": round(new / old, 2),
                     "item_v1_faces_per_s": round(old_item, 1), "item_faces_per_s": round(new_item, 1),
                     "item_speedup": round(new_item / old_item, 2),
                     "shard_item_faces_per_s": round(shard_item, 1), "shard_items_equal": equal,
                     "shard_write_s": round(write_s, 2), "shard_vs_item": round(shard_item / new_item, 1)})
        print(json.dumps(rows[-1]))
    result = {"threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows}
    (HERE / "render_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| px | faces | identical | v1 render/s | render/s | × | v1 item/s | item/s | × | shard item/s | × item |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['faces']} | {r['identical']} | {r['render_v1_faces_per_s']} | "
              f"{r['render_faces_per_s']} | {r['render_speedup']} | {r['item_v1_faces_per_s']} | "
              f"{r['item_faces_per_s']} | {r['item_speedup']} | {r['shard_item_faces_per_s']} | {r['shard_vs_item']} |")
    return result


if __name__ == "__main__":
    main()
