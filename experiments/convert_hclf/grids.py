"""Which of facelab's 50-step grids use a converted Balancing Act h-classifier's heads exactly.

The release's heads sit at the original's grid, written out in its source (rishubhpar/debiasing_gen_models,
multi_classifier.py `get_timetstep`; head k = index of t, t = 999 has no head). For every facelab spacing, count the
grid times in the heads' window [0, 978] that have a head (exact lookup) and the largest |t − head| nearest lookup
would accept. Writes results.json and results.md next to this script.

    .venv/bin/python experiments/convert_hclf/grids.py
"""
import json
from pathlib import Path

from facelab.convert.hclf import original_grid
from facelab.diffusion.schedule import SPACINGS, Schedule

RELEASE = [0, 20, 40, 61, 81, 101, 122, 142, 163, 183, 203, 224, 244, 265, 285, 305, 326, 346, 366, 387, 407, 428,
           448, 468, 489, 509, 530, 550, 570, 591, 611, 632, 652, 672, 693, 713, 733, 754, 774, 795, 815, 835, 856,
           876, 897, 917, 937, 958, 978, 999]  # the original's array, verbatim


def main() -> dict:
    heads = RELEASE[:-1]
    assert original_grid() == RELEASE
    rows = {}
    for spacing in SPACINGS:
        grid = Schedule().timesteps(50, spacing).tolist()
        window = [t for t in grid if heads[0] <= t <= heads[-1]]
        exact = sum(t in heads for t in window)
        off = max(min(abs(t - h) for h in heads) for t in window)
        rows[spacing] = {"guided_times": len(window), "exact_heads": exact,
                         "heads_not_hit": len(set(heads) - set(grid)), "max_nearest_offset": off}
    out = Path(__file__).parent
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# Balancing Act h-classifier heads on facelab's 50-step grids", "",
             "`experiments/convert_hclf/grids.py`: grid times in the heads' window [0, 978] with a head of their own "
             "(exact lookup) out of the release's 49 heads; the largest |t − head| nearest lookup would accept.", "",
             "| spacing | guided times | exact heads | heads no grid time hits | max nearest offset |", "|---|---|---|---|---|"]
    lines += [f"| {s} | {r['guided_times']} | {r['exact_heads']} | {r['heads_not_hit']} | {r['max_nearest_offset']} |"
              for s, r in rows.items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
