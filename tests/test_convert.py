"""facelab.convert: the authors' checkpoints → facelab/diffusers folders, checked against the ORIGINAL code.

- guided-diffusion (ADM, RePaint, P2): against openai's own `guided_diffusion.unet.UNetModel`, from the
  guided-diffusion-sdk package (installed --no-deps under .venv/refs, test-only), built with random weights.
- CycleDiff (improved-diffusion UNet + attribute_emb) and ermongroup/ddim `Model` (SDEdit's celeba_hq.ckpt): no package
  carries them, so they are checked against fixtures written by experiments/make_convert_fixtures.py from the
  authors' own source (gongshuai1/CycleDiff diffusion/unet.py, ermongroup/ddim models/diffusion.py): every state-dict
  key with its shape, and the original forward's ε on seeded random weights.
Tolerance: ≤ 1e-4 of the output's max magnitude (measured: ~3e-7, float32 CPU).
"""
from __future__ import annotations

import argparse
import builtins
import functools
import json
import operator
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from facelab.convert import convert_file, ddim, detect_format
from facelab.convert import guided_diffusion as gd
from facelab.convert.__main__ import main
from facelab.convert.reading import Skipped, load_state, restricted_load
from facelab.io.errors import InputError
from facelab.models.pretrained import load_denoiser

REFS = Path(__file__).resolve().parent.parent / ".venv" / "refs"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "convert"
TOL = 1e-4
# small-width guided-diffusion configs covering each option
TINY = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2,2",
        "attention_resolutions": "16,8", "num_heads": 2, "num_head_channels": 16, "use_scale_shift_norm": True,
        "resblock_updown": True, "learn_sigma": True}
VARIANTS = {
    "repaint_like_legacy": TINY,
    "new_attention_order": {**TINY, "use_new_attention_order": True},
    "conv_resample_plain_norm": {**TINY, "resblock_updown": False, "use_scale_shift_norm": False, "learn_sigma": False,
                                 "num_head_channels": -1, "attention_resolutions": "8"},
    "class_cond_adm": {**TINY, "class_cond": True},
}


def original(flags: dict, seed: int = 0):
    sys.path.insert(0, str(REFS))
    try:
        from guided_diffusion.script_util import create_model
    finally:
        sys.path.remove(str(REFS))
    torch.manual_seed(seed)
    model = create_model(**{k: v for k, v in flags.items() if k in gd.DEFAULTS and k not in
                            ("diffusion_steps", "noise_schedule", "rescale_timesteps", "sigma_small",
                             "predict_xstart", "attributes", "attribute_values")}).eval()
    with torch.no_grad():
        for p in model.parameters():  # also fill the zero-initialised output convs
            p.normal_(0, 0.05)
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def seeded_state(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights experiments/make_convert_fixtures.py gave the original model."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shapes[k], generator=g) * 0.1 for k in sorted(shapes)}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_guided_diffusion_matches_original(name):
    flags = VARIANTS[name]
    model = original(flags)
    unet, sched, _ = gd.build(model.state_dict(), flags)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 871])
    kw = {"y": torch.tensor([1, 7])} if flags.get("class_cond") else {}
    with torch.no_grad():
        ref = model(x, t, **kw)
        out = unet(x, t, class_labels=kw.get("y")).sample
    assert out.shape == ref.shape
    assert rel(out[:, :3], ref[:, :3]) <= TOL  # ε
    if flags["learn_sigma"]:
        assert out.shape[1] == 6 and rel(out[:, 3:], ref[:, 3:]) <= TOL  # variance channels
        assert sched["variance_type"] == "learned_range"


def test_wrong_attention_order_is_detectably_wrong():
    """The equivalence test can fail: splitting legacy qkv weights in the new order changes ε."""
    model = original(TINY)
    unet, _, _ = gd.build(model.state_dict(), {**TINY, "use_new_attention_order": True})
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 871])
    with torch.no_grad():
        assert rel(unet(x, t).sample, model(x, t)) > 10 * TOL  # measured ~9e-3 (the right order: ~2e-7)


