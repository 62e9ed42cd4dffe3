"""Record the golden outputs (see cases.py): `python tests/golden/record.py [case ...]`."""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]  # the checkout: paths under it are recorded relative to it
sys.path.insert(0, str(HERE))
from cases import CASES, outputs, results  # noqa: E402

from facelab.sample import run_sample  # noqa: E402
from facelab.utils import compose_config  # noqa: E402


def run_case(name: str, run_dir: Path):
    metrics = run_sample(compose_config("sample", [*CASES[name], "progress=false", "device=cpu"], run_dir))
    text = json.dumps(results(metrics), default=str).replace(str(run_dir), "<run>").replace(str(ROOT), "<root>")
    return outputs(run_dir), json.loads(text)


if __name__ == "__main__":
    torch.set_num_threads(1)
    (HERE / "data").mkdir(exist_ok=True)
    for name in sys.argv[1:] or CASES:
        with tempfile.TemporaryDirectory() as tmp:
            arrays, metrics = run_case(name, Path(tmp) / name)
        np.savez_compressed(HERE / "data" / f"{name}.npz", **arrays)
        (HERE / "data" / f"{name}.json").write_text(json.dumps(metrics, indent=1, sort_keys=True, default=str))
        print(name, len(arrays), "arrays", len(metrics), "metrics", flush=True)
