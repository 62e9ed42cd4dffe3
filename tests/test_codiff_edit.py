"""method=codiff_edit: Imagic-style stages on tiny random latent models, the fine-tuned UNet cache, the fixed start code,
α selection and the refusals of bad input."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_codiff import export_stages, tiny_latent_model, tiny_vae

from conftest import compose, run_cli
from facelab.diffusion import blend
from facelab.diffusion.tuning import eps_loss, fine_tune, load_tuned, optimise_embedding, tunable_copy, tuned_weights
from facelab.evaluators import caption_flips, choose_alpha
from facelab.io.errors import InputError
from facelab.io.images import save_image, save_mask
from facelab.io.tuned import TunedCache
from facelab.methods.codiff_edit import Options
from facelab.models.latent import LatentModel
from facelab.sample import run_sample
from facelab.sources import SyntheticSource, synthetic_edit

CAPTION = "This woman is smiling. She has blond hair."
TINY = ["sampler.steps=2", "progress=false", "method.stage1_num_iter=2", "method.stage2_num_iter=2",
        "method.classifier=null", "method.eval_classifier=null", "method.parser=null", "method.alpha_list=[0,1]",
        "method.lora.num_iter=2"]


def tiny_model(modality: str, vae, seed: int) -> LatentModel:
    """A random 16 px latent model whose text encoder reads the synthetic captions (up to 96 tokens)."""
    return tiny_latent_model(modality, vae, seed, max_length=96)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("codiff_edit")
    folders = export_stages(root, max_length=96)  # the text encoder reads the synthetic captions (up to 96 tokens)
    faces = root / "faces"
    torch.manual_seed(0)
    save_image(torch.rand(3, 16, 16) * 2 - 1, faces / "a.png")
    mask = torch.zeros(16, 16, dtype=torch.long)
    mask[3:13, 4:12] = 1
    mask[9:11, 6:10] = 11
    save_mask(mask, root / "mask.png", style="palette")
    return {**folders, "faces": faces, "mask": root / "mask.png"}


def edit_run(stages, tmp_path, name: str, *extra: str, mode: str = "imagic") -> dict:
    return run_sample(compose("sample", ["method=codiff_edit", f"model.pretrained={stages['codiff']}", *TINY,
                                         f"method.cache={tmp_path / 'cache'}", f"mode={mode}", *extra], tmp_path / name))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


# --- stages 1 and 2 --------------------------------------------------------------------------------------------------
def test_a_lora_adapter_starts_from_the_generator_not_the_global_rng():
    model = tiny_model("text", tiny_vae(), 1)

    def adapter(global_seed: int) -> dict:
        torch.manual_seed(global_seed)  # what peft would draw from
        unet = tunable_copy(model, "lora", 2, torch.Generator().manual_seed(3))
        return {k: v.clone() for k, v in tuned_weights(unet, "lora").items()}

    first, second = adapter(0), adapter(1)
    a = [k for k in first if "lora_A" in k]
    assert a and all(torch.equal(first[k], second[k]) for k in first)
    assert all(first[k].abs().max() <= first[k][0].numel() ** -0.5 for k in a)  # peft's U(±1/√fan_in)


def test_stage1_fits_the_embedding_and_stage2_the_unet_full_or_lora():
    model = tiny_model("text", tiny_vae(), 1)
    z0 = torch.randn(1, 3, 8, 8)
    e_init, attention = (v for v in model.condition([CAPTION]).values())

    def loss(unet, e):  # the same 16 draws for every candidate
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            return float(sum(eps_loss(unet, model.schedule, z0, e, attention, g) for _ in range(16)))

    e_opt = optimise_embedding(model, z0, e_init, attention, 1e-2, 60, torch.Generator().manual_seed(0))
    assert loss(model.unet, e_opt) < loss(model.unet, e_init)
    assert not any(p.requires_grad for p in model.parameters())  # the base model stays frozen
    base = {k: v.clone() for k, v in model.unet.state_dict().items()}
    for stage2, lr in (("full", 1e-3), ("lora", 1e-2)):
        opts = Options(**{**OPTIONS, "stage2": stage2, "lora": {"rank": 2, "lr": lr, "num_iter": 60},
                          "stage2_lr": lr, "stage2_num_iter": 60})
        unet = fine_tune(tunable_copy(model, stage2, 2), model.schedule, z0, e_opt, attention, *opts.stage2_fit(),
                         torch.Generator().manual_seed(1))
        assert loss(unet, e_opt) < loss(model.unet, e_opt)
        assert all(torch.equal(v, base[k]) for k, v in model.unet.state_dict().items())
        weights = tuned_weights(unet, stage2)
        assert all("lora" in k for k in weights) if stage2 == "lora" else len(weights) == len(base)
        again = load_tuned(model, weights, stage2, 2)  # what the cache reloads gives the same ε
        z, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
        with torch.no_grad():
            assert torch.allclose(again(z, t, e_opt.expand(2, -1, -1)).sample, unet(z, t, e_opt.expand(2, -1, -1)).sample,
                                  atol=1e-6)


OPTIONS = dict(name="codiff_edit", mode="imagic", stage2="full", edit=None, mask=None, text=None, gt_path=None,
               modalities=None, faces={"seed": 0, "start": 900000}, stage1_lr=1e-3, stage1_num_iter=2, stage2_lr=1e-6,
               stage2_num_iter=2, lora={"rank": 2, "lr": 1e-4, "num_iter": None}, alpha_list=[0, 1], alpha="auto",
               x_T=None, cache=None, classifier=None, eval_classifier=None, parser=None)


def test_choose_alpha_is_the_smallest_that_reaches_the_target():
    alphas = [0.0, 0.5, 1.0, 1.5]
    p = {"Smiling": torch.tensor([0.1, 0.6, 0.9, 0.9]), "Eyeglasses": torch.tensor([0.2, 0.4, 0.7, 0.3])}
    assert choose_alpha(alphas, p) == (2, "reached")
    assert choose_alpha(alphas, {"Smiling": torch.tensor([0.1, 0.3, 0.45, 0.2])}) == (2, "not reached")
    assert choose_alpha(alphas, {}) == (2, "no attribute to check")


def test_caption_flips_score_only_what_the_input_lacks():
    class Reader:  # an evaluator reading fixed labels: inputs first, then edits
        def __init__(self):
            self.calls = 0

        def evaluate(self, images):
            self.calls += 1
            smiling = [1, 1] if self.calls == 1 else [0, 0]  # edits (read first), inputs
            return {"labels": {"Smiling": torch.tensor(smiling), "Male": torch.tensor([0, 1])}}

    captions = ["This woman is smiling.", "This woman is smiling."]
    scores = caption_flips(Reader(), torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), captions)
    # both lacked the smile and show it; face 1 also reads as a man on input and edit: its edit misses "woman"
    assert scores == {"flip_rate": 0.5, "faces_to_flip": 2, "caption_preservation": 1.0}


# --- the pipeline ------------------------------------------------------------------------------------------------------
def test_collaborative_edit_caches_the_tuned_unets_and_reuses_them(stages, tmp_path):
    first = edit_run(stages, tmp_path, "first", "num_samples=1", "method.edit=Smiling")
    assert first["modalities"] == ["mask", "text"] and first["tuning"]["faces_tuned"] == 1
    assert len(first["cache_files_written"]) == 2  # one fine-tuned UNet per modality, safetensors
    # stage 1 and 2: 2 + 2 forwards of each UNet; stage 3: 2 steps × (2 UNets + 2 dynamic diffusers) for the α batch
    assert first["tuning"]["network_calls_per_face"] == 8
    assert first["edits"]["Smiling"]["sampling_network_calls_per_edit"] == 8
    out = tmp_path / "first"
    face = "face900000"
    assert {p.name for p in (out / "edits" / face).iterdir()} == {"Smiling_alpha=0.png", "Smiling_alpha=1.png"}
    assert (out / "counterfactuals" / f"{face}_Smiling.png").is_file()
    assert (out / "embeddings" / f"{face}_Smiling.safetensors").is_file()
    assert f"{face}_Smiling.png" in (out / "index.html").read_text()
    # a second edit of the face: other α and another target; stages 1-2 skipped, the same start code
    second = edit_run(stages, tmp_path, "second", "num_samples=1", "method.edit=[Eyeglasses,Smiling]",
                      "method.alpha_list=[0,0.5,1]")
    assert second["tuning"] == {**second["tuning"], "faces_tuned": 0, "unets_from_cache": 2, "network_calls_per_face": 0}
    assert second["cache_files_written"] == []
    for alpha in ("0", "1"):  # reproducible: the cached UNets, the fixed start code and noise of this face
        same = [pixels(tmp_path / run / "edits" / face / f"Smiling_alpha={alpha}.png") for run in ("first", "second")]
        assert np.array_equal(*same)
    assert not np.array_equal(pixels(out / "edits" / face / "Smiling_alpha=0.png"),
                              pixels(out / "edits" / face / "Smiling_alpha=1.png"))
    # another seed: other training draws (so its own cache entry) and another start code
    third = edit_run(stages, tmp_path, "third", "num_samples=1", "method.edit=Smiling", "seed=1")
    assert third["tuning"]["faces_tuned"] == 1 and third["settings"]["seed"] == 1
    assert not np.array_equal(pixels(tmp_path / "third" / "edits" / face / "Smiling_alpha=0.png"),
                              pixels(out / "edits" / face / "Smiling_alpha=0.png"))


def test_no_tuning_equals_codiff_sampling_from_the_same_start_code(stages, tmp_path):
    """With 0 iterations e_opt = e_tgt and the UNets are the base ones: every α is method=codiff's own sample from the
    same x_T (η = 0): an independent check of stage 3, of the start code actually used and of the targets."""
    np.save(tmp_path / "x_T.npy", np.random.default_rng(0).standard_normal((3, 8, 8)).astype(np.float32))
    common = [f"x_T={tmp_path / 'x_T.npy'}", f"mask={stages['mask']}", f"text={CAPTION}", "sampler.eta=0"]
    edit_run(stages, tmp_path, "edit", f"gt_path={stages['faces']}", "method.stage1_num_iter=0",
             "method.stage2_num_iter=0", *common)
    run_sample(compose("sample", ["method=codiff", f"model.pretrained={stages['codiff']}", "num_samples=1",
                                  "sampler.steps=2", "progress=false", *common], tmp_path / "codiff"))
    reference = pixels(next((tmp_path / "codiff" / "samples").rglob("000000_x_0.png")))
    for alpha in ("0", "1"):
        assert np.array_equal(pixels(tmp_path / "edit" / "edits" / "a" / f"custom_alpha={alpha}.png"), reference)


@pytest.mark.parametrize("preset", [["method.stage2=lora"], ["mode=invert"], ["method.modalities=[text]"]])
def test_fast_paths_and_one_modality_alone(stages, tmp_path, preset):
    mode = "invert" if preset == ["mode=invert"] else "imagic"
    metrics = edit_run(stages, tmp_path, "run", "num_samples=1", "method.edit=Smiling", *preset[mode == "invert":],
                       mode=mode)
    entry = metrics["edits"]["Smiling"]
    assert entry["faces"] == 1 and entry["psnr"] is not None
    if preset == ["mode=invert"]:  # the inversion (2 calls of 2 UNets + 2 diffusers) counts as part of the edit
        assert metrics["tuning"]["faces_tuned"] == 0 and metrics["cache_files_written"] == []
        assert entry["network_calls_per_edit"] == 16 and metrics["eta"] == 0
    elif preset == ["method.modalities=[text]"]:
        assert metrics["modalities"] == ["text"] and metrics["reweight"]["reweight"] == "average"
        assert entry["sampling_network_calls_per_edit"] == 2
    else:
        assert metrics["settings"]["stage2"] == "lora"
        assert all(".text." in p or ".mask." in p for p in metrics["cache_files_written"])


# --- bad input -------------------------------------------------------------------------------------------------------
def test_bad_input_is_one_line_and_writes_nothing(stages, tmp_path):
    big = tmp_path / "big"
    save_image(torch.zeros(3, 20, 20), big / "b.png")
    labels = np.zeros((16, 16), np.uint8)
    labels[4:8, 4:8] = 19
    Image.fromarray(labels).save(tmp_path / "m19.png")
    for i, (extra, expected) in enumerate((
            ([f"gt_path={big}", f"text={CAPTION}"], "20x20 px, the model needs 16x16"),
            ([f"gt_path={stages['faces']}", f"mask={tmp_path / 'm19.png'}"], "19 classes"),
            ([f"gt_path={stages['faces']}", "text=' '"], "caption is empty"),
            (["method.alpha_list=[0,5]"], "α=5.0 is outside [-1, 3]"),
            ([f"gt_path={stages['faces']}"], "give the edit's target"),
            (["method.edit=Smile"], "method.edit=Smile: not an attribute"),
            (["method.blend=paste"], "method.blend=paste: use one of auto, none, region"),
            (["method.blend=region", "method.region.auto=decoded", "method.alpha_list=[1,2]"], "put 0 in"),
            (["method.blend=region", "method.region.t=1000"], "method.region.t=1000: a timestep in [0, 999]"))):
        run = tmp_path / f"bad{i}"
        with pytest.raises(InputError) as err:
            edit_run(stages, tmp_path, f"bad{i}", *extra)
        assert expected in str(err.value) and "\n" not in str(err.value)
        assert not run.exists() or not any(run.iterdir())
    with pytest.raises(InputError, match="mode=invert starts from the face's inversion"):
        edit_run(stages, tmp_path, "bad_x_T", f"x_T={tmp_path / 'x_T.npy'}", mode="invert")
    assert not (tmp_path / "cache").exists()


def test_a_cache_from_another_face_or_base_model_is_refused(stages, tmp_path):
    args = [f"gt_path={tmp_path / 'faces'}", f"text={CAPTION}"]
    save_image(torch.zeros(3, 16, 16), tmp_path / "faces" / "a.png")
    edit_run(stages, tmp_path, "made", *args)
    save_image(torch.ones(3, 16, 16) * 0.5, tmp_path / "faces" / "a.png", overwrite=True)  # another face, same name
    with pytest.raises(InputError) as err:
        edit_run(stages, tmp_path, "other_face", *args)
    assert "fine-tuned from another face" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "other_face").exists() or not any((tmp_path / "other_face").iterdir())
    cached = next((tmp_path / "cache").glob("a.text.*.safetensors"))
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(cached), "pt") as file:
        meta = file.metadata()
    save_image(torch.zeros(3, 16, 16), tmp_path / "faces" / "a.png", overwrite=True)
    save_file(load_file(str(cached)), str(cached), metadata={**meta, "base_fingerprint": "0" * 64})
    with pytest.raises(InputError, match="fine-tuned from another base model"):
        edit_run(stages, tmp_path, "other_base", *args)
    assert TunedCache  # the cache class is the public name of this format


@pytest.mark.slow  # a fresh interpreter: ~10-30 s of imports
def test_cli_exit_code_2(tmp_path):
    res = run_cli("sample", "method=codiff_edit", "method.alpha_list=[0,9]", f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 2 and "α=9.0 is outside" in res.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_invert_without_own_conditions_uses_the_stage1_embedding(stages, tmp_path):
    metrics = edit_run(stages, tmp_path, "run", f"gt_path={stages['faces']}", f"text={CAPTION}", mode="invert")
    assert metrics["modalities"] == ["text"] and metrics["tuning"]["faces_tuned"] == 1  # stage 1 only, nothing cached
    assert metrics["tuning"]["network_calls_per_face"] == 2 and metrics["cache_files_written"] == []
    assert (tmp_path / "run" / "edits" / "a" / "custom_alpha=1.png").is_file()


# --- blend=region: the input kept outside the edit's region ---------------------------------------------------------
def dilated_by_hand(region: np.ndarray, px: int) -> np.ndarray:
    h, w = region.shape
    return np.array([[region[max(0, y - px):y + px + 1, max(0, x - px):x + px + 1].any() for x in range(w)]
                     for y in range(h)], dtype=bool)


def test_paste_keeps_the_input_exactly_beyond_the_feathered_region():
    g = torch.Generator().manual_seed(0)
    edit, image = torch.rand(2, 3, 20, 20, generator=g), torch.rand(2, 3, 20, 20, generator=g)
    region = torch.zeros(2, 1, 20, 20)
    region[0, 0, 5:8, 6:9], region[1, 0, 12, 3] = 1, 1
    mask = blend.feather(region, 2)
    out = blend.paste(edit, image, mask)
    for b in range(2):
        inside, near = region[b, 0].numpy() > 0, dilated_by_hand(region[b, 0].numpy() > 0, 2)
        assert torch.equal(out[b][:, ~torch.from_numpy(near)], image[b][:, ~torch.from_numpy(near)])  # bit for bit
        assert torch.equal(out[b][:, torch.from_numpy(inside)], edit[b][:, torch.from_numpy(inside)])
        ring = near & ~inside  # chessboard distance 1 or 2: weights 2/3 and 1/3 of the edit
        one = dilated_by_hand(inside, 1) & ~inside
        for where, w in ((one, 2 / 3), (ring & ~one, 1 / 3)):
            cells = torch.from_numpy(where)
            assert torch.allclose(out[b][:, cells], w * edit[b][:, cells] + (1 - w) * image[b][:, cells], atol=1e-6)


def test_a_caption_region_is_where_the_condition_moves_the_noise_prediction():
    """A denoiser whose ε depends on the caption tokens only in one patch: DiffEdit's region is that patch."""
    patch = torch.zeros(1, 1, 8, 8)
    patch[..., 2:4, 5:7] = 1

    class Toy:
        calls = 0

        def __call__(self, z, t, cond):
            self.calls += 1
            return z + cond[0]["encoder_hidden_states"].mean(dim=(1, 2)).view(-1, 1, 1, 1) * patch

    toy, schedule = Toy(), tiny_model("text", tiny_vae(), 1).schedule
    target, source = (torch.ones(1, 4, 6), torch.ones(1, 4)), (torch.zeros(1, 4, 6), torch.ones(1, 4))
    difference = blend.noise_region(toy, schedule, torch.randn(1, 3, 8, 8), [target], [source], 500, 3,
                                    torch.Generator().manual_seed(0))
    assert toy.calls == 1 and torch.allclose(difference, patch)  # |1 − 0| in the patch for every draw
    region = blend.binary(difference, (16, 16), 0.5)[0, 0]
    assert region.sum() > 0  # non-empty and inside the patch at image scale (rows 4-7, columns 10-13)
    assert region[:3].sum() == 0 and region[9:].sum() == 0 and region[:, :9].sum() == 0 and region[:, 14:].sum() == 0
    assert region[5:7, 11:13].all()
    same = blend.noise_region(toy, schedule, torch.randn(1, 3, 8, 8), [source], [source], 500, 3,
                              torch.Generator().manual_seed(0))
    assert blend.binary(same, (16, 16), 0.5).sum() == 0  # an unchanged caption: no region
    images = torch.zeros(2, 3, 16, 16)
    images[1, :, 4:6, 7:9] = 0.5  # decoded: only where the α = 1 image moved from the α = 0 one
    moved = blend.binary(blend.decoded_region(images, images[:1]), (16, 16), 0.5)
    assert moved[0].sum() == 0 and torch.equal(moved[1, 0] > 0, images[1, 0] > 0)