def test_cyclediff_matches_original_fixture():
    """Against CycleDiff's own UNetModel (attribute_emb, legacy heads, scale-shift) via its recorded output."""
    fixture = json.loads((FIXTURES / "cyclediff_tiny.json").read_text())
    ref = load_file(FIXTURES / "cyclediff_tiny.safetensors")
    flags = {k: v for k, v in fixture["config"].items() if k != "num_attributes"}
    flags.update(attributes=gd.CYCLEDIFF_ATTRIBUTES, rescale_timesteps=True)
    assert {"attribute_emb.0.weight", "attribute_emb.2.weight"} <= set(fixture["shapes"])
    state = seeded_state(fixture["shapes"])
    unet, sched, _ = gd.build(state, flags)
    assert sched["variance_type"] == "fixed_large"
    with torch.no_grad():  # facelab's attribute input is 2y − 1 for the original's y ∈ {0, 1}
        out = unet(ref["x"], ref["t"], class_labels=2 * ref["y"] - 1).sample
    assert rel(out, ref["eps"]) <= TOL


def test_ddim_matches_original_fixture():
    """Against ermongroup/ddim's Model ([sin, cos] embedding, eps 1e-6, pad-then-stride) via its recorded output."""
    fixture = json.loads((FIXTURES / "ddim_tiny.json").read_text())
    ref = load_file(FIXTURES / "ddim_tiny.safetensors")
    shapes = fixture["shapes"]
    assert {"temb.dense.0.weight", "mid.block_1.norm1.weight", "up.2.upsample.conv.weight", "up.0.block.1.conv2.weight",
            "down.0.downsample.conv.weight", "down.1.block.0.nin_shortcut.weight"} <= set(shapes)
    state = seeded_state(shapes)
    assert detect_format(state) == "ddim"
    unet, sched = ddim.build(state, fixture["config"])
    with torch.no_grad():
        out = unet(ref["x"], ref["t"]).sample
    assert rel(out, ref["eps"]) <= TOL
    assert sched["variance_type"] == "fixed_small" and sched["num_train_timesteps"] == 1000


def test_presets_fit_their_architectures():
    """Each preset converts a state dict of the original architecture it names (shape check on the meta device)."""
    for name in ("repaint_celeba256", "p2_celebahq"):
        with torch.device("meta"):
            state = original(gd.PRESETS[name]).state_dict()
        assert gd.fits(state, gd.PRESETS[name]) is None, name
    assert "does not fit" in gd.fits(state, gd.PRESETS["repaint_celeba256"])  # P2's tensors vs RePaint's preset


# --- the CLI, recipe.json, model_index.json ----------------------------------------------------------------------
@pytest.fixture
def gd_file(tmp_path):
    model = original(TINY)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    config = tmp_path / "face.yml"  # RePaint-style confs/*.yml: create_model flags + diffusion flags
    config.write_text("\n".join(f"{k}: {v}" for k, v in {**TINY, "diffusion_steps": 1000,
                                                         "noise_schedule": "linear", "use_fp16": False}.items()))
    return model, path, config


def test_cli_converts_and_facelab_loads_it(gd_file, tmp_path):
    model, path, config = gd_file
    dest = tmp_path / "out"
    assert main([str(path), str(dest), "--config", str(config)]) == 0
    recipe = json.loads((dest / "recipe.json").read_text())
    assert recipe["format"] == "guided_diffusion" and len(recipe["sha256"]) == 64
    assert recipe["schedule"]["variance_type"] == "learned_range" and recipe["schedule"]["num_train_timesteps"] == 1000
    assert recipe["attention_order"] == "legacy"
    assert json.loads((dest / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    denoiser = load_denoiser(str(dest))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 500])
    with torch.no_grad():
        ref = model(x, t)
        assert rel(denoiser(x, t), ref[:, :3]) <= TOL and rel(denoiser.last_variance, ref[:, 3:]) <= TOL


