"""facelab.train refuses unsafe resumes: other settings, foreign or hostile checkpoints, finished runs; Ctrl-C."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY_TRAIN, compose, run_cli
from facelab.callbacks import RUN_RECORD
from facelab.io.checkpoints import load_checkpoint
from facelab.io.errors import InputError
from facelab.train import config_differences, run_train

DDPM = ["+experiment=ddpm_synthetic", *TINY_TRAIN]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step run: its directory (checkpoints, diffusers export, metrics.json)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_train(compose("train", [*DDPM, "trainer.max_steps=2"], out))
    return out


def snapshot(out):
    return {p.relative_to(out): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*"))
            if p.is_file() and ".hydra" not in p.parts}


@pytest.mark.parametrize("more", [[], ["trainer.max_steps=1"], ["ckpt_path=null"], ["trainer.max_steps=4", "ckpt_path=null"]])
def test_a_finished_run_is_never_overwritten(finished, more):
    before = snapshot(finished)
    assert (finished / "metrics.json").is_file() and (finished / "diffusers").is_dir()
    assert list((finished / "checkpoints").glob("step_*.ckpt"))
    with pytest.raises(InputError, match="finished run.*never overwritten"):
        run_train(compose("train", [*DDPM, "trainer.max_steps=2", *more], finished))
    assert snapshot(finished) == before


def test_a_finished_run_trained_further_keeps_its_results(tmp_path):
    out = tmp_path / "run"  # trained here, not copied: a moved checkpoint folder makes Lightning write last-v1.ckpt
    run_train(compose("train", [*DDPM, "trainer.max_steps=2"], out))
    before = snapshot(out)
    run_train(compose("train", [*DDPM, "trainer.max_steps=4"], out))  # ckpt_path=auto: its own last.ckpt
    assert load_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 4
    archived = snapshot(out / "archive" / "1")
    for name in ("metrics.json", "checkpoints/step_000002.ckpt", "diffusers/unet/diffusion_pytorch_model.safetensors"):
        assert archived[Path(name)][1] == before[Path(name)][1], name  # moved, not rewritten
    assert (out / "metrics.json").is_file() and (out / "diffusers" / "unet").is_dir()
    assert (out / "checkpoints" / "step_000004.ckpt").is_file()
    later = snapshot(out)
    with pytest.raises(InputError, match=r"finished run.*raise trainer.max_steps above 4"):  # a re-run: refused
        run_train(compose("train", [*DDPM, "trainer.max_steps=4"], out))
    assert snapshot(out) == later


def test_the_checkpoint_records_the_run_config(finished):
    record = load_checkpoint(finished / "checkpoints" / "last.ckpt")[RUN_RECORD]
    assert record["config"]["model"]["_target_"] == "facelab.models.ddpm.PixelDDPM"
    assert record["config"]["model"]["lr"] == 5e-4


@pytest.mark.parametrize("changed, key", [("model.lr=1e-3", "model.lr"), ("seed=7", "seed"),
                                         ("data.batch_size=2", "data.batch_size"),
                                         ("model.unet.layers_per_block=2", "model.unet.layers_per_block")])
def test_resume_with_other_settings_is_refused_naming_the_keys(finished, tmp_path, changed, key):
    last = finished / "checkpoints" / "last.ckpt"
    cfg = compose("train", [*DDPM, "trainer.max_steps=3", f"ckpt_path={last}", changed], tmp_path / "run")
    with pytest.raises(InputError, match=rf"differing in {key}\b.*resume.force=true"):
        run_train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_force_resumes_other_settings(finished, tmp_path):
    last = finished / "checkpoints" / "last.ckpt"
    out = tmp_path / "run"
    run_train(compose("train", [*DDPM, "trainer.max_steps=3", f"ckpt_path={last}", "model.lr=1e-3",
                                "resume.force=true"], out))
    assert load_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 3


def test_safe_keys_may_change():
    saved = {"trainer": {"max_steps": 2, "devices": 1, "precision": "32-true"}, "logger": {"csv": {}},
             "callbacks": {"sample_grid": {"every_n_steps": 2}, "model_checkpoint": {"every_n_train_steps": 2}},
             "paths": {"output_dir": "a"}, "model": {"lr": 1}}
    current = {"trainer": {"max_steps": 9, "devices": 2, "precision": "32-true"}, "logger": None,
               "callbacks": {"sample_grid": {"every_n_steps": 5}, "model_checkpoint": {"every_n_train_steps": 7}},
               "paths": {"output_dir": "b"}, "model": {"lr": 1}}
    assert config_differences(saved, current) == []
    current["trainer"]["precision"] = "16-mixed"
    assert config_differences(saved, current) == ["trainer.precision"]


def tampered(finished, tmp_path, edit):
    ckpt = load_checkpoint(finished / "checkpoints" / "last.ckpt")
    edit(ckpt)
    path = tmp_path / "other.ckpt"
    torch.save(ckpt, path)
    return path


def test_another_models_checkpoint_is_refused(finished, tmp_path):
    def other_model(ckpt):
        ckpt[RUN_RECORD]["config"]["model"]["_target_"] = "facelab.models.vae.VAE"

    path = tampered(finished, tmp_path, other_model)
    cfg = compose("train", [*DDPM, "trainer.max_steps=3", f"ckpt_path={path}"], tmp_path / "run")
    with pytest.raises(InputError, match="a checkpoint of model facelab.models.vae.VAE, not"):
        run_train(cfg)


def test_a_checkpoint_without_run_config_needs_force_and_fitting_weights(finished, tmp_path):
    def foreign(ckpt):
        del ckpt[RUN_RECORD]
        ckpt["state_dict"] = {"encoder.weight": torch.zeros(3, 3)}

    path = tampered(finished, tmp_path, foreign)
    overrides = [*DDPM, "trainer.max_steps=3", f"ckpt_path={path}"]
    with pytest.raises(InputError, match="carries no facelab run config"):
        run_train(compose("train", overrides, tmp_path / "a"))
    with pytest.raises(InputError, match="weights do not fit this model.*encoder.weight"):
        run_train(compose("train", [*overrides, "resume.force=true"], tmp_path / "b"))


class Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # loading it unsafely creates the marker file


def hostile_files(tmp_path, good):
    files = {}
    files["zero-byte"] = tmp_path / "zero.ckpt"
    files["zero-byte"].write_bytes(b"")
    data = good.read_bytes()
    files["truncated"] = tmp_path / "truncated.ckpt"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["text"] = tmp_path / "notes.ckpt"
    files["text"].write_text("these are not weights\n")
    files["safetensors"] = tmp_path / "weights.ckpt"
    save_file({"x": torch.zeros(3)}, files["safetensors"])
    files["tensor"] = tmp_path / "tensor.ckpt"
    torch.save(torch.zeros(3), files["tensor"])
    return files


@pytest.mark.parametrize("kind, message", [
    ("zero-byte", "empty"), ("truncated", "truncated or not a torch file"), ("text", "truncated or not a torch file"),
    ("safetensors", "safetensors"), ("tensor", "not a Lightning training checkpoint")])
def test_unreadable_or_foreign_checkpoints_are_refused(finished, tmp_path, kind, message):
    path = hostile_files(tmp_path, finished / "checkpoints" / "last.ckpt")[kind]
    cfg = compose("train", [*DDPM, f"ckpt_path={path}"], tmp_path / "run")
    with pytest.raises(InputError, match=message):
        run_train(cfg)


def one_line_exit_2(result):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("facelab: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("how", ["zip", "raw-pickle", "auto"])
def test_malicious_checkpoint_never_runs_code(tmp_path, monkeypatch, how):
    marker = tmp_path / "PWNED"
    control = tmp_path / "control"
    torch.load(_write_evil(tmp_path / "control.ckpt", control, "zip"), weights_only=False)
    assert control.is_file()  # the payload works when loaded unsafely
    run = tmp_path / "run"
    if how == "auto":  # a planted last.ckpt in the run directory, resumed by ckpt_path=auto
        evil = _write_evil(run / "checkpoints" / "last.ckpt", marker, "zip")
        overrides = []
    else:
        evil = _write_evil(tmp_path / "evil.ckpt", marker, how)
        overrides = [f"ckpt_path={evil}"]
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    result = run_cli("train", *DDPM, "trainer.max_steps=2", *overrides, f"hydra.run.dir={run}", cwd=tmp_path)
    line = one_line_exit_2(result)
    assert "refused to load" in line
    if how != "raw-pickle":  # the zip format reaches the global and names it; a raw pickle fails on its framing
        assert "needs code to load" in line and "never run" in line
    assert not marker.exists()


def _write_evil(path, marker, how):
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"state_dict": {}, "global_step": 1, "loops": {}, "callbacks": {"x": Evil(marker)}}
    if how == "zip":
        torch.save(payload, path)
    else:
        import pickle

        path.write_bytes(pickle.dumps(payload))
    return path


def test_truncated_checkpoint_on_the_command_line_is_one_line(finished, tmp_path):
    path = hostile_files(tmp_path, finished / "checkpoints" / "last.ckpt")["truncated"]
    result = run_cli("train", *DDPM, f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert "truncated" in one_line_exit_2(result)


def test_ctrl_c_saves_nothing_broken_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "FACELAB_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "facelab.train", *DDPM, "trainer.max_steps=100000",
                             f"hydra.run.dir={run}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)  # past the checkpoint write
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("facelab:")]
    assert len(lines) == 1, stderr[-2000:]
    assert f"saved: {last}" in lines[0] and f"hydra.run.dir={run}" in lines[0] and "python -m facelab.train" in lines[0]
    assert load_checkpoint(last)["global_step"] >= 2
    assert not (run / "metrics.json").exists()