def test_blend_region_of_a_mask_edit_is_the_dilated_label_difference(stages, tmp_path):
    """With region.auto=null and no feather the paste mask is the label difference dilated by 2 px (computed here by
    hand), and the edit keeps the input's pixels bit for bit outside it."""
    metrics = edit_run(stages, tmp_path, "run", "num_samples=1", "method.edit=Mouth_Slightly_Open", "method.blend=region",
                       "method.region.auto=null", "method.region.feather=0", "method.region.dilate=2", mode="invert")
    assert metrics["blend"] == "region" and metrics["region"]["auto"] is None
    inputs = SyntheticSource(1).load(16)
    own, target = inputs.label_maps[0].numpy(), synthetic_edit(inputs.faces, 0, "Mouth_Slightly_Open").targets["mask"]
    expected = dilated_by_hand(own != target.numpy(), 2)
    assert 0 < expected.mean() < 0.5
    out, face = tmp_path / "run", "face900000"
    region = pixels(out / "regions" / f"{face}_Mouth_Slightly_Open.png")
    assert np.array_equal(region[..., 0] > 127, expected) and set(np.unique(region)) <= {0, 255}
    assert metrics["edits"]["Mouth_Slightly_Open"]["region_area"] == pytest.approx(expected.mean())
    source = pixels(out / "inputs" / f"{face}.png")
    for alpha in ("0", "1"):
        edited = pixels(out / "edits" / face / f"Mouth_Slightly_Open_alpha={alpha}.png")
        assert np.array_equal(edited[~expected], source[~expected])