def test_on_the_fly_conversion_is_cached(gd_file, tmp_path, monkeypatch):
    model, path, _ = gd_file
    monkeypatch.setenv("FACELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(gd.PRESETS, "tiny_test", TINY)
    first = load_denoiser(f"tiny_test:{path}")
    (entry,) = (tmp_path / "cache" / "converted").iterdir()
    stamp = (entry / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    second = load_denoiser(str(path))  # no preset: the one that fits is found, under its own cache entry
    again = load_denoiser(f"tiny_test:{path}")
    assert (entry / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp  # reused
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 2
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(first(x, 7), again(x, 7)) and rel(second(x, 7), model(x, torch.tensor([7]))[:, :3]) <= TOL


# --- reading: never running pickled code -------------------------------------------------------------------------
class Reduce:
    """An object whose unpickling calls func(*args), as a malicious checkpoint's; callable itself, so that one Reduce
    can be the function another calls (pickle insists)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __call__(self, *args):
        raise AssertionError("only ever unpickled")


def payloads(marker: Path) -> dict[str, Reduce]:
    """Each creates `marker` when unpickled, through a different route to code."""
    cmd, import_os = f"touch {marker}", Reduce(builtins.__import__, "os")
    return {"posix.system": Reduce(os.system, cmd),
            "builtins.exec": Reduce(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
            "builtins.eval": Reduce(builtins.eval, f"__import__('os').system({cmd!r})"),
            "functools.partial": Reduce(functools.partial(os.system, cmd)),
            "operator.attrgetter": Reduce(Reduce(operator.attrgetter("system"), import_os), cmd),
            "operator.methodcaller": Reduce(operator.methodcaller("system", cmd), import_os),
            "builtins.getattr": Reduce(Reduce(builtins.getattr, import_os, "system"), cmd),
            "subprocess.Popen": Reduce(subprocess.Popen, ["touch", str(marker)])}


@pytest.mark.parametrize("layout", ["zip", "legacy", "pickle"])
@pytest.mark.parametrize("name", list(payloads(Path("x"))))
def test_code_running_pickles_are_refused_and_never_run(name, layout, tmp_path, capsys):
    """torch's zip format (read by the restricted unpickler), its legacy format and a bare pickle: refused with one
    line naming the callable, the payload never runs; unpickled plainly, the same payload does create the marker."""
    marker = tmp_path / "PWNED"
    payload = payloads(marker)[name]
    ckpt = {"state_dict": {"model.w": torch.ones(2)}, "callbacks": {"ModelCheckpoint": payload}, "global_step": 3}
    path = tmp_path / "evil.ckpt"
    if layout == "pickle":
        path.write_bytes(pickle.dumps(ckpt))
    else:
        torch.save(ckpt, path, _use_new_zipfile_serialization=layout == "zip")
    err = _bad(tmp_path, capsys, [str(path)])
    assert "refused" in err and not marker.exists()
    if layout == "zip":
        assert f"the pickle would call {name} when loaded" in err and "runs code" in err
    if layout == "legacy":
        assert "it needs code to load" in err
    assert not tmp_path.joinpath("out").exists() and not marker.exists()
    live = pickle.loads(pickle.dumps(payload))  # the payload is real
    if isinstance(live, subprocess.Popen):
        live.wait()
    assert marker.exists()


def lightning_ckpt(path: Path, ema: bool = True) -> dict:
    """A Lightning / CompVis-style checkpoint built from the real classes: an OrderedDict state_dict of fp16 and fp32
    tensors with LitEma's `model_ema.*` (only its decay and counter when ema=False), the ModelCheckpoint callback's
    state keyed by its class (Lightning 1.4, CompVis) and the callback object itself, AdamW and StepLR states, numpy
    scalars, OmegaConf hyper-parameters, epoch and global_step. Writes it to `path`; returns what was saved."""
    from omegaconf import OmegaConf
    from pytorch_lightning.callbacks import ModelCheckpoint

    g = torch.Generator().manual_seed(0)
    callback = ModelCheckpoint(dirpath=str(path.parent), monitor="val/loss", save_top_k=3, every_n_train_steps=100)
    callback.best_model_score, callback.best_model_path = torch.tensor(0.25), str(path)
    linear = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=1e-4)
    linear(torch.randn(4, 3, generator=g)).sum().backward()
    optimizer.step()
    state = OrderedDict([("model.diffusion_model.out.weight", torch.randn(2, 3, generator=g).half()),
                         ("model.diffusion_model.out.bias", torch.randn(2, generator=g))])
    if ema:
        state.update([("model_ema.diffusion_modeloutweight", torch.randn(2, 3, generator=g).half()),
                      ("model_ema.diffusion_modeloutbias", torch.randn(2, generator=g))])
    state.update([("model_ema.decay", torch.tensor(0.9999)), ("model_ema.num_updates", torch.tensor(7).int())])
    ckpt = {"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.4.2", "state_dict": state,
            "callbacks": {ModelCheckpoint: callback.state_dict(), "object": callback},
            "optimizer_states": [optimizer.state_dict()],
            "lr_schedulers": [torch.optim.lr_scheduler.StepLR(optimizer, 10).state_dict()],
            "scores": [np.float64(0.5), np.int64(3), np.float32(1.5)],
            "hyper_parameters": OmegaConf.create({"base_learning_rate": 1e-4, "channel_mult": [1, 2, 4]})}
    torch.save(ckpt, path)
    return ckpt


def test_lightning_checkpoint_keeps_tensors_and_skips_objects(tmp_path):
    path = tmp_path / "last.ckpt"
    saved = lightning_ckpt(path)
    with pytest.raises(pickle.UnpicklingError):  # torch's own safe loader refuses it...
        torch.load(path, weights_only=True)
    raw = restricted_load(path)  # ...facelab's reads it, nothing imported or called
    assert type(raw["state_dict"]) is OrderedDict and list(raw["state_dict"]) == list(saved["state_dict"])
    for key, value in saved["state_dict"].items():
        assert raw["state_dict"][key].dtype == value.dtype and torch.equal(raw["state_dict"][key], value)
    assert (raw["epoch"], raw["global_step"], raw["pytorch-lightning_version"]) == (3, 1000, "1.4.2")
    exp_avg = saved["optimizer_states"][0]["state"][0]["exp_avg"]
    assert torch.equal(raw["optimizer_states"][0]["state"][0]["exp_avg"], exp_avg)
    assert raw["lr_schedulers"][0]["step_size"] == 10
    (cls, callback_state), = [(k, v) for k, v in raw["callbacks"].items() if k != "object"]
    assert issubclass(cls, Skipped) and cls.name == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert callback_state["monitor"] == "val/loss" and torch.equal(callback_state["best_model_score"], torch.tensor(0.25))
    skipped = [raw["callbacks"]["object"], *raw["scores"], raw["hyper_parameters"]]
    assert all(isinstance(obj, Skipped) for obj in skipped)
    names = [obj.name.replace("numpy._core.", "numpy.core.") for obj in skipped]  # numpy 2 renamed its core
    assert names == [cls.name, *["numpy.core.multiarray.scalar"] * 3, "omegaconf.dictconfig.DictConfig"]
    assert set(load_state(path)) == {"model.diffusion_model.out.weight", "model.diffusion_model.out.bias"}
    ema = load_state(path, ema=True)
    assert torch.equal(ema["model.diffusion_model.out.weight"], saved["state_dict"]["model_ema.diffusion_modeloutweight"])


def test_objects_built_from_a_size_stay_placeholders(tmp_path):
    """bytearray(10**12) would exhaust memory: the restricted unpickler keeps a placeholder and never calls it. (torch's
    weights_only loader, tried first by load_state, does call it: a MemoryError, not code.)"""
    path = tmp_path / "bomb.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "cb": Reduce(bytearray, 10**12), "r": Reduce(range, 10**12)}, path)
    raw = restricted_load(path)
    assert isinstance(raw["cb"], Skipped) and isinstance(raw["r"], Skipped) and torch.equal(raw["state_dict"]["w"],
                                                                                            torch.ones(2))


def test_lightning_views_keep_sharing_their_storage(tmp_path):
    base = torch.arange(12.0)
    path = tmp_path / "views.ckpt"
    torch.save({"state_dict": {"a": base[:6].view(2, 3), "b": base[6:]}, "hparams": argparse.Namespace(lr=1e-4)}, path)
    state = load_state(path)
    assert torch.equal(state["a"], base[:6].view(2, 3)) and torch.equal(state["b"], base[6:])
    assert state["a"].untyped_storage().data_ptr() == state["b"].untyped_storage().data_ptr()


def test_ddim_training_list_and_module_prefix(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save([{"module.a": torch.ones(1)}, {"state": {}}, 3, 100, {"module.a": torch.zeros(1)}], path)
    assert torch.equal(load_state(path)["a"], torch.ones(1)) and torch.equal(load_state(path, ema=True)["a"],
                                                                            torch.zeros(1))


# --- bad input: one line, exit 2, nothing written ----------------------------------------------------------------
def _bad(tmp_path, capsys, args) -> str:
    dest = tmp_path / "out"
    assert main([*args[:1], str(dest), *args[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("facelab: error: ")
    assert not dest.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    return err


def test_bad_inputs_one_line_each(gd_file, tmp_path, capsys):
    _, path, _ = gd_file
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert "empty" in _bad(tmp_path, capsys, [str(empty)])
    truncated = tmp_path / "trunc.safetensors"
    save_file({"w": torch.ones(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    assert "truncated" in _bad(tmp_path, capsys, [str(truncated)])
    unknown = tmp_path / "unknown.pt"
    torch.save({"encoder.layer.0.weight": torch.ones(2)}, unknown)
    assert "unknown checkpoint format" in _bad(tmp_path, capsys, [str(unknown)])
    assert "no EMA weights" in _bad(tmp_path, capsys, [str(path), "--ema"])
    err = _bad(tmp_path, capsys, [str(path), "--config", "repaint_celeba256"])
    assert "repaint_celeba256" in err and "input_blocks.0.0.weight [32, 3, 3, 3]" in err  # first keys and shapes
    assert "preset sdedit_celebahq belongs to format ddim" in _bad(tmp_path, capsys,
                                                                   [str(path), "--config", "sdedit_celebahq"])
    assert "no guided_diffusion preset fits" in _bad(tmp_path, capsys, [str(path)])
    with zipfile.ZipFile(tmp_path / "notorch.pt", "w") as z:
        z.writestr("x.txt", "hello")
    _bad(tmp_path, capsys, [str(tmp_path / "notorch.pt")])


def test_missing_ema_and_a_ddim_preset_of_other_widths(tmp_path, capsys):
    path = tmp_path / "no_ema.ckpt"
    lightning_ckpt(path, ema=False)  # LitEma's decay and counter, but no model_ema.* weights
    assert "has no EMA weights" in _bad(tmp_path, capsys, [str(path), "--ema"])
    fixture = json.loads((FIXTURES / "ddim_tiny.json").read_text())
    torch.save(seeded_state(fixture["shapes"]), tmp_path / "celeba_hq.ckpt")
    err = _bad(tmp_path, capsys, [str(tmp_path / "celeba_hq.ckpt"), "--config", "sdedit_celebahq"])
    assert "conv_in.weight [32, 3, 3, 3] (the config expects [128, 3, 3, 3]" in err
    assert "has no EMA weights" in _bad(tmp_path, capsys, [str(tmp_path / "celeba_hq.ckpt"), "--ema"])


def test_existing_destination_is_never_overwritten(gd_file, tmp_path):
    _, path, config = gd_file
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep")
    with pytest.raises(InputError, match="already exists"):
        convert_file(path, dest, config=config)
    assert (dest / "mine.txt").read_text() == "keep"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["repaint_celeba256", "p2_celebahq"])
def test_full_width_presets_match_original(name):
    """The full RePaint celeba256 / P2 CelebA-HQ architectures, random weights, against the original code."""
    flags = gd.PRESETS[name]
    model = original(flags)
    unet, _, _ = gd.build(model.state_dict(), flags)
    x, t = torch.randn(1, 3, 256, 256), torch.tensor([613])
    with torch.no_grad():
        ref, out = model(x, t), unet(x, t).sample
    assert rel(out[:, :3], ref[:, :3]) <= TOL and rel(out[:, 3:], ref[:, 3:]) <= TOL


# --- model presets (conf/model/ddpm256 etc.) and init_from mismatches -------------------------------------------
def _preset_unet(name: str, *overrides: str) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parent.parent / "facelab" / "conf"
    with initialize_config_dir(str(conf), version_base=None):
        cfg = compose("train", overrides=[f"model={name}", *overrides])
    return OmegaConf.to_container(cfg.model, resolve=True)


def _full(config: dict) -> dict:
    """A UNet2DModel config with every default filled in (without building the model)."""
    import inspect

    from diffusers import UNet2DModel

    defaults = {k: p.default for k, p in inspect.signature(UNet2DModel.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}}


@pytest.mark.parametrize(("preset", "converter"), [
    ("ddpm256", lambda: ddim.unet_config(ddim.PRESETS["sdedit_celebahq"]["model"], 256)),
    ("cyclediff256", lambda: gd.unet_config(gd._flags(gd.PRESETS["cyclediff_celebahq"])))])
def test_model_presets_are_the_converted_architectures(preset, converter):
    """One override gives the architecture of an author's checkpoint, so a converted model fine-tunes (init_from)."""
    ours, theirs = _full(_preset_unet(preset)["unet"]), _full(converter())
    assert {k: ours[k] for k in theirs} == theirs


def test_cyclediff256_is_one_override():
    model = _preset_unet("cyclediff256", "+experiment=cyclediff_ddpm", "model.init_from=null")
    assert model["unet"]["sample_size"] == 256 and len(model["attributes"]) == 17


def test_init_from_mismatch_names_keys_and_the_fix(tmp_path):
    from facelab.models.ddpm import PixelDDPM

    small = {"sample_size": 16, "layers_per_block": 1, "block_out_channels": [32, 32],
             "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
             "norm_num_groups": 8, "attention_head_dim": 8}
    PixelDDPM(unet=small, scheduler={}).export(tmp_path / "small")
    with pytest.raises(InputError) as err:
        PixelDDPM(unet={**small, "block_out_channels": [64, 64]}, scheduler={}, init_from=str(tmp_path / "small"))
    message = str(err.value)
    assert "conv_in.weight [32, 3, 3, 3] vs the config's [64, 3, 3, 3]" in message
    assert "set model.unet.block_out_channels" in message and len(message.splitlines()) == 1
    PixelDDPM(unet=small, scheduler={}, attributes=["Male"]).export(tmp_path / "conditional")
    with pytest.raises(InputError, match=r"not in the configured model: class_embedding.*set model.attributes"):
        PixelDDPM(unet=small, scheduler={}, init_from=str(tmp_path / "conditional"))


# --- hostile model folders: one line each --------------------------------------------------------------------------
def _break(folder: Path, how: str) -> None:
    weights, config = folder / "unet" / "diffusion_pytorch_model.safetensors", folder / "unet" / "config.json"
    if how == "zero-byte weights":
        weights.write_bytes(b"")
    elif how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif how == "missing weights":
        weights.unlink()
    elif how == "config of another architecture":
        config.write_text(json.dumps({**json.loads(config.read_text()), "block_out_channels": [64, 64, 96, 128]}))
    elif how == "config of another class":
        config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "AutoencoderKL"}))
    elif how == "broken config":
        config.write_text("{oops")


