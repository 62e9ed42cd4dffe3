"""Packaging: the wheel ships the Hydra configs, the zoo and the assets, and a non-editable install runs anywhere."""
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from facelab.utils import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "facelab"


def package_files(folder: str) -> set[str]:
    """The files under facelab/<folder> as wheel member names (facelab/...)."""
    return {p.relative_to(ROOT).as_posix() for p in (PACKAGE / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this checkout, built offline with the venv's setuptools (no build isolation).

    setuptools' build/ and egg-info go to the temporary folder (DIST_EXTRA_CONFIG), never into the shared tree."""
    tmp = tmp_path_factory.mktemp("wheel")
    (tmp / "setup.cfg").write_text(f"[build]\nbuild_base = {tmp / 'build'}\n[egg_info]\negg_base = {tmp}\n")
    env = {**os.environ, "DIST_EXTRA_CONFIG": str(tmp / "setup.cfg"), "PIP_NO_INDEX": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp / "dist"), str(ROOT)], check=True, env=env, timeout=300)
    print(f"wheel built in {time.perf_counter() - start:.1f} s")
    (built,) = (tmp / "dist").glob("facelab-*.whl")
    return built


def test_repo_conf_is_a_relative_link_to_the_package_configs():
    link = ROOT / "conf"
    assert link.is_symlink() and os.readlink(link) == "facelab/conf"
    assert link.resolve() == CONF_DIR == PACKAGE / "conf"
    assert (CONF_DIR / "sample.yaml").is_file() and (CONF_DIR / "train.yaml").is_file()


def test_wheel_ships_every_config_zoo_file_and_asset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {n for n in package_files("conf") if n.endswith(".yaml") and not n.startswith("facelab/conf/local/")}
    zoo, assets = package_files("zoo"), package_files("assets")
    # nested groups, the primary configs and weights of every kind are among them
    assert {"facelab/conf/sample.yaml", "facelab/conf/train.yaml", "facelab/conf/fuzzy_stats.yaml"} <= configs
    assert any(n.startswith("facelab/conf/hydra/launcher/") for n in configs)
    assert any(n.startswith("facelab/conf/model/condition/") for n in configs)
    assert any(n.endswith(".safetensors") for n in zoo) and any(n.endswith(".json") for n in zoo) and assets
    assert not configs - names, f"configs missing from the wheel: {sorted(configs - names)}"
    assert not zoo - names, f"zoo files missing from the wheel: {sorted(zoo - names)}"
    assert not assets - names, f"assets missing from the wheel: {sorted(assets - names)}"
    assert "facelab/sample.py" in names and "facelab/utils.py" in names
    # site settings (the git-ignored conf/local/slurm.yaml) stay out; nothing outside the package goes in
    assert not [n for n in names if n.startswith("facelab/conf/local/")]
    assert all(n.startswith(("facelab/", "facelab-")) for n in names), sorted(names)


@pytest.mark.slow
def test_installed_wheel_samples_into_the_working_directory(wheel, tmp_path):
    """`pip install` (not editable) then `python -m facelab.sample` from another folder: the configs and the zoo
    come from the installed package, the outputs go under the working directory's outputs/."""
    site, cwd = tmp_path / "site", tmp_path / "work"
    cwd.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "FACELAB_ROOT"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    where = subprocess.run([sys.executable, "-c", "import facelab; print(facelab.__file__)"], cwd=cwd, env=env,
                           capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout  # the installed copy, not this checkout
    run = subprocess.run([sys.executable, "-m", "facelab.sample", "method=ddim", "num_samples=1", "sampler.steps=2",
                          "device=cpu", "progress=false"], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (metrics,) = (cwd / "outputs" / "sample" / "runs").glob("*/metrics.json")
    assert (metrics.parent / "samples" / "00000.png").is_file()
    assert not (site / "outputs").exists()
