"""The refactor guard: every method's demo command at tiny settings gives the recorded outputs of the pre-refactor
main (tests/golden/): the same images, stored tensors to 1e-5 and the recorded result metrics to 1e-5 (new metrics
may be added)."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN))
from cases import CASES  # noqa: E402
from record import run_case  # noqa: E402


def close(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_unchanged(name, tmp_path):
    arrays, metrics = run_case(name, tmp_path / name)
    recorded = np.load(GOLDEN / "data" / f"{name}.npz")
    assert sorted(arrays) == sorted(recorded.files)
    for key in recorded.files:
        want, got = recorded[key], arrays[key]
        assert got.shape == want.shape, key
        if want.dtype == np.uint8:
            assert np.array_equal(got, want), f"{key}: {np.abs(got.astype(int) - want).max()} levels off"
        else:
            assert np.allclose(got, want, atol=1e-5, rtol=1e-5), key
    expected = json.loads((GOLDEN / "data" / f"{name}.json").read_text())
    got = json.loads(json.dumps(metrics, default=str))
    assert not set(expected) - set(got), "recorded metrics missing"
    wrong = {k: (got[k], expected[k]) for k in expected if not close(got[k], expected[k])}
    assert not wrong