@pytest.mark.parametrize(("how", "expected"), [
    ("zero-byte weights", "the file is empty"), ("truncated weights", "truncated or corrupt"),
    ("missing weights", "no weights file diffusion_pytorch_model.safetensors"),
    ("config of another architecture", "conv_in.weight [32, 3, 3, 3] vs the config's [64, 3, 3, 3]"),
    ("config of another class", "unsupported model class AutoencoderKL"), ("broken config", "not valid JSON")])
def test_hostile_model_folders_one_line(tmp_path, how, expected):
    import shutil

    from facelab.models.pretrained import ZOO_DIR

    folder = tmp_path / "model"
    shutil.copytree(ZOO_DIR / "ddpm64", folder)
    _break(folder, how)
    with pytest.raises(InputError) as err:
        load_denoiser(str(folder))
    assert expected in str(err.value) and len(str(err.value).splitlines()) == 1


def test_module_entry_point_exit_code(tmp_path):
    import subprocess

    unknown = tmp_path / "unknown.pt"
    torch.save({"encoder.layer.0.weight": torch.ones(2)}, unknown)
    run = subprocess.run([sys.executable, "-m", "facelab.convert", str(unknown), str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 2 and run.stderr.strip().startswith("facelab: error: ") and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_ddim_cli_with_the_originals_yaml_from_safetensors(tmp_path):
    """SDEdit-style: a state dict (here .safetensors) + the original's configs/*.yml layout (data/model/diffusion)."""
    import yaml

    fixture = json.loads((FIXTURES / "ddim_tiny.json").read_text())
    ref = load_file(FIXTURES / "ddim_tiny.safetensors")
    save_file(seeded_state(fixture["shapes"]), tmp_path / "celeba_hq.safetensors")
    (tmp_path / "celeba.yml").write_text(yaml.safe_dump(fixture["config"]))
    assert main([str(tmp_path / "celeba_hq.safetensors"), str(tmp_path / "out"), "--config",
                 str(tmp_path / "celeba.yml")]) == 0
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert recipe["format"] == "ddim" and recipe["schedule"]["variance_type"] == "fixed_small"
    with torch.no_grad():
        assert rel(load_denoiser(str(tmp_path / "out"))(ref["x"], ref["t"]), ref["eps"]) <= TOL
