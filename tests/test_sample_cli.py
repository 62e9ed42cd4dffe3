import json
import pickle

import pytest

from conftest import run_cli
from facelab.io.checkpoints import load_checkpoint
from facelab.io.errors import InputError


def test_sample_ddim_writes_run(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    res = run_cli("sample", "method=ddim", f"model.pretrained={tiny_model_dir}", "num_samples=3", "batch_size=2",
                  "sampler.steps=4", "guidance=[record]", "guidance.record.every=2", f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 3 and metrics["steps"] == 4
    assert (out / "grid.png").is_file() and "grid.png" in (out / "index.html").read_text()
    assert "pretrained" in (out / "config.yaml").read_text()
    assert (out / "trajectory.png").is_file()  # the composable record term, steps t=750, 250 and the end
    # the same seed reproduces the same images; a finished run is never overwritten
    again = run_cli("sample", "method=ddim", f"model.pretrained={tiny_model_dir}", "num_samples=3",
                    "batch_size=2", "sampler.steps=4", f"hydra.run.dir={out}")
    assert again.returncode != 0 and "already holds a finished run" in again.stderr


def test_unknown_key_is_one_clear_error(tiny_model_dir, tmp_path):
    res = run_cli("sample", "mask_ss=0.1", f"hydra.run.dir={tmp_path / 'r'}")
    assert res.returncode != 0 and "mask_ss" in res.stderr


def test_missing_model_is_one_clear_error(tmp_path):
    res = run_cli("sample", f"model.pretrained={tmp_path / 'nope'}", f"hydra.run.dir={tmp_path / 'r'}")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("facelab: error: model.pretrained=")
    assert not (tmp_path / "r" / "metrics.json").exists()


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": _Evil()}))
    with pytest.raises(InputError, match="refused to load"):
        load_checkpoint(path)
    res = run_cli("sample", f"model.pretrained={path}", f"hydra.run.dir={tmp_path / 'r'}")
    assert res.returncode == 2 and "refused to load" in res.stderr
