import json

import pytest
import torch
from diffusers import UNet2DModel
from omegaconf import OmegaConf

from conftest import TINY_UNET, compose, run_cli
from facelab.data.synthetic import SEG, SEG_CLASSES
from facelab.diffusion import DDIM, Denoiser, DPMSolverPP2M, Schedule, hspace, sample
from facelab.directions import discover as maths
from facelab.directions.files import Directions
from facelab.directions.regions import parser_labels, region_classes, region_mask
from facelab.directions.trajectory import run_trajectory, seed_noise
from facelab.guidance.hedit import HEdit
from facelab.io.errors import InputError
from facelab.models.classifier import AttributeClassifier
from facelab.models.parser import FaceParser, ParserNet

SCHEDULE = Schedule.from_config({"num_train_timesteps": 1000, "beta_schedule": "linear"})


@pytest.fixture(scope="module")
def denoiser():
    torch.manual_seed(0)
    return Denoiser(UNet2DModel(**TINY_UNET).eval(), SCHEDULE)


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clf")
    AttributeClassifier(["Male", "Smiling", "Young"], {"skin_tone": 3}, channels=(8, 16), image_size=16).export(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_eval_classifier(tmp_path_factory):
    """Another classifier with the same heads: the held-out evaluator of the supervised runs."""
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("eval")
    AttributeClassifier(["Male", "Smiling", "Young"], {"skin_tone": 3}, channels=(8, 16), image_size=16).export(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_parser(tmp_path_factory):
    """An exported 8 px parser (the model makes 16 px) whose output bias makes every pixel `mouth`."""
    parser = FaceParser(channels=(8, 16), image_size=8)
    with torch.no_grad():
        parser.net.out.bias[SEG["mouth"]] = 100.0
    return parser.export(tmp_path_factory.mktemp("parser"))


def test_pca_matches_svd_reference():
    torch.manual_seed(0)
    hs = torch.randn(30, 3, 2, 4, 4) * torch.linspace(3, 0.1, 32).reshape(1, 1, 2, 4, 4)
    basis, std, ratio = maths.pca_per_t(hs, 4)
    for i in range(3):
        x = hs[:, i].reshape(30, -1)
        _, s, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
        cos = (basis[:, i].reshape(4, -1) * vh[:4]).sum(1).abs()
        torch.testing.assert_close(cos, torch.ones(4), atol=1e-4, rtol=0)
        torch.testing.assert_close(std[:, i], s[:4] / 29 ** 0.5, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ratio[:, i], s[:4] ** 2 / (s ** 2).sum(), atol=1e-5, rtol=1e-4)
    # signs: positive first coordinate at the first step, every step aligned with it
    assert (basis[:, 0].reshape(4, -1)[:, 0] > 0).all()
    assert ((basis * basis[:, :1]).flatten(2).sum(-1) >= 0).all()


def test_projection_is_exact_and_keeps_orthogonal_parts():
    torch.manual_seed(1)
    conditions, primal = torch.randn(3, 4, 5), torch.randn(4, 5)
    projected = maths.project_out(primal, conditions)
    q, _ = torch.linalg.qr(conditions.reshape(3, -1).T.double())  # independent: projector I − QQᵀ
    expected = primal.reshape(-1).double() - q @ (q.T @ primal.reshape(-1).double())
    torch.testing.assert_close(projected.reshape(-1).double(), expected, atol=1e-5, rtol=0)
    assert (conditions.reshape(3, -1) @ projected.reshape(-1)).abs().max() < 1e-4
    orthogonal = projected.clone()
    torch.testing.assert_close(maths.project_out(orthogonal, conditions), orthogonal, atol=1e-5, rtol=0)


def test_supervised_is_top_minus_bottom_mean():
    hs = torch.arange(6.0).reshape(6, 1, 1).repeat(1, 2, 3)
    scores = torch.tensor([0.1, 0.9, 0.5, 0.8, 0.0, 0.3])
    diff, pos, neg = maths.supervised(hs, scores, 2)
    assert sorted(pos.tolist()) == [1, 3] and sorted(neg.tolist()) == [0, 4]
    torch.testing.assert_close(diff, torch.full((2, 3), (1 + 3) / 2 - (0 + 4) / 2))
    with pytest.raises(ValueError, match="num_examples"):
        maths.supervised(hs, scores, 4)


def test_seed_noise_depends_only_on_the_seed():
    a_T, a_z = seed_noise([3, 4], (3, 8, 8), 5, "cpu")
    b_T, b_z = seed_noise([4], (3, 8, 8), 5, "cpu")
    torch.testing.assert_close(a_T[1], b_T[0])
    torch.testing.assert_close(a_z[:, 1], b_z[:, 0])
    assert not torch.allclose(a_T[0], a_z[0, 0])  # x_T and z come from independent streams


def test_hedit_adds_delta_in_the_window_only(denoiser):
    grid = [900, 600, 300, 0]
    x_T, noises = seed_noise([0, 1], (3, 16, 16), len(grid), "cpu")
    plain = run_trajectory(denoiser, x_T, noises, DDIM(eta=1.0, clip=False), timesteps=grid)
    same = sample(denoiser, SCHEDULE, x_T, grid, sampler=DDIM(eta=1.0, clip=False), noises=noises, progress=False)
    torch.testing.assert_close(plain.x0, same)  # recording h changes nothing
    h_shape = plain.hs.shape[2:]
    delta = {600: torch.randn(h_shape)}
    edit = HEdit(delta, torch.tensor([0.0, 2.0]), record=True)
    edited = run_trajectory(denoiser, x_T, noises, DDIM(eta=1.0, clip=False), edit=edit, timesteps=grid)
    torch.testing.assert_close(edited.x0[0], plain.x0[0])      # scale 0 reproduces the source
    assert not torch.allclose(edited.x0[1], plain.x0[1])
    torch.testing.assert_close(edited.hs[:, :2], plain.hs[:, :2])  # steps before 600 are untouched


def test_asymmetric_step_uses_the_unedited_eps_for_the_direction(denoiser):
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    delta = {500: torch.randn(16, 8, 8)}
    edit = HEdit(delta, 3.0, asymmetric=True)
    got = sample(denoiser, SCHEDULE, x, [500], guidance=[edit], progress=False)
    with torch.no_grad():
        plain_eps = denoiser(x, 500)
        from facelab.diffusion import hspace
        with hspace(denoiser.unet, edit=lambda h: h + 3.0 * delta[500]):
            edited_eps = denoiser(x, 500)
    expected = SCHEDULE.ddim_step(x, 500, -1, edited_eps, 0.0, eps_direction=plain_eps)
    torch.testing.assert_close(got, expected)


def test_direction_file_roundtrip_and_checks(tmp_path):
    basis, scale = torch.randn(2, 3, 4, 2, 2), torch.rand(2, 3)
    d = Directions(basis, scale, [900, 500, 0], {"fingerprint": "abc", "h_space": "after", "model": "m"},
                   {"explained_variance": torch.rand(2, 3)})
    path = d.save(tmp_path / "d.safetensors")
    with pytest.raises(InputError, match="never overwritten"):
        d.save(path)
    e = Directions.load(path)
    torch.testing.assert_close(e.basis, basis)
    assert e.timesteps == [900, 500, 0] and set(e.extras) == {"explained_variance"}
    delta = e.delta(1, t_idx=1, global_at_idx=True, window=0)
    assert list(delta) == [500]
    torch.testing.assert_close(delta[500], basis[1, 1] * scale[1, 1])
    e.check("abc", "after", [900, 500, 0])
    with pytest.raises(InputError, match="rediscover"):
        e.check("xyz", "after", [900, 500, 0])
    with pytest.raises(InputError, match="h_space=after"):
        e.check("abc", "before", [900, 500, 0])
    with pytest.raises(InputError, match="sampler.steps=3"):
        e.check("abc", "after", [900, 0])
    with pytest.raises(InputError, match="index=5"):
        e.delta(5)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(InputError, match="not a safetensors"):
        Directions.load(tmp_path / "junk.safetensors")


TINY = ["sampler.steps=3", "method.edit_seeds=2", "batch_size=4", "progress=false", "method.eval_classifier=null"]


def test_cli_pca_discover_then_apply(tmp_path, tiny_model_dir):
    run = tmp_path / "pca"
    result = run_cli("sample", "method=directions", "discover=pca", "num_samples=6", f"model.pretrained={tiny_model_dir}",
                     *TINY, "num_directions=2", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["indices"] == [0, 1] and len(metrics["explained_variance"]) == 5
    assert (run / "grid_seed0.png").is_file() and len(list((run / "edits").glob("seed0_*.png"))) == 10
    assert list((tmp_path / "outputs" / "cache" / "directions").glob("index_*.safetensors"))
    applied = tmp_path / "apply"
    result = run_cli("sample", "method=directions", f"apply={run / 'directions.safetensors'}", "index=[1]",
                     "scales=[-1,1]", f"model.pretrained={tiny_model_dir}", *TINY, f"hydra.run.dir={applied}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (applied / "edits").glob("seed1_*")) == ["seed1_1_-1.png", "seed1_1_1.png"]
    # the same file on another grid is refused with a fix
    result = run_cli("sample", "method=directions", f"apply={run / 'directions.safetensors'}", "sampler.steps=4",
                     f"model.pretrained={tiny_model_dir}", *TINY[1:], f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert result.returncode == 2 and "sampler.steps=3" in result.stderr and "Traceback" not in result.stderr


def test_cli_supervised_conditional_and_real_images(tmp_path, tiny_model_dir, tiny_classifier, tiny_eval_classifier):
    run = tmp_path / "cond"
    common = [f"model.pretrained={tiny_model_dir}", *TINY, f"method.classifier={tiny_classifier}",
              "method.idx_size=8", "method.num_examples=2"]
    result = run_cli("sample", "method=directions", "discover=conditional", "attribute=Smiling", "condition=[Male]",
                     *common, f"method.eval_classifier={tiny_eval_classifier}", "method.input=synthetic",
                     "method.inversion=edit_friendly", "scales=[0,1]", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 < metrics["kept_norm_fraction"] <= 1
    assert metrics["reconstruction_psnr"] > 35  # scale 0 reproduces the inverted face
    assert set(metrics["edits"]["0"]["1"]) == {"Male", "Smiling", "Young"}
    d = Directions.load(run / "directions.safetensors")
    assert d.meta["params"]["condition"] == ["Male"] and len(d) == 2


def test_region_mask_from_parser_is_the_union_of_the_region_classes():
    names = [["mouth", "u_lip", "skin", "l_eye"], ["l_lip", "hair", "r_eye", "background"],
             ["nose", "mouth", "l_brow", "hair"], ["neck", "cloth", "r_brow", "skin"]]
    parser = ParserNet((8,), image_size=4, classes=SEG_CLASSES[::-1])  # numbered unlike the ground truth
    own = torch.tensor([[parser.classes.index(n) for n in row] for row in names])
    parser.forward = lambda x: torch.nn.functional.one_hot(own, 19).permute(2, 0, 1)[None].float()  # set logits
    labels = parser_labels(parser, torch.zeros(3, 4, 4))
    assert labels.tolist() == [[SEG[n] for n in row] for row in names]  # renumbered as the ground truth
    for region, wanted in [("mouth", {"mouth", "u_lip", "l_lip"}), (["eye", "hair"], {"l_eye", "r_eye", "hair"}),
                           ("brow", {"l_brow", "r_brow"}), ("skin", {"skin"})]:
        mask = region_mask(labels, region_classes(region), region, "parser:stub", "seed7")
        expected = torch.tensor([[[float(n in wanted) for n in row] for row in names]])
        assert torch.equal(mask, expected), region
    with pytest.raises(InputError, match="region=eyeglasses: parser:stub finds no such pixels on seed7"):
        region_mask(labels, region_classes("eyeglasses"), "eyeglasses", "parser:stub", "seed7")
    with pytest.raises(InputError, match="region=nostril: unknown"):
        region_classes(["mouth", "nostril"])
    assert region_classes(None) is None


@pytest.mark.parametrize("solver", ["krylov", "golub_kahan"])
def test_cli_jacobian_region_on_samples_uses_the_parser(tmp_path, tiny_model_dir, tiny_parser, solver):
    run = tmp_path / "jac"
    result = run_cli("sample", "method=directions", "discover=jacobian", "region=mouth", f"method.parser={tiny_parser}",
                     "method.num_eigvecs=2", "method.max_iters=3", "num_directions=1", "scales=[0,1]",
                     f"method.jacobian_solver={solver}",
                     f"model.pretrained={tiny_model_dir}", *TINY, f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    d = Directions.load(run / "directions.safetensors")
    assert d.meta["params"]["mask"] == f"parser:{tiny_parser}" and d.meta["params"]["source"] == "seed0"
    assert json.loads((run / "metrics.json").read_text())["mask"] == f"parser:{tiny_parser}"
    assert (run / "masked_source.png").is_file()


@pytest.mark.parametrize("overrides, message", [
    (["discover=pca", "scales=[a,b]"], "give numbers"),
    (["discover=jacobian", "region=nostril", "method.input=synthetic"], "region=nostril"),
    (["discover=jacobian", "region=mouth", "method.parser=null"], "label maps"),
    (["discover=supervised", "attribute=Laughing"], "Laughing"),
    (["discover=conditional", "attribute=Smiling", "condition=[Laughing]"], "condition=[Laughing]: the classifier"),
    (["apply=missing.safetensors", "index=1.5"], "index=1.5: give direction numbers"),
    (["discover=umap"], "discover=umap"),
    (["discover=jacobian", "method.jacobian_solver=lanczos"], "method.jacobian_solver=lanczos: use one of krylov"),
])
def test_bad_input(tmp_path, tiny_model_dir, tiny_classifier, overrides, message):
    """In process (the CLI's one-line exit 2 for the same errors: test_cli_bad_input_exits_2_in_one_line)."""
    from facelab.sample import run_sample

    out = tmp_path / "run"
    cfg = compose("sample", ["method=directions", *overrides, f"model.pretrained={tiny_model_dir}", *TINY,
                             f"method.classifier={tiny_classifier}", "method.idx_size=8", "method.num_examples=2"], out)
    with pytest.raises(InputError) as err:
        run_sample(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not list(out.rglob("*.png")) and not list(out.rglob("*.safetensors"))


def test_cli_bad_input_exits_2_in_one_line(tmp_path, tiny_model_dir):
    result = run_cli("sample", "method=directions", f"model.pretrained={tiny_model_dir}", *TINY,
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and "needs discover=" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_wrong_image_size(tmp_path, tiny_model_dir):
    from facelab.io.images import save_image
    from facelab.sample import run_sample

    save_image(torch.zeros(3, 32, 32), tmp_path / "faces" / "a.png")
    cfg = compose("sample", ["method=directions", "discover=pca", "method.input=images", f"gt_path={tmp_path / 'faces'}",
                             f"model.pretrained={tiny_model_dir}", *TINY], tmp_path / "run")
    with pytest.raises(InputError, match="32x32 px, the model needs 16x16"):
        run_sample(cfg)


@pytest.mark.slow  # the full-width 113M-parameter UNet: ~30 s on 2 cores (tests/test_resolution.py runs 256 px fast)


def test_celebahq_256_architecture_from_a_local_folder(tmp_path):
    """The real google/ddpm-celebahq-256 architecture (random weights) as a diffusers folder: h is 512×8×8."""
    import shutil

    from test_hspace import FIXTURE
    folder = tmp_path / "celebahq"
    config = json.loads((FIXTURE / "unet" / "config.json").read_text())
    UNet2DModel.from_config(config).save_pretrained(folder / "unet")
    shutil.copytree(FIXTURE / "scheduler", folder / "scheduler")
    run = tmp_path / "run"
    result = run_cli("sample", "method=directions", "discover=pca", "num_samples=2", "batch_size=2", "sampler.steps=2",
                     "method.edit_seeds=1", "num_directions=1", "scales=[0,3]", "method.eval_classifier=null",
                     "progress=false", f"model.pretrained={folder}", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    d = Directions.load(run / "directions.safetensors")
    assert d.basis.shape == (1, 2, 512, 8, 8) and d.timesteps == [500, 0]
    assert len(list((run / "edits").glob("seed0_0_*.png"))) == 2


def test_supervised_balanced_takes_half_from_each_group():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.95, 0.2, 0.3, 0.05])
    groups = torch.tensor([True, True, True, True, False, False, False, False])
    hs = torch.arange(8.0).reshape(8, 1, 1)
    _, pos, neg = maths.supervised(hs, scores, 2, groups)
    assert sorted(pos.tolist()) == [0, 4] and sorted(neg.tolist()) == [3, 7]
    with pytest.raises(ValueError, match="per group"):
        maths.supervised(hs, scores, 6, groups)


def test_trajectory_follows_the_sampler_grid_and_records_h_where_asked(denoiser):
    sampler = DDIM(steps=3, eta=1.0, clip=False)
    x_T, noises = seed_noise([0, 1], (3, 16, 16), 3, "cpu")
    recorded = {}
    for where in ("after", "before"):
        traj = run_trajectory(denoiser, x_T, noises, sampler, where=where)
        with hspace(denoiser.unet, where, capture=True) as hs:
            x0 = sample(denoiser, SCHEDULE, x_T, sampler=sampler, noises=noises, progress=False)
        torch.testing.assert_close(traj.x0, x0)
        torch.testing.assert_close(traj.hs, torch.stack(hs, 1))
        recorded[where] = traj.hs
    assert not torch.allclose(recorded["after"], recorded["before"])


def test_samplers_decode_seeds_and_what_cannot_work_is_refused(tmp_path, tiny_model_dir, tiny_classifier):
    from facelab.sample import run_sample

    base = ["method=directions", "discover=pca", "num_samples=4", "batch_size=4", "method.edit_seeds=1",
            "num_directions=1", "scales=[0,2]", "progress=false", "device=cpu", "method.eval_classifier=null",
            f"model.pretrained={tiny_model_dir}", f"paths.cache_dir={tmp_path / 'cache'}"]
    cfg = compose("sample", [*base, "sampler=dpmpp_2m", "sampler.steps=3"], tmp_path / "dpm")
    before = OmegaConf.to_container(cfg)
    metrics = run_sample(cfg)
    assert OmegaConf.to_container(cfg) == before  # the method never writes into its config
    assert metrics["sampler"] == "dpmpp_2m" and metrics["steps"] == 3 and metrics["eta"] is None
    found = Directions.load(tmp_path / "dpm" / "directions.safetensors")
    assert found.timesteps == DPMSolverPP2M(steps=3).timesteps(SCHEDULE) and found.meta["sampler"] == "dpmpp_2m"
    refused = [
        (["sampler=repaint", "sampler.steps=4", "sampler.jump_length=2", "sampler.jump_n_sample=2"], "sampler=repaint"),
        (["sampler=dpmpp_2m", "method.input=synthetic"], "use sampler=ddim, not sampler=dpmpp_2m"),
        (["sampler=ddpm", "sampler.steps=3", "method.asyrp=true"], "needs sampler=ddim, not sampler=ddpm"),
        (["discover=supervised", "attribute=Smiling", f"method.classifier={tiny_classifier}",
          f"method.eval_classifier={tiny_classifier}"], "guidance must not see the evaluator"),
    ]
    for k, (overrides, message) in enumerate(refused):
        with pytest.raises(InputError, match=message):
            run_sample(compose("sample", [*base, *overrides], tmp_path / f"bad{k}"))
        assert not (tmp_path / f"bad{k}" / "metrics.json").exists()