def test_blend_none_is_the_unblended_edit(stages, tmp_path):
    """blend=region with a region covering everything (threshold 0 of the decoded difference, dilated over the whole
    image) gives blend=none's pixels: the paste adds nothing else; its `unblended` scores are blend=none's."""
    plain = edit_run(stages, tmp_path, "plain", "num_samples=1", "method.edit=Smiling", "method.blend=none",
                     mode="invert")
    everywhere = edit_run(stages, tmp_path, "all", "num_samples=1", "method.edit=Smiling", "method.blend=region",
                          "method.region.labels=false", "method.region.auto=decoded", "method.region.threshold=0",
                          "method.region.dilate=16", mode="invert")
    assert plain["blend"] == "none" and plain["region"] is None and plain["edits"]["Smiling"]["region_area"] is None
    assert everywhere["edits"]["Smiling"]["region_area"] == 1.0
    unblended = everywhere["edits"]["Smiling"]["unblended"]  # a blend run scores blend=none's images too
    assert {k: unblended[k] for k in ("psnr", "ssim", "alphas")} == {k: plain["edits"]["Smiling"][k] for k in
                                                                     ("psnr", "ssim", "alphas")}
    face = "face900000"
    assert np.array_equal(pixels(tmp_path / "plain" / "edits" / face / "Smiling_alpha=1.png"),
                          pixels(tmp_path / "all" / "edits" / face / "Smiling_alpha=1.png"))
