"""Scale-out: global batch over ranks, DDP on CPU, exact resume, sweep summaries, submitit launchers."""
import csv
import warnings
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF, ROOT, TINY_TRAIN, compose, run_cli
from facelab.data.datamodule import FaceDataModule
from facelab.io.checkpoints import load_checkpoint
from facelab.io.errors import InputError
from facelab.train import run_train


def summary_rows(sweep_dir):
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def tiny_sample(tiny_model_dir, *overrides):
    return ["method=ddim", f"model.pretrained={tiny_model_dir}", "num_samples=1", "batch_size=1", "sampler.steps=2",
            "progress=false", *overrides]


def test_global_batch_is_split_over_ranks():
    def batches(rank, world, batch_size=4):
        dm = FaceDataModule(dataset=list(range(24)), val_fraction=0.25, batch_size=batch_size)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world)
        dm.setup("fit")
        return list(dm.train_dataloader().batch_sampler)

    one = batches(0, 1)
    ranks = [batches(r, 2) for r in range(2)]
    assert all(len(b) == 2 for b in ranks[0][:-1])
    # every step trains on the same global batch, whatever the number of processes
    assert [sorted(a + b) for a, b in zip(*ranks)][:-1] == [sorted(b) for b in one][:-1]
    with pytest.raises(InputError, match="batch_size=3 is the global batch"):
        batches(0, 2, batch_size=3)


def test_ddp_on_two_cpu_processes(tmp_path):
    res = run_cli("train", "+experiment=ddpm_synthetic", *TINY_TRAIN, "trainer=ddp", "trainer.devices=2",
                  "trainer.max_steps=2", "run_name=ddp", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "global batch 4 = 2 × 2 per process" in res.stdout + res.stderr
    run = tmp_path / "outputs" / "ddpm_synthetic" / "runs" / "ddp"
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"served": 2}]
    assert (run / "metrics.json").is_file() and (run / "diffusers" / "unet").is_dir()


def test_resume_gives_the_uninterrupted_weights(tmp_path):
    def train(run, max_steps):
        run_train(compose("train", ["+experiment=ddpm_synthetic", *TINY_TRAIN, f"trainer.max_steps={max_steps}"], run))
        return load_checkpoint(run / "checkpoints" / "last.ckpt")

    # killed after step 3 (last.ckpt is step 2's: checkpoints every 2 steps), resumed in the same directory
    # through ckpt_path=auto, mid-epoch (5 batches an epoch) and on across the epoch boundary
    assert train(tmp_path / "requeued", 3)["global_step"] == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = train(tmp_path / "requeued", 8)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    uninterrupted = train(tmp_path / "uninterrupted", 8)
    assert resumed["global_step"] == uninterrupted["global_step"] == 8
    for key, value in uninterrupted["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


def test_failing_job_keeps_the_others_results(tiny_model_dir, tmp_path):
    res = run_cli("sample", "-m", *tiny_sample(tiny_model_dir), "run_name=sweep",
                  f"model.pretrained={tiny_model_dir},{tmp_path / 'missing'}", cwd=tmp_path)
    assert res.returncode != 0  # the multirun reports the failure
    sweep = tmp_path / "outputs" / "sample" / "multiruns" / "sweep"
    ok, failed = summary_rows(sweep)
    assert ok["model.pretrained"] == str(tiny_model_dir) and ok["status"] == "completed"
    assert ok["metrics/num_samples"] == "1" and float(ok["seconds"]) > 0  # metrics.json next to the overrides
    assert failed["status"] == "failed" and "missing" in failed["error"] and failed["seconds"] == ""
    assert "| job | status | model.pretrained |" in (sweep / "summary.md").read_text()


def test_submitit_local_sweep(tiny_model_dir, tmp_path):
    res = run_cli("sample", "-m", "hydra/launcher=submitit_local", *tiny_sample(tiny_model_dir), "seed=0,1",
                  "run_name=sweep", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = tmp_path / "outputs" / "sample" / "multiruns" / "sweep"
    rows = summary_rows(sweep)
    assert [(r["seed"], r["status"], r["metrics/num_samples"]) for r in rows] == [("0", "completed", "1"),
                                                                                  ("1", "completed", "1")]
    assert (sweep / "1" / "grid.png").is_file() and list((sweep / ".submitit").iterdir())


@pytest.mark.parametrize("config, overrides, lines", [
    ("train", ["+experiment=ddpm_synthetic", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"],
     ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4"]),
    ("sample", ["method=ddim"], ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1"]),
])
def test_slurm_sbatch_script(config, overrides, lines, tmp_path, monkeypatch):
    import submitit
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    local = tmp_path / "site" / "local"  # stands in for the git-ignored conf/local/slurm.yaml
    local.mkdir(parents=True)
    (local / "slurm.yaml").write_text("partition: gpu\naccount: acme\ntimeout_min: 30\nsetup: [module load cuda]\n")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config, [*overrides, "hydra/launcher=slurm", f"hydra.searchpath=[file://{local.parent}]",
                                     f"paths.root_dir={tmp_path}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    # what hydra-submitit-launcher hands to submitit, rendered by submitit's own sbatch writer without submitting
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", staticmethod(lambda: 2))
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path, slurm_max_num_timeout=params["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("_target_", "submitit_folder", "max_num_timeout")})
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in [*lines, "--time=30", "--partition=gpu", "--account=acme", "--signal=USR2@120"]:
        assert f"#SBATCH {line}\n" in script, line
    assert "\nmodule load cuda\n" in script and params["max_num_timeout"] > 0


def test_optuna_search_composes(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", ["+experiment=ddpm_synthetic", "hparams_search=ddpm_optuna",
                                      f"paths.root_dir={ROOT}"], return_hydra_config=True)
    assert "OptunaSweeper" in cfg.hydra.sweeper._target_ and cfg.optimized_metric == "val/loss"
    assert set(cfg.hydra.sweeper.params) == {"model.lr", "model.warmup_steps", "model.ema_decay"}
