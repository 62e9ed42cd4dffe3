"""Run records of sampling runs: a finished or running run directory is refused before Hydra writes into it, every
file is written temp file -> rename, an interrupted run is completed by its own command, Ctrl-C and command-line
mistakes are one line."""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, compose, run_cli
from facelab.runner import Runner
from facelab.sample import run_sample
from facelab.utils import LOCK_NAME, RunDirRefused, claim_run_dir, release_run_dir


def tiny(model, *overrides):
    return [f"model.pretrained={model}", "sampler=ddpm", "sampler.steps=2", "device=cpu", "progress=false",
            *overrides]


def hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def pngs(folder: Path) -> dict:
    return {k: v for k, v in hashes(folder).items() if k.endswith(".png")}


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    res = run_cli("sample", *tiny(tiny_model_dir, "num_samples=2", "batch_size=1"), f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def test_refused_rerun_changes_no_file(finished, tiny_model_dir):
    before = hashes(finished)
    assert ".hydra/overrides.yaml" in before and LOCK_NAME not in before and "metrics.json" in before
    # the same command, another command, and a different method: all refused before Hydra writes .hydra/ or the log
    for overrides in (tiny(tiny_model_dir, "num_samples=2", "batch_size=1"), tiny(tiny_model_dir, "seed=7"),
                      ["method=debias", *tiny(tiny_model_dir)]):
        res = run_cli("sample", *overrides, f"hydra.run.dir={finished}")
        assert res.returncode == 2 and "already holds a finished run" in res.stderr, res.stderr[-2000:]
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert hashes(finished) == before


def test_unfinished_run_of_other_settings_is_refused_unchanged(finished, tiny_model_dir, tmp_path):
    import shutil

    out = tmp_path / "unfinished"
    shutil.copytree(finished, out)
    (out / "metrics.json").unlink()
    before = hashes(out)
    res = run_cli("sample", *tiny(tiny_model_dir, "num_samples=2", "batch_size=1", "seed=7"), f"hydra.run.dir={out}")
    assert res.returncode == 2 and "unfinished run of other settings" in res.stderr, res.stderr[-2000:]
    assert hashes(out) == before


def test_running_dir_is_refused_and_a_dead_holder_is_taken_over(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    # another live process holds the directory
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from facelab.utils import claim_run_dir; "
                               f"claim_run_dir({str(out)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = hashes(out)
        res = run_cli("sample", *tiny(tiny_model_dir, "num_samples=1"), f"hydra.run.dir={out}")
        assert res.returncode == 2 and f"running facelab process (pid {holder.pid}" in res.stderr, res.stderr[-2000:]
        assert hashes(out) == before and not (out / ".hydra").exists()
        with pytest.raises(RunDirRefused, match="in use"):
            claim_run_dir(out)
    finally:
        holder.kill()  # SIGKILL: no clean-up, the lock file with its pid stays behind
        holder.wait()
    assert (out / LOCK_NAME).read_text().split()[0] == str(holder.pid)
    res = run_cli("sample", *tiny(tiny_model_dir, "num_samples=1"), f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "taking over the stale lock" in res.stderr and (out / "metrics.json").is_file()
    assert not (out / LOCK_NAME).exists()  # released at exit


def test_lock_is_per_process_and_released(tmp_path):
    out = tmp_path / "r"
    assert claim_run_dir(out) and not claim_run_dir(out)  # held by this process already
    assert (out / LOCK_NAME).read_text().split()[0] == str(os.getpid())
    release_run_dir(out)
    assert not (out / LOCK_NAME).exists()
    assert claim_run_dir(out)
    release_run_dir(out)


def test_interrupted_run_resumes_to_the_uninterrupted_images(tiny_model_dir, tmp_path, monkeypatch):
    overrides = tiny(tiny_model_dir, "num_samples=5", "batch_size=2", "guidance=[record]", "guidance.record.every=1")
    whole = tmp_path / "whole"
    run_sample(compose("sample", overrides, whole))

    calls, real = [], Runner.sample

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(Runner, "sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sample(compose("sample", overrides, resumed))
    monkeypatch.setattr(Runner, "sample", real)
    assert sorted(pngs(resumed)) == ["samples/00000.png", "samples/00001.png"]
    assert not (resumed / "metrics.json").exists() and not (resumed / LOCK_NAME).exists()
    kept = (resumed / "samples" / "00000.png").stat().st_mtime_ns

    # other settings are refused, the same ones complete the run: batch 1 kept, the rest computed from the stream
    with pytest.raises(RunDirRefused, match="other settings"):
        run_sample(compose("sample", [*overrides, "seed=3"], resumed))
    metrics = run_sample(compose("sample", overrides, resumed))
    assert pngs(resumed) == pngs(whole)  # samples/, grid.png and trajectory.png
    assert (resumed / "samples" / "00000.png").stat().st_mtime_ns == kept
    assert metrics["network_calls_per_image"] == 2 and not (resumed / ".resume").exists()
    assert not [p for p in resumed.rglob(".*tmp*")]  # no temporary file left


def test_ctrl_c_prints_the_resume_command_and_it_completes_the_run(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    overrides = tiny(tiny_model_dir, "num_samples=4", "batch_size=1", "sampler.steps=150", "seed=1")
    env = {**os.environ, "FACELAB_ROOT": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "facelab.sample", *overrides, f"hydra.run.dir={out}"], cwd=ROOT,
                            env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "samples" / "00000.png").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    if proc.returncode == 0:
        pytest.skip("the run finished before it was interrupted")
    assert proc.returncode == 130, err[-2000:]
    line, = err.strip().splitlines()
    assert line.startswith("facelab: interrupted;") and "images are saved in" in line and "Traceback" not in err
    command = line.split("to complete the run: ")[1]
    assert command.endswith(f"hydra.run.dir={out}") and not (out / "metrics.json").exists()
    saved = pngs(out)

    res = subprocess.run(f"{command.replace('python', sys.executable, 1)}", shell=True, cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    whole = tmp_path / "whole"
    assert run_cli("sample", *overrides, f"hydra.run.dir={whole}").returncode == 0
    assert pngs(out) == pngs(whole)
    assert all(pngs(out)[k] == v for k, v in saved.items())


@pytest.mark.parametrize("override, says", [
    ("method=nope", "Could not find 'method/nope'"),
    ("nope=1", "Could not override 'nope'"),
    ("seed=[1", "no viable alternative"),
    ("text=a,b", "Ambiguous value"),
])
def test_command_line_mistakes_are_one_line(override, says, tmp_path):
    res = run_cli("sample", override, f"hydra.run.dir={tmp_path / 'r'}")
    assert res.returncode == 2 and res.stderr.startswith("facelab: error: ") and says in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_gallery_survives_non_utf8_names(tmp_path):
    from facelab.io.gallery import Gallery

    name = os.fsdecode(b"face_\xff.png")
    (tmp_path / name).write_bytes(b"")
    gallery = Gallery(tmp_path, "t")
    gallery.section("s").append([(name, tmp_path / name)])
    page = gallery.write({"a": 1}).read_text(encoding="utf-8")
    assert "face_%FF.png" in page and "face_\\xff.png" in page


def test_a_refused_input_leaves_no_unfinished_run(tiny_model_dir, tmp_path):
    """A run stopped by its input before it made anything leaves the directory free: the corrected command runs there."""
    from facelab.io.errors import InputError

    out = tmp_path / "run"
    with pytest.raises(InputError, match="num_samples=0"):
        run_sample(compose("sample", tiny(tiny_model_dir, "num_samples=0"), out))
    assert not (out / "config.yaml").exists()
    metrics = run_sample(compose("sample", tiny(tiny_model_dir, "num_samples=1"), out))
    assert metrics and (out / "metrics.json").is_file() and (out / "samples" / "00000.png").is_file()


@pytest.mark.parametrize("where", ["/proc/facelab/run", "FILE/run"])
def test_an_impossible_run_directory_is_one_line(where, tmp_path):
    (tmp_path / "file").write_text("")
    out = where.replace("FILE", str(tmp_path / "file"))
    res = run_cli("sample", "sampler.steps=2", "num_samples=1", "device=cpu", f"hydra.run.dir={out}")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith(f"facelab: error: {out}: cannot write there")
